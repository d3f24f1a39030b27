"""A real OPA server for the integration tests, on a free 127.0.0.1 port."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from authz.tools.launch import LaunchError, free_port, opa_launch, started

__all__ = ["running_opa"]

OPA_START_TIMEOUT_S = 20.0


@contextmanager
def running_opa(
    opa_bin: str, *args: str, log_path: Path, ready_path: str = "/health"
) -> Iterator[str]:
    """``opa run --server <args>`` (:func:`authz.tools.launch.opa_launch`) until the block
    exits; yields its base URL once ``ready_path`` answers 200. Fails the test (with OPA's
    log) when OPA exits or is not ready within OPA_START_TIMEOUT_S seconds."""
    launch = opa_launch(opa_bin, free_port(), *args, ready_path=ready_path)
    with ExitStack() as stack:
        try:
            stack.enter_context(started(launch, log_path, OPA_START_TIMEOUT_S))
        except LaunchError as exc:
            pytest.fail(f"OPA did not become ready: {exc}")
        yield launch.url
