"""The grpc.aio server: Check and health over a real channel, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz.core.authorizer import Authorizer
from authz.core.errors import ConfigError
from authz.core.ratelimit import RedisLimiter
from authz.runtime.config import DEFAULT_REDIS_POOL_SIZE, load
from authz.runtime.server import AUTHZ_SERVICE, build_limiter, create_server
from authz.stack.supervisor import free_port, http_ok
from tests.helpers.fakes import FakeEngine, check_request


def _authorizer(engine: FakeEngine) -> Authorizer:
    return Authorizer(
        engine,
        default_decision_path="authz/gateway/decision",
        credential_headers=(),
        timeout_s=1.0,
    )


async def test_check_and_health_over_grpc() -> None:
    server = await create_server(_authorizer(FakeEngine(True)), "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            response = await stub.Check(check_request(), timeout=2)
            assert response.HasField("ok_response")
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", AUTHZ_SERVICE):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)


async def test_stop_marks_not_serving_before_draining_in_flight_calls() -> None:
    # Observed from outside, as Envoy or a load balancer would: a health Watch opened
    # before stop() must see NOT_SERVING while a Check is still in flight, and that
    # Check must still be answered within the grace period.
    server = await create_server(_authorizer(FakeEngine(True, delay_s=0.6)), "127.0.0.1:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=AUTHZ_SERVICE))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        in_flight = asyncio.ensure_future(stub.Check(check_request(), timeout=5))
        await asyncio.sleep(0.1)  # the Check is now inside the (slow) engine
        stopping = asyncio.ensure_future(server.stop(1.5))
        update = await asyncio.wait_for(watch.read(), timeout=1.0)
        assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not in_flight.done()  # announced before the drain, not after it
        response = await in_flight
        assert response.HasField("ok_response")
        await stopping
        watch.cancel()


def test_sigterm_shuts_the_process_down_cleanly(tmp_path: Path) -> None:
    grpc_port, admin_port = free_port(), free_port()
    env = {
        **os.environ,
        "AUTHZ_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
        "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{admin_port}",
        "AUTHZ_OPA_URL": f"http://127.0.0.1:{free_port()}",
        "AUTHZ_SHUTDOWN_GRACE_S": "1",
        "AUTHZ_AUDIT_DB": str(tmp_path / "audit.db"),
        "AUTHZ_OVERRIDES_FILE": str(tmp_path / "overrides.json"),
    }
    log = (tmp_path / "authz.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "authz", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 15
        while not http_ok(f"http://127.0.0.1:{admin_port}/healthz"):
            assert proc.poll() is None, (tmp_path / "authz.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # OPA is absent: alive but not ready, and the reason is named.
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2)
        assert failed.value.code == 503
        assert json.loads(failed.value.read())["checks"]["opa"]["ok"] is False
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    lines = [json.loads(line) for line in (tmp_path / "authz.log").read_text().splitlines()]
    messages = [line["msg"] for line in lines]
    assert messages.index("authz serving") < messages.index("shutting down")
    assert messages[-1] == "stopped"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"AUTHZ_OPA_POOL_SIZE": "7"}, DEFAULT_REDIS_POOL_SIZE),
        ({"AUTHZ_OPA_POOL_SIZE": "7", "AUTHZ_REDIS_POOL_SIZE": "3"}, 3),
    ],
    ids=["default-not-the-opa-pool", "own-setting"],
)
async def test_redis_pool_is_sized_by_its_own_setting(
    environ: dict[str, str], expected: int
) -> None:
    settings = load(
        {"AUTHZ_RATE_LIMIT_BACKEND": "redis", "AUTHZ_REDIS_URL": "redis://127.0.0.1:1/0", **environ}
    )
    limiter = build_limiter(settings)
    try:
        assert isinstance(limiter, RedisLimiter)
        assert limiter._redis.connection_pool.max_connections == expected
    finally:
        await limiter.close()


@pytest.mark.parametrize("value", ["0", "x", "100000"], ids=["zero", "not-int", "too-large"])
def test_redis_pool_size_refuses_bad_values_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=f"AUTHZ_REDIS_POOL_SIZE={value!r}"):
        load({"AUTHZ_REDIS_POOL_SIZE": value})
