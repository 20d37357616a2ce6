"""Hypothesis strategies for the ledger, kept in one module (as attrs does).

A scenario is a start instant plus a short list of operations run against one account. The
operations are plain frozen dataclasses so that a failing example prints readably.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hypothesis import strategies as st

from ledger.model import Architecture, CaptchaType, Step, Validity
from ledger.money import Region

US_PER_SECOND = 1_000_000
US_PER_HOUR = 3_600 * US_PER_SECOND
US_PER_DAY = 24 * US_PER_HOUR
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Small plans only, so a short sequence of consumes can drain one and spill to the next.
SPEC_UNITS_VALIDITY: dict[str, tuple[int, Validity]] = {
    "month-100k": (100_000, Validity.ONE_MONTH),
    "month-1m": (1_000_000, Validity.ONE_MONTH),
    "year-1m": (1_000_000, Validity.ONE_YEAR),
}

# R3 written out by hand: the billable (architecture, type, step) triples.
BILLABLE_EVENTS: tuple[tuple[Architecture, CaptchaType, Step], ...] = (
    *((Architecture.V2, t, Step.STEP_3) for t in CaptchaType),
    *((Architecture.V3, t, Step.STEP_3) for t in CaptchaType),
    (Architecture.V3, CaptchaType.INVISIBLE, Step.STEP_4_1),
)
NON_BILLABLE_EVENTS: tuple[tuple[Architecture, CaptchaType, Step], ...] = tuple(
    (a, t, s) for a in Architecture for t in CaptchaType for s in Step
    if (a, t, s) not in BILLABLE_EVENTS
)


def _us(*args: int) -> int:
    return (datetime(*args, tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)


# Instants where calendar arithmetic is easy to get wrong (UTC+8 local times in comments).
EDGE_STARTS_US: tuple[int, ...] = (
    _us(2027, 1, 31, 2),  # 31 Jan 10:00: one month later does not exist
    _us(2027, 1, 30, 20),  # 31 Jan 04:00 local, still 30 Jan in UTC
    _us(2028, 1, 31, 2),  # leap year: expires 29 Feb
    _us(2028, 2, 28, 16),  # 29 Feb 00:00 local: one year later is 28 Feb
    _us(2027, 12, 31, 15, 59),  # the last minute of a year, local
    _us(2027, 2, 28, 16),  # 1 Mar 00:00 local, still 28 Feb in UTC
)
START_MIN_US = _us(2027, 1, 1)
START_MAX_US = _us(2029, 12, 31)


@st.composite
def start_instants(draw: st.DrawFn) -> int:
    """A start for the test clock: an edge of the calendar or any microsecond in 2027-2029."""
    return draw(st.one_of(st.sampled_from(EDGE_STARTS_US),
                          st.integers(START_MIN_US, START_MAX_US)))


# ---------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class Purchase:
    spec_id: str


@dataclass(frozen=True)
class Use:
    """One Consume: quantity N of one event (billable or not) in one region."""

    quantity: int
    region: Region
    architecture: Architecture
    captcha_type: CaptchaType
    step: Step


@dataclass(frozen=True)
class Advance:
    delta_us: int


@dataclass(frozen=True)
class Replay:
    """Re-send an earlier billable Use: which one is ``pick`` modulo how many there were."""

    pick: int


@dataclass(frozen=True)
class Restart:
    """Stop the writer, close the store and open it all again from the database."""


# The 100k plan twice as often: small plans are what a short run drains and spills over.
plan_spec_ids = st.sampled_from(["month-100k", "month-100k", "month-1m", "year-1m"])
regions = st.sampled_from(list(Region))
quantities = st.one_of(
    st.integers(1, 50),
    st.integers(1, 300_000),
    st.integers(50_000, 1_000_000),
    st.sampled_from([99_999, 100_000, 100_001, 1_000_000]),
)
advance_deltas = st.one_of(
    st.just(0),
    st.integers(1, US_PER_HOUR),
    st.integers(1, 40 * US_PER_DAY),
    # Month-sized jumps reach one-month expiries. No year-sized jump: every day passed is a
    # daily settlement (one commit each), which would make a run slow for little gain.
    st.sampled_from([28 * US_PER_DAY, 29 * US_PER_DAY, 31 * US_PER_DAY]),
)

purchases = st.builds(Purchase, plan_spec_ids)
advances = st.builds(Advance, advance_deltas)
replays = st.builds(Replay, st.integers(0, 1_000))


@st.composite
def uses(draw: st.DrawFn, *, billable_only: bool = False) -> Use:
    events = st.sampled_from(BILLABLE_EVENTS)
    if not billable_only:
        events = st.one_of(events, st.sampled_from(NON_BILLABLE_EVENTS))
    arch, ctype, step = draw(events)
    return Use(draw(quantities), draw(regions), arch, ctype, step)


@st.composite
def operations(draw: st.DrawFn, *, replay: bool = False, restart: bool = False,
               max_size: int = 14) -> list[object]:
    """A short run: purchases (often at one instant), consumes and clock moves, weighted so
    that most runs buy a plan or two, drain some, spill to pay-as-you-go and see an expiry."""
    kinds = ["purchase"] * 3 + ["use"] * 3 + ["billable"] * 2 + ["advance"] * 3
    if replay:
        kinds += ["replay"] * 2
    if restart:
        kinds += ["restart"]
    by_kind: dict[str, st.SearchStrategy[object]] = {
        "purchase": purchases, "use": uses(), "billable": uses(billable_only=True),
        "advance": advances, "replay": replays, "restart": st.just(Restart())}
    size = draw(st.integers(2, max_size))
    return [draw(by_kind[draw(st.sampled_from(kinds))]) for _ in range(size)]
