"""Throughput and p99 per second of a run, as a PNG (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from typing import Any

from clients.extras import install_hint
from clients.loadgen.recorder import LoadResult

PLOT_EXTRA_HINT = install_hint("plot")
PARTIAL_SECOND_MIN_S = 0.05  # a last fraction shorter than this is too short to scale


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plotted_seconds(result: LoadResult) -> list[dict[str, Any]]:
    """The series as rates per second: the full seconds only. The run's last second is
    usually partial, and drawn as it is it reads as a collapse; it is kept, scaled to a rate,
    only when the run has no full second at all."""
    full = [s for s in result.series if s["second"] + 1 <= result.elapsed_s]
    if full or not result.series:
        return full
    last = result.series[-1]
    fraction = max(result.elapsed_s - last["second"], PARTIAL_SECOND_MIN_S)
    return [{**last, "acknowledged": last["acknowledged"] / fraction,
             "errors": last["errors"] / fraction}]


def write_plot(result: LoadResult, path: str) -> None:
    """Throughput and p99 per full second of the run, one PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = plotted_seconds(result)
    seconds = [s["second"] for s in series]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    top.plot(seconds, [s["acknowledged"] for s in series], label="acknowledged/s")
    top.plot(seconds, [s["errors"] for s in series], label="errors/s")
    top.set_ylabel("requests/s")
    top.legend()
    bottom.plot(seconds, [s["p99_ms"] if s["p99_ms"] is not None else float("nan")
                          for s in series], color="tab:red")
    bottom.set_ylabel("p99 latency (ms)")
    bottom.set_xlabel("second of the run (full seconds only)")
    fig.suptitle(f"loadtest {result.shape} -> {result.target} ({result.mode})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
