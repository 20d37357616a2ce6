"""Webhook delivery of notices (issue 22): a thread of its own, never the writer's.

Each pass turns new outbox notices into deliveries (:mod:`.notice_queue`), claims the due
ones, and POSTs each notice's JSON with its signature (:mod:`.webhook`). A 2xx marks it
delivered; anything else (a status, a timeout, a refused connection) schedules a retry with
exponential backoff and full jitter, until ``RETRY_WINDOW_S`` after the notice was queued,
when it is marked failed (``ledgerctl notices resend ID`` queues it again). Delivery is at
least once: a crash between a POST and its record sends it again, and the receiver
deduplicates by the notice id (also in the ``Quota-Ledger-Notice-Id`` header).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from .notice_config import NoticeConfig
from .notice_queue import Claim, PgQueue, SqliteQueue
from .webhook import RETRY_WINDOW_S, SIGNATURE_HEADER, retry_delay_s, signature

log = logging.getLogger("quota_ledger.notices")

POLL_S = 0.5  # how often the thread looks for new and due notices
CLAIM_BATCH = 20  # deliveries claimed (and on PostgreSQL locked) per pass
POST_TIMEOUT_S = 10.0  # one POST, connect to last byte
PASS_FAILURE_PAUSE_S = 5.0  # after a pass that failed (the database away): wait this long
NOTICE_ID_HEADER = "Quota-Ledger-Notice-Id"


class Delivery:
    def __init__(self, queue: SqliteQueue | PgQueue, config: NoticeConfig,
                 counters: tuple[Any, Any] | None = None,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None
                 ) -> None:
        self.queue, self.config, self.clock = queue, config, clock
        self.endpoints = {e.name: e for e in config.endpoints}
        self.delivered, self.failures = counters or (None, None)
        self.rng = rng or random.Random()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-notices", daemon=True)

    def start(self) -> Delivery:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(POST_TIMEOUT_S + 5)

    def _run(self) -> None:
        with httpx.Client(timeout=POST_TIMEOUT_S, follow_redirects=False) as http:
            while not self._stop.is_set():
                try:
                    busy = self.run_pass(http)
                except Exception as exc:  # the database away, a full disk: later
                    log.warning("notice delivery pass failed", extra={
                        "event": "notice_pass_failed", "error": str(exc)})
                    busy = False
                    self._stop.wait(PASS_FAILURE_PAUSE_S)
                if not busy:
                    self._stop.wait(POLL_S)

    def run_pass(self, http: httpx.Client) -> bool:
        """One pass; True when there may be more to do at once."""
        now = self.clock()
        queued = self.queue.enqueue(tuple(self.endpoints.values()), now)
        with self.queue.claim(now, CLAIM_BATCH) as claims:
            for c in claims:
                self._post(http, c)
        return bool(queued) or len(claims) == CLAIM_BATCH

    def _post(self, http: httpx.Client, c: Claim) -> None:
        endpoint = self.endpoints.get(c.endpoint)
        now = self.clock()
        c.attempts += 1
        if endpoint is None:  # removed from the configuration since it was queued
            c.failed, c.error = True, "endpoint no longer configured"
            return
        body = c.payload.encode()
        try:
            r = http.post(endpoint.url, content=body, headers={
                "Content-Type": "application/json", NOTICE_ID_HEADER: c.notice_id,
                SIGNATURE_HEADER: signature(endpoint.secret, int(now), body)})
            error = None if 200 <= r.status_code < 300 else f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        done = self.clock()
        if error is None:
            c.delivered_at_s, c.error = done, None
            if self.delivered is not None:
                self.delivered.inc()
            return
        c.error = error
        if self.failures is not None:
            self.failures.inc()
        if done - c.created_s >= RETRY_WINDOW_S:
            c.failed = True
            log.warning("notice delivery gave up", extra={
                "event": "notice_failed", "notice_id": c.notice_id, "endpoint": c.endpoint,
                "attempts": c.attempts, "error": error})
        else:
            c.next_at_s = done + retry_delay_s(c.attempts, self.rng, self.config.retry_first_s)
