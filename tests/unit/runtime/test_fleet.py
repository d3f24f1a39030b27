"""authz.runtime.fleet against a real redis-server (tests/helpers/redis_server.py): shared
overrides (grant, delete, TTL by Redis's clock, expiry logged once per fleet, a new
replica's first load), fleet-wide cache invalidation, hostile Redis content, and Redis
down (last known overrides enforced, changes refused, recovery)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import orjson
import pytest
import redis.asyncio

from authz.core.cache import DecisionCache
from authz.core.errors import OpaUnavailable, OverridesUnavailable, TooManyOverrides
from authz.runtime import fleet as fleet_module
from authz.runtime.fleet import (
    CACHE_VERSION_KEY,
    CHANNEL,
    ENTRY_PREFIX,
    IDS_KEY,
    MAX_ENTRY_BYTES,
    OVERRIDES_VERSION_KEY,
    Fleet,
    RedisOverrideStore,
    connect,
)
from authz.runtime.metrics import Metrics
from authz.runtime.overrides import Override, parse_override_request
from tests.helpers.redis_server import RedisServer

GATEWAY = "authz/gateway/decision"
# The fleet's promise: a change on one replica is seen by every other within this.
FLEET_DEADLINE_S = 1.0


@dataclass
class Replica:
    """One replica's fleet part with what it pushed to its (recorded) OPA."""

    fleet: Fleet
    cache: DecisionCache
    metrics: Metrics
    pushed: list[dict[str, Any]] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    @property
    def store(self) -> RedisOverrideStore:
        return self.fleet.overrides

    @property
    def opa(self) -> dict[str, Any]:
        """The ``data.overrides`` this replica's OPA holds now."""
        return self.pushed[-1] if self.pushed else {}


def _client(url: str) -> redis.asyncio.Redis:
    """A client as authz builds the fleet's (:func:`authz.runtime.fleet.connect`)."""
    client: redis.asyncio.Redis = connect(url)
    return client


@contextlib.asynccontextmanager
async def _replica(url: str, *, mode: str = "fallback", run: bool = True) -> AsyncIterator[Replica]:
    """A replica as server.build_fleet wires one (its own client, a recording push, a
    decision cache, metrics), started (first read) and, with ``run``, looping."""
    client = _client(url)
    cache = DecisionCache(ttl_s=60.0)
    metrics = Metrics()
    pushed: list[dict[str, Any]] = []
    expired: list[str] = []

    async def push(document: dict[str, Any]) -> None:
        pushed.append(document)

    store = RedisOverrideStore(
        client,
        push,
        on_pushed=lambda: cache.clear("overrides changed"),
        on_expired=lambda o: expired.append(o.id),
        on_refused=metrics.fleet_entries_refused.inc,
    )
    fleet = Fleet(client, store, cache, failure_mode=mode, metrics=metrics)
    replica = Replica(fleet, cache, metrics, pushed, expired)
    await fleet.start()
    if run:
        replica.task = asyncio.create_task(fleet.run())
    try:
        yield replica
    finally:
        if replica.task is not None:
            replica.task.cancel()
            await asyncio.gather(replica.task, return_exceptions=True)
        await fleet.close()


async def _override(
    store: RedisOverrideStore, override_id: str, *, effect: str = "allow", ttl_s: int = 600
) -> Override:
    return parse_override_request(
        {
            "effect": effect,
            "decision_path": GATEWAY,
            "match": {"key_id": "key-user", "path": "/api/v1/admin/**"},
            "ttl_seconds": ttl_s,
            "reason": "INC-7",
        },
        actor="alice",
        now=await store.now(),
        new_id=lambda: override_id,
    )


async def _within(
    condition: Callable[[], bool | Awaitable[bool]], timeout_s: float = FLEET_DEADLINE_S
) -> float:
    """Seconds until ``condition`` holds; fails the test after ``timeout_s``."""
    start = time.monotonic()
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        elapsed = time.monotonic() - start
        if result:
            return elapsed
        assert elapsed < timeout_s, f"not within {timeout_s} s"
        await asyncio.sleep(0.01)


# --- grants and deletes across replicas ---------------------------------------------------


async def test_a_grant_on_one_replica_reaches_the_others_opa_within_one_second(
    redis_server: RedisServer,
) -> None:
    async with _replica(redis_server.url) as a, _replica(redis_server.url) as b:
        clears = b.cache.clears
        assert await a.store.add(await _override(a.store, "ovr-a")) is True
        assert "ovr-a" in a.opa  # the granting replica pushed before answering
        await _within(lambda: "ovr-a" in b.opa)
        assert [o.id for o in b.store.active()] == ["ovr-a"]
        assert b.opa["ovr-a"]["match"] == {"key_id": "key-user", "path": "/api/v1/admin/**"}
        assert b.cache.clears > clears  # after its OPA holds it


