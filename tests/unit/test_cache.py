"""Decision cache: keys ignore only per-request noise; TTL, LRU, revision and clears."""

from __future__ import annotations

import pytest

from authz.core.cache import DecisionCache, cache_key
from authz.core.decision import Decision
from authz.core.input import build_input
from authz.core.opa import Evaluation
from tests.unit.fakes import ManualClock, check_request


def key(**kwargs: object) -> bytes:
    headers = {"x-api-key": "sha", "x-request-id": "r1", "traceparent": "t1"}
    extra = kwargs.pop("headers", {})
    assert isinstance(extra, dict)
    headers.update(extra)
    request = check_request(headers=headers, **kwargs)  # type: ignore[arg-type]
    return cache_key("authz/gateway/decision", build_input(request, ("x-api-key",)))


def test_key_ignores_request_ids_and_tracing() -> None:
    assert key() == key(headers={"x-request-id": "r2", "traceparent": "t2", "x-b3-traceid": "x"})


@pytest.mark.parametrize(
    "change",
    [
        {"headers": {"x-api-key": "other"}},
        {"headers": {"x-authz-role": "admin"}},
        {"method": "POST"},
        {"path": "/api/v1/other"},
        {"body": "{}"},
        {"context_extensions": {"decision_path": "authz/egress/decision"}},
    ],
    ids=["credential", "extra-header", "method", "path", "body", "route"],
)
def test_key_changes_with_anything_a_policy_may_read(change: dict[str, object]) -> None:
    assert key() != key(**change)


def test_key_differs_per_decision_path() -> None:
    document = build_input(check_request(), ())
    assert cache_key("a/b", document) != cache_key("a/c", document)


def put(cache: DecisionCache, k: object, *, ttl: float | None = None, rev: str = "r1") -> None:
    decision = Decision(allowed=True, cache_ttl_s=ttl, identity={"key_id": "k1"})
    evaluation = Evaluation(True, {"b": rev})
    cache.put(as_key(k), decision, evaluation, "d1", generation=cache.generation)


def as_key(k: object) -> bytes:
    """A test's short key name as the bytes keys the cache holds."""
    return str(k).encode()


def test_ttl_and_counters() -> None:
    clock = ManualClock(100.0)
    cache = DecisionCache(ttl_s=5, confirm_s=3600, jitter=0, clock=clock)
    assert cache.get(as_key("k")) is None
    put(cache, "k")
    assert cache.get(as_key("k")) is not None
    clock.now += 4.9
    assert cache.get(as_key("k")) is not None
    clock.now += 0.2
    assert cache.get(as_key("k")) is None
    assert (cache.hits, cache.misses) == (2, 2)


@pytest.mark.parametrize(
    ("decision_ttl", "alive_at", "dead_at"),
    [(0, None, 0.0), (2, 1.9, 2.1), (60, 4.9, 5.1)],
    ids=["uncacheable", "shorter", "capped-by-config"],
)
def test_decision_ttl(decision_ttl: float, alive_at: float | None, dead_at: float) -> None:
    clock = ManualClock(100.0)
    cache = DecisionCache(ttl_s=5, confirm_s=3600, jitter=0, clock=clock)
    put(cache, "k", ttl=decision_ttl)
    start = clock.now
    if alive_at is not None:
        clock.now = start + alive_at
        assert cache.get(as_key("k")) is not None
    clock.now = start + dead_at
    assert cache.get(as_key("k")) is None


def test_reuse_needs_a_recently_confirmed_revision() -> None:
    clock = ManualClock(100.0)
    cache = DecisionCache(ttl_s=60, confirm_s=5, jitter=0, clock=clock)
    put(cache, "k")  # an OPA answer confirms its revision
    clock.now += 4.9
    assert cache.get(as_key("k")) is not None
    clock.now += 0.2  # OPA silent for 5.1 s: no reuse, though the TTL has 55 s left
    assert cache.get(as_key("k")) is None
    cache.observe_revision("r1")  # the watcher's probe confirms the same revision
    assert cache.get(as_key("k")) is not None
    clock.now += 30
    cache.observe_revision("r1")
    assert cache.get(as_key("k")) is not None
    clock.now += 31  # confirmed, but past the TTL
    cache.observe_revision("r1")
    assert cache.get(as_key("k")) is None


@pytest.mark.parametrize(("draw", "life"), [(0.0, 60.0), (0.5, 54.0), (1.0, 48.0)])
def test_jitter_shortens_each_life_by_up_to_its_share(draw: float, life: float) -> None:
    clock = ManualClock(100.0)
    cache = DecisionCache(ttl_s=60, confirm_s=3600, jitter=0.2, clock=clock, rng=lambda: draw)
    put(cache, "k")
    clock.now = 100.0 + life - 0.01
    assert cache.get(as_key("k")) is not None
    clock.now = 100.0 + life + 0.01
    assert cache.get(as_key("k")) is None


def test_jitter_spreads_a_cold_start_over_its_share_of_the_ttl() -> None:
    clock = ManualClock(100.0)
    cache = DecisionCache(ttl_s=60, confirm_s=3600, max_entries=1000, clock=clock)
    for i in range(1000):
        put(cache, i)
    alive = []
    for at in (47.9, 50.0, 54.0, 58.0, 60.1):
        clock.now = 100.0 + at
        alive.append(sum(1 for i in range(1000) if cache.get(as_key(i)) is not None))
    assert alive[0] == 1000  # nothing expires before 80% of the TTL
    assert 1000 > alive[1] > alive[2] > alive[3] > 0  # then a few at a time
    assert alive[4] == 0


def test_jitter_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="jitter"):
        DecisionCache(jitter=1.5)


def test_nothing_is_reused_before_any_confirmation() -> None:
    clock = ManualClock(100.0)
    cache = DecisionCache(confirm_s=5, clock=clock)
    assert cache.get(as_key("k")) is None
    put(cache, "k")
    assert cache.get(as_key("k")) is not None


def test_lru_bound() -> None:
    cache = DecisionCache(max_entries=2, clock=ManualClock(100.0))
    put(cache, "a")
    put(cache, "b")
    assert cache.get(as_key("a")) is not None  # a is now the most recent
    put(cache, "c")
    assert len(cache) == 2
    assert cache.get(as_key("b")) is None
    assert cache.get(as_key("a")) is not None


def test_new_bundle_revision_drops_everything() -> None:
    cache = DecisionCache(clock=ManualClock(100.0))
    put(cache, "a", rev="r1")
    put(cache, "b", rev="r2")
    assert cache.get(as_key("a")) is None
    assert cache.get(as_key("b")) is not None
    cache.observe_revision("r3")
    assert cache.get(as_key("b")) is None


def test_clear() -> None:
    cache = DecisionCache(clock=ManualClock(100.0))
    put(cache, "a")
    cache.clear("overrides changed")
    assert len(cache) == 0
    assert cache.clears == 1


def test_configured_headers_are_ignored_too() -> None:
    cache = DecisionCache(ignore_headers=["X-Vegeta-Seq"])
    one = build_input(check_request(headers={"x-vegeta-seq": "1"}), ())
    a = cache.key("p", one)
    b = cache.key("p", build_input(check_request(headers={"x-vegeta-seq": "2"}), ()))
    assert a == b
    assert DecisionCache().key("p", one) != a
