"""The summary table of a run."""

from __future__ import annotations

from typing import Any

from clients.loadgen.recorder import LoadResult

# --------------------------------------------------------------------------- reporting

def summary_table(result: LoadResult) -> Any:
    from rich.table import Table

    table = Table(title=f"loadtest {result.shape} -> {result.target} ({result.mode})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("sent", f"{result.sent:,}"),
        ("acknowledged", f"{result.acknowledged:,} ({result.billable:,} billable, "
                         f"{result.replayed:,} replayed)"),
        ("errors", ", ".join(f"{k} {v:,}" for k, v in sorted(result.errors.items())) or "0"),
        ("elapsed", f"{result.elapsed_s:.2f} s"),
        ("throughput", f"{result.rate_per_s:,.0f} acknowledged/s ({result.calls_per_s:,.0f} "
                       f"{'messages' if result.shape == 'stream' else 'calls'}/s)"),
        ("latency p50 / p90", f"{result.p50_ms:.3f} / {result.p90_ms:.3f} ms"),
        ("latency p99 / p99.9 / max",
         f"{result.p99_ms:.3f} / {result.p99_9_ms:.3f} / {result.max_ms:.3f} ms"),
        ("client CPU", f"{result.client_cpu_s:.2f} s"),
        ("sent = acknowledged + errors", "yes" if result.consistent else "NO (a bug: report it)"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table

