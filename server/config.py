"""The server's configuration: one TOML file, environment variables over it, flags over both.

Precedence (lowest first): built-in default, the ``[server]`` table of the TOML file given by
``--config`` or ``QUOTA_LEDGER_CONFIG``, ``QUOTA_LEDGER_<NAME>`` environment variables, flags.
Every setting is listed in :data:`SETTINGS` with its unit; ``quota-ledger config show`` and
``quota-ledger serve --help`` print the effective values.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ledger.errors import InvalidArgument
from ledger.store.urls import URL_SCHEMES, is_pg_url, mask_url

from .cpus import parse_cpus

ENV_PREFIX = "QUOTA_LEDGER_"
CONFIG_ENV = "QUOTA_LEDGER_CONFIG"


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    db: str = "data/ledger.db"
    catalog: str | None = None
    test_clock: bool = False
    metrics_listen: str | None = None
    tokens: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    insecure: bool = False
    log_level: str = "info"
    log_format: str = "text"
    grace_s: float = 5.0
    queue_depth_max: int = 10_000
    group_requests_max: int = 4_096
    slow_commit_ms: float = 100.0
    metrics_top_accounts: int = 0
    notices: str | None = None
    front_cpus: str | None = None


@dataclass(frozen=True)
class Setting:
    name: str
    unit: str
    help: str
    choices: tuple[str, ...] | None = None


SETTINGS: tuple[Setting, ...] = (
    Setting("listen", "HOST:PORT", "Address to serve gRPC on (port 0: any free port)."),
    Setting("db", "path or URL", "SQLite journal file (created with its folder if missing), "
            "or postgresql://USER@HOST:PORT/DBNAME shared by several nodes (PG* environment "
            "variables fill in what the URL leaves out)."),
    Setting("catalog", "path", "TOML plan catalog replacing the built-in one."),
    Setting("test_clock", "flag", "Serve the TestClock service; time moves only when told to."),
    Setting("metrics_listen", "HOST:PORT", "Serve Prometheus metrics over HTTP (off if unset)."),
    Setting("tokens", "path", "TOML file of bearer-token hashes and roles; enables auth."),
    Setting("tls_cert", "path", "PEM certificate: serve TLS."),
    Setting("tls_key", "path", "PEM private key of tls_cert."),
    Setting("tls_client_ca", "path", "PEM CA: require client certificates (mutual TLS)."),
    Setting("insecure", "flag", "Allow a non-loopback listener without authentication."),
    Setting("log_level", "level", "Least severe log level written.",
            ("debug", "info", "warning", "error")),
    Setting("log_format", "format", "text for a terminal, json for one object per line.",
            ("text", "json")),
    Setting("grace_s", "seconds", "How long SIGTERM lets in-flight calls finish."),
    Setting("queue_depth_max", "submissions", "Writer queue bound; beyond it calls get "
            "RESOURCE_EXHAUSTED at once."),
    Setting("group_requests_max", "requests", "Most requests committed in one transaction."),
    Setting("slow_commit_ms", "milliseconds", "Commits slower than this are logged."),
    Setting("metrics_top_accounts", "accounts", "Export units remaining for this many accounts "
            "with the most (0: off; keeps label cardinality bounded)."),
    Setting("notices", "path", "TOML file of webhook endpoints and notice thresholds "
            "(docs/notices.md); notices are listed either way, delivered only with it."),
    Setting("front_cpus", "CPU list", "Linux: run the event loop and gRPC's threads on these "
            "CPUs only (1, or 0-1,3); the writer's thread keeps them all. A lone call then "
            "stays on one CPU (docs/operations.md). Unset: no change."),
)
_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}
assert {s.name for s in SETTINGS} == set(_FIELDS), "every setting documented, once"


_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def check_db_path(value: str, source: str = "--db") -> str:
    """--db is an SQLite file path or a ``postgresql://`` URL (issue 11). Anything else
    shaped like a URL is refused with a reason, never opened: sqlite3 would create a file
    named after it (see TRAPS)."""
    if not value:
        raise InvalidArgument(f"{source}: db must be a file path or a postgresql:// URL")
    if _URL_LIKE.match(value):
        scheme = value.split(":", 1)[0].lower()
        if scheme in URL_SCHEMES:
            if not value.lower().startswith(f"{scheme}://"):
                raise InvalidArgument(f"{source}: a PostgreSQL URL starts with {scheme}://, "
                                      "for example postgresql://ledger@127.0.0.1:5432/ledger")
            return value
        raise InvalidArgument(f"{source}: {scheme!r} is not a storage this server knows; "
                              "give an SQLite file path (data/ledger.db) or a "
                              "postgresql://USER@HOST:PORT/DBNAME URL")
    return value


def shown_db(value: str) -> str:
    """The db setting as logs and ``config show`` print it: a URL's password masked."""
    return mask_url(value) if is_pg_url(value) else value


def default(name: str) -> Any:
    return _FIELDS[name].default


def _kind(name: str) -> type:
    d = default(name)
    if name in ("listen", "db", "log_level", "log_format") or d is None:
        return str
    return type(d)


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = _kind(name)
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError(value)
                value = lowered in ("1", "true", "yes", "on")
            if not isinstance(value, bool):
                raise ValueError(value)
        elif kind is int:
            value = int(value)
        elif kind is float:
            value = float(value)
        else:
            value = str(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{source}: {name} must be a {kind.__name__}; got {value!r}"
                              ) from None
    if name == "db":
        check_db_path(value, source)
    if name == "front_cpus":
        parse_cpus(value, source)
    choices = next(s.choices for s in SETTINGS if s.name == name)
    if choices and value not in choices:
        raise InvalidArgument(f"{source}: {name} must be one of {', '.join(choices)}")
    if kind in (int, float) and value <= 0 and not (name == "metrics_top_accounts" and value == 0):
        raise InvalidArgument(f"{source}: {name} must be positive")
    return value


def load(path: str | None = None, env: Mapping[str, str] | None = None,
         flags: Mapping[str, Any] | None = None) -> ServerConfig:
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = path or env.get(CONFIG_ENV)
    if path:
        with open(path, "rb") as f:
            table = tomllib.load(f).get("server", {})
        unknown = set(table) - set(_FIELDS)
        if unknown:
            raise InvalidArgument(f"{path}: unknown settings {', '.join(sorted(unknown))}")
        values.update({k: _coerce(k, v, path) for k, v in table.items()})
    for name in _FIELDS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _coerce(name, raw, ENV_PREFIX + name.upper())
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, "--" + name.replace("_", "-"))
    return ServerConfig(**values)


def to_toml(cfg: ServerConfig) -> str:
    """The effective configuration as a commented TOML file that ``--config`` accepts."""
    lines = ["[server]"]
    for s in SETTINGS:
        value = getattr(cfg, s.name)
        lines.append(f"# {s.help} ({s.unit}; default {default(s.name)!r}; "
                     f"env {ENV_PREFIX}{s.name.upper()})")
        if value is None:
            lines.append(f"# {s.name} =")
        elif isinstance(value, bool):
            lines.append(f"{s.name} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{s.name} = {value}")
        else:
            lines.append(f'{s.name} = "{shown_db(value) if s.name == "db" else value}"')
    return "\n".join(lines) + "\n"
