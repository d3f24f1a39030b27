"""Settings, read once at startup into a frozen object.

Sources, later ones win: the named defaults below, an optional YAML file (keys as in
:class:`Settings`), then ``AUTHZ_<KEY>`` environment variables. The environment is a
parameter (Starlette's ``Config`` pattern) so tests never touch ``os.environ``. Every bad
value raises :class:`~authz.core.errors.ConfigError` naming the key and the value.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

import yaml

from authz.core import authorizer, cache
from authz.core.batch import DEFAULT_MAX_BATCH, DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_IN_FLIGHT
from authz.core.errors import ConfigError
from authz.core.headers import CREDENTIAL_HEADERS, IDENTITY_HEADERS, is_header_name
from authz.core.input import BodyParsing
from authz.core.mode import Mode, parse_mode
from authz.core.opa import parse_decision_path
from authz.core.secret import Secret
from authz.runtime.files import read_capped

__all__ = [
    "ADMIN_TOKEN_MIN_CHARS",
    "DECISION_LOG_FORMATS",
    "DEFAULT_ADMIN_ADDR",
    "DEFAULT_CREDENTIAL_HEADERS",
    "DEFAULT_DECISION_LOG_FORMAT",
    "DEFAULT_DECISION_PATH",
    "DEFAULT_DECISION_TIMEOUT_MS",
    "DEFAULT_GRPC_ADDR",
    "DEFAULT_KEY_EXPIRY_WARNING_DAYS",
    "DEFAULT_OPA_URL",
    "ENV_PREFIX",
    "FILE_SUFFIX",
    "RELOADABLE",
    "RESTART_ONLY",
    "SECRET_FILE_KEYS",
    "SECRET_FILE_MAX_BYTES",
    "SETTINGS_FILE_MAX_BYTES",
    "Settings",
    "is_loopback_host",
    "load",
    "sources",
    "unknown_variables",
]

ENV_PREFIX: Final = "AUTHZ_"
DEFAULT_GRPC_ADDR: Final = "127.0.0.1:9191"
DEFAULT_ADMIN_ADDR: Final = "127.0.0.1:9192"
DEFAULT_OPA_URL: Final = "http://127.0.0.1:8181"
DEFAULT_DECISION_PATH: Final = "authz/gateway/decision"
# Envoy's ext_authz timeout in infra/envoy is 500 ms; our whole budget stays inside it
# so authz, not Envoy, decides what the client sees when OPA is slow.
DEFAULT_DECISION_TIMEOUT_MS: Final = 300
# The one list (authz.core.headers): AUTHZ_CREDENTIAL_HEADERS adds to it, never removes.
DEFAULT_CREDENTIAL_HEADERS: Final = CREDENTIAL_HEADERS
DEFAULT_OPA_POOL_SIZE: Final = 64
DEFAULT_SHUTDOWN_GRACE_S: Final = 5.0
DEFAULT_LOG_LEVEL: Final = "INFO"
DEFAULT_SECRETS_RELOAD_INTERVAL_S: Final = 1.0
# The bundle watcher's revision probe: how soon a new bundle (a revoked key) reaches the
# decision cache.
DEFAULT_BUNDLE_POLL_INTERVAL_S: Final = 1.0
DEFAULT_RATE_LIMIT_BURST_S: Final = 10.0
DEFAULT_REDIS_TIMEOUT_MS: Final = 50
# Connections to Redis (one Lua call per limited check); a burst waits for a free one
# within AUTHZ_REDIS_TIMEOUT_MS.
DEFAULT_REDIS_POOL_SIZE: Final = 32
DEFAULT_CIRCUIT_FAILURE_THRESHOLD: Final = 5
DEFAULT_CIRCUIT_RESET_TIMEOUT_S: Final = 5.0
DEFAULT_AUDIT_DB: Final = Path("authz-audit.db")
DEFAULT_AUDIT_RETENTION_DAYS: Final = 30.0
DEFAULT_AUDIT_MAX_RECORDS: Final = 1_000_000
DEFAULT_OVERRIDES_FILE: Final = Path("authz-overrides.json")
# Entries are dropped on every new bundle revision, so the TTL only bounds what the
# bundle cannot announce (policies shorten it for keys and overrides that expire sooner).
DEFAULT_DECISION_CACHE_TTL_S: Final = 60.0
# Reuse stops when OPA has not confirmed the active revision for this long.
DEFAULT_DECISION_CACHE_CONFIRM_S: Final = 5.0
DEFAULT_DECISION_CACHE_MAX_ENTRIES: Final = 10_000
# An allowed key whose expires_at is this close gets an "api key expiring" warning.
DEFAULT_KEY_EXPIRY_WARNING_DAYS: Final = 14.0
# The admin token is a bearer secret for mode switches and overrides: at least 32
# characters (e.g. ``secrets.token_urlsafe(32)``, 43 characters, 256 bits).
ADMIN_TOKEN_MIN_CHARS: Final = 32
# Most fail-open allows per decision path per second; over it, requests fail closed while
# OPA is unreachable.
DEFAULT_FAIL_OPEN_MAX_PER_S: Final = authorizer.DEFAULT_FAIL_OPEN_MAX_PER_S
# The decision cache's bound in (accounted) bytes.
DEFAULT_DECISION_CACHE_MAX_BYTES: Final = cache.DEFAULT_MAX_BYTES
# Audit rows (README "Audit trail"): the request headers a row keeps (a trailing "*"
# makes a prefix; never a credential header), the largest body kept (0: none), and the
# byte caps on one value and on a whole row.
DEFAULT_AUDIT_HEADERS: Final = (
    ":authority",
    "host",
    "user-agent",
    "content-type",
    "content-length",
    "x-request-id",
    "x-sandbox-id",
    "x-envoy-*",
)
DEFAULT_AUDIT_BODY_MAX_BYTES: Final = 0
DEFAULT_AUDIT_VALUE_MAX_BYTES: Final = 1024
DEFAULT_AUDIT_ROW_MAX_BYTES: Final = 8192
# The audit store's bound on disk (database + WAL + shared memory). With the headroom of
# authz.runtime.audit.volume_bytes it fills the Kubernetes data volume (infra/k8s/base/authz.yaml,
# emptyDir sizeLimit 1Gi; tests/infra/test_audit_volume.py keeps them equal).
DEFAULT_AUDIT_MAX_BYTES: Final = 960 * 1024 * 1024
# The decision log line's schema (README "Decision log"): authz's own line, or OPA's
# decision-log event (https://www.openpolicyagent.org/docs/management-decision-logs).
DECISION_LOG_FORMATS: Final = ("authz", "opa")
DEFAULT_DECISION_LOG_FORMAT: Final = "authz"
# Decision-log upload (README "Decision log"), OPA's decision_logs.reporting knobs
# (https://www.openpolicyagent.org/docs/configuration#decision-logs): the delay between
# uploads and the retry backoff's bounds, one upload's size, and the buffer's bound.
# OPA waits 300..600 s between uploads; authz ships sooner so a log pipeline stays current.
DEFAULT_DECISION_LOG_MIN_DELAY_S: Final = 5.0
DEFAULT_DECISION_LOG_MAX_DELAY_S: Final = 60.0
DEFAULT_DECISION_LOG_UPLOAD_SIZE_LIMIT_BYTES: Final = 32768  # OPA's default
DEFAULT_DECISION_LOG_BUFFER_SIZE_LIMIT_BYTES: Final = 16 * 1024 * 1024

_NEVER_IGNORED: Final = (
    "{name!r} is a credential or identity header (authz.core.headers, AUTHZ_CREDENTIAL_HEADERS); "
    "the decision cache key always includes it"
)
# RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_BEARER_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_LOG_LEVELS: Final = frozenset({"DEBUG", "INFO", "WARNING", "ERROR"})
_SECRET_KEYS: Final = frozenset(
    {"opa_token", "redis_url", "admin_token", "decision_log_service_token", "audit_url"}
)
# Operators' secrets as files (Docker and Kubernetes secrets): AUTHZ_<KEY>_FILE names a
# file holding the value (surrounding whitespace, the trailing newline, stripped).
FILE_SUFFIX: Final = "_FILE"
SECRET_FILE_KEYS: Final = (
    "admin_token",
    "opa_token",
    "redis_url",
    "decision_log_service_token",
    # Fleet audit store (issue #16): the URL holds the database password.
    "audit_url",
)
SECRET_FILE_MAX_BYTES: Final = 64 * 1024
# The settings file (read at startup and on every reload): a few dozen keys; anything
# larger is a mistake, refused unread (PyYAML's parser is slow on large input).
SETTINGS_FILE_MAX_BYTES: Final = 1024 * 1024
# An unknown AUTHZ_* variable at least this similar (difflib's ratio, 0..1, names without
# the prefix) to a setting's variable is refused as a typo; anything less alike (tool
# variables, Kubernetes service links such as AUTHZ_METRICS_SERVICE_HOST) is only reported
# (unknown_variables).
TYPO_SIMILARITY: Final = 0.8


# Batch queries and BatchCheck (issue #19): concurrent misses coalesced into one OPA
# query (authz.core.batch), and the batch decision API's bounds (authz.v1.Decisions).
DEFAULT_OPA_BATCH_MAX: Final = DEFAULT_MAX_BATCH
DEFAULT_OPA_BATCH_MAX_BYTES: Final = DEFAULT_MAX_BATCH_BYTES
DEFAULT_OPA_BATCH_IN_FLIGHT: Final = DEFAULT_MAX_IN_FLIGHT
DEFAULT_BATCH_CHECK_MAX_ACTIONS: Final = 100
DEFAULT_BATCH_CHECK_MAX_BYTES: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Settings:
    """authz settings. Addresses are ``host:port``; times in the unit their name says.

    ``opa_token`` is sent as ``Authorization: Bearer`` to OPA when OPA's REST API is
    locked down with token authentication; it prints masked.
    """

    grpc_addr: str = DEFAULT_GRPC_ADDR
    admin_addr: str = DEFAULT_ADMIN_ADDR
    opa_url: str = DEFAULT_OPA_URL
    opa_token: Secret | None = None
    opa_pool_size: int = DEFAULT_OPA_POOL_SIZE
    default_decision_path: str = DEFAULT_DECISION_PATH
    decision_timeout_ms: int = DEFAULT_DECISION_TIMEOUT_MS
    credential_headers: tuple[str, ...] = DEFAULT_CREDENTIAL_HEADERS
    parse_body: BodyParsing = BodyParsing.ROUTE
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    log_level: str = DEFAULT_LOG_LEVEL
    decision_log: bool = True
    uvloop: bool = True
    secrets_file: Path | None = None
    secrets_reload_interval_s: float = DEFAULT_SECRETS_RELOAD_INTERVAL_S
    bundle_poll_interval_s: float = DEFAULT_BUNDLE_POLL_INTERVAL_S
    rate_limit_backend: str = "memory"
    rate_limit_burst_s: float = DEFAULT_RATE_LIMIT_BURST_S
    redis_url: Secret | None = None
    redis_failure_mode: str = "fallback"
    redis_timeout_ms: int = DEFAULT_REDIS_TIMEOUT_MS
    mode: Mode = Mode.ENFORCE
    allow_bypass: bool = False
    fail_open_paths: tuple[str, ...] = ()
    circuit_failure_threshold: int = DEFAULT_CIRCUIT_FAILURE_THRESHOLD
    circuit_reset_timeout_s: float = DEFAULT_CIRCUIT_RESET_TIMEOUT_S
    admin_token: Secret | None = None
    audit_db: Path | None = DEFAULT_AUDIT_DB
    audit_retention_days: float = DEFAULT_AUDIT_RETENTION_DAYS
    audit_max_records: int = DEFAULT_AUDIT_MAX_RECORDS
    overrides_file: Path | None = DEFAULT_OVERRIDES_FILE
    decision_cache_ttl_s: float = DEFAULT_DECISION_CACHE_TTL_S
    decision_cache_confirm_s: float = DEFAULT_DECISION_CACHE_CONFIRM_S
    decision_cache_max_entries: int = DEFAULT_DECISION_CACHE_MAX_ENTRIES
    decision_cache_ignore_headers: tuple[str, ...] = ()
    key_expiry_warning_days: float = DEFAULT_KEY_EXPIRY_WARNING_DAYS
    # Hostile callers (issue #13): fail-open cap, cache byte bound.
    fail_open_max_per_s: int = DEFAULT_FAIL_OPEN_MAX_PER_S
    decision_cache_max_bytes: int = DEFAULT_DECISION_CACHE_MAX_BYTES
    # Transport security: mTLS on the gRPC port, plaintext only where told.
    grpc_tls_cert: Path | None = None
    grpc_tls_key: Path | None = None
    grpc_tls_client_ca: Path | None = None
    grpc_allow_plaintext: bool = False
    opa_allow_plaintext: bool = False
    # Audit trail: what a row keeps, in bytes.
    audit_headers: tuple[str, ...] = DEFAULT_AUDIT_HEADERS
    audit_body_max_bytes: int = DEFAULT_AUDIT_BODY_MAX_BYTES
    audit_value_max_bytes: int = DEFAULT_AUDIT_VALUE_MAX_BYTES
    audit_row_max_bytes: int = DEFAULT_AUDIT_ROW_MAX_BYTES
    audit_max_bytes: int = DEFAULT_AUDIT_MAX_BYTES
    # Lifecycle: the Redis pool has its own size, not the OPA pool's.
    redis_pool_size: int = DEFAULT_REDIS_POOL_SIZE
    # Decision log (issue #15): the line's schema, authz's or OPA's.
    decision_log_format: str = DEFAULT_DECISION_LOG_FORMAT
    # opa-envoy-plugin compatibility: bearer JWTs reach the policy (io.jwt.*), and gRPC
    # request bodies are decoded with a descriptor set (the plugin's proto-descriptor).
    jwt_passthrough: bool = True
    proto_descriptor: Path | None = None
    # Decision-log upload (issue #17): OPA's upload protocol to a remote service.
    decision_log_service_url: str | None = None
    decision_log_service_token: Secret | None = None
    decision_log_min_delay_s: float = DEFAULT_DECISION_LOG_MIN_DELAY_S
    decision_log_max_delay_s: float = DEFAULT_DECISION_LOG_MAX_DELAY_S
    decision_log_upload_size_limit_bytes: int = DEFAULT_DECISION_LOG_UPLOAD_SIZE_LIMIT_BYTES
    decision_log_buffer_size_limit_bytes: int = DEFAULT_DECISION_LOG_BUFFER_SIZE_LIMIT_BYTES
    decision_log_drop_allowed: bool = False
    decision_log_drop_paths: tuple[str, ...] = ()
    # Fleet audit store (issue #16): every replica's chain in one PostgreSQL schema.
    audit_url: Secret | None = None
    replica_id: str = field(default_factory=socket.gethostname)
    audit_allow_plaintext: bool = False
    # Egress tunnels (issue 18), test-only: host:port -> ip:port used as is (no DNS, no
    # public-address check). Empty by default, which is what every deployment wants.
    egress_tunnel_test_targets: tuple[tuple[str, str], ...] = ()
    # Batch queries and BatchCheck (issue #19).
    opa_batch_max: int = DEFAULT_OPA_BATCH_MAX
    opa_batch_max_bytes: int = DEFAULT_OPA_BATCH_MAX_BYTES
    batch_check_max_actions: int = DEFAULT_BATCH_CHECK_MAX_ACTIONS
    batch_check_max_bytes: int = DEFAULT_BATCH_CHECK_MAX_BYTES
    opa_batch_in_flight: int = DEFAULT_OPA_BATCH_IN_FLIGHT

    @property
    def grpc_tls(self) -> bool:
        """True when the gRPC listener is mTLS (certificate, key and client CA set)."""
        return None not in (self.grpc_tls_cert, self.grpc_tls_key, self.grpc_tls_client_ca)

    @property
    def decision_timeout_s(self) -> float:
        """The decision budget in seconds."""
        return self.decision_timeout_ms / 1000.0


# Reload (SIGHUP, POST /v1/reload): the settings applied to the running service, and why
# every other one needs a restart. Every Settings field is in exactly one of the two
# (tests/unit/runtime/test_server.py fails for an unclassified field). Secret-valued
# fields are reported by name only.
RELOADABLE: Final[Mapping[str, str]] = {
    "mode": "the shared Control; bypass still needs AUTHZ_ALLOW_BYPASS from startup",
    "log_level": "the root logger's level",
    "decision_timeout_ms": "the authorizer's decision budget (and preview's)",
    "rate_limit_burst_s": "the authorizer's default burst for a decision's rate_limit",
    "fail_open_paths": "the authorizer's fail-open path set",
    "fail_open_max_per_s": "the authorizer's fail-open cap per path and second",
    "key_expiry_warning_days": "the key-expiry watch's warning window",
}
RESTART_ONLY: Final[Mapping[str, str]] = {
    "grpc_addr": "the gRPC listener is bound at startup",
    "admin_addr": "the admin listener is bound at startup",
    "opa_url": "the OPA client and its connection pool are built at startup",
    "opa_token": "held by the OPA client built at startup",
    "opa_pool_size": "the OPA connection pool is sized at startup",
    "default_decision_path": "the authorizer's path set and readiness are built with it",
    "credential_headers": "what the cache key excludes and what is stripped; changing it "
    "live would mix cache keys of both rules",
    "parse_body": "request parsing is built into the authorizer at startup",
    "shutdown_grace_s": "read at shutdown from the startup settings",
    "decision_log": "the decision-log sink is added at startup",
    "uvloop": "the event loop is chosen before anything runs",
    "secrets_file": "the secret store is opened at startup (its contents reload)",
    "secrets_reload_interval_s": "the secrets watcher runs with it from startup",
    "bundle_poll_interval_s": "the bundle watcher runs with it from startup",
    "rate_limit_backend": "the limiter is built at startup",
    "redis_url": "the Redis client is built at startup",
    "redis_failure_mode": "the limiter and readiness check are built with it",
    "redis_timeout_ms": "the Redis client is built with it",
    "redis_pool_size": "the Redis pool is sized at startup",
    "allow_bypass": "a safety latch: permitting bypass is a deliberate deployment change",
    "circuit_failure_threshold": "the circuit breaker is built with it",
    "circuit_reset_timeout_s": "the circuit breaker is built with it",
    "admin_token": "the admin API authenticates with the token read at startup",
    "audit_db": "the audit database is opened at startup",
    "audit_retention_days": "the audit writer is built with it",
    "audit_max_records": "the audit writer is built with it",
    "audit_headers": "the audit writer is built with it",
    "audit_body_max_bytes": "the audit writer is built with it",
    "audit_value_max_bytes": "the audit writer is built with it",
    "audit_row_max_bytes": "the audit writer is built with it",
    "audit_max_bytes": "the audit writer is built with it",
    "overrides_file": "the override store is opened at startup",
    "decision_cache_ttl_s": "the decision cache is built with its bounds at startup",
    "decision_cache_confirm_s": "the decision cache is built with its bounds at startup",
    "decision_cache_max_entries": "the decision cache is built with its bounds at startup",
    "decision_cache_max_bytes": "the decision cache is built with its bounds at startup",
    "decision_cache_ignore_headers": "part of the cache key; changing it live would mix "
    "keys of both rules",
    "grpc_tls_cert": "the listener's credentials are built at startup; a renewed file at "
    "the same path is re-read without a restart",
    "grpc_tls_key": "as grpc_tls_cert: renewed files at the same path are re-read",
    "grpc_tls_client_ca": "as grpc_tls_cert: renewed files at the same path are re-read",
    "grpc_allow_plaintext": "the listener's transport is chosen at startup",
    "opa_allow_plaintext": "checked against the OPA URL at startup",
    "decision_log_format": "the decision-log sink is built with it",
    "jwt_passthrough": "the authorizer's input building is set at startup",
    "proto_descriptor": "the descriptor set is loaded into the authorizer at startup",
    "decision_log_service_url": "the uploader is built at startup",
    "decision_log_service_token": "held by the uploader built at startup",
    "decision_log_min_delay_s": "the uploader is built with it",
    "decision_log_max_delay_s": "the uploader is built with it",
    "decision_log_upload_size_limit_bytes": "the uploader is built with it",
    "decision_log_buffer_size_limit_bytes": "the uploader's buffer is sized at startup",
    "decision_log_drop_allowed": "the decision-log sink is built with its drop rules",
    "decision_log_drop_paths": "the decision-log sink is built with its drop rules",
    # Fleet audit store (issue #16).
    "audit_url": "the audit database is connected (and its schema migrated) at startup",
    "replica_id": "names the audit chain the writer built at startup appends to",
    "audit_allow_plaintext": "checked against the audit URL at startup",
    "egress_tunnel_test_targets": "the tunnel resolver is built with it at startup",
    # Batch queries and BatchCheck (issue #19).
    "opa_batch_max": "the coalescer in front of OPA is built with it",
    "opa_batch_max_bytes": "the coalescer in front of OPA is built with it",
    "batch_check_max_actions": "the BatchCheck servicer is built with it",
    "batch_check_max_bytes": "the BatchCheck servicer is built with it",
    "opa_batch_in_flight": "the coalescer in front of OPA is built with it",
}


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (``127.0.0.0/8``, ``::1``; IPv6 may
    be bracketed). Any other name is not loopback: what it resolves to is not ours to know.
    ``0.0.0.0`` and ``[::]`` (every interface) are not loopback."""
    text = host.strip().lower().removeprefix("[").removesuffix("]")
    if text == "localhost":
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def _addr(key: str, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}={value!r}: expected host:port")
    return value


