"""Webhook endpoints, signatures and retry timing (issue 22), without any I/O.

A delivery is an HTTP POST of the notice's JSON. It carries the header
``Quota-Ledger-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``, keyed
with the endpoint's secret, in the manner of the payment platforms. A receiver recomputes
the HMAC over the raw body, compares in constant time, and refuses a timestamp too far
from its own clock (``SIGNATURE_TOLERANCE_S``), which stops replays: ``verify`` below.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import random
from dataclasses import dataclass
from urllib.parse import urlsplit

SIGNATURE_HEADER = "Quota-Ledger-Signature"
SIGNATURE_TOLERANCE_S = 300
RETRY_FIRST_S = 10  # the first retry waits about this long; each next one twice as long
RETRY_DELAY_MAX_S = 3_600  # no wait between two attempts is longer
RETRY_WINDOW_S = 24 * 3_600  # after this long since the notice, it is marked failed
SECRET_LEN_MIN = 16
ENDPOINT_URL_LEN_MAX = 2_048


def signature(secret: str, timestamp_s: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp_s}.".encode() + body, hashlib.sha256)
    return f"t={timestamp_s},v1={mac.hexdigest()}"


def verify(secret: str, header: str, body: bytes, now_s: int,
           tolerance_s: int = SIGNATURE_TOLERANCE_S) -> bool:
    """What a receiver does (the docs show the same in a few lines)."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        t = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now_s - t) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, t, body), f"t={t},v1={fields.get('v1', '')}")


def retry_delay_s(attempts: int, rng: random.Random, first_s: float = RETRY_FIRST_S) -> float:
    """Exponential backoff with full jitter: after the n-th failed attempt, a wait drawn
    from [0, min(RETRY_DELAY_MAX_S, first_s * 2**(n-1))]."""
    ceiling = min(RETRY_DELAY_MAX_S, first_s * 2 ** min(max(attempts - 1, 0), 20))
    return rng.uniform(0, ceiling)


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    url: str
    secret: str
    accounts: tuple[str, ...] = ()  # empty: every account

    def wants(self, account_id: str) -> bool:
        return not self.accounts or account_id in self.accounts


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_problems(e: Endpoint, insecure: bool) -> list[str]:
    """What is wrong with an endpoint, each in one line (empty when it is usable)."""
    out = []
    parts = urlsplit(e.url)
    if len(e.url) > ENDPOINT_URL_LEN_MAX or parts.scheme not in ("http", "https") \
            or not parts.hostname:
        out.append(f"webhook {e.name!r}: {e.url[:80]!r} is not an http(s) URL")
    elif parts.scheme == "http" and not is_loopback_host(parts.hostname) and not insecure:
        out.append(f"webhook {e.name!r}: {e.url!r} is not loopback, so it needs https:// "
                   "(or --insecure)")
    if len(e.secret) < SECRET_LEN_MIN:
        out.append(f"webhook {e.name!r}: its secret is missing or shorter than "
                   f"{SECRET_LEN_MIN} characters")
    return out
