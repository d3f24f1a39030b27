"""Every Prometheus metric authz exposes, in one place (prometheus-client).

Served on the admin port at ``GET /metrics`` (text exposition format). Labels are low
cardinality by construction: ``path`` is a decision path from the Envoy config, ``reason``
and ``code`` are the stable snake_case codes of :mod:`authz.core.errors` and the policies,
``result`` is ``allow``/``deny``, ``mode`` one of three, ``tier`` a bundle tier name.
Never a key, sandbox id, request path or revision in a label (the revision is the value
of an info metric, one series at a time).

Metric names (``authz_`` prefix):

=========================================  =========  =================================
name                                       type       labels
=========================================  =========  =================================
decisions_total                            counter    path, result, reason, mode
decision_duration_seconds                  histogram  path
opa_duration_seconds                       histogram  path
opa_errors_total                           counter    code
opa_circuit_state                          gauge      state (closed, open, half_open)
fail_open_total                            counter    path, code
dry_run_suppressed_total                   counter    path, reason
rate_limit_rejections_total                counter    path, tier
rate_limit_backend_available               gauge      backend
bundle_info                                info       revision
bundle_activations_total                   counter    -
secrets_loaded                             gauge      -
secrets_reloads_total                      counter    -
secrets_reload_failures_total              counter    -
audit_records_total                        counter    -
audit_write_failures_total                 counter    -
audit_degraded                             gauge      -
mode                                       gauge      mode
overrides_active                           gauge      -
decision_cache_lookups_total               counter    result (hit, miss)
decision_cache_entries                     gauge      -
decision_cache_bytes                       gauge      -
decision_cache_max_bytes                   gauge      -
decision_cache_stale_puts_total            counter    -
expiring_key_decisions_total               counter    path
decision_fields_ignored_total              counter    path, field (a decision field name)
decision_log_dropped_total                 counter    reason (buffer_full, too_large, shutdown)
decision_log_uploads_total                 counter    result (ok, error)
decision_log_upload_events_total           counter    -
decision_log_upload_bytes_total            counter    -
decision_log_buffer_bytes                  gauge      -
decision_log_buffer_max_bytes              gauge      -
build_info                                 info       version
fleet_redis_available                      gauge      -
fleet_sync_lag_seconds                     gauge      -
fleet_sync_failures_total                  counter    -
fleet_entries_refused_total                counter    -
fleet_cache_invalidations_total            counter    direction (sent, received)
access_log_entries_total                   counter    result (audited, or a refusal reason)
=========================================  =========  =================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from authz import __version__
from authz.core.batch import BATCH_OUTCOMES
from authz.core.errors import meanings
from authz.core.record import DecisionRecord
from authz.runtime.als import REFUSALS as ALS_REFUSALS

if TYPE_CHECKING:
    from authz.core.cache import DecisionCache

# No ``*_created`` series: they double the series count and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

__all__ = ["CIRCUIT_STATES", "MODES", "Metrics", "MetricsSink"]

# Decision latency buckets in seconds: sub-millisecond to the 500 ms ext_authz timeout.
_BUCKETS: Final = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
# Batch sizes: 1 (nothing to coalesce) up to the largest bound (AUTHZ_OPA_BATCH_MAX).
_BATCH_SIZE_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
CIRCUIT_STATES: Final = ("closed", "open", "half_open")
MODES: Final = ("enforce", "dry-run", "bypass")


class Metrics:
    """All authz metrics on their own registry (tests create as many as they like)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "authz_decisions",
            "Decisions by decision path, result, reason code and mode.",
            ("path", "result", "reason", "mode"),
            registry=r,
        )
        self.decision_duration = Histogram(
            "authz_decision_duration_seconds",
            "Time from Check received to response built.",
            ("path",),
            buckets=_BUCKETS,
            registry=r,
        )
        self.opa_duration = Histogram(
            "authz_opa_duration_seconds",
            "Time spent waiting for OPA per decision.",
            ("path",),
            buckets=_BUCKETS,
            registry=r,
        )
        self.opa_errors = Counter(
            "authz_opa_errors", "OPA failures by error code.", ("code",), registry=r
        )
        self.circuit_state = Gauge(
            "authz_opa_circuit_state",
            "1 for the OPA circuit breaker's current state.",
            ("state",),
            registry=r,
        )
        self.fail_open = Counter(
            "authz_fail_open",
            "Requests allowed because OPA failed on a fail-open path.",
            ("path", "code"),
            registry=r,
        )
        self.dry_run_suppressed = Counter(
            "authz_dry_run_suppressed",
            "Denies suppressed in dry-run mode.",
            ("path", "reason"),
            registry=r,
        )
        self.rate_limit_rejections = Counter(
            "authz_rate_limit_rejections",
            "Requests denied 429 by tier.",
            ("path", "tier"),
            registry=r,
        )
        self.rate_limit_backend_available = Gauge(
            "authz_rate_limit_backend_available",
            "1 while the rate-limit backend answers.",
            ("backend",),
            registry=r,
        )
        self.bundle = Info("authz_bundle", "The active OPA bundle revision.", registry=r)
        self.bundle_activations = Counter(
            "authz_bundle_activations", "Bundle revision changes seen.", registry=r
        )
        self.secrets_loaded = Gauge(
            "authz_secrets_loaded", "1 while the egress secrets file is loaded.", registry=r
        )
        self.secrets_reloads = Counter(
            "authz_secrets_reloads", "Secrets file re-reads after a change.", registry=r
        )
        self.secrets_reload_failures = Counter(
            "authz_secrets_reload_failures", "Secrets file re-reads that failed.", registry=r
        )
        self.audit_records = Counter(
            "authz_audit_records", "Decisions appended to the audit trail.", registry=r
        )
        self.audit_write_failures = Counter(
            "authz_audit_write_failures", "Audit trail writes that failed.", registry=r
        )
        self.audit_degraded = Gauge(
            "authz_audit_degraded",
            "1 while the audit trail is degraded to log-only.",
            registry=r,
        )
        self.mode = Gauge("authz_mode", "1 for the active enforcement mode.", ("mode",), registry=r)
        self.overrides_active = Gauge("authz_overrides_active", "Active TTL overrides.", registry=r)
        self.expiring_key_decisions = Counter(
            "authz_expiring_key_decisions",
            "Allowed decisions for a key whose expires_at is within the warning window.",
            ("path",),
            registry=r,
        )
        # ``field`` is one of the few plugin field names a decision may carry for the other
        # outcome (authz.core.decision), or ``authz``: low cardinality by construction.
        self.decision_fields_ignored = Counter(
            "authz_decision_fields_ignored",
            "Decision fields the outcome does not use (ignored as opa-envoy-plugin does).",
            ("path", "field"),
            registry=r,
        )
        # Decision-log upload (authz.runtime.decision_upload).
        self.decision_log_dropped = Counter(
            "authz_decision_log_dropped",
            "Decision-log events dropped before upload (buffer full, too large, shutdown).",
            ("reason",),
            registry=r,
        )
        self.decision_log_uploads = Counter(
            "authz_decision_log_uploads",
            "Decision-log upload requests by result (ok: 2xx; error: anything else).",
            ("result",),
            registry=r,
        )
        self.decision_log_upload_events = Counter(
            "authz_decision_log_upload_events", "Decision-log events uploaded.", registry=r
        )
        self.decision_log_upload_bytes = Counter(
            "authz_decision_log_upload_bytes",
            "Decision-log bytes uploaded (gzip bodies).",
            registry=r,
        )
        self.decision_log_buffer_bytes = Gauge(
            "authz_decision_log_buffer_bytes",
            "Bytes of decision-log events waiting for upload.",
            registry=r,
        )
        self.decision_log_buffer_max_bytes = Gauge(
            "authz_decision_log_buffer_max_bytes",
            "The decision-log upload buffer's bound in bytes.",
            registry=r,
        )
        for reason in ("buffer_full", "too_large", "shutdown"):  # 0 from the start: rate()
            self.decision_log_dropped.labels(reason=reason)
        # Batch queries and BatchCheck (issue #19).
        self.opa_batch_size = Histogram(
            "authz_opa_batch_size",
            "Inputs per batch query to OPA (coalesced misses, and BatchCheck calls).",
            ("outcome",),
            buckets=_BATCH_SIZE_BUCKETS,
            registry=r,
        )
        for outcome in BATCH_OUTCOMES:  # 0 from the start: rate()
            self.opa_batch_size.labels(outcome)
        self.batch_checks = Counter(
            "authz_batch_checks",
            "BatchCheck calls by result (ok, or the gRPC status code of a refusal).",
            ("result",),
            registry=r,
        )
        self.batch_check_actions = Histogram(
            "authz_batch_check_actions",
            "Actions per BatchCheck call answered.",
            buckets=_BATCH_SIZE_BUCKETS,
            registry=r,
        )
        # Fleet (issue #16): shared overrides and cache invalidation through Redis.
        self.fleet_redis_available = Gauge(
            "authz_fleet_redis_available",
            "1 while the fleet's Redis (shared overrides, cache invalidation) answers.",
            registry=r,
        )
        self.fleet_sync_lag = Gauge(
            "authz_fleet_sync_lag_seconds",
            "Seconds since the overrides were last read from Redis (grows while it is down).",
            registry=r,
        )
        self.fleet_sync_failures = Counter(
            "authz_fleet_sync_failures_total",
            "Redis calls of the fleet (override sync, grants, invalidations) that failed.",
            registry=r,
        )
        self.fleet_entries_refused = Counter(
            "authz_fleet_entries_refused_total",
            "Override entries read from Redis and refused (oversized or malformed).",
            registry=r,
        )
        self.fleet_cache_invalidations = Counter(
            "authz_fleet_cache_invalidations_total",
            "Fleet-wide decision-cache invalidations sent to or received from other replicas.",
            ("direction",),
            registry=r,
        )
        for direction in ("sent", "received"):
            self.fleet_cache_invalidations.labels(direction)
        # Tunnel ends (issue 18): entries of Envoy's access log service.
        self.access_log_entries = Counter(
            "authz_access_log_entries",
            "Access-log entries from Envoy: audited (a tunnel end) or refused, by reason.",
            ("result",),
            registry=r,
        )
        for result in ("audited", *ALS_REFUSALS):  # 0 from the start: rate()
            self.access_log_entries.labels(result)
        self.build = Info("authz_build", "authz version.", registry=r)
        self.build.info({"version": __version__})
        self.set_mode("enforce")
        self.set_circuit_state("closed")

    def watch_decision_cache(self, cache: DecisionCache) -> None:
        """Expose ``cache``, read at scrape time: lookups (hit, miss), entries, accounted
        bytes and their bound, and puts dropped because a clear happened during their
        evaluation (``authz_decision_cache_stale_puts_total``)."""
        self.registry.register(
            _CacheCollector(
                lambda: (cache.hits, cache.misses, len(cache)),
                extra=lambda: (cache.bytes, cache.max_bytes, cache.dropped_stale),
            )
        )

    def set_mode(self, mode: str) -> None:
        """Mark ``mode`` (one of :data:`MODES`) as the active one."""
        for name in MODES:
            self.mode.labels(name).set(1 if name == mode else 0)

    def set_circuit_state(self, state: str) -> None:
        """Mark ``state`` (one of :data:`CIRCUIT_STATES`) as the circuit's current one."""
        for name in CIRCUIT_STATES:
            self.circuit_state.labels(name).set(1 if name == state else 0)


