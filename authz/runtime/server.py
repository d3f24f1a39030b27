"""Transport: build the grpc.aio server (Check + standard health), run it, shut it down.

Follows grpc's ``helloworld/async_greeter_server_with_graceful_shutdown.py``:
:func:`create_server` builds and starts a server (port 0 picks a free port, for tests);
:func:`serve` runs the whole process until SIGTERM/SIGINT, then marks health NOT_SERVING
first (so Envoy and load balancers stop sending), drains in-flight calls for
``shutdown_grace_s`` seconds, and closes the OPA pool.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from authz.core.authorizer import Authorizer, CredentialSource
from authz.core.cache import DecisionCache
from authz.core.errors import ConfigError
from authz.core.mode import Control
from authz.core.opa import OpaClient, PolicyEngine
from authz.core.ratelimit import Limiter, MemoryLimiter, RedisLimiter
from authz.core.record import DecisionSink
from authz.runtime.admin import create_admin_app, start_admin
from authz.runtime.audit import AuditTrail, Projection
from authz.runtime.bundle_watch import BundleWatcher
from authz.runtime.circuit import CLOSED, CircuitBreaker
from authz.runtime.config import Settings, is_loopback_host
from authz.runtime.expiry import KeyExpiryWatch
from authz.runtime.logs import DecisionLog
from authz.runtime.metrics import Metrics, MetricsSink
from authz.runtime.overrides import OpaOverrideWriter, OverrideStore
from authz.runtime.preview import parse_preview_request, preview
from authz.runtime.readiness import (
    ReadinessCheck,
    bundle_check,
    opa_bundles_check,
    opa_check,
    redis_check,
    secrets_check,
    serving_check,
)
from authz.runtime.secrets import SecretStore
from authz.runtime.servicer import AuthorizationServicer

__all__ = [
    "AUTHZ_SERVICE",
    "AuthzServer",
    "build_authorizer",
    "build_limiter",
    "create_server",
    "grpc_server_credentials",
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

# How often the overrides list is re-pushed to OPA (it keeps pushed data in memory only).
_OVERRIDES_SYNC_S: Final = 5.0

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
    *,
    control: Control | None = None,
    cache: DecisionCache | None = None,
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
        control=control,
        fail_open_paths=settings.fail_open_paths,
        fail_open_max_per_s=settings.fail_open_max_per_s,
        cache=cache,
        sinks=sinks,
    )


def grpc_server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The gRPC listener's mTLS credentials from ``AUTHZ_GRPC_TLS_CERT`` (PEM chain),
    ``AUTHZ_GRPC_TLS_KEY`` (its PEM private key) and ``AUTHZ_GRPC_TLS_CLIENT_CA`` (PEM CA
    certificates; a client must present a certificate issued by one of them: Envoy's),
    or None when the settings ask for none (plaintext, which config allows only on
    loopback or with ``AUTHZ_GRPC_ALLOW_PLAINTEXT``).

    The files are read and checked here: an unreadable file, a certificate and key that
    are not PEM or do not match, or a CA file without a certificate raises ConfigError
    naming the key and the path (never the key material). They are reloaded when they
    change (:class:`_TlsFiles`, checked at each new connection), so a renewed
    certificate needs no restart; a bad renewal is logged and the previous files stay in
    use. Client authentication is always required. Built with grpc's
    ``dynamic_ssl_server_credentials`` (https://grpc.github.io/grpc/python/grpc.html#
    create-server-credentials)."""
    if (
        settings.grpc_tls_cert is None
        or settings.grpc_tls_key is None
        or settings.grpc_tls_client_ca is None
    ):
        return None
    files = _TlsFiles(settings.grpc_tls_cert, settings.grpc_tls_key, settings.grpc_tls_client_ca)
    # grpc documents None as "keep the current configuration"; its stubs do not.
    fetch = cast("Callable[[], grpc.ServerCertificateConfiguration]", files.fetch)
    return grpc.dynamic_ssl_server_credentials(
        files.initial, fetch, require_client_authentication=True
    )