# The longest unix socket path the kernel takes, in bytes (sun_path of sockaddr_un, 108
# on Linux, less the terminating NUL; unix(7)).
_MAX_UNIX_PATH: Final = 107


def _url(key: str, value: str) -> str:
    if value.startswith("unix:///"):
        # OPA listening on a unix socket (opa run --addr unix:///path): an absolute path
        # to a file the kernel can bind.
        path = value.removeprefix("unix://")
        if path.endswith("/") or "\x00" in path or len(path.encode()) > _MAX_UNIX_PATH:
            raise ConfigError(
                f"{key}={value!r}: expected unix:///<absolute unix socket path> of at most "
                f"{_MAX_UNIX_PATH} bytes"
            )
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise ConfigError(
            f"{key}={value!r}: expected an http(s) URL without a query, or unix:///path"
        )
    return value.rstrip("/")


def _service_url(key: str, value: Any) -> str | None:
    # A decision-log service: http(s) without credentials in it (the token has its own key).
    text = str(value).strip()
    if not text:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ConfigError(f"{key}={value!r}: expected an http(s) URL without a query")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"{key}=<redacted>: no credentials in the URL; set "
            "AUTHZ_DECISION_LOG_SERVICE_TOKEN(_FILE) instead"
        )
    return text.rstrip("/")


