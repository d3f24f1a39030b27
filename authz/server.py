"""Transport: build the grpc.aio server (Check + standard health), run it, shut it down.

Follows grpc's ``helloworld/async_greeter_server_with_graceful_shutdown.py``:
:func:`create_server` builds and starts a server (port 0 picks a free port, for tests);
:func:`serve` runs the whole process until SIGTERM/SIGINT, then marks health NOT_SERVING
first (so Envoy and load balancers stop sending), drains in-flight calls for
``shutdown_grace_s`` seconds, and closes the OPA pool.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from authz.admin import ReadinessCheck, create_admin_app, opa_bundles_check, start_admin
from authz.authorizer import Authorizer, CredentialSource
from authz.bundle import BundleWatcher
from authz.config import Settings
from authz.logs import DecisionLog
from authz.policy import OpaClient, PolicyEngine
from authz.ratelimit import Limiter, MemoryLimiter, RedisLimiter
from authz.record import DecisionSink
from authz.secrets import SecretStore
from authz.servicer import AuthorizationServicer

__all__ = [
    "AUTHZ_SERVICE",
    "AuthzServer",
    "build_authorizer",
    "build_limiter",
    "create_server",
    "serve",
]

AUTHZ_SERVICE: Final = "envoy.service.auth.v3.Authorization"
# Check requests are small; keep the limits tight so a bad peer cannot make us buffer.
_GRPC_OPTIONS: Final = (
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_concurrent_streams", 1000),
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AuthzServer:
    """A started gRPC server, the port it bound and its health servicer."""

    server: grpc.aio.Server
    port: int
    health: HealthServicer

    async def stop(self, grace_s: float) -> None:
        """Health NOT_SERVING for every service first, then stop with ``grace_s``
        seconds for in-flight calls."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


def build_authorizer(
    settings: Settings,
    engine: PolicyEngine,
    sinks: Iterable[DecisionSink],
    credentials: CredentialSource | None = None,
    limiter: Limiter | None = None,
) -> Authorizer:
    """The :class:`Authorizer` the settings describe, over ``engine``."""
    return Authorizer(
        engine,
        default_decision_path=settings.default_decision_path,
        credential_headers=settings.credential_headers,
        timeout_s=settings.decision_timeout_s,
        parse_body=settings.parse_body,
        limiter=limiter,
        burst_s=settings.rate_limit_burst_s,
        credentials=credentials,
        sinks=sinks,
    )


async def create_server(authorizer: Authorizer, addr: str) -> AuthzServer:
    """Build and start a grpc.aio server on ``addr`` (``host:port``; port 0 = any free)
    serving Check and ``grpc.health.v1.Health``. Raises RuntimeError if the address
    cannot be bound."""
    server = grpc.aio.server(options=_GRPC_OPTIONS)
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        AuthorizationServicer(authorizer), server
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(addr)
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC address {addr!r}")
    await server.start()
    for service in ("", AUTHZ_SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    return AuthzServer(server, port, health)


async def serve(settings: Settings) -> None:
    """Run authz until SIGTERM or SIGINT, then shut down gracefully. Raises ConfigError
    before serving anything when the secrets file is set but missing or malformed."""
    secrets = SecretStore.open(settings.secrets_file) if settings.secrets_file else None
    engine = OpaClient(settings.opa_url, token=settings.opa_token, pool_size=settings.opa_pool_size)
    sinks: list[DecisionSink] = [DecisionLog()] if settings.decision_log else []
    limiter = build_limiter(settings)
    authorizer = build_authorizer(settings, engine, sinks, secrets, limiter)
    grpc_server = await create_server(authorizer, settings.grpc_addr)
    watcher = BundleWatcher(engine, interval_s=settings.bundle_poll_interval_s)
    stopping = asyncio.Event()
    tasks = [asyncio.create_task(watcher.run(), name="bundle-watcher")]
    if secrets is not None:
        tasks.append(
            asyncio.create_task(secrets.watch(settings.secrets_reload_interval_s), name="secrets")
        )

    async def not_stopping() -> tuple[bool, str]:
        return (not stopping.is_set(), "shutting down" if stopping.is_set() else "serving")

    checks = {"serving": not_stopping, "opa": opa_bundles_check(engine)}
    if secrets is not None:
        checks["secrets"] = _secrets_check(secrets)
    if isinstance(limiter, RedisLimiter):
        checks["rate_limit"] = _redis_check(limiter, settings.redis_failure_mode)
    admin_host, _, admin_port = settings.admin_addr.rpartition(":")
    runner, bound_admin = await start_admin(create_admin_app(checks), admin_host, int(admin_port))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    log.info(
        "authz serving",
        extra={
            "grpc_addr": settings.grpc_addr,
            "grpc_port": grpc_server.port,
            "admin_port": bound_admin,
            "opa_url": settings.opa_url,
            "default_decision_path": settings.default_decision_path,
            "decision_timeout_ms": settings.decision_timeout_ms,
            "secrets_file": str(settings.secrets_file) if settings.secrets_file else None,
        },
    )
    await stopping.wait()
    log.info("shutting down", extra={"grace_s": settings.shutdown_grace_s})
    await grpc_server.stop(settings.shutdown_grace_s)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await runner.cleanup()
    await engine.close()
    await limiter.close()
    log.info("stopped")


def build_limiter(settings: Settings) -> Limiter:
    """The rate limiter the settings describe: in process, or Redis shared by replicas."""
    if settings.rate_limit_backend != "redis" or settings.redis_url is None:
        return MemoryLimiter()
    import redis.asyncio  # only needed with the redis backend

    timeout_s = settings.redis_timeout_ms / 1000
    # A blocking pool: a burst of checks waits (within the timeout) for a connection
    # instead of failing with "too many connections" and falling back.
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        settings.redis_url.reveal(),
        max_connections=settings.opa_pool_size,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
    )
    client = redis.asyncio.Redis.from_pool(pool)  # closes the pool with the client
    if settings.redis_failure_mode == "deny":
        return RedisLimiter(client, on_failure="deny", timeout_s=timeout_s)
    return RedisLimiter(client, on_failure="fallback", timeout_s=timeout_s)


def _redis_check(limiter: RedisLimiter, mode: str) -> ReadinessCheck:
    # In fallback mode an unreachable Redis degrades the limit, not readiness.
    async def check() -> tuple[bool, str]:
        if limiter.available:
            return True, "redis"
        return mode != "deny", f"redis unreachable ({mode})"

    return check


def _secrets_check(secrets: SecretStore) -> ReadinessCheck:
    async def check() -> tuple[bool, str]:
        if secrets.loaded:
            return True, f"{len(secrets.references)} credentials"
        return False, "secrets file missing or malformed"

    return check