class _TlsFiles:
    """The listener's certificate, key and client CA, re-read when one of them changes
    (size, mtime or inode: a Kubernetes Secret update swaps a symlink)."""

    def __init__(self, cert: Path, key: Path, client_ca: Path) -> None:
        self._paths = (cert, key, client_ca)
        self.initial = self._load()  # first: its errors name the setting
        self._stamp = self._stat()

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        stats = [path.stat() for path in self._paths]
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert_path, key_path, ca_path = self._paths
        cert = _read_tls_file("AUTHZ_GRPC_TLS_CERT", cert_path)
        key = _read_tls_file("AUTHZ_GRPC_TLS_KEY", key_path)
        client_ca = _read_tls_file("AUTHZ_GRPC_TLS_CLIENT_CA", ca_path)
        # The standard library's TLS parses PEM and matches key and certificate with
        # precise errors; grpc would only fail later, without saying which file.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"AUTHZ_GRPC_TLS_CERT={str(cert_path)!r}, AUTHZ_GRPC_TLS_KEY="
                f"{str(key_path)!r}: not a PEM certificate chain and its matching private "
                f"key ({exc.reason or exc.strerror})"
            ) from None
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError):
            raise ConfigError(
                f"AUTHZ_GRPC_TLS_CLIENT_CA={str(ca_path)!r}: no PEM CA certificate in it"
            ) from None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's certificate_configuration_fetcher: called for each new connection; a
        new configuration when the files changed and are valid, else None (keep)."""
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            self._stamp = stamp  # one attempt (and one log line) per change
            config = self._load()
        except (OSError, ConfigError) as exc:
            log.error(
                "gRPC TLS files changed but cannot be used; keeping the previous ones",
                extra={"error": str(exc)},
            )
            return None
        log.info("gRPC TLS certificates reloaded")
        return config


def _read_tls_file(key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}={str(path)!r}: cannot read: {exc.strerror}") from None


async def create_server(
    authorizer: Authorizer, addr: str, credentials: grpc.ServerCredentials | None = None
) -> AuthzServer:
    """Build and start a grpc.aio server on ``addr`` (``host:port``; port 0 = any free)
    serving Check and ``grpc.health.v1.Health``, over TLS with ``credentials``
    (:func:`grpc_server_credentials`) or plaintext without. Raises RuntimeError if the
    address cannot be bound."""
    server = grpc.aio.server(options=_GRPC_OPTIONS)
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        AuthorizationServicer(authorizer), server
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if credentials is None:
        port = server.add_insecure_port(addr)
    else:
        port = server.add_secure_port(addr, credentials)
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC address {addr!r}")
    await server.start()
    for service in ("", AUTHZ_SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    return AuthzServer(server, port, health)


async def serve(settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
    """Run authz until SIGTERM or SIGINT, then shut down gracefully. ``reload`` re-reads
    the settings on SIGHUP (the mode switches, the secrets file is re-read). Raises
    ConfigError before serving anything when a file it needs (secrets, audit database,
    overrides) is unusable."""
    _tune_gc()
    grpc_credentials = grpc_server_credentials(settings)
    metrics = Metrics()
    secrets = SecretStore.open(settings.secrets_file) if settings.secrets_file else None
    opa = OpaClient(settings.opa_url, token=settings.opa_token, pool_size=settings.opa_pool_size)
    breaker = CircuitBreaker(
        opa,
        failure_threshold=settings.circuit_failure_threshold,
        reset_timeout_s=settings.circuit_reset_timeout_s,
        on_state_change=lambda state: _circuit_changed(metrics, state),
    )
    control = Control(settings.mode, allow_bypass=settings.allow_bypass, on_change=metrics.set_mode)
    limiter = build_limiter(settings)
    audit = _audit_trail(settings, metrics)
    cache = decision_cache(settings)

    def overrides_pushed() -> None:
        if cache is not None:
            cache.clear("overrides changed")

    overrides = OverrideStore(
        OpaOverrideWriter(opa),
        path=settings.overrides_file,
        on_change=metrics.overrides_active.set,
        on_pushed=overrides_pushed,
    )
    if cache is not None:
        metrics.watch_decision_cache(cache)
    sinks: list[DecisionSink] = [
        MetricsSink(metrics),
        KeyExpiryWatch(settings.key_expiry_warning_days, metrics.expiring_key_decisions),
    ]
    if settings.decision_log:
        sinks.append(DecisionLog())
    if audit is not None:
        sinks.append(audit)
    authorizer = build_authorizer(
        settings, breaker, sinks, secrets, limiter, control=control, cache=cache
    )
    grpc_server = await create_server(authorizer, settings.grpc_addr, grpc_credentials)
    watcher = BundleWatcher(
        opa,
        interval_s=settings.bundle_poll_interval_s,
        on_revision=cache.observe_revision if cache is not None else None,
        on_activation=lambda revision: _bundle_activated(metrics, revision),
    )
    stopping = asyncio.Event()
    tasks = [
        asyncio.create_task(watcher.run(), name="bundle-watcher"),
        asyncio.create_task(overrides.watch(_OVERRIDES_SYNC_S), name="overrides"),
    ]
    if secrets is not None:
        secrets.on_reload = lambda ok: _secrets_reloaded(metrics, ok)
        metrics.secrets_loaded.set(1)
        tasks.append(
            asyncio.create_task(secrets.watch(settings.secrets_reload_interval_s), name="secrets")
        )

    checks: dict[str, ReadinessCheck] = {
        "serving": serving_check(stopping.is_set),
        "opa": opa_check(opa_bundles_check(opa), breaker),
        "bundle": bundle_check(watcher),
    }
    if secrets is not None:
        checks["secrets"] = secrets_check(secrets)
    if isinstance(limiter, RedisLimiter):
        checks["rate_limit"] = redis_check(limiter, settings.redis_failure_mode)

    def before_scrape() -> None:
        control.warn_if_bypass()

        if isinstance(limiter, RedisLimiter):
            metrics.rate_limit_backend_available.labels("redis").set(int(limiter.available))

    def on_action(action: str, fields: Mapping[str, Any]) -> None:
        if audit is not None:
            audit.admin(action, fields, entry_id=str(fields.get("id", action)))

    async def preview_decision(body: Any) -> Mapping[str, Any]:
        request = parse_preview_request(body, default_decision_path=settings.default_decision_path)
        return await preview(
            breaker,
            request,
            credential_headers=settings.credential_headers,
            timeout_s=settings.decision_timeout_s,
        )

    async def reload_now(actor: str) -> Mapping[str, Any]:
        result = _reload(reload, control, secrets, on_action, actor=actor)
        changed = await watcher.poll_once()
        if cache is not None:
            cache.clear("admin reload")
        return {**result, "revision": watcher.revision, "bundle_changed": changed}

    admin_app = create_admin_app(
        checks,
        metrics=metrics,
        before_scrape=before_scrape,
        control=control,
        overrides=overrides,
        token=settings.admin_token,
        on_action=on_action,
        preview=preview_decision,
        reload=reload_now,
    )
    admin_host, _, admin_port = settings.admin_addr.rpartition(":")
    runner, bound_admin = await start_admin(admin_app, admin_host, int(admin_port))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(reload, control, secrets, on_action))
    log.info(
        "authz serving",
        extra={
            "grpc_addr": settings.grpc_addr,
            "grpc_port": grpc_server.port,
            "grpc_mtls": grpc_credentials is not None,
            "admin_port": bound_admin,
            "opa_url": settings.opa_url,
            "default_decision_path": settings.default_decision_path,
            "decision_timeout_ms": settings.decision_timeout_ms,
            "mode": control.mode.value,
            "fail_open_paths": list(settings.fail_open_paths),
            "secrets_file": str(settings.secrets_file) if settings.secrets_file else None,
            "audit_db": str(settings.audit_db) if settings.audit_db else None,
            "rate_limit_backend": settings.rate_limit_backend,
            "admin_api": settings.admin_token is not None,
            "decision_cache_ttl_s": settings.decision_cache_ttl_s,
        },
    )
    if grpc_credentials is None and not is_loopback_host(settings.grpc_addr.rpartition(":")[0]):
        log.warning(
            "gRPC listener is plaintext on a non-loopback address (AUTHZ_GRPC_ALLOW_PLAINTEXT): "
            "credentials cross the network in clear",
            extra={"grpc_addr": settings.grpc_addr},
        )
    if settings.fail_open_paths:
        log.warning(
            "fail-open paths allow requests when OPA fails",
            extra={"fail_open_paths": list(settings.fail_open_paths)},
        )
    await stopping.wait()
    log.info("shutting down", extra={"grace_s": settings.shutdown_grace_s})
    await grpc_server.stop(settings.shutdown_grace_s)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await runner.cleanup()
    await breaker.close()
    await limiter.close()
    if audit is not None:
        await asyncio.to_thread(audit.close)
    log.info("stopped")


def _tune_gc() -> None:
    """Fewer, cheaper cyclic-GC passes: a decision allocates thousands of short-lived
    objects that reference counting frees, and the default thresholds (700, 10, 10) then
    run a full collection every few hundred requests, scanning every cached decision and
    pausing the event loop for milliseconds (p99 spikes). Objects alive at startup are
    frozen out of collections altogether."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def _reload(
    reload: Callable[[], Settings] | None,
    control: Control,
    secrets: SecretStore | None,
    on_action: Callable[[str, Mapping[str, Any]], None],
    *,
    actor: str = "sighup",
) -> dict[str, Any]:
    """SIGHUP and ``POST /v1/reload``: re-read the settings (the mode applies at once) and
    the secrets file. Returns ``{"mode": str, "settings": "reloaded" | "refused" |
    "not_configured", "secrets": "reloaded" | "unchanged" | "failed" | "not_configured"}``."""
    log.info("reloading", extra={"actor": actor})
    result: dict[str, Any] = {"settings": "not_configured", "secrets": "not_configured"}
    if secrets is not None:
        reread = secrets.refresh()
        result["secrets"] = (
            "failed" if not secrets.loaded else "reloaded" if reread else "unchanged"
        )
    if reload is not None:
        try:
            new = reload()
            result["settings"] = "reloaded"
            if new.mode is not control.mode:
                previous = control.set_mode(new.mode, actor=actor, reason="settings reloaded")
                on_action(
                    "set_mode",
                    {
                        "mode": new.mode.value,
                        "previous": previous.value,
                        "actor": actor,
                        "reason": "settings reloaded",
                    },
                )
        except ConfigError as exc:
            result["settings"] = "refused"
            log.error("reload refused; keeping the running settings", extra={"error": str(exc)})
    result["mode"] = control.mode.value
    return result


