"""authz.runtime.metrics: every metric on its own registry, and MetricsSink counting decisions
(labels, durations, OPA errors, fail-open, dry-run suppressions, rate-limit rejections)."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from authz import __version__
from authz.core.cache import DecisionCache
from authz.core.decision import Decision
from authz.core.opa import Evaluation
from authz.core.record import DecisionRecord
from authz.runtime.metrics import CHILDREN_MAX, CIRCUIT_STATES, MODES, Metrics, MetricsSink
from tests.helpers.fakes import ManualClock

GATEWAY = "authz/gateway/decision"
EGRESS = "authz/egress/decision"
# The counters MetricsSink.record increments, as exposed (with the _total suffix).
COUNTERS = (
    "authz_decisions_total",
    "authz_opa_errors_total",
    "authz_fail_open_total",
    "authz_dry_run_suppressed_total",
    "authz_rate_limit_rejections_total",
    "authz_decision_fields_ignored_total",
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def sample(name: str, value: float = 1.0, **labels: str) -> Samples:
    return {(name, frozenset(labels.items())): value}


def counted(metrics: Metrics) -> Samples:
    """Every non-zero sample of the counters MetricsSink touches."""
    found: Samples = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name in COUNTERS and s.value:
                found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def record(**fields: Any) -> DecisionRecord:
    values: dict[str, Any] = {
        "decision_id": "d-1",
        "timestamp": 0.0,
        "decision_path": GATEWAY,
        "allowed": True,
        "reason": "allowed",
        "http_status": 200,
        "duration_s": 0.004,
        "opa_duration_s": 0.002,
    }
    values.update(fields)
    return DecisionRecord(**values)


def decision(path: str, result: str, reason: str, mode: str = "enforce") -> Samples:
    return sample("authz_decisions_total", path=path, result=result, reason=reason, mode=mode)


# --- Metrics -----------------------------------------------------------------------------


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    assert first.registry is not second.registry
    first.decisions.labels(GATEWAY, "allow", "allowed", "enforce").inc()
    labels = {"path": GATEWAY, "result": "allow", "reason": "allowed", "mode": "enforce"}
    assert first.registry.get_sample_value("authz_decisions_total", labels) == 1.0
    assert second.registry.get_sample_value("authz_decisions_total", labels) is None


def test_given_registry_is_used() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    assert metrics.registry is registry
    assert registry.get_sample_value("authz_build_info", {"version": __version__}) == 1.0


def test_initial_state() -> None:
    registry = Metrics().registry
    modes = {m: registry.get_sample_value("authz_mode", {"mode": m}) for m in MODES}
    assert modes == {"enforce": 1.0, "dry-run": 0.0, "bypass": 0.0}
    states = {
        s: registry.get_sample_value("authz_opa_circuit_state", {"state": s})
        for s in CIRCUIT_STATES
    }
    assert states == {"closed": 1.0, "open": 0.0, "half_open": 0.0}


@pytest.mark.parametrize("mode", MODES)
def test_set_mode_is_one_hot(mode: str) -> None:
    metrics = Metrics()
    metrics.set_mode("bypass")
    metrics.set_mode(mode)
    values = {m: metrics.registry.get_sample_value("authz_mode", {"mode": m}) for m in MODES}
    assert values == {m: (1.0 if m == mode else 0.0) for m in MODES}


@pytest.mark.parametrize("state", CIRCUIT_STATES)
def test_set_circuit_state_is_one_hot(state: str) -> None:
    metrics = Metrics()
    metrics.set_circuit_state("open")
    metrics.set_circuit_state(state)
    registry = metrics.registry
    values = {
        s: registry.get_sample_value("authz_opa_circuit_state", {"state": s})
        for s in CIRCUIT_STATES
    }
    assert values == {s: (1.0 if s == state else 0.0) for s in CIRCUIT_STATES}


def test_no_created_series() -> None:
    metrics = Metrics()
    sink = MetricsSink(metrics)
    sink.record(record())
    sink.record(record(reason="opa_timeout", allowed=True, decision_allowed=False, fail_open=True))
    sink.record(record(reason="rate_limited", allowed=False, http_status=429, tier="default"))
    text = generate_latest(metrics.registry).decode()
    assert "authz_decisions_total{" in text
    assert "_created" not in text


# --- MetricsSink.record ------------------------------------------------------------------

SINK_CASES: list[tuple[str, DecisionRecord, Samples]] = [
    ("allow", record(), decision(GATEWAY, "allow", "allowed")),
    (
        "policy-deny",
        record(allowed=False, reason="role_not_allowed", http_status=403, decision_path=EGRESS),
        decision(EGRESS, "deny", "role_not_allowed"),
    ),
    *[
        (
            f"opa-error-{code}",
            record(allowed=False, reason=code, http_status=503, opa_duration_s=0.0),
            decision(GATEWAY, "deny", code) | sample("authz_opa_errors_total", code=code),
        )
        for code in (
            "opa_unavailable",
            "opa_circuit_open",
            "opa_timeout",
            "opa_error",
            "undefined_decision",
            "invalid_decision",
        )
    ],
    *[
        (
            f"not-an-opa-error-{code}",
            record(allowed=False, reason=code, http_status=503),
            decision(GATEWAY, "deny", code),
        )
        for code in (
            "deadline_exceeded",
            "credential_unavailable",
            "invalid_request",
            "rate_limit_unavailable",
        )
    ],
    (
        "fail-open",
        record(allowed=True, decision_allowed=False, reason="opa_unavailable", fail_open=True),
        decision(GATEWAY, "allow", "opa_unavailable")
        | sample("authz_opa_errors_total", code="opa_unavailable")
        | sample("authz_fail_open_total", path=GATEWAY, code="opa_unavailable"),
    ),
    (
        "dry-run-suppressed",
        record(
            mode="dry-run",
            allowed=True,
            decision_allowed=False,
            reason="role_not_allowed",
            http_status=403,
        ),
        decision(GATEWAY, "allow", "role_not_allowed", "dry-run")
        | sample("authz_dry_run_suppressed_total", path=GATEWAY, reason="role_not_allowed"),
    ),
    (
        "dry-run-allowed-is-not-suppressed",
        record(mode="dry-run", allowed=True, decision_allowed=True),
        decision(GATEWAY, "allow", "allowed", "dry-run"),
    ),
    (
        "dry-run-fail-open-counts-once",
        record(
            mode="dry-run",
            allowed=True,
            decision_allowed=False,
            reason="opa_timeout",
            fail_open=True,
        ),
        decision(GATEWAY, "allow", "opa_timeout", "dry-run")
        | sample("authz_opa_errors_total", code="opa_timeout")
        | sample("authz_fail_open_total", path=GATEWAY, code="opa_timeout"),
    ),
    (
        "bypass-is-not-dry-run",
        record(mode="bypass", allowed=True, decision_allowed=False, reason="bypass"),
        decision(GATEWAY, "allow", "bypass", "bypass"),
    ),
    (
        "rate-limited",
        record(allowed=False, reason="rate_limited", http_status=429, tier="premium"),
        decision(GATEWAY, "deny", "rate_limited")
        | sample("authz_rate_limit_rejections_total", path=GATEWAY, tier="premium"),
    ),
    (
        "rate-limited-without-tier",
        record(allowed=False, reason="rate_limited", http_status=429, decision_path=EGRESS),
        decision(EGRESS, "deny", "rate_limited")
        | sample("authz_rate_limit_rejections_total", path=EGRESS, tier=""),
    ),
    (
        "fields-the-plugin-ignores-counted-per-field",
        record(ignored_fields=("body", "http_status")),
        decision(GATEWAY, "allow", "allowed")
        | sample("authz_decision_fields_ignored_total", path=GATEWAY, field="body")
        | sample("authz_decision_fields_ignored_total", path=GATEWAY, field="http_status"),
    ),
]


@pytest.mark.parametrize(
    ("rec", "expected"), [case[1:] for case in SINK_CASES], ids=[case[0] for case in SINK_CASES]
)
def test_sink_counts(rec: DecisionRecord, expected: Samples) -> None:
    metrics = Metrics()
    MetricsSink(metrics).record(rec)
    assert counted(metrics) == expected


def test_sink_accumulates() -> None:
    metrics = Metrics()
    sink = MetricsSink(metrics)
    for _ in range(3):
        sink.record(record())
    sink.record(record(allowed=False, reason="opa_timeout", http_status=503))
    sink.record(record(allowed=False, reason="opa_timeout", http_status=503))
    assert counted(metrics) == (
        sample(
            "authz_decisions_total",
            3.0,
            path=GATEWAY,
            result="allow",
            reason="allowed",
            mode="enforce",
        )
        | sample(
            "authz_decisions_total",
            2.0,
            path=GATEWAY,
            result="deny",
            reason="opa_timeout",
            mode="enforce",
        )
        | sample("authz_opa_errors_total", 2.0, code="opa_timeout")
    )


def _exposed(children_max: int, records: list[DecisionRecord]) -> bytes:
    metrics = Metrics()
    sink = MetricsSink(metrics, children_max=children_max)
    for rec in records:
        sink.record(rec)
    return generate_latest(metrics.registry)


@pytest.mark.parametrize(
    "children_max", [1, 3, CHILDREN_MAX], ids=["bound-1", "bound-3", "default"]
)
def test_sink_cached_children_expose_what_labels_each_time_does(children_max: int) -> None:
    # children_max=0 caches nothing: every decision goes through labels(), as before the
    # cache; every case's record, twice, plus more series than the small bounds.
    records = [case[1] for case in SINK_CASES] * 2 + [
        record(decision_path=f"authz/p{i}/decision", duration_s=i / 1000) for i in range(8)
    ]
    assert _exposed(children_max, records) == _exposed(0, records)


def test_sink_labels_each_series_once_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = Metrics()
    sink = MetricsSink(metrics, children_max=2)
    calls: list[tuple[str, ...]] = []
    labels = metrics.decisions.labels

    def counting(*values: str) -> Any:
        calls.append(values)
        return labels(*values)

    monkeypatch.setattr(metrics.decisions, "labels", counting)
    paths = ["authz/a", "authz/b", "authz/c", "authz/a", "authz/c", "authz/c"]
    for path in paths:
        sink.record(record(decision_path=path))
    # a and b are cached (the bound), c goes to labels() each time; the cache stays at 2.
    assert [values[0] for values in calls] == [
        "authz/a",
        "authz/b",
        "authz/c",
        "authz/c",
        "authz/c",
    ]
    assert len(sink._decisions) == 2
    value = metrics.registry.get_sample_value
    total = "authz_decisions_total"
    common = {"result": "allow", "reason": "allowed", "mode": "enforce"}
    assert [value(total, {"path": p} | common) for p in ("authz/a", "authz/b", "authz/c")] == [
        2.0,
        1.0,
        3.0,
    ]


@pytest.mark.parametrize(
    ("duration_s", "opa_duration_s", "opa_observed"),
    [(0.004, 0.002, True), (0.0007, 0.0, False), (0.3, 0.25, True)],
    ids=["with-opa", "no-opa-call", "slow"],
)
def test_sink_observes_durations(
    duration_s: float, opa_duration_s: float, opa_observed: bool
) -> None:
    metrics = Metrics()
    MetricsSink(metrics).record(record(duration_s=duration_s, opa_duration_s=opa_duration_s))
    registry = metrics.registry
    path = {"path": GATEWAY}
    assert registry.get_sample_value("authz_decision_duration_seconds_count", path) == 1.0
    assert registry.get_sample_value("authz_decision_duration_seconds_sum", path) == pytest.approx(
        duration_s
    )
    # The bucket just above the duration holds it, the one just below does not.
    bucket = "authz_decision_duration_seconds_bucket"
    le_above = next(b for b in (0.001, 0.005, 0.5) if b >= duration_s)
    assert registry.get_sample_value(bucket, {**path, "le": str(le_above)}) == 1.0
    le_below = {0.001: "0.0005", 0.005: "0.003", 0.5: "0.25"}[le_above]
    assert registry.get_sample_value(bucket, {**path, "le": le_below}) == 0.0
    opa_count = registry.get_sample_value("authz_opa_duration_seconds_count", path)
    if opa_observed:
        assert opa_count == 1.0
        assert registry.get_sample_value("authz_opa_duration_seconds_sum", path) == pytest.approx(
            opa_duration_s
        )
    else:
        assert opa_count is None


# --- decision cache metrics --------------------------------------------------------------


def test_decision_cache_metrics_show_bytes_entries_and_dropped_puts() -> None:
    cache = DecisionCache(max_bytes=1 << 20, clock=ManualClock(100.0))
    metrics = Metrics()
    metrics.watch_decision_cache(cache)
    started = cache.generation
    decision = Decision(allowed=True, identity={"key_id": "k1"})
    cache.put(b"a" * 32, decision, Evaluation(True, {"b": "r1"}), "d1", generation=started)
    cache.get(b"a" * 32)
    cache.get(b"b" * 32)
    cache.clear("overrides changed")
    cache.put(b"a" * 32, decision, Evaluation(True, {"b": "r1"}), "d2", generation=started)
    cache.put(b"c" * 32, decision, Evaluation(True, {"b": "r1"}), "d3", generation=cache.generation)

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("authz_decision_cache_bytes") == cache.bytes > 0
    assert value("authz_decision_cache_max_bytes") == 1 << 20
    assert value("authz_decision_cache_entries") == 1
    assert value("authz_decision_cache_lookups_total", result="hit") == 1
    assert value("authz_decision_cache_lookups_total", result="miss") == 1
    assert value("authz_decision_cache_stale_puts_total") == 1
