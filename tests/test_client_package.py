"""The client package: public imports that callers rely on, files small enough to read at
once, and the load generator's plot drawn on full seconds only."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from clients.loadgen import LoadResult
from clients.loadgen.plot import PLOT_EXTRA_HINT, plotted_seconds

CLIENTS = Path(__file__).resolve().parent.parent / "clients"
FILE_LINES_MAX = 400  # issue 10: no file of the client package passes about 400 lines


def test_public_imports_keep_working():
    """The names tests/bench.py, the console script and callers import are still there."""
    from clients.client import AsyncLedgerClient, LedgerClient, LedgerError, enum_value
    from clients.ledgerctl import CliState, main
    from clients.loadgen import LoadConfig, prepare_accounts, run_load

    assert callable(main) and CliState and LoadConfig and prepare_accounts and run_load
    assert LedgerClient and AsyncLedgerClient and LedgerError and callable(enum_value)


def test_no_file_of_the_client_package_is_too_long():
    """Every module of clients/ stays within FILE_LINES_MAX lines."""
    sizes = {str(p.relative_to(CLIENTS)): len(p.read_text().splitlines())
             for p in CLIENTS.rglob("*.py")}
    assert sizes and all(n <= FILE_LINES_MAX for n in sizes.values()), sizes


def _result(series: list[tuple[int, int]], elapsed_s: float) -> LoadResult:
    return LoadResult(sent=0, acknowledged=0, errors={}, elapsed_s=elapsed_s, rate_per_s=0.0,
                      p50_ms=0, p90_ms=0, p99_ms=0, p99_9_ms=0, max_ms=0,
                      series=[{"second": s, "acknowledged": a, "errors": 0, "p99_ms": 1.0}
                              for s, a in series])


def test_plot_leaves_out_the_last_partial_second():
    """A run of 3.1 s: the 0.1 s tail (100 acks) is not drawn as a fall to 100/s."""
    shown = plotted_seconds(_result([(0, 1000), (1, 1000), (2, 1000), (3, 100)], 3.1))
    assert [s["second"] for s in shown] == [0, 1, 2]


def test_plot_scales_a_run_shorter_than_one_second():
    """A run of 0.5 s with 400 acks has no full second: it is drawn as 800/s."""
    shown = plotted_seconds(_result([(0, 400)], 0.5))
    assert [(s["second"], s["acknowledged"]) for s in shown] == [(0, 800.0)]


def test_plot_option_names_the_extra():
    """--help names the pip extra that brings matplotlib."""
    from clients.loadgen import loadtest

    result = CliRunner().invoke(loadtest, ["--help"])
    assert result.exit_code == 0 and "[plot]" in result.output and "[plot]" in PLOT_EXTRA_HINT


def test_list_accounts_pages_by_prefix(server):
    """list_accounts answers one page of accounts whose id starts with the prefix."""
    from .conftest import make_account

    with server.client() as c:
        for account_id in ("la-1", "la-2", "lb-1"):
            make_account(c, account_id)
        page = c.list_accounts(prefix="la-", page_size=1)
        assert [a.account_id for a in page.accounts] == ["la-1"]
        rest = c.list_accounts(prefix="la-", page_token=page.next_page_token)
        assert [a.account_id for a in rest.accounts] == ["la-2"]
