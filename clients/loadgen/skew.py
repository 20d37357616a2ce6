"""How traffic spreads over accounts: uniform, hot set or zipf."""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass

# --------------------------------------------------------------------------- traffic skew

@dataclass(frozen=True)
class Skew:
    """How traffic spreads over accounts: ``uniform``, ``hot`` (``traffic`` of the requests go
    to the first ``hot`` fraction of the accounts) or ``zipf`` (weight 1/rank**exponent)."""

    kind: str
    traffic: float = 0.0
    hot: float = 0.0
    exponent: float = 1.0


def parse_skew(spec: str, hot_fraction: float = 0.1) -> Skew:
    """``uniform`` | ``zipf`` | ``zipf:S`` | ``F`` (fraction of traffic to the hot accounts,
    the first ``hot_fraction`` of them) | ``P/H`` (P% of traffic to H% of accounts: ``90/10``)."""
    s = spec.strip().lower()
    if s in ("", "none", "uniform", "0"):
        return Skew("uniform")
    if s == "zipf" or s.startswith("zipf:"):
        exponent = 1.0
        if ":" in s:
            try:
                exponent = float(s.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"zipf exponent must be a number: {spec!r}") from None
        if not 0 < exponent <= 10:
            raise ValueError(f"zipf exponent must be in (0, 10]: {spec!r}")
        return Skew("zipf", exponent=exponent)
    try:
        if "/" in s:
            p, h = (float(x.rstrip("%")) for x in s.split("/", 1))
            traffic, hot = p / 100, h / 100
        else:
            traffic, hot = float(s.rstrip("%")), hot_fraction
            if s.endswith("%"):
                traffic /= 100
    except ValueError:
        raise ValueError(f"--skew takes uniform, zipf[:S], a traffic fraction such as 0.9, or "
                         f"P/H such as 90/10; got {spec!r}") from None
    if not (0 <= traffic <= 1 and 0 < hot <= 1):
        raise ValueError(f"--skew fractions must be within 0..1 (or 0..100%): {spec!r}")
    return Skew("hot", traffic=traffic, hot=hot)


class AccountPicker:
    """Draws account indexes 0..n-1 according to a :class:`Skew` (account 0 is the hottest)."""

    def __init__(self, n: int, skew: Skew, rng: random.Random | None = None) -> None:
        self.n, self.skew = n, skew
        self._random = (rng or random.Random()).random
        self.n_hot = max(1, min(n, math.ceil(n * skew.hot))) if skew.kind == "hot" else n
        self._cum: list[float] = []
        if skew.kind == "zipf":
            total = 0.0
            for k in range(1, n + 1):
                total += 1.0 / k ** skew.exponent
                self._cum.append(total)
            self._cum = [c / total for c in self._cum]

    def pick(self) -> int:
        r = self._random()
        kind = self.skew.kind
        if kind == "uniform":
            return int(r * self.n)
        if kind == "zipf":
            return min(bisect.bisect_left(self._cum, r), self.n - 1)
        cold = self.n - self.n_hot
        if r < self.skew.traffic or cold == 0:
            return int(self._random() * self.n_hot)
        return self.n_hot + int(self._random() * cold)