def _bearer(key: str, value: Any) -> Secret | None:
    # Never quote the value: it is a credential.
    text = str(value).strip()
    if not text:
        return None
    if not _BEARER_TOKEN_RE.fullmatch(text):
        raise ConfigError(
            f"{key}=<redacted>: expected RFC 6750 bearer token characters only "
            "(A-Z a-z 0-9 - . _ ~ + /, then optional '=' padding)"
        )
    return Secret(text)


def _int_in(lo: int, hi: int) -> Callable[[str, Any], int]:
    def conv(key: str, value: Any) -> int:
        try:
            number = int(str(value), 10)
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected an integer") from None
        if not lo <= number <= hi:
            raise ConfigError(f"{key}={value!r}: expected {lo}..{hi}")
        return number

    return conv


def _non_negative(unit: str) -> Callable[[str, Any], float]:
    """A converter to a finite number >= 0 of ``unit`` (seconds, days)."""

    def conv(key: str, value: Any) -> float:
        try:
            number = float(str(value))
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected a number of {unit}") from None
        if not 0 <= number < math.inf:
            raise ConfigError(f"{key}={value!r}: expected a non-negative number of {unit}")
        return number

    return conv


_positive_float = _non_negative("seconds")
_days = _non_negative("days")


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}={value!r}: expected true or false")


