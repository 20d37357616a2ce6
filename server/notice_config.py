"""The notices file (issue 22): webhook endpoints, forecast thresholds and retry timing.

Given by the ``notices`` setting (``--notices PATH``); without it notices are still written
to the outbox and listed (``ListNotices``), but none is delivered. Example::

    [thresholds]            # optional; the defaults are shown
    plan_low_days = 7       # plan_low: projected use-up within this many days ...
    plan_low_percent = 10   # ... or fewer units left than this share of the plan
    forfeit_ahead_days = 7  # forfeit_ahead: expiry within this many days, units left

    [delivery]              # optional
    retry_first_s = 10      # the first retry's ceiling; each next one doubles (full jitter)

    [[webhook]]
    name = "billing"
    url = "https://hooks.example.com/quota-ledger"
    secret_env = "BILLING_HOOK_SECRET"   # or: secret = "..." (at least 16 characters)
    accounts = []                        # empty: every account

Anything wrong stops the server at start with one line saying what (:class:`NoticeConfig`).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field

from ledger.errors import InvalidArgument
from ledger.notices import Thresholds

from .webhook import RETRY_FIRST_S, Endpoint, endpoint_problems

RETRY_FIRST_S_MIN = 0.1  # a test's receiver can come back quickly; production keeps 10 s
RETRY_FIRST_S_MAX = 3_600.0
WEBHOOKS_MAX = 32


@dataclass(frozen=True)
class NoticeConfig:
    endpoints: tuple[Endpoint, ...] = ()
    thresholds: Thresholds = field(default_factory=Thresholds)
    retry_first_s: float = RETRY_FIRST_S


def load(path: str | None, *, insecure: bool = False,
         env: Mapping[str, str] | None = None) -> NoticeConfig:
    """Read and check the file; raises InvalidArgument with the first problem, in one line."""
    if path is None:
        return NoticeConfig()
    env = os.environ if env is None else env
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument(f"notices file {path}: {exc}") from None
    unknown = set(doc) - {"thresholds", "delivery", "webhook"}
    if unknown:
        raise InvalidArgument(f"notices file {path}: unknown tables {', '.join(sorted(unknown))}")
    limits = _table(path, doc, "thresholds", {"plan_low_days", "plan_low_percent",
                                              "forfeit_ahead_days"})
    if any(not isinstance(v, int) or isinstance(v, bool) for v in limits.values()):
        raise InvalidArgument(f"notices file {path}: thresholds are whole numbers")
    thresholds = Thresholds(**limits)
    if problems := thresholds.problems():
        raise InvalidArgument(f"notices file {path}: thresholds: {problems[0]}")
    delivery = _table(path, doc, "delivery", {"retry_first_s"})
    retry = delivery.get("retry_first_s", RETRY_FIRST_S)
    if not isinstance(retry, (int, float)) or isinstance(retry, bool) \
            or not RETRY_FIRST_S_MIN <= retry <= RETRY_FIRST_S_MAX:
        raise InvalidArgument(f"notices file {path}: delivery.retry_first_s must be "
                              f"{RETRY_FIRST_S_MIN}..{RETRY_FIRST_S_MAX:g} seconds")
    hooks = doc.get("webhook", [])
    if not isinstance(hooks, list) or len(hooks) > WEBHOOKS_MAX:
        raise InvalidArgument(f"notices file {path}: [[webhook]] is a list of at most "
                              f"{WEBHOOKS_MAX} tables")
    endpoints = tuple(_endpoint(path, i, h, env) for i, h in enumerate(hooks))
    names = [e.name for e in endpoints]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"notices file {path}: two webhooks share a name")
    for e in endpoints:
        if problems := endpoint_problems(e, insecure):
            raise InvalidArgument(f"notices file {path}: {problems[0]}")
    return NoticeConfig(endpoints, thresholds, float(retry))


def _table(path: str, doc: dict, name: str, keys: set[str]) -> dict:
    table = doc.get(name, {})
    if not isinstance(table, dict):
        raise InvalidArgument(f"notices file {path}: [{name}] is a table")
    if unknown := set(table) - keys:
        raise InvalidArgument(f"notices file {path}: [{name}] has unknown keys "
                              f"{', '.join(sorted(unknown))}")
    return table


def _endpoint(path: str, i: int, h: object, env: Mapping[str, str]) -> Endpoint:
    where = f"notices file {path}: webhook #{i + 1}"
    if not isinstance(h, dict):
        raise InvalidArgument(f"{where} is not a table")
    if unknown := set(h) - {"name", "url", "secret", "secret_env", "accounts"}:
        raise InvalidArgument(f"{where} has unknown keys {', '.join(sorted(unknown))}")
    name, url = h.get("name") or f"webhook-{i + 1}", h.get("url")
    if not isinstance(name, str) or not isinstance(url, str):
        raise InvalidArgument(f"{where}: name and url are text; url is required")
    if "secret_env" in h:
        secret = env.get(str(h["secret_env"]), "")
        if not secret:
            raise InvalidArgument(f"{where}: the environment variable {h['secret_env']} "
                                  "holding its secret is not set")
    else:
        secret = h.get("secret", "")
    accounts = h.get("accounts", [])
    if not isinstance(secret, str) or not isinstance(accounts, list) \
            or not all(isinstance(a, str) and a for a in accounts):
        raise InvalidArgument(f"{where}: secret is text and accounts a list of account ids")
    return Endpoint(name, url, secret, tuple(accounts))
