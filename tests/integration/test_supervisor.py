"""stack.supervisor.Supervisor with tiny children: a crashed child is restarted with
backoff and one log line, the others keep serving; stopping leaves nothing behind.

The children are small Python processes (``http.server`` or a sleeper) on free
127.0.0.1 ports, started exactly as the local stack starts OPA, authz and Envoy.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from authz.stack.supervisor import Backoff, Process, Supervisor, free_port, http_ok

# Short delays so a test sees several restarts in well under a second of backoff.
FAST = Backoff(initial_s=0.05, factor=2.0, cap_s=0.2, stable_s=30.0)
POLL_S = 0.02
# Upper bound on any wait for a restart (the machine is shared and may be slow).
WAIT_S = 20.0
# Exits 3 once the marker exists, else creates it and sleeps: ready at the first start,
# then crashes at every restart.
FLAKY = (
    "import pathlib,sys,time; m=pathlib.Path(sys.argv[1]); "
    "m.exists() and sys.exit(3); m.touch(); time.sleep(600)"
)


def http_child(name: str, tmp_path: Path) -> tuple[Process, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    process = Process(
        name,
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        tmp_path / "logs" / f"{name}.log",
        lambda: http_ok(url),
        cwd=tmp_path,
    )
    return process, url


def flaky_child(tmp_path: Path) -> Process:
    marker = tmp_path / "flaky.started"
    return Process(
        "flaky",
        [sys.executable, "-c", FLAKY, str(marker)],
        tmp_path / "logs/flaky.log",
        marker.exists,
    )


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S:.0f} s: {what}")
        time.sleep(POLL_S)


def gone(pid: int) -> bool:
    """True when no process ``pid`` exists (a reaped child) or it is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    sup = Supervisor(backoff=FAST, poll_s=POLL_S)
    try:
        yield sup
    finally:
        sup.stop()


