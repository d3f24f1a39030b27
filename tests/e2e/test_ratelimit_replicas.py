"""Exact limits under concurrency: one authz in process, two authz replicas sharing Redis,
and Redis stopped mid-run (fallback and strict modes). Real OPA (the session stack's),
real authz processes, gRPC Check calls."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz.stack.supervisor import Process, free_port, http_ok
from tests.conftest import RedisServer
from tests.e2e.conftest import BURST_S, Env
from tests.unit.fakes import check_request

pytestmark = pytest.mark.e2e

LIMIT = 60  # the "default" gateway tier, per minute; burst is a full minute here
REQUESTS = 150


@contextmanager
def authz_processes(
    e2e: Env, tmp: Path, count: int, env: dict[str, str]
) -> Iterator[list[tuple[int, int]]]:
    """``count`` authz processes on the session's OPA; yields (grpc port, admin port)."""
    started: list[Process] = []
    ports = []
    try:
        for i in range(count):
            grpc_port, admin_port = free_port(), free_port()
            process = Process(
                f"authz-{i}",
                [sys.executable, "-m", "authz", "serve"],
                tmp / f"authz-{i}.log",
                lambda p=admin_port: http_ok(f"http://127.0.0.1:{p}/readyz"),
                env={
                    **os.environ,
                    "AUTHZ_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
                    "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{admin_port}",
                    "AUTHZ_OPA_URL": f"http://127.0.0.1:{e2e.stack.ports.opa}",
                    "AUTHZ_RATE_LIMIT_BURST_S": BURST_S,
                    "AUTHZ_DECISION_LOG": "false",
                    "AUTHZ_AUDIT_DB": str(tmp / f"audit-{i}.db"),
                    "AUTHZ_OVERRIDES_FILE": str(tmp / f"overrides-{i}.json"),
                    **env,
                },
            )
            started.append(process)
            process.start()
            process.wait_ready(30)
            ports.append((grpc_port, admin_port))
        yield ports
    finally:
        for process in started:
            process.stop()


def check_all(grpc_ports: list[int], api_key: str, n: int) -> list[int]:
    """Send ``n`` concurrent Checks spread over the ports; returns the HTTP statuses."""

    async def run() -> list[int]:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in grpc_ports]
        stubs = [external_auth_pb2_grpc.AuthorizationStub(c) for c in channels]
        request = check_request(
            headers={"x-api-key": api_key},
            context_extensions={"decision_path": "authz/gateway/decision"},
        )
        try:
            replies = await asyncio.gather(
                *(stubs[i % len(stubs)].Check(request, timeout=5) for i in range(n))
            )
        finally:
            for channel in channels:
                await channel.close()
        return [
            200 if r.HasField("ok_response") else int(r.denied_response.status.code)
            for r in replies
        ]

    return asyncio.run(run())


def test_one_process_in_memory_is_exact(e2e: Env, tmp_path: Path) -> None:
    with authz_processes(e2e, tmp_path, 1, {}) as ports:
        statuses = check_all([ports[0][0]], e2e.keys["limited"], REQUESTS)
    assert statuses.count(200) == LIMIT
    assert statuses.count(429) == REQUESTS - LIMIT


def test_two_replicas_sharing_redis_are_exact_combined(
    e2e: Env, tmp_path: Path, redis_server: RedisServer
) -> None:
    env = {"AUTHZ_RATE_LIMIT_BACKEND": "redis", "AUTHZ_REDIS_URL": redis_server.url}
    with authz_processes(e2e, tmp_path, 2, env) as ports:
        statuses = check_all([p for p, _ in ports], e2e.keys["limited"], REQUESTS)
    assert statuses.count(200) == LIMIT
    assert statuses.count(429) == REQUESTS - LIMIT


@pytest.mark.parametrize(
    ("mode", "status_while_down", "ready_while_down"),
    [("fallback", 200, 200), ("deny", 503, 503)],
    ids=["fallback", "strict"],
)
def test_redis_stopped_mid_run(
    e2e: Env,
    tmp_path: Path,
    redis_server: RedisServer,
    mode: str,
    status_while_down: int,
    ready_while_down: int,
) -> None:
    env = {
        "AUTHZ_RATE_LIMIT_BACKEND": "redis",
        "AUTHZ_REDIS_URL": redis_server.url,
        "AUTHZ_REDIS_FAILURE_MODE": mode,
    }
    key = e2e.keys["admin"]  # premium: plenty of quota for a few calls
    with authz_processes(e2e, tmp_path, 1, env) as [(grpc_port, admin_port)]:
        assert check_all([grpc_port], key, 3) == [200] * 3
        redis_server.stop()
        assert set(check_all([grpc_port], key, 5)) == {status_while_down}
        ready = httpx.get(f"http://127.0.0.1:{admin_port}/readyz")
        assert ready.status_code == ready_while_down
        assert "redis unreachable" in ready.json()["checks"]["rate_limit"]["detail"]
        redis_server.start()
        for _ in range(50):  # Redis is probed again after its retry interval
            if check_all([grpc_port], key, 1) == [200] and http_ok(
                f"http://127.0.0.1:{admin_port}/readyz"
            ):
                break
            asyncio.run(asyncio.sleep(0.1))
        assert check_all([grpc_port], key, 2) == [200, 200]
        assert httpx.get(f"http://127.0.0.1:{admin_port}/readyz").json()["checks"]["rate_limit"][
            "ok"
        ]
