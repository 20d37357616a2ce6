"""Protos to domain commands and back. No logic beyond the shape of the data."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from quota_ledger.v1 import accounts_pb2 as apb
from quota_ledger.v1 import common_pb2 as pb
from quota_ledger.v1 import quota_ledger_pb2 as qpb

from ledger import model as m
from ledger.calendar import US_PER_DAY, billing_day
from ledger.consume_group import GroupResult
from ledger.errors import InvalidArgument
from ledger.money import Region
from ledger.runway import Runway
from ledger.settlement import Bill

US = 1_000_000


def ts(t_us: int | None) -> Timestamp | None:
    if t_us is None:
        return None
    return Timestamp(seconds=t_us // US, nanos=(t_us % US) * 1_000)


_last_ts: tuple[int, Timestamp] = (-1, Timestamp())


def _recorded_at(t_us: int) -> Timestamp:
    """A group's replies share one instant: convert it once (read-only use only)."""
    global _last_ts
    if _last_ts[0] != t_us:
        _last_ts = (t_us, Timestamp(seconds=t_us // US, nanos=(t_us % US) * 1_000))
    return _last_ts[1]


# google.protobuf.Timestamp's own range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
TS_SECONDS_MIN = -62_135_596_800
TS_SECONDS_MAX = 253_402_300_799


def from_ts(t: Timestamp, field_name: str = "timestamp") -> int:
    """A valid Timestamp as integer microseconds; anything else is INVALID_ARGUMENT."""
    if not 0 <= t.nanos <= 999_999_999:
        raise InvalidArgument(f"{field_name}.nanos must be 0..999,999,999; got {t.nanos}")
    if not TS_SECONDS_MIN <= t.seconds <= TS_SECONDS_MAX:
        raise InvalidArgument(f"{field_name} is outside 0001-01-01..9999-12-31")
    return t.seconds * US + t.nanos // 1_000


_REGION_NUMS = frozenset(int(r) for r in Region)
_TYPE_NUMS = frozenset(int(t) for t in m.CaptchaType)
_ARCH_NUMS = frozenset(int(a) for a in m.Architecture)
_STEP_NUMS = frozenset(int(s) for s in m.Step)


def consume_row(req: qpb.ConsumeRequest) -> tuple:
    """Validate every field (R5, limits) into the plain tuple a consume group takes
    (``ledger.consume_group.ROW_FIELDS``). Checked in field order; a known enum number is
    checked in a table, anything else goes to ``parse_enum`` for its message (the hot path:
    every request of a batch comes through here)."""
    account_id = m.check_id(req.account_id, "account_id")
    request_id = m.check_request_id(req.request_id)
    scenario = None
    if req.HasField("scenario_id") and req.scenario_id:
        scenario = m.check_id(req.scenario_id, "scenario_id", m.SCENARIO_ID_LEN_MAX)
    region = req.region
    if region not in _REGION_NUMS:
        m.parse_enum(Region, region, "region")
    ctype = req.captcha_type
    if ctype not in _TYPE_NUMS:
        m.parse_enum(m.CaptchaType, ctype, "captcha_type")
    arch = req.architecture
    if arch not in _ARCH_NUMS:
        m.parse_enum(m.Architecture, arch, "architecture")
    step = req.step
    if step not in _STEP_NUMS:
        m.parse_enum(m.Step, step, "step")
    quantity = req.quantity
    quantity = quantity if 0 < quantity <= m.QUANTITY_MAX else m.check_quantity(quantity)
    observed = (_client_observed_us(req)
                if req.HasField("client_observed_at") or req.HasField("client_timestamp")
                else None)
    return (account_id, request_id, region, ctype, arch, step, scenario, quantity,
            req.dry_run, observed)


_ID_BYTES = bytes(range(0x21, 0x7F))  # printable ASCII but the space: an id's characters
_TEXT_BYTES = bytes(range(0x20, 0x7F))  # printable ASCII: a request_id's characters


def _ids_ok(ids: tuple[str, ...], max_len: int, allowed: bytes) -> bool:
    """Whether every id passes its field's check (:func:`ledger.model.check_id`,
    ``check_request_id``) at once: one ``join`` and a few passes in C, not a call per id.
    ASCII first, so deleting the allowed bytes leaves nothing exactly when ``isprintable``
    (and, for an id, no space) would hold."""
    lengths = list(map(len, ids))
    joined = "".join(ids)
    return (min(lengths) > 0 and max(lengths) <= max_len and joined.isascii()
            and not joined.encode().translate(None, allowed))


def consume_rows(requests: Any) -> list[tuple] | None:
    """A batch's items as consume rows, validated column by column (issue 19): the same
    rows :func:`consume_row` gives item by item, or None when any item fails a check (the
    caller then goes item by item, for each refused item's own message). Each item's fields
    are read once, into the row itself (``ROW_FIELDS``' order); the rare item with a
    client instant (R26) or quantity 0 (R5) has its row remade."""
    rows = [(r.account_id, r.request_id, r.region, r.captcha_type, r.architecture, r.step,
             r.scenario_id or None, r.quantity, r.dry_run,
             (r.HasField("client_observed_at") or r.HasField("client_timestamp")) or None)
            for r in requests]
    if not rows:
        return rows
    accounts, request_ids, regions, ctypes, archs, steps, scenarios, quantities, _, stamped = (
        zip(*rows, strict=True))
    if not (_ids_ok(accounts, m.ACCOUNT_ID_LEN_MAX, _ID_BYTES)
            and _ids_ok(request_ids, m.REQUEST_ID_LEN_MAX, _TEXT_BYTES)
            and _REGION_NUMS.issuperset(regions) and _TYPE_NUMS.issuperset(ctypes)
            and _ARCH_NUMS.issuperset(archs) and _STEP_NUMS.issuperset(steps)):
        return None
    low, high = min(quantities), max(quantities)
    if low < 0 or high > m.QUANTITY_MAX:
        return None
    named = tuple([s for s in scenarios if s is not None])
    if named and not _ids_ok(named, m.SCENARIO_ID_LEN_MAX, _ID_BYTES):
        return None
    if low == 0:  # R5: 0 means 1
        rows = [r if r[7] else (*r[:7], 1, *r[8:]) for r in rows]
    if any(stamped):
        try:
            rows = [(*r[:9], _client_observed_us(req)) if r[9] else r
                    for r, req in zip(rows, requests, strict=True)]
        except InvalidArgument:
            return None
    return rows


def _client_observed_us(req: qpb.ConsumeRequest) -> int | None:
    """R26: the caller's own instant, kept for audit only (never the billing day, R2).
    client_observed_at is its name since 2026-11-29; the older client_timestamp still works,
    and when both are sent they must agree."""
    observed = (from_ts(req.client_observed_at, "client_observed_at")
                if req.HasField("client_observed_at") else None)
    legacy = (from_ts(req.client_timestamp, "client_timestamp")
              if req.HasField("client_timestamp") else None)
    if observed is not None and legacy is not None and observed != legacy:
        raise InvalidArgument("client_observed_at and client_timestamp differ; send one of them "
                              "(they name the same instant, R26)")
    return observed if observed is not None else legacy


def group_template(out: GroupResult) -> qpb.ConsumeResponse:
    """What every reply of a consume group shares: its billing day and instant (R1, R2). A
    FULL batch merges it into each item, cheaper than setting both item by item."""
    template = qpb.ConsumeResponse(billing_day=out.day)
    template.recorded_at.CopyFrom(_recorded_at(out.at_us))
    return template


def fill_group_response(msg: qpb.ConsumeResponse, request_id: str, out: GroupResult, j: int,
                        template: qpb.ConsumeResponse | None = None) -> qpb.ConsumeResponse:
    """Set a new, empty ConsumeResponse in place from request ``j`` of a consume group's
    columns (the unary reply, each FULL batch item, each stream message): about 2-3x cheaper
    than building it from keyword arguments with nested messages, which copies each of them.
    Fields at their zero value are left unset (proto3: the same bytes). ``template``: the
    group's :func:`group_template`; a replayed request keeps the day and instant of its
    first recording (R12)."""
    replay = out.replays.get(j) if out.replays else None
    if template is not None:
        msg.MergeFrom(template)
    if replay is not None or template is None:
        at_us, day = replay or (out.at_us, out.day)
        msg.billing_day = day
        msg.recorded_at.CopyFrom(_recorded_at(at_us))
    if out.billable[j]:
        msg.billable = True
    for plan_id, units in out.allocations[j]:
        a = msg.allocations.add()
        a.plan_id = plan_id
        a.units = units
    if out.payg_units[j]:
        msg.payg_units = out.payg_units[j]
    if out.payg_micros[j]:
        msg.payg_amount_micros = out.payg_micros[j]
    if out.replayed[j]:
        msg.replayed = True
    msg.plan_units_remaining = out.remaining[j]
    msg.request_id = request_id
    msg.journal_seq = out.seq[j]
    return msg


def plan(p: m.PlanState, now_us: int) -> pb.Plan:
    return pb.Plan(
        plan_id=p.plan_id, account_id=p.account_id, spec_id=p.spec_id,
        units_total=p.units_total, units_remaining=p.units_remaining,
        units_consumed=p.units_consumed, price_micros=p.price_micros, validity=int(p.validity),
        purchased_at=ts(p.purchased_at), expires_at=ts(p.expires_at),
        status=int(p.status_at(now_us)), paid_voucher_micros=p.paid_voucher_micros,
        paid_cash_micros=p.paid_cash_micros, refunded_at=ts(p.refunded_at),
        units_forfeited=p.units_forfeited)


def account(a: m.AccountState) -> pb.Account:
    return pb.Account(
        account_id=a.account_id, status=int(a.status), cash_balance_micros=a.cash_micros,
        voucher_balance_micros=a.voucher_micros, outstanding_micros=a.outstanding_micros,
        overdue_since=ts(a.overdue_since), scenario_ids=list(a.scenario_ids),
        custom_policy_enabled=a.custom_policy_enabled, display_name=a.display_name,
        created_at=ts(a.created_at), suspended_at=ts(a.suspended_at))


def bill(b: Bill) -> pb.Bill:
    return pb.Bill(
        account_id=b.account_id, billing_day=b.billing_day, bill_date=b.bill_date,
        lines=[pb.BillLine(item=ln.item, region=ln.region, quantity=ln.quantity,
                           unit_price_micros=ln.unit_price_micros, amount_micros=ln.amount_micros)
               for ln in b.lines],
        plan_offsets=[pb.PlanUnits(plan_id=p, units=n) for p, n in b.plan_offsets],
        total_micros=b.total_micros, amount_due_micros=b.amount_due_micros,
        paid_voucher_micros=b.paid_voucher_micros, paid_cash_micros=b.paid_cash_micros,
        outstanding_micros=b.outstanding_micros, issued_at=ts(b.issued_at_us))


def plan_spec(s: m.PlanSpec) -> pb.PlanSpec:
    return pb.PlanSpec(spec_id=s.spec_id, units=s.units, validity=int(s.validity),
                       price_micros=s.price_micros)


def runway(account_id: str, r: Runway) -> apb.Runway:
    """docs/runway.md; with no estimate only the reason is set (proto field comments)."""
    out = apb.Runway(account_id=account_id, as_of=ts(r.now), estimated=r.estimated,
                     no_estimate_reason=r.no_estimate_reason)
    if not r.estimated or r.window is None:
        return out
    w = r.window
    out.window_from_day, out.window_to_day, out.window_days = w.from_day, w.to_day, w.days
    out.window_units, out.daily_rate_units = w.units, r.daily_rate_units
    out.window_payg_mainland_units = w.payg_mainland_units
    out.window_payg_outside_units = w.payg_outside_units
    out.plans.extend(apb.PlanRunway(
        plan_id=p.plan_id, spec_id=p.spec_id, units_remaining=p.units_remaining,
        expires_at=ts(p.expires_at), used_up_at=ts(p.used_up_at),
        expires_first=p.used_up_at is None, forfeit_units=p.forfeit_units) for p in r.plans)
    if r.payg_starts_at is not None:
        out.payg_starts_at.CopyFrom(ts(r.payg_starts_at))
        out.payg_starts_day = billing_day(r.payg_starts_at)
    out.horizon_days = (r.horizon_end - r.now) // US_PER_DAY
    out.payg_units, out.payg_cost_micros, out.price_basis = (
        r.payg_units, r.payg_cost_micros, r.price_basis)
    return out


def notice(row: tuple, deliveries: list[tuple]) -> apb.Notice:
    """An outbox row (notice_id, account_id, kind, at_us, payload) and its deliveries
    (endpoint, state, attempts, delivered_at_s, last_error)."""
    notice_id, account_id, kind, at_us, payload = row
    return apb.Notice(notice_id=notice_id, account_id=account_id, kind=kind, at=ts(at_us),
                      payload_json=payload, deliveries=[
                          apb.NoticeDelivery(endpoint=ep, state=state, attempts=attempts,
                                             delivered_at=None if at_s is None
                                             else ts(int(at_s * US)), last_error=err or "")
                          for ep, state, attempts, at_s, err in deliveries])
