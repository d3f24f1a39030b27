"""The service's lifecycle: wire the components from :class:`Settings`, serve, shut down.

Follows grpc's ``helloworld/async_greeter_server_with_graceful_shutdown.py``
(https://github.com/grpc/grpc/tree/master/examples/python/helloworld):
:func:`create_server` builds and starts the grpc.aio server (Check + standard health;
port 0 picks a free port, for tests). :func:`build_runtime` is the one wiring function:
it builds every component and registers each one's close on an
:class:`contextlib.AsyncExitStack` as soon as it exists. :func:`serve` and :func:`run`
drive that stack: a start that fails at any step raises :class:`StartupError` (one line;
``run`` logs it and returns exit code 2) with everything already built closed; a started
server runs until SIGTERM/SIGINT, then marks health NOT_SERVING first (so Envoy and load
balancers stop sending), drains in-flight calls for ``shutdown_grace_s`` seconds, and the
stack closes the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final, cast

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from opentelemetry.trace import Tracer

from authz.core.authorizer import Authorizer, CredentialSource
from authz.core.batch import Coalescer
from authz.core.cache import DecisionCache
from authz.core.errors import ConfigError, StartupError
from authz.core.input import GrpcDescriptors
from authz.core.mode import Control
from authz.core.opa import OpaClient, PolicyEngine
from authz.core.ratelimit import Limiter, MemoryLimiter, RedisLimiter
from authz.core.record import DecisionSink
from authz.core.tunnel import TunnelResolver
from authz.runtime.admin import create_admin_app, start_admin
from authz.runtime.als import AccessLogServicer, add_access_log_to_server
from authz.runtime.audit import AuditTrail, Projection
from authz.runtime.audit.storage import AuditStorage
from authz.runtime.bundle_watch import BundleWatcher
from authz.runtime.circuit import CLOSED, CircuitBreaker
from authz.runtime.config import RELOADABLE, Settings, is_loopback_host
from authz.runtime.decision_upload import DecisionUploader, aiohttp_post
from authz.runtime.decisions import DECISIONS_SERVICE, DecisionsServicer, add_decisions_to_server
from authz.runtime.expiry import KeyExpiryWatch
from authz.runtime.fleet import Fleet, RedisOverrideStore
from authz.runtime.fleet import connect as fleet_connect
from authz.runtime.logs import DecisionLog
from authz.runtime.metrics import Metrics, MetricsSink
from authz.runtime.overrides import OpaOverrideWriter, Override, OverrideBackend, OverrideStore
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
from authz.runtime.servicer import AuthorizationServicer, add_to_server
from authz.runtime.tracing import build_tracing

__all__ = [
    "AUTHZ_SERVICE",
    "AuthzServer",
    "LiveSettings",
    "Runtime",
    "StartupError",
    "build_authorizer",
    "build_fleet",
    "build_limiter",
    "build_runtime",
    "create_server",
    "decision_cache",
    "grpc_server_credentials",
    "reload_settings",
    "run",
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
# How long a Redis that must be reachable (failure mode deny) may take to answer at startup.
_REDIS_STARTUP_S: Final = 1.0

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
    tracer: Tracer | None = None,
) -> Authorizer:
    """The :class:`Authorizer` the settings describe, over ``engine``."""
    return Authorizer(
        engine,
        default_decision_path=settings.default_decision_path,
        credential_headers=settings.credential_headers,
        timeout_s=settings.decision_timeout_s,
        parse_body=settings.parse_body,
        pass_jwts=settings.jwt_passthrough,
        grpc_descriptors=_grpc_descriptors(settings),
        limiter=limiter,
        burst_s=settings.rate_limit_burst_s,
        credentials=credentials,
        # Egress tunnels: destinations resolved and checked off the event loop (threads
        # start on first use and idle out with the process).
        tunnels=TunnelResolver(static=dict(settings.egress_tunnel_test_targets)),
        control=control,
        fail_open_paths=settings.fail_open_paths,
        fail_open_max_per_s=settings.fail_open_max_per_s,
        cache=cache,
        sinks=sinks,
        tracer=tracer,
    )


def _grpc_descriptors(settings: Settings) -> GrpcDescriptors | None:
    """The descriptor set ``AUTHZ_PROTO_DESCRIPTOR`` names (``protoc --descriptor_set_out
    --include_imports``), or None. Raises ConfigError naming the key and the file."""
    path = settings.proto_descriptor
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"AUTHZ_PROTO_DESCRIPTOR={str(path)!r}: {exc.strerror}") from None
    return GrpcDescriptors.from_bytes(data, key=f"AUTHZ_PROTO_DESCRIPTOR={str(path)!r}")


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
    authorizer: Authorizer,
    addr: str,
    credentials: grpc.ServerCredentials | None = None,
    decisions: DecisionsServicer | None = None,
    access_log: AccessLogServicer | None = None,
) -> AuthzServer:
    """Build and start a grpc.aio server on ``addr`` (``host:port``; port 0 = any free)
    serving Check, ``authz.v1.Decisions/BatchCheck`` (with ``decisions``) and
    ``grpc.health.v1.Health`` and, with ``access_log``, Envoy's
    ``envoy.service.accesslog.v3.AccessLogService`` (tunnel ends), over TLS with ``credentials``
    (:func:`grpc_server_credentials`) or plaintext without. Raises RuntimeError if the
    address cannot be bound."""
    server = grpc.aio.server(options=_GRPC_OPTIONS)
    # Not the generated add_AuthorizationServicer_to_server: an undecodable CheckRequest
    # must reach Check and get a deny, not fail inside grpc with a gRPC error.
    add_to_server(AuthorizationServicer(authorizer), server)
    if decisions is not None:  # the same port, TLS and authentication as Check
        add_decisions_to_server(decisions, server)
    if access_log is not None:  # the same port and mTLS: only Envoy's certificate
        add_access_log_to_server(access_log, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        if credentials is None:
            port = server.add_insecure_port(addr)
        else:
            port = server.add_secure_port(addr, credentials)
        if port == 0:
            raise RuntimeError(f"cannot bind gRPC address {addr!r}")
    except RuntimeError:
        await server.stop(None)  # release the core server now, not at garbage collection
        raise
    await server.start()
    for service in ("", AUTHZ_SERVICE, *((DECISIONS_SERVICE,) if decisions else ())):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    return AuthzServer(server, port, health)


@dataclass(frozen=True, slots=True)
class Runtime:
    """The running components :func:`build_runtime` wired from the settings. Each one's
    close is already registered on the exit stack it was built on."""

    settings: Settings
    metrics: Metrics
    control: Control
    engine: CircuitBreaker
    limiter: Limiter
    audit: AuditTrail | None
    secrets: SecretStore | None
    watcher: BundleWatcher
    grpc: AuthzServer
    grpc_tls: bool
    admin_port: int
    stopping: asyncio.Event
    live: LiveSettings
    reload: Callable[[], Settings] | None = None
    # Fleet (issue #16): shared overrides and cache invalidation, with AUTHZ_REDIS_URL.
    fleet: Fleet | None = None

    async def serve_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT (SIGHUP reloads, see :func:`reload_settings`),
        then: readiness and gRPC health NOT_SERVING first (Envoy and load balancers stop
        sending), then drain in-flight calls for ``shutdown_grace_s`` seconds. What is left
        (admin, watchers, pools, the audit writer) closes with the exit stack."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        try:
            self._log_started()
            await self.stopping.wait()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
        log.info("shutting down", extra={"grace_s": self.settings.shutdown_grace_s})
        await self.grpc.stop(self.settings.shutdown_grace_s)

    def _sighup(self) -> None:
        on_action = _audit_action(self.audit)
        result = reload_settings(self.reload, self.live, self.secrets, on_action)
        on_action("reload", {"actor": "sighup", **result})

    def _log_started(self) -> None:
        settings = self.settings
        log.info(
            "authz serving",
            extra={
                "grpc_addr": settings.grpc_addr,
                "grpc_port": self.grpc.port,
                "grpc_mtls": self.grpc_tls,
                "admin_port": self.admin_port,
                "opa_url": settings.opa_url,
                "default_decision_path": settings.default_decision_path,
                "decision_timeout_ms": settings.decision_timeout_ms,
                "mode": self.control.mode.value,
                "fail_open_paths": list(settings.fail_open_paths),
                "secrets_file": str(settings.secrets_file) if settings.secrets_file else None,
                "audit_db": self.audit.label if self.audit is not None else None,
                "rate_limit_backend": settings.rate_limit_backend,
                "overrides_store": "redis" if self.fleet is not None else "file",
                "admin_api": settings.admin_token is not None,
                "decision_cache_ttl_s": settings.decision_cache_ttl_s,
            },
        )
        if not self.grpc_tls and not is_loopback_host(settings.grpc_addr.rpartition(":")[0]):
            log.warning(
                "gRPC listener is plaintext on a non-loopback address "
                "(AUTHZ_GRPC_ALLOW_PLAINTEXT): credentials cross the network in clear",
                extra={"grpc_addr": settings.grpc_addr},
            )
        if settings.fail_open_paths:
            log.warning(
                "fail-open paths allow requests when OPA fails",
                extra={"fail_open_paths": list(settings.fail_open_paths)},
            )


async def build_runtime(
    settings: Settings,
    stack: contextlib.AsyncExitStack,
    reload: Callable[[], Settings] | None = None,
) -> Runtime:
    """Build and start every component ``settings`` describe, registering each one's
    close on ``stack`` as soon as it exists, so a failure at any step leaves nothing
    open once the stack unwinds. ``reload`` re-reads the settings (SIGHUP,
    ``POST /v1/reload``).

    Order: the listen addresses are checked first (a port in use fails before anything
    starts or logs), then the files (TLS, secrets, audit database, overrides), the OPA
    and Redis clients, with ``AUTHZ_REDIS_URL`` the fleet's first read of the overrides
    into OPA (so a new replica enforces them from its first Check), the gRPC server, the
    watchers, and the admin server last.

    Raises :class:`StartupError` (one line naming what failed) for a port in use, an
    unusable file, or Redis unreachable with ``AUTHZ_REDIS_FAILURE_MODE=deny``; a
    :class:`ConfigError` from a file reader is re-raised as one."""
    try:
        return await _build(settings, stack, reload)
    except StartupError:
        raise
    except ConfigError as exc:
        raise StartupError(str(exc)) from None


async def _build(
    settings: Settings,
    stack: contextlib.AsyncExitStack,
    reload: Callable[[], Settings] | None,
) -> Runtime:
    _check_bindable("AUTHZ_GRPC_ADDR", settings.grpc_addr)
    _check_bindable("AUTHZ_ADMIN_ADDR", settings.admin_addr)
    grpc_credentials = grpc_server_credentials(settings)
    metrics = Metrics()
    secrets = SecretStore.open(settings.secrets_file) if settings.secrets_file else None
    audit = _audit_trail(settings, metrics)
    if audit is not None:
        stack.push_async_callback(_in_own_thread, audit.close, "audit-close")
    tracing = build_tracing()  # OTEL_* variables; None unless configured
    if tracing is not None:
        stack.push_async_callback(_in_own_thread, tracing.shutdown, "tracing-shutdown")
    tracer = tracing.tracer if tracing is not None else None
    opa = OpaClient(
        settings.opa_url,
        token=settings.opa_token,
        pool_size=settings.opa_pool_size,
        propagate_trace=tracer is not None,
    )
    stack.push_async_callback(opa.close)
    # Concurrent misses share one OPA query (issue #19; AUTHZ_OPA_BATCH_MAX=1: never).
    # Below the breaker, so the breaker still counts each decision's own outcome.
    coalescer = Coalescer(
        opa,
        max_batch=settings.opa_batch_max,
        max_bytes=settings.opa_batch_max_bytes,
        max_in_flight=settings.opa_batch_in_flight,
        on_batch=lambda outcome, size: metrics.opa_batch_size.labels(outcome).observe(size),
    )
    breaker = CircuitBreaker(
        coalescer,
        failure_threshold=settings.circuit_failure_threshold,
        reset_timeout_s=settings.circuit_reset_timeout_s,
        on_state_change=lambda state: _circuit_changed(metrics, state),
    )
    limiter = build_limiter(settings)
    stack.push_async_callback(limiter.close)
    if isinstance(limiter, RedisLimiter) and settings.redis_failure_mode == "deny":
        await _require_redis(settings)
    cache = decision_cache(settings)
    if cache is not None:
        metrics.watch_decision_cache(cache)
    on_pushed = (lambda: cache.clear("overrides changed")) if cache is not None else None
    fleet = build_fleet(settings, OpaOverrideWriter(opa), cache, metrics, _audit_action(audit))
    overrides: OverrideBackend
    if fleet is not None:
        stack.push_async_callback(fleet.close)
        overrides = fleet.overrides
    else:
        overrides = OverrideStore(
            OpaOverrideWriter(opa),
            path=settings.overrides_file,
            on_change=metrics.overrides_active.set,
            on_pushed=on_pushed,
        )
    control = Control(settings.mode, allow_bypass=settings.allow_bypass, on_change=metrics.set_mode)
    expiry = KeyExpiryWatch(settings.key_expiry_warning_days, metrics.expiring_key_decisions)
    sinks: list[DecisionSink] = [MetricsSink(metrics), expiry]
    upload = await _decision_upload(settings, metrics, stack)
    if settings.decision_log or upload is not None:
        decision_log = DecisionLog.from_settings(settings, upload=upload)
        stack.callback(decision_log.flush)  # the last loop turn's lines (issue 19)
        sinks.append(decision_log)
    if audit is not None:
        sinks.append(audit)
    authorizer = build_authorizer(
        settings, breaker, sinks, secrets, limiter, control=control, cache=cache, tracer=tracer
    )
    live = LiveSettings(settings, control, authorizer, expiry)
    if fleet is not None:
        # Every active override in this replica's OPA before the first Check.
        await fleet.start()
    try:
        grpc_server = await create_server(
            authorizer,
            settings.grpc_addr,
            grpc_credentials,
            DecisionsServicer(
                authorizer,
                max_actions=settings.batch_check_max_actions,
                max_bytes=settings.batch_check_max_bytes,
                on_call=lambda result, actions: _batch_check_counted(metrics, result, actions),
            ),
            _access_log_servicer(audit, metrics),
        )
    except RuntimeError as exc:  # lost a race for the port since _check_bindable
        raise StartupError(f"AUTHZ_GRPC_ADDR={settings.grpc_addr!r}: {exc}") from None
    stack.push_async_callback(grpc_server.stop, 0)  # a no-op once drained on a signal

    watcher = BundleWatcher(
        opa,
        interval_s=settings.bundle_poll_interval_s,
        on_revision=cache.observe_revision if cache is not None else None,
        on_activation=_FleetActivation(metrics, fleet),
        on_cache_keys=cache.declare if cache is not None else None,
    )
    _background(stack, watcher.run(), "bundle-watcher")
    if fleet is not None:
        _background(stack, fleet.run(), "fleet")
    elif isinstance(overrides, OverrideStore):
        _background(stack, overrides.watch(_OVERRIDES_SYNC_S), "overrides")
    if secrets is not None:
        secrets.on_reload = lambda ok: _secrets_reloaded(metrics, ok)
        metrics.secrets_loaded.set(1)
        _background(stack, secrets.watch(settings.secrets_reload_interval_s), "secrets")

    stopping = asyncio.Event()
    checks: dict[str, ReadinessCheck] = {
        "serving": serving_check(stopping.is_set),
        "opa": opa_check(opa_bundles_check(opa), breaker),
        "bundle": bundle_check(watcher),
    }
    if secrets is not None:
        checks["secrets"] = secrets_check(secrets)
    if isinstance(limiter, RedisLimiter):
        checks["rate_limit"] = redis_check(limiter, settings.redis_failure_mode)
    if fleet is not None:
        checks["overrides"] = fleet.readiness()
    hooks = _AdminHooks(
        live,
        control,
        breaker,
        limiter,
        metrics,
        watcher,
        cache,
        secrets,
        on_action=_audit_action(audit),
        reload=reload,
        fleet=fleet,
    )
    admin_app = create_admin_app(
        checks,
        metrics=metrics,
        before_scrape=hooks.before_scrape,
        control=control,
        overrides=overrides,
        token=settings.admin_token,
        on_action=hooks.on_action,
        preview=hooks.preview,
        reload=hooks.reload_now,
        tracer=tracer,
    )
    admin_host, _, admin_port = settings.admin_addr.rpartition(":")
    try:
        runner, bound_admin = await start_admin(admin_app, admin_host, int(admin_port))
    except OSError as exc:  # lost a race for the port since _check_bindable
        raise StartupError(
            f"AUTHZ_ADMIN_ADDR={settings.admin_addr!r}: cannot listen ({exc.strerror})"
        ) from None
    stack.push_async_callback(runner.cleanup)
    return Runtime(
        settings=settings,
        metrics=metrics,
        control=control,
        engine=breaker,
        limiter=limiter,
        audit=audit,
        secrets=secrets,
        watcher=watcher,
        grpc=grpc_server,
        grpc_tls=grpc_credentials is not None,
        admin_port=bound_admin,
        stopping=stopping,
        live=live,
        reload=reload,
        fleet=fleet,
    )


@dataclass(frozen=True, slots=True)
class _AdminHooks:
    """What the admin server calls back into: the scrape hook, preview and reload."""

    live: LiveSettings
    control: Control
    engine: CircuitBreaker
    limiter: Limiter
    metrics: Metrics
    watcher: BundleWatcher
    cache: DecisionCache | None
    secrets: SecretStore | None
    on_action: Callable[[str, Mapping[str, Any]], None]
    reload: Callable[[], Settings] | None
    fleet: Fleet | None = None

    def before_scrape(self) -> None:
        """Refresh what a scrape reads: the bypass warning, Redis availability, the
        fleet's sync lag."""
        self.control.warn_if_bypass()
        if isinstance(self.limiter, RedisLimiter):
            available = int(self.limiter.available)
            self.metrics.rate_limit_backend_available.labels("redis").set(available)
        if self.fleet is not None:
            self.fleet.before_scrape()

    async def preview(self, body: Any) -> Mapping[str, Any]:
        """``POST /v1/preview`` (:mod:`authz.runtime.preview`)."""
        settings = self.live.settings
        request = parse_preview_request(body, default_decision_path=settings.default_decision_path)
        return await preview(
            self.engine,
            request,
            credential_headers=settings.credential_headers,
            timeout_s=settings.decision_timeout_s,
        )

    async def reload_now(self, actor: str) -> Mapping[str, Any]:
        """``POST /v1/reload``: :func:`reload_settings`, ask OPA for the active bundle
        now, and empty the decision cache."""
        result = reload_settings(self.reload, self.live, self.secrets, self.on_action, actor=actor)
        changed = await self.watcher.poll_once()
        if self.cache is not None:
            self.cache.clear("admin reload")
        if self.fleet is not None:
            self.fleet.invalidate("admin reload")
        return {**result, "revision": self.watcher.revision, "bundle_changed": changed}


