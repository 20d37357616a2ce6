"""One load run's configuration, its limits and defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass

from quota_ledger.v1 import common_pb2 as pb

from clients.coalescer import DEFAULT_LINGER_MS, check_batching
from clients.loadgen.answers import VIEWS
from clients.loadgen.skew import parse_skew
from clients.wire import DEFAULT_TARGET, enum_value

SHAPES = ("unary", "stream", "batch")
DEFAULT_ACCOUNTS = 100
DEFAULT_REQUESTS = 10_000
DEFAULT_DURATION_S = 30.0
DEFAULT_CONCURRENCY = 16
DEFAULT_BATCH_SIZE = 100
BATCH_SIZE_MAX = 1_000  # CONTRACT: a ConsumeBatch holds at most 1,000 requests
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_IN_FLIGHT = 10_000
DEFAULT_TOP_UP_MICROS = 10_000_000  # USD 10 on top of the plan's price
WORKERS_PER_CHANNEL = 64  # --channels auto: one aio channel (one connection) per 64 workers
STREAMS_AUTO_MAX = 4
SETUP_CONCURRENCY = 32
CONNECT_TIMEOUT_S = 10.0
TICK_S = 0.25
LATENCY_MIN_US = 1
LATENCY_MAX_US = 60_000_000
SIGNIFICANT_DIGITS = 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
MICROS_PER_USD = 1_000_000


class LoadgenError(RuntimeError):
    """The run could not start (bad configuration, unreachable target, failed setup)."""


@dataclass
class LoadConfig:
    """One run. ``concurrency`` and ``rate`` are mutually exclusive (see the module doc)."""

    target: str = DEFAULT_TARGET
    accounts: int = DEFAULT_ACCOUNTS
    account_prefix: str = "load-"
    account_ids: list[str] | None = None  # explicit ids; overrides accounts/account_prefix
    create_accounts: bool = False
    plan: str | None = None
    top_up_micros: int = DEFAULT_TOP_UP_MICROS
    skew: str = "uniform"
    hot_fraction: float = 0.1
    shape: str = "unary"
    batch_size: int = DEFAULT_BATCH_SIZE
    view: str = "full"  # --shape batch, --client-batching: the answer's view, full or compact
    client_batching: bool = False  # unary through AsyncLedgerClient(batching=True)
    linger_ms: float = DEFAULT_LINGER_MS
    concurrency: int | None = None
    rate: float | None = None
    requests: int = DEFAULT_REQUESTS
    duration_s: float = DEFAULT_DURATION_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    streams: int | None = None
    channels: int | None = None
    region: str = "mainland"
    captcha_type: str = "slider"
    architecture: str = "v2"
    step: str = "3"
    quantity: int = 1
    dry_run: bool = False
    seed: int | None = None

    def validate(self) -> None:
        """Raise ValueError with a message a person can act on."""
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}; got {self.shape!r}")
        if self.view not in VIEWS:
            raise ValueError(f"view must be one of {', '.join(VIEWS)}; got {self.view!r}")
        if self.client_batching and self.shape != "unary":
            raise ValueError("--client-batching coalesces consume() calls: it goes with "
                             "--shape unary (--batch-size is then the client's "
                             "batch_size_max)")
        if self.client_batching:
            check_batching(self.linger_ms, self.batch_size)
        if self.concurrency is not None and self.rate is not None:
            raise ValueError("--concurrency (closed loop) and --rate (open loop) are mutually "
                             "exclusive; give one")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError("rate must be a positive number of requests per second")
        if not 1 <= self.batch_size <= BATCH_SIZE_MAX:
            raise ValueError(f"batch size must be 1..{BATCH_SIZE_MAX:,}; got {self.batch_size}")
        if self.requests < 1:
            raise ValueError("requests must be at least 1 (the run is always bounded)")
        if not (self.duration_s > 0 and math.isfinite(self.duration_s)):
            raise ValueError("duration must be a positive number of seconds "
                             "(the run is always bounded)")
        if not self.timeout_s > 0:
            raise ValueError("timeout must be positive")
        if self.max_in_flight < 1:
            raise ValueError("max in flight must be at least 1")
        if self.account_ids is not None:
            if not self.account_ids:
                raise ValueError("account_ids is empty")
        elif self.accounts < 1:
            raise ValueError("accounts must be at least 1")
        if not 0 < self.hot_fraction <= 1:
            raise ValueError("hot fraction must be in (0, 1]")
        if self.streams is not None and self.streams < 1:
            raise ValueError("streams must be at least 1")
        if self.channels is not None and self.channels < 1:
            raise ValueError("channels must be at least 1")
        if not 1 <= self.quantity <= 1_000_000:
            raise ValueError("quantity must be 1..1,000,000")
        if self.top_up_micros < 0:
            raise ValueError("top-up must not be negative")
        parse_skew(self.skew, self.hot_fraction)
        for enum, value in ((pb.Region, self.region), (pb.CaptchaType, self.captcha_type),
                            (pb.ClientArchitecture, self.architecture),
                            (pb.VerificationStep, self.step)):
            enum_value(enum, value)

    @property
    def closed_loop(self) -> bool:
        return self.rate is None

    @property
    def in_flight(self) -> int:
        return self.concurrency or DEFAULT_CONCURRENCY

    def ids(self) -> list[str]:
        if self.account_ids is not None:
            return list(self.account_ids)
        width = max(4, len(str(self.accounts - 1)))
        return [f"{self.account_prefix}{i:0{width}d}" for i in range(self.accounts)]