class _CacheCollector(Collector):
    def __init__(
        self,
        stats: Callable[[], tuple[int, int, int]],
        extra: Callable[[], tuple[int, int, int]] | None = None,
    ) -> None:
        self._stats = stats
        self._extra = extra  # (bytes, max bytes, stale puts), when known

    def collect(self) -> Iterable[Metric]:
        hits, misses, entries = self._stats()
        lookups = CounterMetricFamily(
            "authz_decision_cache_lookups", "Decision cache lookups.", labels=["result"]
        )
        lookups.add_metric(["hit"], hits)
        lookups.add_metric(["miss"], misses)
        yield lookups
        yield GaugeMetricFamily(
            "authz_decision_cache_entries", "Decisions in the cache.", value=entries
        )
        if self._extra is None:
            return
        held, bound, stale = self._extra()
        yield GaugeMetricFamily(
            "authz_decision_cache_bytes", "Accounted bytes of the cached decisions.", value=held
        )
        yield GaugeMetricFamily(
            "authz_decision_cache_max_bytes", "The cache's bound in bytes.", value=bound
        )
        yield CounterMetricFamily(
            "authz_decision_cache_stale_puts",
            "Decisions not cached because a clear happened during their evaluation.",
            value=stale,
        )


# Labelled children MetricsSink keeps at hand per metric: label values are decision paths,
# reason codes, tiers and decision field names (low cardinality by construction); past
# this many a label tuple goes to ``labels()`` each time, so a flood cannot grow the cache.
CHILDREN_MAX: Final = 4096