def _headers(key: str, value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else str(value).split(",")
    names = tuple(str(item).strip().lower() for item in items if str(item).strip())
    for name in names:
        if not is_header_name(name):
            raise ConfigError(f"{key}={value!r}: {name!r} is not a header name")
    return names


def _credential_headers(key: str, value: Any) -> tuple[str, ...]:
    # Added to the one list, in order, without duplicates: a deployment may hash one more
    # header but can never make a credential travel in clear.
    added = _headers(key, value)
    return tuple(dict.fromkeys((*DEFAULT_CREDENTIAL_HEADERS, *added)))


def _cache_ignore_headers(key: str, value: Any) -> tuple[str, ...]:
    # Left out of the cache key, two callers with different credentials (or claimed
    # identities) would share one cached decision. Headers added by
    # AUTHZ_CREDENTIAL_HEADERS are checked once both are read (_check_consistency).
    names = _headers(key, value)
    for name in names:
        if name in DEFAULT_CREDENTIAL_HEADERS or name in IDENTITY_HEADERS:
            raise ConfigError(f"{key}={value!r}: {_NEVER_IGNORED.format(name=name)}")
    return names


def _body_parsing(key: str, value: Any) -> BodyParsing:
    """``route``, ``always`` or ``never`` (:class:`~authz.core.input.BodyParsing`); the old
    boolean values keep their meaning (true: every body, false: none)."""
    text = str(value).strip().lower()
    try:
        return BodyParsing(text)
    except ValueError:
        pass
    try:
        return BodyParsing.ALWAYS if _bool(key, value) else BodyParsing.NEVER
    except ConfigError:
        raise ConfigError(f"{key}={value!r}: expected route, always or never") from None


def _audit_headers(key: str, value: Any) -> tuple[str, ...]:
    """Header names, each optionally ending in ``*`` (a prefix). None may name or match a
    credential header (:data:`authz.core.headers.CREDENTIAL_HEADERS`): the audit trail never
    stores one."""
    items = value if isinstance(value, list) else str(value).split(",")
    names = tuple(str(item).strip().lower() for item in items if str(item).strip())
    for name in names:
        if not is_header_name(name.removesuffix("*")):
            raise ConfigError(f"{key}={value!r}: {name!r} is not a header name or prefix*")
        matched = audit_header_matches(name, CREDENTIAL_HEADERS)
        if matched:
            raise ConfigError(
                f"{key}={value!r}: {name!r} would store the credential header {matched[0]!r}"
            )
    return names


def audit_header_matches(pattern: str, names: Iterable[str]) -> list[str]:
    """The ``names`` an audit header pattern (a name, or a prefix ending in ``*``) matches."""
    if pattern.endswith("*"):
        return [n for n in names if n.startswith(pattern[:-1])]
    return [n for n in names if n == pattern]


def _log_level(key: str, value: Any) -> str:
    level = str(value).upper()
    if level not in _LOG_LEVELS:
        raise ConfigError(f"{key}={value!r}: expected one of {sorted(_LOG_LEVELS)}")
    return level


def _path(key: str, value: Any) -> Path | None:
    text = str(value).strip()
    if not text:
        return None
    if "\x00" in text:
        raise ConfigError(f"{key}={value!r}: not a file path")
    return Path(text)


def _interval(key: str, value: Any) -> float:
    number = _positive_float(key, value)
    if not 0.05 <= number <= 3600:
        raise ConfigError(f"{key}={value!r}: expected 0.05..3600 seconds")
    return number


def _cache_ttl(key: str, value: Any) -> float:
    number = _positive_float(key, value)
    if number > 3600:
        raise ConfigError(f"{key}={value!r}: expected 0..3600 seconds (0 disables the cache)")
    return number


def _decision_paths(key: str, value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else str(value).split(",")
    return tuple(parse_decision_path(key, str(i).strip()) for i in items if str(i).strip())


_TUNNEL_TARGET: Final = re.compile(r"([a-z0-9_]([a-z0-9_.-]{0,251}[a-z0-9_])?):([0-9]{1,5})")


def _tunnel_targets(key: str, value: Any) -> tuple[tuple[str, str], ...]:
    """``host:port=ip:port`` pairs, comma-separated (or a YAML mapping): a lowercase DNS
    name and port, an IP address (IPv6 in brackets) and port."""
    if isinstance(value, dict):
        items = [f"{k}={v}" for k, v in value.items()]
    else:
        items = [i for i in str(value).split(",") if i.strip()]
    pairs = []
    for item in items:
        target, _, address = item.strip().partition("=")
        name = _TUNNEL_TARGET.fullmatch(target)
        if name is None or not 1 <= int(name.group(3)) <= 65535:
            raise ConfigError(f"{key}={value!r}: {target!r} is not a lowercase host:port")
        host, _, port = address.rpartition(":")
        try:
            ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise ConfigError(f"{key}={value!r}: {address!r} is not ip:port") from None
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{key}={value!r}: {address!r} is not ip:port")
        pairs.append((target, address))
    return tuple(pairs)


def _choice(*allowed: str) -> Callable[[str, Any], str]:
    def conv(key: str, value: Any) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
        return text

    return conv


def _redis_url(key: str, value: Any) -> Secret | None:
    # May carry a password: kept as a Secret, and errors never quote it.
    text = str(value).strip()
    if not text:
        return None
    if urlsplit(text).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{key}=<redacted>: expected a redis://, rediss:// or unix:// URL")
    return Secret(text)


# A replica id (AUTHZ_REPLICA_ID): what host names and Kubernetes pod names are made of.
REPLICA_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
AUDIT_URL_SCHEMES: Final = ("postgresql", "postgres")


def _audit_url(key: str, value: Any) -> Secret | None:
    # Holds the database password: kept as a Secret, and errors never quote it.
    text = str(value).strip()
    if not text:
        return None
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ConfigError(f"{key}=<redacted>: not a URL") from None
    if parts.scheme not in AUDIT_URL_SCHEMES or not (
        parts.hostname or _query(parts.query).get("host")
    ):
        raise ConfigError(
            f"{key}=<redacted>: expected postgresql://user:password@host:port/database "
            "(https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING-URIS)"
        )
    return Secret(text)


def _replica_id(key: str, value: Any) -> str:
    text = str(value).strip()
    if not REPLICA_ID_RE.fullmatch(text):
        raise ConfigError(
            f"{key}={text!r}: expected 1-128 letters, digits, '_', '.' or '-', starting "
            "with a letter or digit (it names this replica's audit chain)"
        )
    return text


def _secret(key: str, value: Any) -> Secret | None:
    text = str(value)
    return Secret(text) if text else None


def _admin_token(key: str, value: Any) -> Secret | None:
    # Never quote the value, not even a wrong one: it may be the real token mistyped.
    text = str(value)
    if not text:
        return None  # the admin API stays disabled
    # Stripped: the admin API strips what a client sends, so padding could never match.
    text = text.strip()
    if len(text) < ADMIN_TOKEN_MIN_CHARS:
        raise ConfigError(
            f"{key}=<redacted>: expected at least {ADMIN_TOKEN_MIN_CHARS} characters "
            f"(not counting surrounding whitespace), got {len(text)}; generate one with "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    if not _BEARER_TOKEN_RE.fullmatch(text):
        # Anything else cannot be sent as an Authorization: Bearer value.
        raise ConfigError(
            f"{key}=<redacted>: expected RFC 6750 bearer token characters only "
            "(A-Z a-z 0-9 - . _ ~ + /, then optional '=' padding)"
        )
    return Secret(text)


_CONVERTERS: Final[Mapping[str, Callable[[str, Any], Any]]] = {
    "grpc_addr": _addr,
    "admin_addr": _addr,
    "opa_url": _url,
    "opa_token": _secret,
    "opa_pool_size": _int_in(1, 4096),
    "default_decision_path": lambda k, v: parse_decision_path(k, str(v)),
    "decision_timeout_ms": _int_in(1, 60_000),
    "credential_headers": _credential_headers,
    "parse_body": _body_parsing,
    "shutdown_grace_s": _positive_float,
    "log_level": _log_level,
    "decision_log": _bool,
    "uvloop": _bool,
    "secrets_file": _path,
    "secrets_reload_interval_s": _interval,
    "bundle_poll_interval_s": _interval,
    "rate_limit_backend": _choice("memory", "redis"),
    "rate_limit_burst_s": _interval,
    "redis_url": _redis_url,
    "redis_failure_mode": _choice("fallback", "deny"),
    "redis_timeout_ms": _int_in(1, 10_000),
    "mode": parse_mode,
    "allow_bypass": _bool,
    "fail_open_paths": _decision_paths,
    "circuit_failure_threshold": _int_in(1, 1000),
    "circuit_reset_timeout_s": _interval,
    "admin_token": _admin_token,
    "audit_db": _path,
    "audit_retention_days": _days,
    "audit_max_records": _int_in(1, 1_000_000_000),
    "overrides_file": _path,
    "decision_cache_ttl_s": _cache_ttl,
    "decision_cache_confirm_s": _interval,
    "decision_cache_max_entries": _int_in(1, 10_000_000),
    "decision_cache_ignore_headers": _cache_ignore_headers,
    "key_expiry_warning_days": _days,
    # Hostile callers (issue #13): fail-open cap, cache byte bound.
    "fail_open_max_per_s": _int_in(1, 1_000_000),
    "decision_cache_max_bytes": _int_in(1, 1 << 40),
    # Transport security: mTLS on the gRPC port, plaintext only where told.
    "grpc_tls_cert": _path,
    "grpc_tls_key": _path,
    "grpc_tls_client_ca": _path,
    "grpc_allow_plaintext": _bool,
    "opa_allow_plaintext": _bool,
    # Audit trail: what a row keeps, in bytes.
    "audit_headers": _audit_headers,
    "audit_body_max_bytes": _int_in(0, 1024 * 1024),
    "audit_value_max_bytes": _int_in(64, 64 * 1024),
    "audit_row_max_bytes": _int_in(4096, 4 * 1024 * 1024),
    "audit_max_bytes": _int_in(16 * 1024 * 1024, 1024**4),
    # Lifecycle: the Redis pool has its own size, not the OPA pool's.
    "redis_pool_size": _int_in(1, 4096),
    # Decision log (issue #15): the line's schema, authz's or OPA's.
    "decision_log_format": _choice(*DECISION_LOG_FORMATS),
    "jwt_passthrough": _bool,
    "proto_descriptor": _path,
    # Decision-log upload (issue #17): OPA's upload protocol to a remote service.
    "decision_log_service_url": _service_url,
    "decision_log_service_token": _bearer,
    "decision_log_min_delay_s": _interval,
    "decision_log_max_delay_s": _interval,
    "decision_log_upload_size_limit_bytes": _int_in(1024, 64 * 1024 * 1024),
    "decision_log_buffer_size_limit_bytes": _int_in(1024, 1024**3),
    "decision_log_drop_allowed": _bool,
    "decision_log_drop_paths": _decision_paths,
    # Fleet audit store (issue #16).
    "audit_url": _audit_url,
    "replica_id": _replica_id,
    "audit_allow_plaintext": _bool,
    # Egress tunnels (issue 18), test-only.
    "egress_tunnel_test_targets": _tunnel_targets,
    # Batch queries and BatchCheck (issue #19): 1 turns coalescing off.
    "opa_batch_max": _int_in(1, 1024),
    "opa_batch_max_bytes": _int_in(1024, 16 * 1024 * 1024),
    "batch_check_max_actions": _int_in(1, 1000),
    "batch_check_max_bytes": _int_in(1024, 4 * 1024 * 1024),
    "opa_batch_in_flight": _int_in(1, 64),
}


def load(environ: Mapping[str, str], path: Path | None = None) -> Settings:
    """Build :class:`Settings` from defaults, the YAML file at ``path`` and ``environ``.

    Raises ConfigError for an unreadable/invalid file, an unknown key in the file, or a
    value that does not convert; the message names the key (``AUTHZ_X`` for the
    environment, ``file:key`` for the file) and the value (masked for ``opa_token``).
    """
    raw: dict[str, tuple[str, Any]] = {}
    if path is not None:
        loaded = _settings_file(path)
        for key, value in loaded.items():
            if key not in _CONVERTERS:
                raise ConfigError(f"config file {str(path)!r}: unknown key {key!r}")
            raw[key] = (f"{path.name}:{key}", value)
    _refuse_typos(environ)
    for name in _CONVERTERS:
        env_key = ENV_PREFIX + name.upper()
        if env_key in environ:
            raw[name] = (env_key, environ[env_key])
    raw.update(_secret_files(environ))
    # The default replica id is the host name (a Kubernetes pod's name), checked the same.
    raw.setdefault(
        "replica_id", ("AUTHZ_REPLICA_ID (default: the host name)", socket.gethostname())
    )
    values: dict[str, Any] = {}
    for name, (where, value) in raw.items():
        shown = "<redacted>" if name in _SECRET_KEYS else value
        try:
            values[name] = _CONVERTERS[name](where, value)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(repr(value), repr(shown))) from None
    settings = Settings(**values)
    _check_consistency(settings)
    _check_transport(settings)
    _check_decision_upload(settings)
    _check_audit_url(settings)
    return settings


def _settings_file(path: Path) -> dict[Any, Any]:
    """The settings file's top-level mapping (``{}`` for an empty file), read at most
    :data:`SETTINGS_FILE_MAX_BYTES`. Raises ConfigError naming the file (never quoting
    its content) when it cannot be read, is too large, not UTF-8, not YAML or no mapping."""
    data = read_capped(path, SETTINGS_FILE_MAX_BYTES, f"config file {str(path)!r}")
    try:
        loaded = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r}: not UTF-8 (byte {exc.start})") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"config file {str(path)!r}: nested too deeply") from None
    except yaml.YAMLError as exc:
        # Only the position: PyYAML's message quotes the line, which may hold a token.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r}: invalid YAML{where}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping at top level")
    return loaded


def _known_variables() -> frozenset[str]:
    names = {ENV_PREFIX + name.upper() for name in _CONVERTERS}
    return frozenset(names | {ENV_PREFIX + n.upper() + FILE_SUFFIX for n in SECRET_FILE_KEYS})


def _resembled(variable: str) -> str | None:
    """The setting variable ``variable`` (unknown) is most likely a typo of, if any: names
    compared without the common ``AUTHZ_`` prefix, which would make them all look alike."""
    names = [name.removeprefix(ENV_PREFIX) for name in _known_variables()]
    wanted = variable.removeprefix(ENV_PREFIX)
    match = difflib.get_close_matches(wanted, names, 1, TYPO_SIMILARITY)
    return ENV_PREFIX + match[0] if match else None


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """Sorted names of the ``AUTHZ_*`` variables in ``environ`` that are no setting (nor an
    ``AUTHZ_<KEY>_FILE`` variant): the server logs them as one warning at startup.
    Those resembling a setting's name are not listed: :func:`load` refuses them."""
    known = _known_variables()
    return sorted(
        name
        for name in environ
        if name.startswith(ENV_PREFIX) and name not in known and _resembled(name) is None
    )


def sources(environ: Mapping[str, str], path: Path | None = None) -> dict[str, str]:
    """Where each setting's value comes from, as :func:`load` reads them: setting name ->
    ``"AUTHZ_<KEY>_FILE"``, ``"environment"``, the settings file's name, or ``"default"``.
    Call after :func:`load` succeeded (the file is then known to be a valid mapping)."""
    in_file = set(_settings_file(path)) if path is not None else set()
    found: dict[str, str] = {}
    for name in _CONVERTERS:
        env_key = ENV_PREFIX + name.upper()
        if name in SECRET_FILE_KEYS and env_key + FILE_SUFFIX in environ:
            found[name] = env_key + FILE_SUFFIX
        elif env_key in environ:
            found[name] = "environment"
        elif path is not None and name in in_file:
            found[name] = path.name
        else:
            found[name] = "default"
    return found


def _refuse_typos(environ: Mapping[str, str]) -> None:
    """A mistyped setting silently ignored leaves its default in force (a fallback instead
    of deny, a header not masked): refuse to start instead. Never quotes the value."""
    known = _known_variables()
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known:
            continue
        meant = _resembled(name)
        if meant is not None:
            raise ConfigError(
                f"{name} is not a setting; did you mean {meant}? (an unknown AUTHZ_* "
                "variable this close to a setting's name is refused as a typo)"
            )


def _secret_files(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``AUTHZ_<KEY>_FILE`` for :data:`SECRET_FILE_KEYS`: key -> (where, the file's text,
    stripped). Read once per :func:`load`. Errors name the variable and the file, never the
    content; the plain variable set (non-empty) beside its ``_FILE`` is an error."""
    found: dict[str, tuple[str, str]] = {}
    for name in SECRET_FILE_KEYS:
        env_key = ENV_PREFIX + name.upper()
        file_key = env_key + FILE_SUFFIX
        if file_key not in environ:
            continue
        where = f"{file_key}={environ[file_key]!r}"
        if environ.get(env_key):
            raise ConfigError(f"{env_key} and {where} are both set: set only one of them")
        path = Path(environ[file_key])
        data = read_capped(path, SECRET_FILE_MAX_BYTES, where, unreadable="cannot read the file: ")
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: not UTF-8 text") from None
        if not text:
            raise ConfigError(f"{where}: the file is empty")
        # The converters' messages start with "<where>=<redacted>".
        found[name] = (f"{env_key} (from {where})", text)
    return found


def _check_consistency(settings: Settings) -> None:
    for name in settings.decision_cache_ignore_headers:
        if name in settings.credential_headers:
            value = ",".join(settings.decision_cache_ignore_headers)
            raise ConfigError(
                f"AUTHZ_DECISION_CACHE_IGNORE_HEADERS={value!r}: "
                + _NEVER_IGNORED.format(name=name)
            )
    if settings.mode is Mode.BYPASS and not settings.allow_bypass:
        raise ConfigError(
            "AUTHZ_MODE='bypass': refused; bypass allows every request without evaluation. "
            "Set AUTHZ_ALLOW_BYPASS=true to confirm (local debugging only)"
        )
    if (
        settings.decision_cache_ttl_s > 0
        and settings.decision_cache_confirm_s <= settings.bundle_poll_interval_s
    ):
        raise ConfigError(
            f"AUTHZ_DECISION_CACHE_CONFIRM_S={settings.decision_cache_confirm_s:g}: must be "
            f"longer than AUTHZ_BUNDLE_POLL_INTERVAL_S={settings.bundle_poll_interval_s:g} "
            "(the probe that confirms the bundle revision), or no decision is ever reused"
        )
    for pattern in settings.audit_headers:
        matched = audit_header_matches(pattern, settings.credential_headers)
        if matched:
            raise ConfigError(
                f"AUTHZ_AUDIT_HEADERS={','.join(settings.audit_headers)!r}: {pattern!r} would "
                f"store the credential header {matched[0]!r} (AUTHZ_CREDENTIAL_HEADERS)"
            )
    if settings.audit_value_max_bytes * 4 > settings.audit_row_max_bytes:
        raise ConfigError(
            f"AUTHZ_AUDIT_VALUE_MAX_BYTES={settings.audit_value_max_bytes}: at most a quarter "
            f"of AUTHZ_AUDIT_ROW_MAX_BYTES={settings.audit_row_max_bytes}"
        )
    if settings.audit_body_max_bytes * 2 > settings.audit_row_max_bytes:
        raise ConfigError(
            f"AUTHZ_AUDIT_BODY_MAX_BYTES={settings.audit_body_max_bytes}: at most half of "
            f"AUTHZ_AUDIT_ROW_MAX_BYTES={settings.audit_row_max_bytes}"
        )
    if settings.rate_limit_backend == "redis" and settings.redis_url is None:
        raise ConfigError(
            "AUTHZ_RATE_LIMIT_BACKEND='redis': AUTHZ_REDIS_URL is required (redis://host:port/0)"
        )


def _check_decision_upload(settings: Settings) -> None:
    """The decision-log upload's settings agree, and the service is reached over TLS
    unless on loopback (an uploaded event holds decision inputs; the token rides along)."""
    if settings.decision_log_min_delay_s > settings.decision_log_max_delay_s:
        raise ConfigError(
            f"AUTHZ_DECISION_LOG_MIN_DELAY_S={settings.decision_log_min_delay_s}: at most "
            f"AUTHZ_DECISION_LOG_MAX_DELAY_S={settings.decision_log_max_delay_s}"
        )
    upload_limit = settings.decision_log_upload_size_limit_bytes
    if upload_limit > settings.decision_log_buffer_size_limit_bytes:
        raise ConfigError(
            "AUTHZ_DECISION_LOG_UPLOAD_SIZE_LIMIT_BYTES="
            f"{upload_limit}: at most "
            "AUTHZ_DECISION_LOG_BUFFER_SIZE_LIMIT_BYTES="
            f"{settings.decision_log_buffer_size_limit_bytes}"
        )
    url = settings.decision_log_service_url
    if url is None:
        if settings.decision_log_service_token is not None:
            raise ConfigError(
                "AUTHZ_DECISION_LOG_SERVICE_TOKEN=<redacted>: set without "
                "AUTHZ_DECISION_LOG_SERVICE_URL (the service to send it to)"
            )
        return
    parts = urlsplit(url)
    if parts.scheme == "http" and not is_loopback_host(parts.hostname or ""):
        raise ConfigError(
            f"AUTHZ_DECISION_LOG_SERVICE_URL={url!r}: refusing plaintext HTTP to a "
            "non-loopback host (decision inputs and the service token would cross the "
            "network in clear); use https://"
        )


_GRPC_TLS_KEYS: Final = ("grpc_tls_cert", "grpc_tls_key", "grpc_tls_client_ca")


def _check_transport(settings: Settings) -> None:
    """No credential in clear on a network hop: the gRPC listener (every raw API key and
    sandbox token arrives on it, every injected secret leaves on it) is mTLS or bound to
    loopback, and OPA (it receives the same input) is reached over TLS, loopback or a
    unix socket; each unless explicitly allowed."""
    given = [name for name in _GRPC_TLS_KEYS if getattr(settings, name) is not None]
    if given and len(given) != len(_GRPC_TLS_KEYS):
        missing = [ENV_PREFIX + n.upper() for n in _GRPC_TLS_KEYS if n not in given]
        shown = ", ".join(f"{ENV_PREFIX}{n.upper()}={str(getattr(settings, n))!r}" for n in given)
        raise ConfigError(
            f"{', '.join(missing)} not set ({shown}): the gRPC listener's mTLS needs "
            "AUTHZ_GRPC_TLS_CERT, AUTHZ_GRPC_TLS_KEY and AUTHZ_GRPC_TLS_CLIENT_CA together"
        )
    host = settings.grpc_addr.rpartition(":")[0]
    if not settings.grpc_tls and not settings.grpc_allow_plaintext and not is_loopback_host(host):
        raise ConfigError(
            f"AUTHZ_GRPC_ADDR={settings.grpc_addr!r}: refusing a plaintext gRPC listener on a "
            "non-loopback address (whoever reaches it reads the credentials authz injects); "
            "set AUTHZ_GRPC_TLS_CERT, AUTHZ_GRPC_TLS_KEY and AUTHZ_GRPC_TLS_CLIENT_CA (mTLS "
            "with Envoy), or AUTHZ_GRPC_ALLOW_PLAINTEXT=true to accept the risk"
        )
    opa = urlsplit(settings.opa_url)
    if (
        opa.scheme == "http"
        and not settings.opa_allow_plaintext
        and not is_loopback_host(opa.hostname or "")
    ):
        raise ConfigError(
            f"AUTHZ_OPA_URL={settings.opa_url!r}: refusing plaintext HTTP to a non-loopback "
            "host (every decision input, API keys and sandbox tokens included, would cross "
            "the network in clear); use https://, a loopback address (an OPA sidecar) or "
            "unix:///path, or set AUTHZ_OPA_ALLOW_PLAINTEXT=true to accept the risk"
        )


# -- Fleet audit store (issue #16) -------------------------------------------------------

# libpq's sslmode values that never fall back to plaintext (``prefer``, the default, does).
_TLS_SSLMODES: Final = frozenset({"require", "verify-ca", "verify-full"})


def _query(query: str) -> dict[str, str]:
    """A URL query's ``name=value`` pairs (percent-decoded; the last of a repeated name)."""
    return dict(parse_qsl(query))


def _check_audit_url(settings: Settings) -> None:
    """The audit database is reached over TLS (``sslmode=require`` or stricter in the
    URL's query, https://www.postgresql.org/docs/current/libpq-ssl.html) unless on
    loopback or ``AUTHZ_AUDIT_ALLOW_PLAINTEXT``: audit rows hold decision inputs."""
    if settings.audit_url is None or settings.audit_allow_plaintext:
        return
    parts = urlsplit(settings.audit_url.reveal())
    query = _query(parts.query)
    host = parts.hostname or query.get("host", "")
    # A host starting with "/" is a Unix-socket directory (libpq): never a network hop.
    if host.startswith("/") or is_loopback_host(host) or query.get("sslmode") in _TLS_SSLMODES:
        return
    raise ConfigError(
        "AUTHZ_AUDIT_URL=<redacted>: refusing a non-loopback database without TLS (audit "
        "rows hold decision inputs); add ?sslmode=verify-full (or require), or set "
        "AUTHZ_AUDIT_ALLOW_PLAINTEXT=true to accept the risk"
    )
