"""What both clients assemble alike (``clients/client.py``): their options, and the wiring
of stubs, coalescers, the per-node lanes of account affinity, the spool and its replayer,
and how each attempt of a call picks its way (issue 20: the account's home node)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import grpc

from clients.api import LedgerApi
from clients.breaker import FAILURES_TO_OPEN, OPEN, CircuitBreaker, StateListener
from clients.coalescer import DEFAULT_BATCH_SIZE_MAX, DEFAULT_LINGER_MS
from clients.failopen import DEFAULT_BUDGET_S, ReplayGate, check_budget
from clients.replay import REPLAY_CALL_TIMEOUT_S
from clients.routing import ROUTINGS, Router, split_targets
from clients.spool import Spool, SpoolLimits
from clients.wire import (
    DEFAULT_TIMEOUT_S,
    RETRIES_MAX,
    LedgerError,
    auth_metadata,
    backoff_s,
    channel_target,
    credentials,
    stubs,
)

BATCHING_ENV = "QUOTA_LEDGER_CLIENT_BATCHING"  # the default of ``batching`` when not given
BATCHING_OFF = ("0", "false", "off", "no")


class _Options:
    """The keyword arguments both clients take, checked once.

    ``timeout_s`` one deadline per call, retries included; ``retries`` attempts after the
    first; ``token`` a bearer token; ``tls_ca``/``tls_cert``/``tls_key`` PEM paths for TLS
    and mutual TLS; ``spool_path`` the local spool file (fail open, R26) and
    ``spool_limits`` its :class:`SpoolLimits`; ``batching`` coalesce concurrent consume()
    calls (default: on, unless ``BATCHING_ENV`` says 0/false/off), ``linger_ms`` and
    ``batch_size_max`` how, ``compact_answers`` the batches' COMPACT view (no allocations
    nor remaining units in the answers; ``clients/coalescer.py``);
    ``budget_s`` a consume()'s latency budget with a spool, ``breaker`` the circuit breaker
    (None: on when there is a spool), ``failures_to_open`` and ``on_state_change`` its
    threshold and listener (``clients/failopen.py``); ``routing`` with several targets:
    ``affinity`` (each account's calls to its home node, ``clients/routing.py``) or
    ``round_robin``.
    """

    def __init__(self, *, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = RETRIES_MAX,
                 token: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 spool_path: str | os.PathLike[str] | None = None,
                 spool_limits: SpoolLimits | None = None, batching: bool | None = None,
                 linger_ms: float = DEFAULT_LINGER_MS,
                 batch_size_max: int = DEFAULT_BATCH_SIZE_MAX, compact_answers: bool = False,
                 budget_s: float | None = DEFAULT_BUDGET_S, breaker: bool | None = None,
                 failures_to_open: int = FAILURES_TO_OPEN,
                 on_state_change: StateListener | None = None,
                 routing: str = "affinity") -> None:
        self.timeout_s, self.retries = timeout_s, retries
        self.metadata = auth_metadata(token)
        self.creds = credentials(tls_ca, tls_cert, tls_key)
        self.spool = Spool(spool_path, spool_limits) if spool_path is not None else None
        if batching is None:
            batching = os.environ.get(BATCHING_ENV, "1").strip().lower() not in BATCHING_OFF
        self.batching = {"linger_ms": linger_ms, "batch_size_max": batch_size_max,
                         "compact_answers": compact_answers} if batching else None
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}; got {routing!r}")
        self.routing = routing
        self.budget_s = check_budget(budget_s)
        self.breaker = CircuitBreaker(failures_to_open=failures_to_open,
                                      on_state_change=on_state_change) if (
            self.spool is not None if breaker is None else breaker) else None


class _Lane:
    """One node's channel, stubs and coalescer (account affinity)."""

    __slots__ = ("channel", "stubs", "coalescer")

    def __init__(self, channel: Any, lane_stubs: dict[str, Any], coalescer: Any) -> None:
        self.channel, self.stubs, self.coalescer = channel, lane_stubs, coalescer


def _node_channels(target: str, o: _Options, channel: Any, open_channel: Callable[[str], Any]
                   ) -> Callable[[], dict[str, Any]] | None:
    """With several targets and affinity (and no channel given), a channel per node."""
    nodes = split_targets(target)
    if channel is not None or o.routing != "affinity" or len(nodes) < 2:
        return None
    channel_target(target)  # refuses what one channel could not take either
    return lambda: {node: open_channel(node) for node in nodes}


class _Wired(LedgerApi):
    """The parts both clients assemble alike: stubs, coalescer, spool and replayer."""

    def _wire(self, o: _Options, channel: Any, coalescer: Any, replayer: Any, probe: Any,
              non_blocking: Callable[[Any], Any],
              node_channels: Callable[[], dict[str, Any]] | None = None) -> None:
        """``node_channels``: one channel per node, for account affinity (several targets,
        ``routing="affinity"``); the main channel then serves the probe, the spool's replay
        and streams."""
        self.channel = channel
        self.timeout_s, self.retries, self.metadata = o.timeout_s, o.retries, o.metadata
        self.budget_s, self.breaker = o.budget_s, o.breaker
        self.probe = probe(o.breaker, channel, o.metadata) if o.breaker is not None else None
        self.stubs = stubs(channel)
        batch = self.stubs["ledger"].ConsumeBatch
        self.lanes: dict[str, _Lane] = {}
        self.router: Router | None = None
        if node_channels is not None:
            for node, ch in node_channels().items():
                lane_stubs = stubs(ch)
                self.lanes[node] = _Lane(ch, lane_stubs, self._coalescer(
                    o, coalescer, lane_stubs, non_blocking))
            self.router = Router(list(self.lanes))
        self.coalescer = None if self.lanes else self._coalescer(o, coalescer, self.stubs,
                                                                 non_blocking)
        self.spool, self.replayer = o.spool, None
        if self.spool is not None:
            self.replayer = replayer(self.spool, lambda request: batch(
                request, timeout=REPLAY_CALL_TIMEOUT_S, metadata=self.metadata),
                ReplayGate(o.breaker, self._noted) if o.breaker is not None else None)
            if o.breaker is not None:
                o.breaker.listen(self._breaker_moved)

    def _coalescer(self, o: _Options, coalescer: Any, lane_stubs: dict[str, Any],
                   non_blocking: Callable[[Any], Any]) -> Any:
        if not o.batching:
            return None
        send = non_blocking(lane_stubs["ledger"].ConsumeBatch)  # sync: .future, several out
        return coalescer(lambda request, timeout: send(
            request, timeout=timeout, metadata=self.metadata),
            unary=lane_stubs["ledger"].Consume, **o.batching)

    def _pick(self, stub: str, method: str, request: Any) -> tuple[Any, str | None]:
        """What one attempt goes through (Consume: a coalescer, when batching), and the
        node it goes to when calls are routed by account (None: gRPC chooses)."""
        node = None
        coalescer, where = self.coalescer, self.stubs
        if self.router is not None:
            node = self.router.pick(getattr(request, "account_id", "") or "")
            lane = self.lanes[node]
            coalescer, where = lane.coalescer, lane.stubs
        fn = (coalescer if coalescer is not None and method == "Consume"
              else getattr(where[stub], method))
        return fn, node

    def _node_result(self, node: str | None, err: grpc.RpcError | LedgerError | None) -> None:
        """Routed calls: a node that answered UNAVAILABLE is skipped for a while (its
        accounts go to their next node); one that answered is used again."""
        if node is None or self.router is None:
            return
        code = None if err is None else (err.code if isinstance(err, LedgerError)
                                         else err.code())
        if code is grpc.StatusCode.UNAVAILABLE:
            self.router.failed(node)
        elif err is None:
            self.router.answered(node)

    @property
    def coalescers(self) -> list[Any]:
        """Every coalescer of this client: one, or one per node with account affinity."""
        every = [self.coalescer, *(lane.coalescer for lane in self.lanes.values())]
        return [c for c in every if c is not None]

    def _breaker_moved(self, _old: str, new: str) -> None:
        """Half-open or closed: replay the spool now (its batch may be the trial call); every
        change is kept in the spool file for ``ledgerctl spool status``."""
        assert self.spool is not None and self.replayer is not None
        if new != OPEN:
            self.replayer.wake()
        self.spool.note_breaker(new)

    def _transport(self, method: str, budget_s: float | None) -> float:
        """A call's deadline: one budget for all attempts. An open breaker lets nothing
        through."""
        self._gate()
        return self._deadline(method, budget_s)

    def _pause_or_raise(self, err: grpc.RpcError | LedgerError, retry: bool, attempt: int,
                        deadline: float) -> float:
        exc = err if isinstance(err, LedgerError) else LedgerError.from_rpc_error(err)
        pause = backoff_s(attempt)
        if not self._may_retry(retry, attempt, exc, deadline, pause):
            self._noted(exc)
            raise exc from None
        return pause
