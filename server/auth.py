"""Bearer-token authentication and role-based authorisation.

The tokens file (TOML) keeps only SHA-256 hashes of tokens; a token itself is shown once,
when ``quota-ledger token create`` makes it, and never logged:

    [[token]]
    name = "edge-eu-1"
    sha256 = "9f2c..."
    role = "consumer"          # consumer | reader | admin
    accounts = ["acme"]        # optional: only these accounts

Roles: ``consumer`` may call the Consume RPCs, ``reader`` the queries, ``admin`` everything.
A token limited to accounts may only name those accounts; calls that name no account (or
that act on all of them, like SettleDay) are refused to it, except the harmless
ListPlanSpecs and GetTime; ListAccounts answers such a token with only its own accounts.
Health checks and reflection need no token.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ledger.errors import InvalidArgument, PermissionDenied, Unauthenticated

ROLES = ("consumer", "reader", "admin")
TOKEN_PREFIX = "qlt_"
CONSUMER_METHODS = frozenset({"QuotaLedger/Consume", "QuotaLedger/ConsumeBatch",
                              "QuotaLedger/ConsumeStream"})
READER_METHODS = frozenset({
    "QuotaLedger/GetRemaining", "QuotaLedger/ListPlans", "QuotaLedger/GetUsage",
    "Accounts/GetAccount", "Accounts/ListAccounts", "Accounts/ListPlanSpecs",
    "Accounts/GetRunway", "Accounts/ListNotices",
    "Settlement/GetBill",
    "Settlement/ListBills", "TestClock/GetTime"})
# ListAccounts names no account; a token limited to accounts is answered with only those.
ACCOUNTLESS_OK = frozenset({"Accounts/ListPlanSpecs", "Accounts/ListAccounts",
                            "TestClock/GetTime"})


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    accounts: frozenset[str] | None  # None: every account

    def may_call(self, method: str) -> bool:
        if self.role == "admin":
            return True
        allowed = CONSUMER_METHODS if self.role == "consumer" else READER_METHODS
        return method in allowed


ANONYMOUS_ADMIN = Principal("anonymous", "admin", None)


class Authorizer:
    """Maps the ``authorization`` metadata of a call to a principal and checks it."""

    def __init__(self, principals_by_hash: dict[str, Principal] | None) -> None:
        self._by_hash = principals_by_hash  # None: authentication off (loopback only)

    @property
    def enabled(self) -> bool:
        return self._by_hash is not None

    @classmethod
    def from_file(cls, path: str | None) -> Authorizer:
        if path is None:
            return cls(None)
        return cls(load_tokens(path))

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        if self._by_hash is None:
            return ANONYMOUS_ADMIN
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(header, str) or not header.startswith("Bearer "):
            raise Unauthenticated("this server needs a bearer token: send metadata "
                                  "'authorization: Bearer <token>'")
        digest = hash_token(header[len("Bearer "):].strip())
        for known, principal in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return principal
        raise Unauthenticated("unknown token", reason="TOKEN_UNKNOWN")

    def authorize(self, principal: Principal, method: str, account_ids: Iterable[str]) -> None:
        self.check_role(principal, method)
        self.check_accounts(principal, method, account_ids)

    @staticmethod
    def check_role(principal: Principal, method: str) -> None:
        if not principal.may_call(method):
            raise PermissionDenied(
                f"token {principal.name!r} has role {principal.role!r}, which may not call "
                f"{method}", reason="ROLE_DENIED")

    @staticmethod
    def check_accounts(principal: Principal, method: str, account_ids: Iterable[str]) -> None:
        if principal.accounts is None:
            return
        ids = list(account_ids)
        if not ids and method not in ACCOUNTLESS_OK:
            raise PermissionDenied(
                f"token {principal.name!r} is limited to some accounts and {method} is not "
                "limited to one account", reason="ACCOUNT_DENIED")
        for account_id in ids:
            if account_id not in principal.accounts:
                raise PermissionDenied(
                    f"token {principal.name!r} may not act on account {account_id!r}",
                    reason="ACCOUNT_DENIED", account_id=account_id)


def load_tokens(path: str) -> dict[str, Principal]:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    out: dict[str, Principal] = {}
    for i, raw in enumerate(data.get("token", [])):
        name, digest, role = raw.get("name"), raw.get("sha256"), raw.get("role")
        if not name or not isinstance(digest, str) or len(digest) != 64 or role not in ROLES:
            raise InvalidArgument(f"{path}: token #{i + 1} needs name, sha256 (64 hex) and a "
                                  f"role among {', '.join(ROLES)}")
        accounts = raw.get("accounts")
        out[digest] = Principal(name, role, frozenset(accounts) if accounts else None)
    return out


def create_token(path: str, name: str, role: str, accounts: list[str]) -> str:
    """Append a new token's hash to the file and return the token (shown once)."""
    if role not in ROLES:
        raise InvalidArgument(f"role must be one of {', '.join(ROLES)}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    line = [f'\n[[token]]\nname = "{_toml_str(name)}"\nsha256 = "{hash_token(token)}"\n'
            f'role = "{role}"\n']
    if accounts:
        line.append("accounts = [" + ", ".join(f'"{_toml_str(a)}"' for a in accounts) + "]\n")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write("".join(line))
    load_tokens(path)  # the file must still parse
    return token


def _toml_str(s: str) -> str:
    if any(c in s for c in '"\\\n') or not s.isprintable():
        raise InvalidArgument(f"{s!r}: use printable characters without quotes or backslashes")
    return s


def is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")