async def test_a_delete_on_one_replica_reaches_the_others_opa_within_one_second(
    redis_server: RedisServer,
) -> None:
    async with _replica(redis_server.url) as a, _replica(redis_server.url) as b:
        await b.store.add(await _override(b.store, "ovr-b", effect="deny"))
        await _within(lambda: "ovr-b" in a.opa)
        removed, pushed = await a.store.remove("ovr-b")
        assert removed is not None
        assert removed.id == "ovr-b"
        assert pushed
        assert "ovr-b" not in a.opa
        await _within(lambda: "ovr-b" not in b.opa)
        assert await a.store.remove("ovr-b") == (None, True)  # gone fleet-wide: 404


async def test_a_missed_message_is_caught_by_the_version_check(
    redis_server: RedisServer,
) -> None:
    async with _replica(redis_server.url) as a, _replica(redis_server.url) as b:
        override = await _override(a.store, "ovr-quiet")
        # A grant whose notification went to no one (as if b's subscription had dropped).
        await a.store._add(
            keys=[IDS_KEY, ENTRY_PREFIX + override.id, OVERRIDES_VERSION_KEY],
            args=[
                override.id,
                orjson.dumps(asdict(override)),
                int(override.expires_at * 1000),
                1000,
                "nobody-listens",
            ],
        )
        await _within(lambda: "ovr-quiet" in b.opa)


async def test_a_new_replica_holds_every_active_override_after_start(
    redis_server: RedisServer,
) -> None:
    async with _replica(redis_server.url) as a:
        for name in ("ovr-1", "ovr-2"):
            await a.store.add(await _override(a.store, name))
        async with _replica(redis_server.url, run=False) as late:
            # start() alone, before any loop ran: what it serves its first request with.
            assert set(late.opa) == {"ovr-1", "ovr-2"}
            assert late.store.loaded
            assert (await late.fleet.readiness()())[0] is True


# --- time ---------------------------------------------------------------------------------


async def test_ttl_counts_from_redis_time_and_the_entry_expires_in_redis(
    redis_server: RedisServer,
) -> None:
    async with _replica(redis_server.url, run=False) as a:
        client = _client(redis_server.url)
        try:
            seconds, micros = await client.time()
            override = await _override(a.store, "ovr-ttl", ttl_s=120)
            assert abs(override.created_at - (seconds + micros / 1e6)) < 0.5
            await a.store.add(override)
            expires_ms = await client.pexpiretime(ENTRY_PREFIX + "ovr-ttl")
            assert expires_ms == int(override.expires_at * 1000)
            assert await client.zscore(IDS_KEY, "ovr-ttl") == expires_ms
        finally:
            await client.aclose()


async def test_a_replica_clock_off_by_an_hour_still_expires_by_redis_time(
    redis_server: RedisServer,
) -> None:
    client = _client(redis_server.url)
    pushed: list[dict[str, Any]] = []

    async def push(document: dict[str, Any]) -> None:
        pushed.append(document)

    # This replica's clock runs an hour fast: by it, every 10-minute override is expired.
    skewed = RedisOverrideStore(client, push, clock=lambda: time.time() + 3600)
    try:
        override = await _override(skewed, "ovr-skew")
        await skewed.add(override)
        assert [o.id for o in skewed.active()] == ["ovr-skew"]
        assert "ovr-skew" in pushed[-1]
    finally:
        await client.aclose()


