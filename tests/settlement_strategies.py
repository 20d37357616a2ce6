"""Hypothesis strategies for the settlement property tests: random runs of operations.

A run is purchases, consumes, feature changes, top-ups, refunds, reactivations, on-demand
settlements and clock moves for one or two accounts (restarts in the lifecycle runs), each a
frozen dataclass so that a failing example prints readably; the start instants lean on the edges
of a UTC+8 day.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from ledger.model import FundsKind

from .settlement_model import PAYG_PRICE, SCENARIO_POOL, SPECS, US_PER_SECOND, USD, _us

# Starts near the edges of a UTC+8 day (local times in comments).
EDGE_STARTS_US = (
    _us(2027, 3, 10, 16) - 1,  # 10 Mar 23:59:59.999999
    _us(2027, 3, 10, 16) - 60 * US_PER_SECOND,  # 10 Mar 23:59
    _us(2027, 3, 10, 16),  # 11 Mar 00:00
    _us(2028, 2, 28, 15, 30),  # 28 Feb 23:30 of a leap year
    _us(2027, 12, 31, 15, 59),  # 31 Dec 23:59
)


# ---------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class Buy:
    acct: int
    spec_id: str


@dataclass(frozen=True)
class Use:
    acct: int
    quantity: int
    region: int


@dataclass(frozen=True)
class Configure:
    acct: int
    scenario_ids: tuple[str, ...]
    custom: bool


@dataclass(frozen=True)
class Fund:
    acct: int
    kind: FundsKind
    amount: int


@dataclass(frozen=True)
class PayOff:
    """A top-up of what the account owes now plus ``extra`` (skipped when that is 0)."""

    acct: int
    kind: FundsKind
    extra: int


@dataclass(frozen=True)
class Refund:
    pick: int


@dataclass(frozen=True)
class React:
    acct: int


@dataclass(frozen=True)
class Settle:
    pick: int


@dataclass(frozen=True)
class Restart:
    pass


@dataclass(frozen=True)
class Advance:
    """secs: by ``value`` seconds; day_end, suspend, refund_edge, expiry: that instant + value µs
    (the next day's start; the first suspension due; the end of the first refund window open;
    the first plan expiry with units left)."""

    mode: str
    value: int


accts = st.integers(0, 1)
amounts = st.one_of(
    st.integers(1, 10 * USD),
    st.integers(1, 700 * USD),
    st.sampled_from([5_000, 60 * USD, 500 * USD, 10 * USD - 1]),
)
advances = st.one_of(
    st.builds(Advance, st.just("secs"), st.integers(60, 3 * 86_400)),
    st.builds(Advance, st.just("day_end"), st.sampled_from([-1, 0, 1])),
    st.builds(Advance, st.just("suspend"), st.sampled_from([0, 1])),
    st.builds(Advance, st.just("refund_edge"), st.sampled_from([0, 1])),
    st.builds(Advance, st.just("expiry"), st.sampled_from([-1, 0, 1])),
)
uses = st.builds(Use, accts, st.one_of(st.integers(1, 300_000), st.integers(1, 60),
                                       st.sampled_from([50, 100_000, 100_001])),
                 st.sampled_from(sorted(PAYG_PRICE)))
configures = st.builds(Configure, accts, st.lists(st.sampled_from(SCENARIO_POOL), unique=True,
                                                 max_size=6).map(tuple), st.booleans())
funds = st.builds(Fund, accts, st.sampled_from(list(FundsKind)), amounts)
buys = st.builds(Buy, accts, st.sampled_from(SPECS))
# Weighted by repetition: sampled_from keeps duplicates (one_of would not weigh them).
operation = st.sampled_from([
    uses, uses, uses, uses, advances, advances, advances, advances, configures, configures,
    funds, funds, buys, buys, st.builds(Refund, st.integers(0, 100)), st.builds(React, accts),
    st.builds(Settle, st.integers(0, 100)),
]).flatmap(lambda s: s)
# Overdue, suspension and reactivation (R22-R24) more often: fees, small top-ups, long waits.
lifecycle_operation = st.sampled_from([
    uses, configures, configures, advances, advances, advances,
    st.builds(Advance, st.just("suspend"), st.sampled_from([0, 1])),
    st.builds(Advance, st.just("suspend"), st.sampled_from([0, 1])),
    st.builds(Fund, accts, st.sampled_from(list(FundsKind)), st.integers(1, 30 * USD)),
    st.builds(Fund, accts, st.sampled_from(list(FundsKind)), st.integers(1, 30 * USD)),
    st.builds(PayOff, accts, st.sampled_from(list(FundsKind)),
              st.sampled_from([0, 1, 5_000, 7 * USD])),
    st.builds(React, accts), st.builds(React, accts), buys, st.just(Restart()),
]).flatmap(lambda s: s)
# Refunds (R21) to accounts with something outstanding (R22 clarified): a plan bought with
# everything the account has, fees that the day's bill cannot pay, then the refund.
refund_lifecycle_operation = st.sampled_from([
    buys, buys, st.builds(Configure, accts, st.just(("s1", "s2", "s3", "s4")), st.booleans()),
    st.builds(Advance, st.just("day_end"), st.sampled_from([0, 1])),
    st.builds(Advance, st.just("day_end"), st.sampled_from([0, 1])),
    st.builds(Advance, st.just("suspend"), st.sampled_from([0, 1])),
    st.builds(Refund, st.integers(0, 100)), st.builds(Refund, st.integers(0, 100)),
    st.builds(Fund, accts, st.sampled_from(list(FundsKind)),
              st.sampled_from([1, 3 * USD, 60 * USD])),
    st.builds(PayOff, accts, st.sampled_from(list(FundsKind)), st.sampled_from([0, 60 * USD])),
    st.builds(React, accts), st.just(Restart()),
]).flatmap(lambda s: s)
initial_cash = st.sampled_from([0, 60 * USD, 600 * USD]) | st.integers(0, 10 * USD)
initial_vouchers = st.sampled_from([0, 100 * USD]) | st.integers(0, 10 * USD)
start_instants = st.one_of(st.sampled_from(EDGE_STARTS_US),
                           st.integers(_us(2027, 1, 1), _us(2029, 12, 31)))
