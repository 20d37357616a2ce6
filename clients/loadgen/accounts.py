"""Account setup before a run: create, top up, buy a plan; a replay when repeated."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc

from clients.client import AsyncLedgerClient
from clients.loadgen.config import SETUP_CONCURRENCY, LoadConfig, LoadgenError
from clients.wire import LedgerError

# --------------------------------------------------------------------------- account setup

async def prepare_accounts(config: LoadConfig, client: AsyncLedgerClient | None = None
                           ) -> dict[str, int]:
    """Create the accounts (existing ones are kept), top them up and buy ``config.plan`` for
    each. Top-up and purchase carry request ids derived from the account, amount and spec, so
    running the same setup again is a replay (R12) and charges nothing twice."""
    own = client is None
    client = client or AsyncLedgerClient(config.target, timeout_s=config.timeout_s)
    try:
        price = 0
        if config.plan:
            specs = {s.spec_id: s for s in (await client.list_plan_specs()).specs}
            if config.plan not in specs:
                raise LoadgenError(f"no plan spec {config.plan!r}; the catalog has: "
                                   f"{', '.join(sorted(specs))}")
            price = specs[config.plan].price_micros
        amount = price + config.top_up_micros
        counts = Counter[str]()
        sem = asyncio.Semaphore(SETUP_CONCURRENCY)

        async def one(account_id: str) -> None:
            async with sem:
                try:
                    await client.create_account(account_id, "loadtest")
                    counts["created"] += 1
                except LedgerError as exc:
                    if exc.code != grpc.StatusCode.ALREADY_EXISTS:
                        raise
                    counts["existing"] += 1
                if amount:
                    await client.top_up(account_id, amount, "cash",
                                        request_id=f"loadtest-top-up-{amount}")
                if config.plan:
                    await client.purchase_plan(account_id, config.plan,
                                               request_id=f"loadtest-plan-{config.plan}")
                    counts["plans"] += 1

        try:
            await asyncio.gather(*(one(a) for a in config.ids()))
        except LedgerError as exc:
            raise LoadgenError(f"account setup failed: {exc}") from exc
        return dict(counts)
    finally:
        if own:
            await client.close()