async def serve(settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
    """Run authz until SIGTERM or SIGINT, then shut down gracefully; everything
    :func:`build_runtime` built is closed on the way out, whether startup completed or
    not. Raises :class:`StartupError` (a ConfigError) when it cannot start."""
    _tune_gc()
    async with contextlib.AsyncExitStack() as stack:
        runtime = await build_runtime(settings, stack, reload)
        await runtime.serve_until_signalled()
    log.info("stopped")


async def run(settings: Settings, reload: Callable[[], Settings] | None = None) -> int:
    """:func:`serve`, as a process exit code: 0 after a signalled shutdown, 2 when authz
    cannot start (one error line naming what failed, nothing left open)."""
    try:
        await serve(settings, reload)
    except ConfigError as exc:
        log.error("cannot start: %s", exc, extra={"code": exc.code})
        return 2
    return 0


def _check_bindable(key: str, addr: str) -> None:
    """Raise StartupError when ``addr`` (``host:port``) cannot be listened on (a port in
    use, an address not on this host). Binds and closes a socket per resolved address,
    as the listeners do (SO_REUSEADDR, no SO_REUSEPORT), and passes when one binds; the
    gRPC core would otherwise print its own multi-line error before ours. Port 0 passes."""
    host, _, port_text = addr.rpartition(":")
    port = int(port_text)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(f"{key}={addr!r}: cannot resolve ({exc.strerror})") from None
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                error = exc
                continue
            return
    reason = error.strerror if error is not None else "no address"
    raise StartupError(f"{key}={addr!r}: cannot listen ({reason})")


async def _require_redis(settings: Settings) -> None:
    """With ``AUTHZ_REDIS_FAILURE_MODE=deny`` every limited check fails while Redis is
    down, so an unreachable Redis at startup is a startup failure. Pings with a client of
    its own (closed here) for up to ``_REDIS_STARTUP_S`` seconds."""
    import redis.asyncio  # only needed with the redis backend
    import redis.exceptions

    assert settings.redis_url is not None  # config requires it for the redis backend
    client = redis.asyncio.Redis.from_url(
        settings.redis_url.reveal(),
        socket_timeout=_REDIS_STARTUP_S,
        socket_connect_timeout=_REDIS_STARTUP_S,
    )
    deadline = time.monotonic() + _REDIS_STARTUP_S
    try:
        while True:
            try:
                await client.ping()
                return
            except (redis.exceptions.RedisError, OSError):
                if time.monotonic() >= deadline:
                    break
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()
    raise StartupError(
        "AUTHZ_REDIS_URL=<redacted>: unreachable, and AUTHZ_REDIS_FAILURE_MODE='deny' "
        "would deny every rate-limited request"
    )


async def _in_own_thread(blocking: Callable[[], None], name: str) -> None:
    """Run ``blocking`` (a close that flushes and joins) off the event loop on a thread of
    its own that has ended when this returns; the loop's default executor would keep its
    worker thread alive after authz stopped."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def target() -> None:
        try:
            blocking()
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, done, exc)
        else:
            loop.call_soon_threadsafe(_settle, done, None)

    thread = threading.Thread(target=target, name=name)
    thread.start()
    try:
        await done
    finally:
        thread.join()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the awaiting coroutine was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _background(
    stack: contextlib.AsyncExitStack, work: Coroutine[Any, Any, None], name: str
) -> None:
    """Run ``work`` as a task cancelled (and awaited) when ``stack`` unwinds."""
    task = asyncio.create_task(work, name=name)

    async def cancel() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    stack.push_async_callback(cancel)


async def _decision_upload(
    settings: Settings, metrics: Metrics, stack: contextlib.AsyncExitStack
) -> DecisionUploader | None:
    """The decision-log uploader when ``AUTHZ_DECISION_LOG_SERVICE_URL`` is set, running
    until ``stack`` unwinds (then flushed within ``shutdown_grace_s``)."""
    if settings.decision_log_service_url is None:
        return None
    session = await stack.enter_async_context(aiohttp.ClientSession())
    uploader = DecisionUploader.from_settings(settings, aiohttp_post(session), metrics)
    return await stack.enter_async_context(uploader.running(settings.shutdown_grace_s))


def _audit_action(audit: AuditTrail | None) -> Callable[[str, Mapping[str, Any]], None]:
    """Every admin change (and SIGHUP's) as an audit entry, when there is an audit trail."""

    def on_action(action: str, fields: Mapping[str, Any]) -> None:
        if audit is not None:
            audit.admin(action, fields, entry_id=str(fields.get("id", action)))

    return on_action


def _tune_gc() -> None:
    """Fewer, cheaper cyclic-GC passes: a decision allocates thousands of short-lived
    objects that reference counting frees, and the default thresholds (700, 10, 10) then
    run a full collection every few hundred requests, scanning every cached decision and
    pausing the event loop for milliseconds (p99 spikes). Objects alive at startup are
    frozen out of collections altogether."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


@dataclass(slots=True)
class LiveSettings:
    """The settings the running service uses and the components a reload retunes.

    ``settings`` starts as the startup settings; :meth:`apply` takes the fields of
    :data:`authz.runtime.config.RELOADABLE` from a newly read Settings and leaves every
    other field as it was started (those need a restart;
    :data:`authz.runtime.config.RESTART_ONLY` says why).
    ``authorizer`` and ``expiry`` are None in tests that build only part of the service."""

    settings: Settings
    control: Control
    authorizer: Authorizer | None = None
    expiry: KeyExpiryWatch | None = None

    def changes(self, new: Settings) -> tuple[list[str], list[str]]:
        """The field names that differ in ``new``: (reloadable, restart-only), in field
        order. Names only: a secret's value is never returned. The mode is compared with
        the running mode, which the admin API may have changed since (a reload sets the
        mode the settings name, as before)."""
        running = replace(self.settings, mode=self.control.mode)
        changed = [
            f.name for f in fields(Settings) if getattr(new, f.name) != getattr(running, f.name)
        ]
        return (
            [n for n in changed if n in RELOADABLE],
            [n for n in changed if n not in RELOADABLE],
        )

    def apply(self, new: Settings, *, actor: str) -> tuple[list[str], list[str]]:
        """Apply the reloadable fields of ``new``; returns (applied, restart_required)
        field names. All or nothing: the one step that can refuse (the mode, bypass
        without ``AUTHZ_ALLOW_BYPASS`` at startup: ConfigError) runs first, and the rest
        are plain stores with no await between them, so no Check sees half of it."""
        applied, restart = self.changes(new)
        if "mode" in applied:
            self.control.set_mode(new.mode, actor=actor, reason="settings reloaded")
        if "log_level" in applied:
            logging.getLogger().setLevel(new.log_level)
        if self.authorizer is not None:
            self.authorizer.retune(
                timeout_s=new.decision_timeout_s,
                burst_s=new.rate_limit_burst_s,
                fail_open_paths=new.fail_open_paths,
                fail_open_max_per_s=new.fail_open_max_per_s,
            )
        if self.expiry is not None:
            self.expiry.set_warning_days(new.key_expiry_warning_days)
        self.settings = replace(self.settings, **{n: getattr(new, n) for n in applied})
        return applied, restart


def reload_settings(
    reload: Callable[[], Settings] | None,
    live: LiveSettings,
    secrets: SecretStore | None,
    on_action: Callable[[str, Mapping[str, Any]], None],
    *,
    actor: str = "sighup",
) -> dict[str, Any]:
    """SIGHUP and ``POST /v1/reload``: re-read the secrets file and the settings, and
    apply the settings that can change at runtime (:meth:`LiveSettings.apply`).

    Returns ``{"mode": str, "settings": "reloaded" | "refused" | "not_configured",
    "secrets": "reloaded" | "unchanged" | "failed" | "not_configured", "applied":
    [field names changed and applied], "restart_required": [field names changed that
    need a restart]}``, plus ``"error"`` (the ConfigError, naming the key) when refused:
    then nothing of the new settings applies. Logged as one line ("settings reloaded"
    or "reload refused; keeping the running settings")."""
    log.info("reloading", extra={"actor": actor})
    result: dict[str, Any] = {
        "settings": "not_configured",
        "secrets": "not_configured",
        "applied": [],
        "restart_required": [],
    }
    if secrets is not None:
        reread = secrets.refresh()
        result["secrets"] = (
            "failed" if not secrets.loaded else "reloaded" if reread else "unchanged"
        )
    if reload is not None:
        previous = live.control.mode
        try:
            applied, restart = live.apply(reload(), actor=actor)
        except ConfigError as exc:
            result["settings"] = "refused"
            result["error"] = str(exc)
            log.error("reload refused; keeping the running settings", extra={"error": str(exc)})
        else:
            result.update(settings="reloaded", applied=applied, restart_required=restart)
            log.info(
                "settings reloaded",
                extra={"actor": actor, "applied": applied, "restart_required": restart},
            )
            if "mode" in applied:
                on_action(
                    "set_mode",
                    {
                        "mode": live.control.mode.value,
                        "previous": previous.value,
                        "actor": actor,
                        "reason": "settings reloaded",
                    },
                )
    result["mode"] = live.control.mode.value
    return result


def _circuit_changed(metrics: Metrics, state: str) -> None:
    metrics.set_circuit_state(state)
    level = logging.INFO if state == CLOSED else logging.WARNING
    log.log(level, "OPA circuit breaker %s", state, extra={"state": state})


def _batch_check_counted(metrics: Metrics, result: str, actions: int) -> None:
    metrics.batch_checks.labels(result).inc()
    if result == "ok":
        metrics.batch_check_actions.observe(actions)


def _bundle_activated(metrics: Metrics, revision: str) -> None:
    metrics.bundle.info({"revision": revision})
    metrics.bundle_activations.inc()


class _FleetActivation:
    """The bundle watcher's ``on_activation``: metrics, and from the second activation
    on (the first is this replica starting) every replica's decision cache emptied."""

    def __init__(self, metrics: Metrics, fleet: Fleet | None) -> None:
        self._metrics = metrics
        self._fleet = fleet
        self._seen = False

    def __call__(self, revision: str) -> None:
        _bundle_activated(self._metrics, revision)
        if self._fleet is not None and self._seen:
            self._fleet.invalidate(f"bundle revision {revision}")
        self._seen = True


def _secrets_reloaded(metrics: Metrics, ok: bool) -> None:
    metrics.secrets_loaded.set(int(ok))
    if ok:
        metrics.secrets_reloads.inc()
    else:
        metrics.secrets_reload_failures.inc()


def _audit_trail(settings: Settings, metrics: Metrics) -> AuditTrail | None:
    """The audit writer: to this replica's chain in PostgreSQL when ``AUTHZ_AUDIT_URL`` is
    set, else to the SQLite file ``AUTHZ_AUDIT_DB`` (None: no audit trail)."""
    if settings.audit_db is None and settings.audit_url is None:
        return None
    counts = {"written": 0, "failed": 0}

    def on_state(degraded: bool, written: int, failed: int) -> None:
        metrics.audit_degraded.set(int(degraded))
        metrics.audit_records.inc(max(0, written - counts["written"]))
        metrics.audit_write_failures.inc(max(0, failed - counts["failed"]))
        counts.update(written=written, failed=failed)

    target: Path | AuditStorage | None = settings.audit_db
    if settings.audit_url is not None:
        from authz.runtime.audit.postgres import PostgresStorage  # only with a database

        target = PostgresStorage(
            settings.audit_url, settings.replica_id, max_bytes=settings.audit_max_bytes
        )
    assert target is not None  # one of the two is set (checked above)
    return AuditTrail(
        target,
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


def build_fleet(
    settings: Settings,
    push: Callable[[dict[str, Any]], Awaitable[None]],
    cache: DecisionCache | None,
    metrics: Metrics,
    on_action: Callable[[str, Mapping[str, Any]], None],
) -> Fleet | None:
    """The fleet's shared overrides and cache invalidation (:mod:`authz.runtime.fleet`)
    when ``AUTHZ_REDIS_URL`` is set, else None (the file-backed store, as one process).
    ``push`` sends ``data.overrides`` to this replica's OPA; ``on_action`` audits an
    expiry this replica claims. Its own Redis client (not the limiter's pool: a burst
    of checks must not starve the sync), closed by :meth:`Fleet.close`."""
    if settings.redis_url is None:
        return None
    client = fleet_connect(settings.redis_url.reveal())

    def on_expired(override: Override) -> None:
        on_action(
            "expire_override",
            {"id": override.id, "effect": override.effect, "actor": "expiry"},
        )

    store = RedisOverrideStore(
        client,
        push,
        on_change=metrics.overrides_active.set,
        on_pushed=(lambda: cache.clear("overrides changed")) if cache is not None else None,
        on_expired=on_expired,
        on_refused=metrics.fleet_entries_refused.inc,
    )
    return Fleet(client, store, cache, failure_mode=settings.redis_failure_mode, metrics=metrics)


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


# Tunnel ends (issue 18): Envoy's access log service into the audit trail.
def _access_log_servicer(audit: AuditTrail | None, metrics: Metrics) -> AccessLogServicer | None:
    """The AccessLogService that audits tunnel ends (None without an audit trail: the
    service is then not offered, and Envoy's access log keeps the tunnel's line)."""
    if audit is None:
        return None
    return AccessLogServicer(
        audit.tunnel, lambda result, n: metrics.access_log_entries.labels(result).inc(n)
    )