def test_a_killed_child_is_restarted_with_one_log_line_and_the_others_keep_serving(
    supervisor: Supervisor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, first_url = http_child("first", tmp_path)
    other, other_url = http_child("other", tmp_path)
    supervisor.start([first, other], timeout_s=WAIT_S)
    killed, other_pid = first.pid, other.pid
    assert killed is not None
    assert other_pid is not None
    caplog.set_level(logging.INFO, logger="authz.stack")

    os.kill(killed, signal.SIGKILL)
    served = []
    deadline = time.monotonic() + WAIT_S
    while not (first.pid != killed and first.running and http_ok(first_url)):
        assert time.monotonic() < deadline, "first was not restarted"
        served.append(http_ok(other_url))
        time.sleep(POLL_S)

    assert [(r.name, r.exit_code, r.attempt, r.delay_s) for r in supervisor.restarts] == [
        ("first", -signal.SIGKILL, 1, 0.05)
    ]
    lines = [r.getMessage() for r in caplog.records if r.name == "authz.stack"]
    assert lines == ["first exited with code -9 (SIGKILL); restart 1 in 0.05 s"]
    assert other.pid == other_pid
    assert other.running
    assert served
    assert all(served)


def test_a_child_that_keeps_crashing_is_restarted_with_doubling_delays(
    supervisor: Supervisor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = flaky_child(tmp_path)
    supervisor.start([flaky], timeout_s=WAIT_S)
    caplog.set_level(logging.INFO, logger="authz.stack")
    assert flaky.pid is not None
    os.kill(flaky.pid, signal.SIGKILL)
    wait_for(lambda: len(supervisor.restarts) >= 4, "four restarts")
    seen = [(r.exit_code, r.attempt, r.delay_s) for r in supervisor.restarts[:4]]
    assert seen == [(-9, 1, 0.05), (3, 2, 0.1), (3, 3, 0.2), (3, 4, 0.2)]
    lines = [r.getMessage() for r in caplog.records if r.name == "authz.stack"][:4]
    assert lines == [
        "flaky exited with code -9 (SIGKILL); restart 1 in 0.05 s",
        "flaky exited with code 3; restart 2 in 0.1 s",
        "flaky exited with code 3; restart 3 in 0.2 s",
        "flaky exited with code 3; restart 4 in 0.2 s",
    ]


def test_a_child_that_cannot_be_started_again_is_retried_until_it_can(
    supervisor: Supervisor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart that fails (the binary is gone) is one more attempt, logged with the
    reason; the watcher survives it and starts the child once the binary is back."""
    binary = tmp_path / "sleeper"
    binary.write_text("#!/bin/sh\nexec sleep 600\n")
    binary.chmod(0o755)
    sleeper = Process("sleeper", [str(binary)], tmp_path / "logs/sleeper.log", lambda: True)
    supervisor.start([sleeper], timeout_s=WAIT_S)
    caplog.set_level(logging.INFO, logger="authz.stack")
    binary.rename(tmp_path / "sleeper.away")
    first = sleeper.pid
    assert first is not None
    os.kill(first, signal.SIGTERM)
    wait_for(lambda: len(supervisor.restarts) >= 3, "two failed restarts")
    (tmp_path / "sleeper.away").rename(binary)
    wait_for(lambda: sleeper.running and sleeper.pid != first, "the child back")
    crash, failed, *_ = supervisor.restarts
    assert (crash.exit_code, crash.attempt, crash.reason) == (-signal.SIGTERM, 1, "")
    assert (failed.exit_code, failed.attempt) == (None, 2)
    assert "No such file" in failed.reason
    lines = [r.getMessage() for r in caplog.records if r.name == "authz.stack"]
    assert lines[:2] == [crash.line(), failed.line()]
    assert failed.line().startswith("sleeper could not be restarted ([Errno 2] No such file")
    assert failed.line().endswith("; restart 2 in 0.1 s")


def test_stop_during_a_pending_restart_leaves_no_process_or_thread_behind(
    tmp_path: Path,
) -> None:
    """A stop while a crashed child waits for its restart: every child is gone, the
    watcher thread too, and the pending restart never happens."""
    backoff = Backoff(initial_s=0.5, factor=2.0, cap_s=0.5, stable_s=30.0)
    sup = Supervisor(backoff=backoff, poll_s=POLL_S)
    first, _ = http_child("first", tmp_path)
    flaky = flaky_child(tmp_path)
    pids: list[int] = []
    threads_before = set(threading.enumerate())  # other stacks may run in this session
    try:
        sup.start([first, flaky], timeout_s=WAIT_S)
        pids = [p for p in (first.pid, flaky.pid) if p is not None]
        os.kill(pids[1], signal.SIGKILL)
        wait_for(lambda: len(sup.restarts) == 1, "the crash seen")
    finally:
        sup.stop()
    assert len(pids) == 2
    assert all(gone(pid) for pid in pids)
    assert not first.running
    assert not flaky.running
    assert set(threading.enumerate()) - threads_before == set()
    time.sleep(backoff.initial_s + 5 * POLL_S)  # past the moment the restart was due
    assert not flaky.running
    assert flaky.pid == pids[1]
    assert len(sup.restarts) == 1


def test_a_paused_child_is_not_restarted_until_the_pause_ends(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    first, first_url = http_child("first", tmp_path)
    supervisor.start([first], timeout_s=WAIT_S)
    with supervisor.paused("first", timeout_s=WAIT_S) as paused:
        time.sleep(10 * POLL_S)
        assert not paused.running
        assert not http_ok(first_url)
    assert first.running
    assert http_ok(first_url)
    assert supervisor.restarts == []


# The supervisor in a process of its own: start a sleeper, kill it, print the restarted
# child's pid once it is back, then wait to be killed.
SUPERVISED = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from authz.stack.supervisor import Backoff, Process, Supervisor

    sleeper = Process(
        "sleeper", [sys.executable, "-c", "import time; time.sleep(600)"],
        Path(sys.argv[1]), lambda: True,
    )
    sup = Supervisor(backoff=Backoff(initial_s=0.05), poll_s=0.02)
    sup.start([sleeper], timeout_s=10)
    first = sleeper.pid
    os.kill(first, signal.SIGKILL)
    while sleeper.pid == first or not sleeper.running:
        time.sleep(0.02)
    print(sleeper.pid, flush=True)
    time.sleep(600)
    """
)


def test_a_restarted_child_dies_with_a_supervisor_killed_hard(tmp_path: Path) -> None:
    """Children restarted by the watcher thread also get PR_SET_PDEATHSIG: SIGKILL of
    the supervisor leaves no orphan."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with subprocess.Popen(
        [sys.executable, "-c", SUPERVISED, str(tmp_path / "sleeper.log")],
        stdout=subprocess.PIPE,
        env=env,
    ) as parent:
        try:
            assert parent.stdout is not None
            restarted = int(parent.stdout.readline())
            assert not gone(restarted)
        finally:
            parent.kill()
    wait_for(lambda: gone(restarted), f"restarted child {restarted} gone")
