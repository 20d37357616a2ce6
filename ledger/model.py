"""Domain types: enums that mirror the wire numbers, commands, plan state, and input checks.

Commands are plain frozen dataclasses (``Consume``, built once per request on the hot path,
is a hashable slots dataclass that nothing mutates); ``server/`` builds them from protos and
``ledger/`` never sees a proto. Every check of caller input lives here, so each transport
gets the same messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import TypeVar

from .errors import InvalidArgument
from .money import Region

E = TypeVar("E", bound=IntEnum)

# Named limits (STYLE: a limit on everything, passed explicitly).
REQUEST_ID_LEN_MAX = 128
ACCOUNT_ID_LEN_MAX = 64
DISPLAY_NAME_LEN_MAX = 200
SCENARIO_ID_LEN_MAX = 64
SCENARIOS_PER_ACCOUNT_MAX = 1_000
REASON_LEN_MAX = 500
QUANTITY_MAX = 1_000_000
AMOUNT_MICROS_MAX = 10**15  # USD 1 billion in one top-up
BALANCE_MICROS_MAX = 10**17  # USD 100 billion held, cash and vouchers together (int64-safe)
BATCH_SIZE_MAX = 1_000


class CaptchaType(IntEnum):
    SLIDER = 1
    PUZZLE = 2
    ONE_CLICK = 3
    IMAGE_RESTORATION = 4
    INVISIBLE = 5


class Architecture(IntEnum):
    V2 = 1
    V3 = 2


class Step(IntEnum):
    STEP_3 = 1
    STEP_4_1 = 2


class Validity(IntEnum):
    ONE_MONTH = 1
    ONE_YEAR = 2

    @property
    def months(self) -> int:
        return 1 if self is Validity.ONE_MONTH else 12


class PlanStatus(IntEnum):
    ACTIVE = 1
    EXHAUSTED = 2
    EXPIRED = 3
    REFUNDED = 4


class AccountStatus(IntEnum):
    ACTIVE = 1
    OVERDUE = 2
    SUSPENDED = 3


class FundsKind(IntEnum):
    CASH = 1
    VOUCHER = 2


_ALL_TYPES = frozenset(CaptchaType)
_VISIBLE_TYPES = _ALL_TYPES - {CaptchaType.INVISIBLE}
# R3: (architecture, captcha type) -> billable steps.
BILLABLE_STEPS: dict[tuple[Architecture, CaptchaType], frozenset[Step]] = {
    **{(Architecture.V2, t): frozenset({Step.STEP_3}) for t in _ALL_TYPES},
    **{(Architecture.V3, t): frozenset({Step.STEP_3}) for t in _VISIBLE_TYPES},
    (Architecture.V3, CaptchaType.INVISIBLE): frozenset({Step.STEP_3, Step.STEP_4_1}),
}


_BILLABLE = frozenset((a, t, s) for (a, t), steps in BILLABLE_STEPS.items() for s in steps)


def is_billable(arch: Architecture, ctype: CaptchaType, step: Step) -> bool:
    """R3 (R4: the outcome of the verification is not an input at all)."""
    return (arch, ctype, step) in _BILLABLE


# ---------------------------------------------------------------------------- input checks


def parse_enum(cls: type[E], value: int, field_name: str) -> E:
    """*_UNSPECIFIED (0) and numbers the contract does not know are refused."""
    member = cls._value2member_map_.get(value)  # type: ignore[attr-defined]  # no exception
    if member is None:
        names = ", ".join(m.name for m in cls)
        raise InvalidArgument(
            f"{field_name} must be one of {names}; got {value}"
            + (" (unspecified)" if value == 0 else " (unknown value)")
        )
    return member


def check_text(value: str, field_name: str, max_len: int, *, allow_empty: bool = False) -> str:
    """Printable ASCII only (0x20..0x7E), bounded length."""
    if not value:
        if allow_empty:
            return value
        raise InvalidArgument(f"{field_name} is required")
    if len(value) > max_len:
        raise InvalidArgument(f"{field_name} is {len(value)} characters long; at most {max_len}")
    if not value.isascii() or not value.isprintable():
        raise InvalidArgument(f"{field_name} must be printable ASCII (no control characters)")
    return value


def check_id(value: str, field_name: str, max_len: int = ACCOUNT_ID_LEN_MAX) -> str:
    if 0 < len(value) <= max_len and value.isascii() and value.isprintable() and " " not in value:
        return value  # the common case, checked at once (printable ASCII: only " " strips)
    check_text(value, field_name, max_len)
    if value != value.strip() or " " in value:
        raise InvalidArgument(f"{field_name} {value!r} must not contain spaces")
    return value


def check_request_id(value: str) -> str:
    if 0 < len(value) <= REQUEST_ID_LEN_MAX and value.isascii() and value.isprintable():
        return value  # the common case, checked at once
    return check_text(value, "request_id", REQUEST_ID_LEN_MAX)


def check_quantity(value: int) -> int:
    """R5: 0 means 1; at most QUANTITY_MAX."""
    if value == 0:
        return 1
    if value < 0 or value > QUANTITY_MAX:
        raise InvalidArgument(f"quantity must be between 1 and {QUANTITY_MAX:,}; got {value}")
    return value


def check_amount(value: int, field_name: str = "amount_micros") -> int:
    if value <= 0 or value > AMOUNT_MICROS_MAX:
        raise InvalidArgument(
            f"{field_name} must be a positive whole number of micro-USD at most "
            f"{AMOUNT_MICROS_MAX:,}; got {value}"
        )
    return value


# ---------------------------------------------------------------------------- commands


@dataclass(slots=True, unsafe_hash=True)
class Consume:
    """Not frozen only for speed: a frozen dataclass sets each field through
    ``object.__setattr__`` (about 3 us of the ~9 us a request cost to validate); hashable
    as before, and treated as immutable (``dataclasses.replace`` makes a changed copy)."""

    account_id: str
    request_id: str
    region: Region
    captcha_type: CaptchaType
    architecture: Architecture
    step: Step
    scenario_id: str | None = None
    quantity: int = 1
    dry_run: bool = False
    client_timestamp_us: int | None = None

    @property
    def billable(self) -> bool:
        return is_billable(self.architecture, self.captcha_type, self.step)

    def fingerprint(self) -> str:
        """R12: what makes two requests with one key 'the same content'."""
        return consume_fingerprint(self.region, self.captcha_type, self.architecture,
                                   self.step, self.scenario_id, self.quantity)


def consume_fingerprint(region: int, captcha_type: int, architecture: int, step: int,
                        scenario_id: str | None, quantity: int) -> str:
    """R12 content of a Consume, from its fields (also as a journal block stores them)."""
    return f"{region:d}|{captcha_type:d}|{architecture:d}|{step:d}|{scenario_id or ''}|{quantity}"


@dataclass(frozen=True, slots=True)
class CreateAccount:
    account_id: str
    display_name: str = ""


@dataclass(frozen=True, slots=True)
class TopUp:
    account_id: str
    request_id: str
    kind: FundsKind
    amount_micros: int

    def fingerprint(self) -> str:
        return f"{int(self.kind)}|{self.amount_micros}"


@dataclass(frozen=True, slots=True)
class UpdateFeatures:
    account_id: str
    request_id: str
    scenario_ids: tuple[str, ...]
    custom_policy_enabled: bool

    def fingerprint(self) -> str:
        return f"{','.join(sorted(self.scenario_ids))}|{int(self.custom_policy_enabled)}"


@dataclass(frozen=True, slots=True)
class PurchasePlan:
    account_id: str
    request_id: str
    spec_id: str

    def fingerprint(self) -> str:
        return self.spec_id


@dataclass(frozen=True, slots=True)
class RefundPlan:
    plan_id: str
    request_id: str
    reason: str = ""

    def fingerprint(self) -> str:
        return self.plan_id


@dataclass(frozen=True, slots=True)
class Reactivate:
    account_id: str
    request_id: str

    def fingerprint(self) -> str:
        return ""


@dataclass(frozen=True, slots=True)
class SettleDay:
    billing_day: str


@dataclass(frozen=True, slots=True)
class AdvanceClock:
    """Test clock only: move to ``to_us`` and run everything that falls due on the way."""

    to_us: int


@dataclass(frozen=True, slots=True)
class PlanSpec:
    spec_id: str
    units: int
    validity: Validity
    price_micros: int


# ---------------------------------------------------------------------------- state


@dataclass(slots=True)
class PlanState:
    plan_id: str
    account_id: str
    spec_id: str
    units_total: int
    units_remaining: int
    price_micros: int
    validity: Validity
    purchased_at: int
    expires_at: int
    purchase_seq: int
    paid_voucher_micros: int = 0
    paid_cash_micros: int = 0
    refunded_at: int | None = None
    units_forfeited: int = 0

    @property
    def order_key(self) -> tuple[int, int]:
        """R8: earliest expiry first, then the ledger's own purchase order."""
        return (self.expires_at, self.purchase_seq)

    @property
    def units_consumed(self) -> int:
        return self.units_total - self.units_remaining - self.units_forfeited

    def is_valid_at(self, t_us: int) -> bool:
        """R6/R7: purchased_at <= t < expires_at."""
        return self.purchased_at <= t_us < self.expires_at

    def can_offset_at(self, t_us: int) -> bool:
        return self.refunded_at is None and self.units_remaining > 0 and self.is_valid_at(t_us)

    def status_at(self, t_us: int) -> PlanStatus:
        if self.refunded_at is not None:
            return PlanStatus.REFUNDED
        if t_us >= self.expires_at:
            return PlanStatus.EXPIRED
        if self.units_remaining == 0:
            return PlanStatus.EXHAUSTED
        return PlanStatus.ACTIVE


@dataclass(slots=True)
class AccountState:
    account_id: str
    display_name: str
    created_at: int
    status: AccountStatus = AccountStatus.ACTIVE
    cash_micros: int = 0
    voucher_micros: int = 0
    outstanding_micros: int = 0
    overdue_since: int | None = None
    suspended_at: int | None = None
    scenario_ids: tuple[str, ...] = ()
    custom_policy_enabled: bool = False
    # Plans that may still offset something, kept in R8 order; loaded with the account.
    live_plans: list[PlanState] = field(default_factory=list)

    def units_remaining_at(self, t_us: int) -> int:
        """The units of the plans that can offset at t (``PlanState.can_offset_at``, spelt
        out: a consume group asks once per account it touches). An account with one live
        plan, the common case, is answered without building a list (issue 19)."""
        plans = self.live_plans
        if len(plans) == 1:
            p = plans[0]
            return (p.units_remaining if p.refunded_at is None
                    and p.purchased_at <= t_us < p.expires_at else 0)
        return sum([p.units_remaining for p in plans
                    if p.refunded_at is None and p.units_remaining > 0
                    and p.purchased_at <= t_us < p.expires_at])