_M = TypeVar("_M", Counter, Histogram)


class _Children(Generic[_M]):
    """``metric.labels(*values)`` cached per label tuple, up to ``bound`` tuples (then
    ``labels()`` on every call). ``labels()`` validates and takes the metric's lock on each
    call; the cache holds only references to the children the metric keeps anyway (a
    metric's series are never removed here)."""

    __slots__ = ("_bound", "_cache", "_metric")

    def __init__(self, metric: _M, bound: int = CHILDREN_MAX) -> None:
        self._metric: _M = metric
        self._bound = bound
        self._cache: dict[tuple[str, ...], _M] = {}

    def __call__(self, *values: str) -> _M:
        child = self._cache.get(values)
        if child is None:
            child = self._metric.labels(*values)
            if len(self._cache) < self._bound:
                self._cache[values] = child
        return child

    def __len__(self) -> int:
        return len(self._cache)


class MetricsSink:
    """A :class:`~authz.core.record.DecisionSink` counting every decision into ``metrics``.
    Each metric's labelled children are cached per label tuple (at most ``children_max``
    per metric), so a decision costs dict lookups and increments."""

    def __init__(self, metrics: Metrics, *, children_max: int = CHILDREN_MAX) -> None:
        self._m = metrics
        self._decisions = _Children(metrics.decisions, children_max)
        self._decision_duration = _Children(metrics.decision_duration, children_max)
        self._opa_duration = _Children(metrics.opa_duration, children_max)
        self._opa_errors = _Children(metrics.opa_errors, children_max)
        self._fail_open = _Children(metrics.fail_open, children_max)
        self._dry_run_suppressed = _Children(metrics.dry_run_suppressed, children_max)
        self._rate_limit_rejections = _Children(metrics.rate_limit_rejections, children_max)
        self._fields_ignored = _Children(metrics.decision_fields_ignored, children_max)

    def record(self, record: DecisionRecord) -> None:
        """Count ``record``: decisions, latency, OPA share and errors, fail-open,
        dry-run suppressions, rate-limit rejections and ignored decision fields."""
        path = record.decision_path
        result = "allow" if record.allowed else "deny"
        self._decisions(path, result, record.reason, record.mode).inc()
        self._decision_duration(path).observe(record.duration_s)
        if record.opa_duration_s:
            self._opa_duration(path).observe(record.opa_duration_s)
        failure = meanings().get(record.reason)  # None for a decision's own reason
        if failure is not None and failure.opa_error:
            self._opa_errors(record.reason).inc()
        if record.fail_open:
            self._fail_open(path, record.reason).inc()
        elif record.suppressed and record.mode == "dry-run":
            self._dry_run_suppressed(path, record.reason).inc()
        if record.reason == "rate_limited" and not record.allowed:  # enforced, not dry-run
            self._rate_limit_rejections(path, record.tier or "").inc()
        for name in record.ignored_fields:
            self._fields_ignored(path, name).inc()
