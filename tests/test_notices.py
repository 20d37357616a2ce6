"""Notices end to end (issue 22), on both backends, against a real webhook receiver on
127.0.0.1: each kind driven on the test clock, its payload and signature, one id per fact
across a second settlement (R19) and a restart."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from ledger.calendar import BILLING_TZ, US_PER_HOUR, from_datetime

from .conftest import ServerProcess, make_account
from .webhook_receiver import Receiver, notices_file

USD = 1_000_000
SECRET = "s3cret-for-the-tests-only"
START = datetime(2027, 3, 10, 18, 0, tzinfo=BILLING_TZ)
DAY = timedelta(days=1)


@pytest.fixture
def receiver():
    r = Receiver(SECRET)
    yield r
    r.close()


@pytest.fixture
def ledger(tmp_path: Path, db: str, receiver: Receiver):
    path = notices_file(tmp_path / "notices.toml", receiver.url, SECRET)
    srv = ServerProcess(tmp_path, db=db, extra=["--notices", path]).start()
    try:
        yield srv
    finally:
        srv.stop()


def all_notices(c, account_id: str = "") -> list:
    out, token = [], ""
    while True:
        page = c.list_notices(account_id, page_size=7, page_token=token)
        out += page.notices
        token = page.next_page_token
        if not token:
            return out


def by_kind(notices) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in notices:
        out.setdefault(n.kind, []).append(n)
    return out


def drive(c) -> None:
    """acme burns a month plan at 20,000 a day (plan_low); slow holds a plan it barely
    uses (forfeit_ahead before it expires on 04-10, R9); late owes pay-as-you-go it cannot
    pay (its bill R18, overdue R22, the two warnings and the suspension R23), then pays and
    is reactivated (R24)."""
    c.set_time(START)
    make_account(c, "acme", cash_micros=100 * USD)
    make_account(c, "slow", cash_micros=100 * USD)
    make_account(c, "late")
    c.purchase_plan("acme", "month-100k")
    c.purchase_plan("slow", "month-100k")
    c.set_time(START + DAY)  # 03-11: a complete day for each account
    c.consume("acme", quantity=20_000)
    c.consume("slow", quantity=10)
    c.consume("late", quantity=10_000)  # USD 7 of pay-as-you-go, no funds: overdue (R22)
    c.set_time(START + 2 * DAY)  # 03-11 settled at 03-12 00:00
    c.set_time(datetime(2027, 3, 19, 1, 0, tzinfo=BILLING_TZ))  # past R23's 168 h
    c.top_up("late", 10 * USD, "cash")
    c.reactivate("late")
    c.set_time(datetime(2027, 4, 4, 1, 0, tzinfo=BILLING_TZ))  # slow's plan ends 04-10 18:00


def test_each_kind_is_noticed_once_and_delivered_signed(ledger: ServerProcess,
                                                       receiver: Receiver) -> None:
    with ledger.client() as c:
        drive(c)
        notices = all_notices(c)
        kinds = by_kind(notices)
        assert set(kinds) == {"plan_low", "forfeit_ahead", "bill_issued", "overdue",
                              "suspension_ahead", "suspended", "reactivated"}
        ids = [n.notice_id for n in notices]
        assert len(ids) == len(set(ids))
        assert [n.account_id for n in kinds["plan_low"]] == ["acme"]
        # acme stopped after 03-11 too: both plans end 04-10 with units left (R9)
        assert sorted(n.account_id for n in kinds["forfeit_ahead"]) == ["acme", "slow"]
        overdue = json.loads(kinds["overdue"][0].payload_json)
        since = from_datetime(datetime(2027, 3, 12, 0, 0, tzinfo=BILLING_TZ))
        assert overdue["data"]["overdue_since_us"] == since
        assert overdue["data"]["outstanding_micros"] == 7 * USD
        warned = sorted((json.loads(n.payload_json)["data"]["hours_ahead"], n.at.ToMicroseconds())
                        for n in kinds["suspension_ahead"])
        suspend_at = since + 168 * US_PER_HOUR + 1
        assert warned == [(24, suspend_at - 24 * US_PER_HOUR), (72, suspend_at - 72 * US_PER_HOUR)]
        assert kinds["suspended"][0].at.ToMicroseconds() == suspend_at
        assert [n.account_id for n in kinds["reactivated"]] == ["late"]
        bill = json.loads(next(n for n in kinds["bill_issued"] if n.account_id == "late"
                               and json.loads(n.payload_json)["data"]["day"] == "2027-03-11"
                               ).payload_json)
        assert bill["data"]["outstanding_micros"] == 7 * USD
        forfeit = {n.account_id: json.loads(n.payload_json)["data"]
                   for n in kinds["forfeit_ahead"]}
        assert forfeit["slow"]["forfeit_units"] == forfeit["slow"]["units_remaining"] == 99_990
        assert forfeit["acme"]["forfeit_units"] == 80_000
        assert forfeit["slow"]["expires_at_us"] == from_datetime(
            datetime(2027, 4, 10, 18, 0, tzinfo=BILLING_TZ))

        got = receiver.wait_for(set(ids))
        assert set(got) == set(ids), "every notice delivered"
        assert all(p["signed"] and p["header_id"] == json.loads(p["body"])["id"]
                   for p in receiver.posts)
        assert {k: json.loads(n.payload_json) for n in notices for k in [n.notice_id]} == got
        assert all(d.state == "delivered" and d.attempts == 1
                   for n in all_notices(c) for d in n.deliveries)

        c.settle_day("2027-03-11")  # R19: settled already; nothing new
        assert [n.notice_id for n in all_notices(c)] == ids
    ledger.stop()
    ledger.start()
    with ledger.client() as c:
        c.advance_time(60)
        assert [n.notice_id for n in all_notices(c)] == ids, "a restart mints nothing new"
        assert [n.notice_id for n in all_notices(c, "late")] == [
            n.notice_id for n in notices if n.account_id == "late"]
        assert not c.list_notices(undelivered_only=True).notices
        april = datetime(2027, 4, 1, 0, 0, tzinfo=BILLING_TZ)
        later = c.list_notices(since=april, page_size=1_000).notices
        assert later and [n.notice_id for n in later] == [
            n.notice_id for n in notices if n.at.ToMicroseconds() >= from_datetime(april)]
