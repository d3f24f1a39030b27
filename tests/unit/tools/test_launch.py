"""authz.tools.launch builds the one OPA and the one Redis command line every starter
uses (replay, the local stack, the benchmark rig, the tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz.tools.launch import HOST, free_port, opa_launch, redis_launch, redis_ping


def test_opa_launch_serves_on_loopback_with_the_callers_flags_last() -> None:
    launch = opa_launch("/bin/opa", 18181, "--bundle", "b.tar.gz")
    assert launch.argv[:4] == ("/bin/opa", "run", "--server", f"--addr={HOST}:18181")
    assert "--skip-version-check" in launch.argv
    assert "--log-level=error" in launch.argv
    assert launch.argv[-2:] == ("--bundle", "b.tar.gz")
    assert launch.url == f"http://{HOST}:18181"


def test_redis_launch_binds_loopback_without_persistence(tmp_path: Path) -> None:
    launch = redis_launch("/bin/redis-server", 16379, tmp_path)
    argv = list(launch.argv)
    assert argv[argv.index("--bind") + 1] == HOST
    assert argv[argv.index("--port") + 1] == "16379"
    assert argv[argv.index("--save") + 1] == ""
    assert argv[argv.index("--appendonly") + 1] == "no"
    assert argv[argv.index("--dir") + 1] == str(tmp_path)
    assert launch.url == f"redis://{HOST}:16379/0"


@pytest.mark.parametrize(
    "launch",
    [
        opa_launch("/bin/opa", free_port(), ready_path="/health?bundles"),
        redis_launch("/bin/redis-server", free_port(), Path()),
    ],
    ids=["opa", "redis"],
)
def test_launch_is_not_ready_while_nothing_listens(launch: object) -> None:
    assert not launch.ready()  # type: ignore[attr-defined]


def test_redis_ping_is_false_on_a_closed_port() -> None:
    assert not redis_ping(free_port())