def _circuit_changed(metrics: Metrics, state: str) -> None:
    metrics.set_circuit_state(state)
    level = logging.INFO if state == CLOSED else logging.WARNING
    log.log(level, "OPA circuit breaker %s", state, extra={"state": state})


def _bundle_activated(metrics: Metrics, revision: str) -> None:
    metrics.bundle.info({"revision": revision})
    metrics.bundle_activations.inc()


def _secrets_reloaded(metrics: Metrics, ok: bool) -> None:
    metrics.secrets_loaded.set(int(ok))
    if ok:
        metrics.secrets_reloads.inc()
    else:
        metrics.secrets_reload_failures.inc()


def _audit_trail(settings: Settings, metrics: Metrics) -> AuditTrail | None:
    if settings.audit_db is None:
        return None
    counts = {"written": 0, "failed": 0}

    def on_state(degraded: bool, written: int, failed: int) -> None:
        metrics.audit_degraded.set(int(degraded))
        metrics.audit_records.inc(max(0, written - counts["written"]))
        metrics.audit_write_failures.inc(max(0, failed - counts["failed"]))
        counts.update(written=written, failed=failed)

    return AuditTrail(
        settings.audit_db,
        retention_days=settings.audit_retention_days or None,
        max_records=settings.audit_max_records,
        on_state=on_state,
        projection=Projection(
            headers=settings.audit_headers,
            body_max_bytes=settings.audit_body_max_bytes,
            value_max_bytes=settings.audit_value_max_bytes,
            row_max_bytes=settings.audit_row_max_bytes,
            # Also any header configured as a credential (AUTHZ_CREDENTIAL_HEADERS).
            never=Projection().never | frozenset(settings.credential_headers),
        ),
        max_bytes=settings.audit_max_bytes,
    )


