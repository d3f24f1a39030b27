"""authz.runtime.expiry: the runtime "api key expiring" warning (once per key per hour, bounded)
and the authz_expiring_key_decisions_total counter, with the clock injected through the
decision records."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from authz.core.authorizer import Authorizer
from authz.core.mode import Control, Mode
from authz.core.record import DecisionRecord
from authz.core.rfc3339 import DAY_S
from authz.runtime.expiry import _PARSED_MAX, WARN_INTERVAL_S, KeyExpiryWatch, _parse_cached
from authz.runtime.metrics import Metrics
from tests.helpers.fakes import FakeEngine, check_request
from tests.helpers.key_health import NOW, iso

GATEWAY = "authz/gateway/decision"
EGRESS = "authz/egress/decision"
LOGGER = "authz.runtime.expiry"


def record(
    key_id: str = "key-a",
    expires_in_s: float | None = 3 * DAY_S,
    *,
    at: float = NOW,
    allowed: bool = True,
    path: str = GATEWAY,
    expires_at: str | None = None,
) -> DecisionRecord:
    identity = {"key_id": key_id, "role": "user", "tier": "default"}
    if expires_at is not None:
        identity["expires_at"] = expires_at
    elif expires_in_s is not None:
        identity["expires_at"] = iso(at + expires_in_s)
    return DecisionRecord(
        decision_id="d-1",
        timestamp=at,
        decision_path=path,
        allowed=allowed,
        reason="allowed" if allowed else "role_not_allowed",
        http_status=200 if allowed else 403,
        identity=identity,
    )


def counted(metrics: Metrics, path: str = GATEWAY) -> float:
    value = metrics.registry.get_sample_value("authz_expiring_key_decisions_total", {"path": path})
    return value or 0.0


def warnings(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        {k: getattr(r, k) for k in ("key_id", "expires_at", "expires_in_days", "decision_path")}
        for r in caplog.records
        if r.name == LOGGER and r.getMessage() == "api key expiring"
    ]


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def watch(metrics: Metrics) -> KeyExpiryWatch:
    return KeyExpiryWatch(14, metrics.expiring_key_decisions)


CASES: list[tuple[str, DecisionRecord, bool]] = [
    ("expiring", record(expires_in_s=3 * DAY_S), True),
    ("at-window", record(expires_in_s=14 * DAY_S), True),
    ("just-outside-window", record(expires_in_s=14 * DAY_S + 1), False),
    ("far-expiry", record(expires_in_s=365 * DAY_S), False),
    ("already-expired-but-allowed", record(expires_in_s=-DAY_S), True),
    ("no-expiry", record(expires_in_s=None), False),
    ("denied", record(allowed=False), False),
    ("unparseable", record(expires_at="soon"), False),
    ("offset-form", record(expires_at="2026-01-03T02:00:00+02:00"), True),
]


@pytest.mark.parametrize(("rec", "warns"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_which_decisions_count(
    caplog: pytest.LogCaptureFixture,
    metrics: Metrics,
    watch: KeyExpiryWatch,
    rec: DecisionRecord,
    warns: bool,
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    watch.record(rec)
    assert counted(metrics) == (1.0 if warns else 0.0)
    assert len(warnings(caplog)) == (1 if warns else 0)


def test_warning_fields(caplog: pytest.LogCaptureFixture, watch: KeyExpiryWatch) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    watch.record(record("key-a", 3 * DAY_S, path=GATEWAY))
    assert warnings(caplog) == [
        {
            "key_id": "key-a",
            "expires_at": iso(NOW + 3 * DAY_S),
            "expires_in_days": 3.0,
            "decision_path": GATEWAY,
        }
    ]
    (line,) = [r for r in caplog.records if r.name == LOGGER]
    assert line.levelno == logging.WARNING


def test_once_per_key_per_hour_but_every_decision_counts(
    caplog: pytest.LogCaptureFixture, metrics: Metrics, watch: KeyExpiryWatch
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    expires = iso(NOW + 3 * DAY_S)
    times = [NOW, NOW + 1, NOW + 1800, NOW + WARN_INTERVAL_S - 1]
    for at in times:
        watch.record(record("key-a", at=at, expires_at=expires))
    watch.record(record("key-b", at=NOW + 5, expires_at=expires))  # another key: its own
    assert [w["key_id"] for w in warnings(caplog)] == ["key-a", "key-b"]
    assert counted(metrics) == len(times) + 1
    watch.record(record("key-a", at=NOW + WARN_INTERVAL_S, expires_at=expires))
    watch.record(record("key-a", at=NOW + WARN_INTERVAL_S + 60, expires_at=expires))
    assert [w["key_id"] for w in warnings(caplog)] == ["key-a", "key-b", "key-a"]
    assert counted(metrics) == len(times) + 3


def test_counter_is_labelled_by_decision_path_only(metrics: Metrics, watch: KeyExpiryWatch) -> None:
    watch.record(record("key-a", path=GATEWAY))
    watch.record(record("key-b", path=EGRESS))
    watch.record(record("key-c", path=EGRESS))
    assert (counted(metrics, GATEWAY), counted(metrics, EGRESS)) == (1.0, 2.0)
    assert metrics.expiring_key_decisions._labelnames == ("path",)


def test_zero_days_turns_the_watch_off(caplog: pytest.LogCaptureFixture, metrics: Metrics) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    off = KeyExpiryWatch(0, metrics.expiring_key_decisions)
    off.record(record(expires_in_s=60))
    off.record(record(expires_in_s=-60))
    assert (counted(metrics), warnings(caplog)) == (0.0, [])


def test_window_follows_the_setting(metrics: Metrics) -> None:
    short = KeyExpiryWatch(1, metrics.expiring_key_decisions)
    short.record(record("key-a", expires_in_s=DAY_S + 1))
    assert counted(metrics) == 0.0
    short.record(record("key-a", expires_in_s=DAY_S))
    assert counted(metrics) == 1.0


def test_warned_keys_are_bounded(caplog: pytest.LogCaptureFixture, metrics: Metrics) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    watch = KeyExpiryWatch(14, metrics.expiring_key_decisions, max_keys=2)
    for key in ("key-a", "key-b", "key-c"):  # key-c pushes out key-a, the oldest
        watch.record(record(key, at=NOW))
    watch.record(record("key-b", at=NOW + 10))  # still remembered: no warning
    watch.record(record("key-a", at=NOW + 10))  # forgotten: warns again
    assert [w["key_id"] for w in warnings(caplog)] == ["key-a", "key-b", "key-c", "key-a"]
    assert len(watch._warned) == 2


def test_parsed_timestamps_are_cached_and_bounded(watch: KeyExpiryWatch) -> None:
    _parse_cached.cache_clear()
    for at in (NOW, NOW + 1, NOW + 2):
        watch.record(record(at=at, expires_at="2026-01-05T00:00:00Z"))
    info = _parse_cached.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    assert info.maxsize == _PARSED_MAX  # bounded
    watch.record(record(expires_in_s=None))  # nothing to parse: not even a lookup
    assert _parse_cached.cache_info().hits + _parse_cached.cache_info().misses == 3


# --- through the authorizer: a sink like the decision log and the metrics ----------------


def allow_with_expiry(expires_at: str) -> dict[str, Any]:
    return {
        "allowed": True,
        "authz": {
            "reason": "allowed",
            "identity": {
                "key_id": "key-a",
                "role": "user",
                "tier": "default",
                "expires_at": expires_at,
            },
        },
    }


@pytest.mark.parametrize(
    ("answer", "mode", "counted_decisions"),
    [
        (allow_with_expiry(iso(NOW + DAY_S)), Mode.ENFORCE, 2),
        (allow_with_expiry(iso(NOW + 30 * DAY_S)), Mode.ENFORCE, 0),
        ({**allow_with_expiry(iso(NOW + DAY_S)), "allowed": False}, Mode.ENFORCE, 0),
        ({**allow_with_expiry(iso(NOW - DAY_S)), "allowed": False}, Mode.DRY_RUN, 2),
    ],
    ids=["expiring", "not-yet", "denied", "expired-let-through-by-dry-run"],
)
async def test_authorizer_feeds_the_watch(
    caplog: pytest.LogCaptureFixture,
    metrics: Metrics,
    answer: dict[str, Any],
    mode: Mode,
    counted_decisions: int,
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    authorizer = Authorizer(
        FakeEngine(answer),
        default_decision_path=GATEWAY,
        credential_headers=("x-api-key",),
        timeout_s=0.3,
        control=Control(mode),
        sinks=[KeyExpiryWatch(14, metrics.expiring_key_decisions)],
        wall_clock=lambda: NOW,
    )
    for _ in range(2):
        await authorizer.check(check_request())
    assert counted(metrics) == counted_decisions
    assert len(warnings(caplog)) == (1 if counted_decisions else 0)
