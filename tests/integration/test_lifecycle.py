"""authz's lifecycle: a start that fails at any step says what failed in one line, exits
2 and leaves nothing open (no thread, no connection pool, no listener); a started authz
stops through the same exit stack."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from authz.core.opa import OpaClient
from authz.core.ratelimit import Limiter
from authz.runtime import server
from authz.runtime.config import Settings, load
from authz.stack.supervisor import free_port
from tests.helpers.serve import serve_until_exit


@contextlib.contextmanager
def _listening() -> Iterator[int]:
    """A port some other process-like owner is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _base_env(tmp_path: Path) -> dict[str, str]:
    return {
        "AUTHZ_GRPC_ADDR": f"127.0.0.1:{free_port()}",
        "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
        "AUTHZ_OPA_URL": f"http://127.0.0.1:{free_port()}",  # nothing there: never needed
        "AUTHZ_AUDIT_DB": str(tmp_path / "audit.db"),
        "AUTHZ_OVERRIDES_FILE": str(tmp_path / "overrides.json"),
        "AUTHZ_SHUTDOWN_GRACE_S": "1",
    }


@pytest.mark.parametrize("key", ["AUTHZ_GRPC_ADDR", "AUTHZ_ADMIN_ADDR"], ids=["grpc", "admin"])
@pytest.mark.parametrize("uvloop", ["false", "true"], ids=["asyncio", "uvloop"])
def test_a_port_in_use_fails_the_process_with_one_line_and_exit_2(
    tmp_path: Path, key: str, uvloop: str
) -> None:
    with _listening() as port:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AUTHZ_")},
            **_base_env(tmp_path),
            key: f"127.0.0.1:{port}",
            "AUTHZ_UVLOOP": uvloop,
        }
        proc = serve_until_exit(env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = json.loads(lines[0])
    assert line["level"] == "error"
    assert f"{key}='127.0.0.1:{port}'" in line["msg"]
    assert "in use" in line["msg"]
    assert proc.stdout == ""


# --- in process: what a failed start leaves behind ------------------------------------


class _Opened:
    """Records every OPA client and rate limiter the server builds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opa: list[OpaClient] = []
        self.limiters: list[tuple[Limiter, list[bool]]] = []
        real_limiter = server.build_limiter
        opened = self

        class RecordingOpaClient(OpaClient):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                opened.opa.append(self)

        def recording_limiter(settings: Settings) -> Limiter:
            limiter = real_limiter(settings)
            closed: list[bool] = []
            close = limiter.close

            async def close_and_record() -> None:
                await close()
                closed.append(True)

            limiter.close = close_and_record  # type: ignore[method-assign]
            self.limiters.append((limiter, closed))
            return limiter

        monkeypatch.setattr(server, "OpaClient", RecordingOpaClient)
        monkeypatch.setattr(server, "build_limiter", recording_limiter)


def _port_taken(key: str) -> Callable[[dict[str, str], Path, contextlib.ExitStack], None]:
    def arrange(env: dict[str, str], _: Path, stack: contextlib.ExitStack) -> None:
        env[key] = f"127.0.0.1:{stack.enter_context(_listening())}"

    return arrange


def _port_taken_after_the_check(
    key: str,
) -> Callable[[dict[str, str], Path, contextlib.ExitStack], None]:
    """The port is taken between the early check and the listener's bind (a race): the
    failure comes last, after the gRPC server, the watchers and the pools started."""

    def arrange(env: dict[str, str], tmp_path: Path, stack: contextlib.ExitStack) -> None:
        _port_taken(key)(env, tmp_path, stack)
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        patch.setattr(server, "_check_bindable", lambda key, addr: None)

    return arrange


def _write(name: str, text: str, key: str) -> Callable[[dict[str, str], Path, Any], None]:
    def arrange(env: dict[str, str], tmp_path: Path, _: Any) -> None:
        (tmp_path / name).write_text(text, encoding="utf-8")
        env[key] = str(tmp_path / name)

    return arrange


def _tls_file_missing(env: dict[str, str], tmp_path: Path, _: Any) -> None:
    for name in ("CERT", "KEY", "CLIENT_CA"):
        env[f"AUTHZ_GRPC_TLS_{name}"] = str(tmp_path / f"missing-{name.lower()}.pem")


def _redis_unreachable_strict(env: dict[str, str], _: Path, __: Any) -> None:
    env["AUTHZ_RATE_LIMIT_BACKEND"] = "redis"
    env["AUTHZ_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    env["AUTHZ_REDIS_FAILURE_MODE"] = "deny"


FAILURES: list[tuple[Callable[[dict[str, str], Path, Any], None], str]] = [
    (_port_taken("AUTHZ_GRPC_ADDR"), "AUTHZ_GRPC_ADDR"),
    (_port_taken("AUTHZ_ADMIN_ADDR"), "AUTHZ_ADMIN_ADDR"),
    (_port_taken_after_the_check("AUTHZ_GRPC_ADDR"), "AUTHZ_GRPC_ADDR"),
    (_port_taken_after_the_check("AUTHZ_ADMIN_ADDR"), "AUTHZ_ADMIN_ADDR"),
    (_tls_file_missing, "AUTHZ_GRPC_TLS_CERT"),
    (_write("secrets.json", "{not json", "AUTHZ_SECRETS_FILE"), "secrets.json"),
    (_write("overrides.json", "{not json", "AUTHZ_OVERRIDES_FILE"), "overrides.json"),
    (_redis_unreachable_strict, "AUTHZ_REDIS_URL"),
]
FAILURE_IDS = [
    "grpc-port-in-use",
    "admin-port-in-use",
    "grpc-port-lost-race",
    "admin-port-lost-race",
    "tls-file-unreadable",
    "secrets-file-malformed",
    "overrides-file-malformed",
    "redis-unreachable-deny-mode",
]


@pytest.fixture
async def grpc_poller_running() -> AsyncIterator[None]:
    """grpc.aio runs one poller thread per process while any of its objects lives; it is
    grpc's, not authz's, so a server kept alive here starts it before the 'before'
    snapshot and keeps it after."""
    warm = grpc.aio.server()
    await warm.start()
    yield
    await warm.stop(None)


@pytest.mark.usefixtures("grpc_poller_running")
@pytest.mark.parametrize(("arrange", "named"), FAILURES, ids=FAILURE_IDS)
async def test_a_failed_start_exits_2_with_one_line_and_leaves_nothing_open(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    arrange: Callable[[dict[str, str], Path, Any], None],
    named: str,
) -> None:
    opened = _Opened(monkeypatch)
    env = _base_env(tmp_path)
    before = set(threading.enumerate())
    with contextlib.ExitStack() as stack:
        arrange(env, tmp_path, stack)
        settings = load(env)
        with caplog.at_level(logging.ERROR, logger="authz"):
            code = await server.run(settings)
    assert code == 2
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert named in error.getMessage()
    assert "\n" not in error.getMessage()
    leftover = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert leftover == []
    assert all(client.closed for client in opened.opa)
    assert all(closed == [True] for _, closed in opened.limiters)
    for addr in (settings.grpc_addr, settings.admin_addr):  # no listener left behind
        host, _, port = addr.rpartition(":")
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, int(port)))


@pytest.mark.usefixtures("grpc_poller_running")
async def test_a_started_runtime_stops_through_its_exit_stack_leaving_nothing_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = _Opened(monkeypatch)
    env = _base_env(tmp_path)
    settings = load(env)
    before = set(threading.enumerate())
    async with contextlib.AsyncExitStack() as stack:
        runtime = await server.build_runtime(settings, stack)
        assert "audit-writer" in {t.name for t in threading.enumerate()}
        serving = asyncio.ensure_future(runtime.serve_until_signalled())
        await asyncio.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the runtime, not the test runner
        await asyncio.wait_for(serving, timeout=10)
        assert runtime.stopping.is_set()
    leftover = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert leftover == []
    assert [client.closed for client in opened.opa] == [True]
    assert [closed for _, closed in opened.limiters] == [[True]]
    for addr in (settings.grpc_addr, settings.admin_addr):
        host, _, port = addr.rpartition(":")
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, int(port)))