def decision_cache(settings: Settings) -> DecisionCache | None:
    """The decision cache the ``AUTHZ_DECISION_CACHE_*`` settings describe; None when
    its TTL is 0 (caching off)."""
    if settings.decision_cache_ttl_s <= 0:
        return None
    return DecisionCache(
        ttl_s=settings.decision_cache_ttl_s,
        confirm_s=settings.decision_cache_confirm_s,
        max_entries=settings.decision_cache_max_entries,
        max_bytes=settings.decision_cache_max_bytes,
        ignore_headers=settings.decision_cache_ignore_headers,
    )


def build_limiter(settings: Settings) -> Limiter:
    """The rate limiter the settings describe: in process, or Redis shared by replicas."""
    if settings.rate_limit_backend != "redis" or settings.redis_url is None:
        return MemoryLimiter()
    import redis.asyncio  # only needed with the redis backend
    import redis.exceptions
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    timeout_s = settings.redis_timeout_ms / 1000
    # A blocking pool: a burst of checks waits (within the timeout) for a connection
    # instead of failing with "too many connections" and falling back.
    # One immediate retry on a connection error: after a Redis restart the pooled
    # connections are dead, and the first use of each must reconnect, not fail the check.
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        settings.redis_url.reveal(),
        max_connections=settings.redis_pool_size,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[redis.exceptions.ConnectionError],
    )
    client = redis.asyncio.Redis.from_pool(pool)  # closes the pool with the client
    if settings.redis_failure_mode == "deny":
        return RedisLimiter(client, on_failure="deny", timeout_s=timeout_s)
    return RedisLimiter(client, on_failure="fallback", timeout_s=timeout_s)
