"""``--front-cpus`` (issue 18): the event loop and gRPC's threads on the CPUs given, the
writer's thread on all of the process's; bad lists refused before anything is served."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ledger.errors import InvalidArgument
from server import config as config_mod
from server.cpus import parse_cpus
from tests.conftest import ServerProcess, make_account

ALLOWED = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()


@pytest.mark.parametrize(("text", "cpus"), [("1", {1}), ("0-1,3", {0, 1, 3}),
                                             ("2, 4-5", {2, 4, 5}), ("0-0", {0})])
def test_a_cpu_list_reads_as_linux_writes_it(text: str, cpus: set[int]) -> None:
    assert parse_cpus(text) == cpus


@pytest.mark.parametrize(("text", "words"), [("", "CPU list"), ("one", "CPU list"),
                                              ("1-", "CPU list"), ("-1", "CPU list"),
                                              ("3-1", "runs backwards"), ("1;2", "CPU list")])
def test_a_bad_cpu_list_is_refused_with_its_reason(text: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        parse_cpus(text)
    with pytest.raises(InvalidArgument, match="front_cpus"):
        config_mod.load(env={}, flags={"front_cpus": text or " "})


def _thread_cpus(pid: int) -> dict[int, tuple[str, frozenset[int]]]:
    """Each thread of a process: its name and the CPUs it may run on."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        cpus = status.split("Cpus_allowed_list:")[1].split()[0]
        out[int(tid)] = (comm, parse_cpus(cpus))
    return out


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs a process that may run on 2 CPUs")
def test_the_front_runs_on_its_cpus_and_the_writer_on_all(tmp_path: Path) -> None:
    front = max(ALLOWED)
    srv = ServerProcess(tmp_path, extra=["--front-cpus", str(front)]).start()
    try:
        with srv.client() as c:  # the server serves: a consume goes through its front
            make_account(c, "acme", cash_micros=1_000_000)
            assert c.consume("acme", request_id="r-1").billable
        threads = _thread_cpus(srv.proc.pid)
        assert threads[srv.proc.pid][1] == {front}, threads  # the event loop's
        writers = [cpus for comm, cpus in threads.values() if comm == "ledger-writer"]
        assert writers == [ALLOWED], threads
        # gRPC's own threads start after the front is confined: they inherit it
        grpc_threads = [cpus for tid, (comm, cpus) in threads.items()
                        if tid != srv.proc.pid and not comm.startswith("ledger-")
                        and cpus == {front}]
        assert grpc_threads, threads
    finally:
        assert srv.stop() == 0


def test_cpus_this_process_may_not_use_stop_the_start(tmp_path: Path) -> None:
    beyond = max(ALLOWED, default=0) + 1
    srv = ServerProcess(tmp_path, extra=["--front-cpus", str(beyond)])
    try:
        with pytest.raises(RuntimeError, match="may run only on CPUs"):
            srv.start()
    finally:  # had it started after all, it must not outlive the test
        srv.stop()
