"""authz.tools.launch starts OPA and Redis, waits until they serve, names a process that
fails to start with its log's tail, and leaves nothing running."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from authz.tools.launch import (
    Launch,
    LaunchError,
    free_port,
    http_ok,
    opa_launch,
    redis_launch,
    redis_ping,
    started,
)


def test_started_opa_serves_until_the_block_ends(opa_bin: str, tmp_path: Path) -> None:
    launch = opa_launch(opa_bin, free_port())
    with started(launch, tmp_path / "opa.log") as proc:
        assert http_ok(f"{launch.url}/health")
    assert proc.returncode is not None
    assert not http_ok(f"{launch.url}/health")


def test_started_redis_answers_ping_until_the_block_ends(tmp_path: Path) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found: run ./scripts/test, which installs it")
    port = free_port()
    with started(redis_launch(binary, port, tmp_path), tmp_path / "redis.log") as proc:
        assert redis_ping(port)
    assert proc.returncode is not None
    assert not redis_ping(port)


def test_started_names_a_process_that_exits_early_with_its_log(tmp_path: Path) -> None:
    launch = Launch(
        "broken",
        (sys.executable, "-c", "print('no such bundle'); raise SystemExit(3)"),
        "",
        lambda: False,
    )
    with (
        pytest.raises(LaunchError, match=r"broken exited early\n.*no such bundle"),
        started(launch, tmp_path / "broken.log"),
    ):
        pytest.fail("the block ran although the process exited")


def test_started_stops_a_process_that_is_never_ready(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = (
        "import os, pathlib, time\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    launch = Launch(
        "sleeper", (sys.executable, "-c", script), "", lambda: pid_file.exists() and False
    )
    with (
        pytest.raises(LaunchError, match="sleeper not ready after 3s"),
        started(launch, tmp_path / "sleeper.log", timeout_s=3.0),
    ):
        pytest.fail("the block ran although the process was never ready")
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