async def test_an_expiry_is_logged_and_reported_once_per_fleet(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authz.runtime.fleet")
    async with _replica(redis_server.url) as a, _replica(redis_server.url) as b:
        await a.store.add(await _override(a.store, "ovr-short", ttl_s=2))
        await _within(lambda: "ovr-short" in b.opa, 5.0)
        await _within(lambda: "ovr-short" not in a.opa and "ovr-short" not in b.opa, 10.0)
        await asyncio.sleep(2 * fleet_module.POLL_S)  # both loops past the expiry
        assert a.expired + b.expired == ["ovr-short"]
        lines = [r for r in caplog.records if r.getMessage() == "override expired"]
        assert len(lines) == 1


# --- the cap --------------------------------------------------------------------------------


async def test_the_cap_on_active_overrides_holds_across_replicas(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleet_module, "MAX_ACTIVE_OVERRIDES", 2)
    async with (
        _replica(redis_server.url, run=False) as a,
        _replica(redis_server.url, run=False) as b,
    ):
        await a.store.add(await _override(a.store, "ovr-1"))
        await b.store.add(await _override(b.store, "ovr-2"))
        with pytest.raises(TooManyOverrides):
            await a.store.add(await _override(a.store, "ovr-3"))
        # Replacing one of the two is not a new one.
        await b.store.add(await _override(b.store, "ovr-2"))


# --- the decision cache ---------------------------------------------------------------------


@pytest.mark.parametrize("why", ["admin reload", "bundle revision 2"], ids=["reload", "bundle"])
async def test_an_invalidation_empties_every_replicas_cache_within_one_second(
    redis_server: RedisServer, why: str
) -> None:
    async with _replica(redis_server.url) as a, _replica(redis_server.url) as b:
        await asyncio.sleep(fleet_module.POLL_S)  # both have read the version once
        before = b.cache.clears
        a.fleet.invalidate(why)
        await _within(lambda: b.cache.clears > before)
        assert (
            b.metrics.registry.get_sample_value(
                "authz_fleet_cache_invalidations_total", {"direction": "received"}
            )
            == 1
        )
        assert (
            a.metrics.registry.get_sample_value(
                "authz_fleet_cache_invalidations_total", {"direction": "sent"}
            )
            == 1
        )


# --- hostile Redis content ------------------------------------------------------------------


async def _good_entry(client: redis.asyncio.Redis, override_id: str, **changes: Any) -> bytes:
    seconds, _ = await client.time()
    entry = {
        "id": override_id,
        "effect": "allow",
        "decision_path": GATEWAY,
        "match": {"key_id": "key-user"},
        "reason": "r",
        "actor": "a",
        "created_at": float(seconds),
        "expires_at": float(seconds + 600),
        "extra": {},
    }
    entry.update(changes)
    return orjson.dumps(entry)


async def _plant(client: redis.asyncio.Redis, override_id: str, value: Any) -> None:
    """An entry written straight into Redis (not through authz), indexed for 10 minutes."""
    seconds, _ = await client.time()
    expires_ms = (seconds + 600) * 1000
    if value is not None:
        await client.set(ENTRY_PREFIX + override_id, value, pxat=expires_ms)
    await client.zadd(IDS_KEY, {override_id: expires_ms})
    await client.incr(OVERRIDES_VERSION_KEY)


async def _plant_bad_field(client: redis.asyncio.Redis, override_id: str, **changes: Any) -> None:
    await _plant(client, override_id, await _good_entry(client, override_id, **changes))


async def _plant_wrong_type(client: redis.asyncio.Redis, override_id: str) -> None:
    # The hash first, then the index and the version bump: the other order let a
    # replica read the bump before the entry existed and never look again.
    await client.hset(ENTRY_PREFIX + override_id, "id", override_id)
    await _plant(client, override_id, None)


async def _plant_long_id(client: redis.asyncio.Redis, override_id: str) -> None:
    await _plant(client, "x" * 10_000, await _good_entry(client, "x" * 10_000))


HOSTILE_ENTRIES: list[tuple[str, Callable[[redis.asyncio.Redis, str], Awaitable[None]]]] = [
    ("not-json", lambda c, i: _plant(c, i, b"{not json")),
    ("not-utf8", lambda c, i: _plant(c, i, b'{"id": "\xff\xfe"}')),
    ("oversized", lambda c, i: _plant(c, i, b" " * (MAX_ENTRY_BYTES + 1))),
    ("a-list", lambda c, i: _plant(c, i, b"[1, 2]")),
    ("deep-nesting", lambda c, i: _plant(c, i, b"[" * 5000 + b"]" * 5000)),
    ("effect-grant", lambda c, i: _plant_bad_field(c, i, effect="grant")),
    ("no-identity", lambda c, i: _plant_bad_field(c, i, match={"path": "/**"})),
    ("unknown-field", lambda c, i: _plant_bad_field(c, i, admin=True)),
    ("bad-path", lambda c, i: _plant_bad_field(c, i, decision_path="../../x")),
    ("expiry-nan", lambda c, i: _plant(c, i, b'{"expires_at": NaN}')),
    ("expiry-out-of-range", lambda c, i: _plant_bad_field(c, i, expires_at=1e300)),
    ("id-not-the-indexed-one", lambda c, i: _plant(c, i, _sync_entry("ovr-other"))),
    ("wrong-key-type", _plant_wrong_type),
    ("indexed-id-too-long", _plant_long_id),
]


def _sync_entry(override_id: str) -> bytes:
    now = time.time()
    return orjson.dumps(
        {
            "id": override_id,
            "effect": "allow",
            "decision_path": GATEWAY,
            "match": {"key_id": "key-user"},
            "reason": "r",
            "actor": "a",
            "created_at": now,
            "expires_at": now + 600,
            "extra": {},
        }
    )


@pytest.mark.parametrize(
    "plant", [p for _, p in HOSTILE_ENTRIES], ids=[name for name, _ in HOSTILE_ENTRIES]
)
async def test_a_hostile_redis_entry_is_refused_and_counted_never_granted(
    redis_server: RedisServer,
    plant: Callable[[redis.asyncio.Redis, str], Awaitable[None]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _replica(redis_server.url) as a:
        await a.store.add(await _override(a.store, "ovr-good"))
        client = _client(redis_server.url)
        try:
            await plant(client, "ovr-evil")
            # The planted version bump: the replica re-reads (no message was sent).
            await _within(
                lambda: (
                    (a.metrics.registry.get_sample_value("authz_fleet_entries_refused_total") or 0)
                    >= 1
                ),
                5.0,
            )
        finally:
            await client.aclose()
        assert set(a.opa) == {"ovr-good"}  # the good one stays, nothing else granted
        assert [o.id for o in a.store.active()] == ["ovr-good"]
        assert any(r.getMessage() == "override entry in Redis refused" for r in caplog.records)
        assert a.fleet.available  # a bad entry is not an outage
        assert (await a.fleet.readiness()())[0] is True


@pytest.mark.parametrize(
    ("key", "hostile"),
    [
        (OVERRIDES_VERSION_KEY, "list"),
        (CACHE_VERSION_KEY, "list"),
        (IDS_KEY, "string"),
        (OVERRIDES_VERSION_KEY, "huge"),
    ],
    ids=["overrides-version-a-list", "cache-version-a-list", "index-a-string", "version-huge"],
)
async def test_a_hostile_fleet_key_keeps_the_last_known_overrides(
    redis_server: RedisServer, key: str, hostile: str
) -> None:
    async with _replica(redis_server.url) as a:
        await a.store.add(await _override(a.store, "ovr-good"))
        await asyncio.sleep(fleet_module.POLL_S)
        client = _client(redis_server.url)
        try:
            await client.delete(key)
            if hostile == "list":
                await client.rpush(key, "x")
            elif hostile == "string":
                await client.set(key, "x")
            else:
                await client.set(key, b"9" * (1024 * 1024))
            await client.publish(CHANNEL, b"\xff" * 10_000)  # a forged, garbled message
            await asyncio.sleep(3 * fleet_module.POLL_S)
        finally:
            await client.aclose()
        assert set(a.opa) <= {"ovr-good"}
        assert a.task is not None
        assert not a.task.done()


# --- Redis down -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "ready_while_down"), [("fallback", True), ("deny", False)], ids=["fallback", "deny"]
)
async def test_redis_down_keeps_the_last_known_overrides_refuses_changes_and_recovers(
    redis_server: RedisServer, mode: str, ready_while_down: bool
) -> None:
    async with _replica(redis_server.url, mode=mode) as a:
        await a.store.add(await _override(a.store, "ovr-kept", effect="deny"))
        redis_server.stop()
        await _within(lambda: not a.fleet.available, 5.0)
        assert set(a.opa) == {"ovr-kept"}  # still enforced
        assert [o.id for o in a.store.active()] == ["ovr-kept"]
        with pytest.raises(OverridesUnavailable):
            await a.store.now()
        with pytest.raises(OverridesUnavailable):
            await a.store.add(replace(await _last(a), id="ovr-new"))
        with pytest.raises(OverridesUnavailable):
            await a.store.remove("ovr-kept")
        ready, detail = await a.fleet.readiness()()
        assert (ready, "redis unreachable" in detail) == (ready_while_down, True)
        assert a.metrics.registry.get_sample_value("authz_fleet_redis_available") == 0
        assert (a.metrics.registry.get_sample_value("authz_fleet_sync_failures_total") or 0) > 0
        a.fleet.invalidate("admin reload")  # sent once Redis is back
        redis_server.start()  # empty: no persistence in the test server
        await _within(lambda: a.fleet.available, 5.0)
        assert (await a.fleet.readiness()())[0] is True
        # The restarted Redis holds no overrides: the replica follows it.
        await _within(lambda: "ovr-kept" not in a.opa, 5.0)
        assert (
            a.metrics.registry.get_sample_value(
                "authz_fleet_cache_invalidations_total", {"direction": "sent"}
            )
            == 1
        )


async def _last(replica: Replica) -> Override:
    return replica.store.active()[-1]


async def test_a_replica_started_while_redis_is_down_is_not_ready_until_it_read_them(
    redis_server: RedisServer,
) -> None:
    redis_server.stop()
    async with _replica(redis_server.url) as a:
        assert not a.store.loaded
        assert (await a.fleet.readiness()())[0] is False
        redis_server.start()
        await _within(lambda: a.store.loaded, 5.0)
        assert (await a.fleet.readiness()())[0] is True


async def test_a_replica_whose_opa_refuses_the_overrides_is_not_ready_until_it_takes_them(
    redis_server: RedisServer,
) -> None:
    client = _client(redis_server.url)
    failing = [True]

    async def push(document: dict[str, Any]) -> None:
        if failing[0]:
            raise OpaUnavailable("OPA not up yet")

    store = RedisOverrideStore(client, push)
    fleet = Fleet(client, store, None)
    try:
        await fleet.start()
        assert store.loaded
        ready, detail = await fleet.readiness()()
        assert (ready, "not pushed to OPA" in detail) == (False, True)
        failing[0] = False
        await fleet.step()  # the next step retries at once, not after REPUSH_S
        assert (await fleet.readiness()())[0] is True
    finally:
        await fleet.close()


async def test_a_delete_on_a_replica_that_has_not_read_the_grant_yet_reports_it_deleted(
    redis_server: RedisServer,
) -> None:
    async with (
        _replica(redis_server.url, run=False) as a,
        _replica(redis_server.url, run=False) as b,
    ):
        await a.store.add(await _override(a.store, "ovr-new"))
        assert b.store.active() == []  # b's loop has not run: it does not know ovr-new
        removed, _ = await b.store.remove("ovr-new")
        assert removed is not None
        assert removed.id == "ovr-new"
        await a.store.refresh()
        assert a.store.active() == []


async def test_a_malformed_entry_can_be_deleted_and_is_reported_deleted(
    redis_server: RedisServer,
) -> None:
    async with _replica(redis_server.url, run=False) as a:
        client = _client(redis_server.url)
        try:
            await _plant(client, "ovr-junk", b"{not json")
            removed, _ = await a.store.remove("ovr-junk")
            assert removed is not None
            assert removed.id == "ovr-junk"
            assert await client.exists(ENTRY_PREFIX + "ovr-junk") == 0
            assert await client.zscore(IDS_KEY, "ovr-junk") is None
        finally:
            await client.aclose()


class _SwallowingPubSub:
    """A pub/sub whose read swallows a cancellation and returns None, as redis-py's
    does when the cancellation arrives as its read timeout expires (Python 3.11)."""

    async def subscribe(self, channel: str) -> None:
        return None

    async def get_message(self, **_: Any) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)

    async def aclose(self) -> None:
        return None


class _DownRedis:
    """A Redis client whose every script fails (down), with :class:`_SwallowingPubSub`."""

    def register_script(self, _: str) -> Callable[..., Awaitable[Any]]:
        async def script(**_: Any) -> Any:
            raise ConnectionError("down")

        return script

    def pubsub(self) -> _SwallowingPubSub:
        return _SwallowingPubSub()

    async def aclose(self) -> None:
        return None


async def test_the_fleet_loop_stops_when_cancelled_even_if_a_read_swallows_the_cancellation() -> (
    None
):
    client = _DownRedis()
    store = RedisOverrideStore(client, _no_push)
    fleet = Fleet(client, store, None, poll_s=0.05, timeout_s=0.05)
    task = asyncio.create_task(fleet.run())
    await asyncio.sleep(0.3)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5.0)
    assert done == {task}, "the fleet loop did not stop: shutdown would hang"


async def _no_push(document: dict[str, Any]) -> None:
    return None


async def test_other_replicas_log_nothing_for_a_grant_or_a_delete(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The admin API of the replica that made the change logs and audits it; the others
    # only follow (one line per fleet event, not one per replica).
    async with _replica(redis_server.url) as a, _replica(redis_server.url) as b:
        caplog.set_level(logging.DEBUG)
        await a.store.add(await _override(a.store, "ovr-quiet"))
        await _within(lambda: "ovr-quiet" in b.opa, 5.0)
        await a.store.remove("ovr-quiet")
        await _within(lambda: "ovr-quiet" not in b.opa, 5.0)
        lines = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert lines == [], [r.getMessage() for r in lines]
