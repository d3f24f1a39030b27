"""A real OPA server for the integration tests, on a free 127.0.0.1 port."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from authz.stack.supervisor import free_port, http_ok

__all__ = ["running_opa"]

OPA_START_TIMEOUT_S = 20.0


@contextmanager
def running_opa(
    opa_bin: str, *args: str, log_path: Path, ready_path: str = "/health"
) -> Iterator[str]:
    """``opa run --server <args>`` until the block exits; yields its base URL once
    ``ready_path`` answers 200. Fails the test (with OPA's log) when OPA exits or is not
    ready within OPA_START_TIMEOUT_S seconds."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            [
                opa_bin,
                "run",
                "--server",
                f"--addr=127.0.0.1:{port}",
                "--skip-version-check",
                "--log-level=error",
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + OPA_START_TIMEOUT_S
            while not http_ok(f"{url}{ready_path}"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"OPA did not become ready:\n{log_path.read_text()}")
                time.sleep(0.05)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
