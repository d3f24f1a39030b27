"""A fleet of authz replicas as one: overrides and decision-cache invalidation shared
through Redis (``AUTHZ_REDIS_URL``; without it, one process keeps its file-backed
:class:`~authz.runtime.overrides.OverrideStore` and its own cache, as before).

**Overrides** (:class:`RedisOverrideStore`) live in Redis, durable there and expiring by
Redis's own clock: each entry is a string key holding ``asdict(Override)`` as JSON,
written with ``PXAT`` (its ``expires_at`` in Unix ms, counted from Redis ``TIME``, never
from one replica's clock), indexed in a sorted set scored by that expiry. Every change
bumps a version key and is published on a channel (:data:`CHANNEL`). Each replica keeps
the last snapshot it read (a Lua script returns the index, entries and version
atomically) and pushes it to the OPA it talks to (:class:`~authz.runtime.overrides.
OpaOverrideWriter`), clearing its decision cache once OPA holds it.

**Decision-cache invalidation**: a bundle activation, an admin reload or an override
change on any replica bumps :data:`CACHE_VERSION_KEY` and publishes; every replica that
sees a new version empties its cache.

**Within one second**: a published message wakes a replica's :class:`Fleet` loop at once;
a missed message (a reconnect, a dropped subscription) is caught by the version check
every :data:`POLL_S` seconds. A message is only a hint: whatever it says, the replica
reads the version keys, so a forged message costs one read and changes nothing.

**Logged once per fleet event**: a grant and a delete are logged and audited by the
replica whose admin API made them (:mod:`authz.runtime.admin`); an expiry by the one
replica that claims it (``SET NX`` on :data:`EXPIRED_PREFIX` ``<id>``).

**Untrusted Redis**: whatever is in Redis is checked as the overrides file is
(:func:`~authz.runtime.overrides.parse_persisted_override`): an entry over
:data:`MAX_ENTRY_BYTES` (measured in Redis, never read), an id that is not one, a value
that is not such JSON, or a key of the wrong type is refused, logged and counted
(``authz_fleet_entries_refused_total``), never granted, never a crash; at most
:data:`~authz.runtime.overrides.MAX_ACTIVE_OVERRIDES` entries are read.

**Redis down** (the same ``AUTHZ_REDIS_FAILURE_MODE`` as the rate limiter): the last
known overrides stay enforced (each still expires at its time, by this replica's clock
corrected by the last Redis time it saw) and OPA keeps getting them; a grant or a delete
is refused with 503 ``overrides_unavailable`` (:class:`~authz.core.errors.
OverridesUnavailable`); failures are logged once per outage and counted
(``authz_fleet_sync_failures_total``; ``authz_fleet_sync_lag_seconds`` grows); with
``deny`` the replica is also not ready (``/readyz`` check ``overrides``), with
``fallback`` it stays ready. When Redis answers again the replica re-reads the overrides
and sends any cache invalidation it could not send meanwhile. A replica that has never
read the overrides (started while Redis was down) is not ready in either mode.

Redis data layout (one logical database; every key under :data:`PREFIX`, so several
keys per call: a Redis Cluster needs them in one hash slot, which this layout does not
arrange)::

    authz:fleet:overrides            ZSET   override id -> expires_at (Unix ms)
    authz:fleet:override:<id>        STRING asdict(Override) as JSON, PXAT expires_at
    authz:fleet:overrides:version    STRING integer, INCR at every grant and delete
    authz:fleet:cache:version        STRING integer, INCR at every invalidation
    authz:fleet:expired:<id>         STRING claim of one expiry's log line (SET NX)
    authz:fleet:events               pub/sub channel: "overrides <v>" | "cache <v>"
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, Final

import orjson

from authz.core.cache import DecisionCache
from authz.core.errors import AdminRequestError, OverridesUnavailable, PolicyError, TooManyOverrides
from authz.runtime.metrics import Metrics
from authz.runtime.overrides import (
    MAX_ACTIVE_OVERRIDES,
    Override,
    parse_persisted_override,
)
from authz.runtime.readiness import ReadinessCheck

__all__ = [
    "CACHE_VERSION_KEY",
    "CHANNEL",
    "ENTRY_PREFIX",
    "EXPIRED_PREFIX",
    "IDS_KEY",
    "MAX_ENTRY_BYTES",
    "OVERRIDES_VERSION_KEY",
    "POLL_S",
    "PREFIX",
    "Fleet",
    "RedisOverrideStore",
    "connect",
]

PREFIX: Final = "authz:fleet:"
IDS_KEY: Final = PREFIX + "overrides"
ENTRY_PREFIX: Final = PREFIX + "override:"
OVERRIDES_VERSION_KEY: Final = PREFIX + "overrides:version"
CACHE_VERSION_KEY: Final = PREFIX + "cache:version"
EXPIRED_PREFIX: Final = PREFIX + "expired:"
CHANNEL: Final = PREFIX + "events"
# An entry is an admin request body (at most 16 KiB) plus the fields authz adds; twice
# that is refused unread, as the overrides file's per-entry share (MAX_FILE_BYTES).
MAX_ENTRY_BYTES: Final = 32 * 1024
# A version is an INCR counter: anything longer is not one (compared as bytes, never parsed).
MAX_VERSION_BYTES: Final = 32
# The version check between messages: a missed message costs at most this much delay.
POLL_S: Final = 0.5
# OPA keeps pushed data in memory only: the overrides are re-pushed this often even
# unchanged, so a restarted OPA gets them back (as the file store's sync interval).
REPUSH_S: Final = 5.0
# Each Redis call of the fleet (not on the Check path: admin calls and the loop).
TIMEOUT_S: Final = 1.0
# How long an expiry's claim is kept (then the key is gone; the override long expired).
_CLAIM_MS: Final = 24 * 3600 * 1000
_MAX_ID: Final = 128

log = logging.getLogger(__name__)

# KEYS[1] index, KEYS[2] entry, KEYS[3] version; ARGV[1] id, ARGV[2] JSON, ARGV[3]
# expires_at (Unix ms), ARGV[4] cap, ARGV[5] channel. The cap check runs first and the
# writes after the INCR (a script's writes are not rolled back on an error: a hostile
# key of the wrong type fails the script before anything is written).
# Returns the new version, or -1 at the cap.
_ADD_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1])
    and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return -1
end
local v = redis.call('INCR', KEYS[3])
redis.call('SET', KEYS[2], ARGV[2], 'PXAT', ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('PUBLISH', ARGV[5], 'overrides ' .. v)
return v
"""

# KEYS[1] index, KEYS[2] entry, KEYS[3] version; ARGV[1] id, ARGV[2] channel, ARGV[3]
# max entry bytes. Returns {the new version, the entry deleted (or a refusal code as in
# _LOAD_LUA)}, or {0} when no entry had that id.
_DELETE_LUA: Final = """
local kind = redis.call('TYPE', KEYS[2])['ok']
redis.call('ZREM', KEYS[1], ARGV[1])
if kind == 'none' then return {0} end
local value = 2
if kind == 'string' then
  value = 1
  if redis.call('STRLEN', KEYS[2]) <= tonumber(ARGV[3]) then
    value = redis.call('GET', KEYS[2])
  end
end
local v = redis.call('INCR', KEYS[3])
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[2], 'overrides ' .. v)
return {v, value}
"""

# A string key's value, or a marker when it is not a short string (never read then).
_GET_CAPPED_LUA: Final = """
local function capped(key, cap)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'none' then return 'none' end
  if kind ~= 'string' then return 'type:' .. kind end
  if redis.call('STRLEN', key) > cap then return 'oversize' end
  return redis.call('GET', key)
end
"""

# KEYS[1] overrides version, KEYS[2] cache version; ARGV[1] cap.
# Returns {TIME seconds, TIME microseconds, overrides version, cache version}.
_VERSIONS_LUA: Final = (
    _GET_CAPPED_LUA
    + """
local t = redis.call('TIME')
local cap = tonumber(ARGV[1])
return {t[1], t[2], capped(KEYS[1], cap), capped(KEYS[2], cap)}
"""
)

# KEYS[1] index, KEYS[2] overrides version; ARGV[1] entry prefix, ARGV[2] max entries,
# ARGV[3] max entry bytes, ARGV[4] max version bytes, ARGV[5] max id length.
# Returns {TIME s, TIME us, version, {id, value | refusal code}...}: code 1 = over the
# size cap, 2 = not a string key, 3 = the id is too long (cut to 64 characters).
_LOAD_LUA: Final = (
    _GET_CAPPED_LUA
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local version = capped(KEYS[2], tonumber(ARGV[4]))
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'LIMIT', 0,
                       tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  if #id > tonumber(ARGV[5]) then
    out[#out + 1] = {string.sub(id, 1, 64), 3}
  else
    local key = ARGV[1] .. id
    local kind = redis.call('TYPE', key)['ok']
    if kind == 'string' then
      if redis.call('STRLEN', key) > tonumber(ARGV[3]) then
        out[#out + 1] = {id, 1}
      else
        out[#out + 1] = {id, redis.call('GET', key)}
      end
    elseif kind ~= 'none' then
      out[#out + 1] = {id, 2}
    end
  end
end
return {t[1], t[2], version, out}
"""
)

_REFUSALS: Final = {1: "over the size cap", 2: "not a string key", 3: "id too long"}


def connect(url: str, timeout_s: float = TIMEOUT_S) -> Any:
    """A ``redis.asyncio.Redis`` for the fleet (``url``: ``AUTHZ_REDIS_URL``; answers
    bytes): every socket operation bounded by ``timeout_s`` seconds, one immediate retry
    on a connection error (after a Redis restart the pooled connections are dead, and
    the first use of each must reconnect, not fail), no retries with backoff (the loop
    retries on its own schedule). Its own pool, not the limiter's: a burst of Checks
    must not starve the sync."""
    import redis.asyncio  # only needed with Redis
    import redis.exceptions
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return redis.asyncio.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[redis.exceptions.ConnectionError],
    )


def _raise_if_cancelling() -> None:
    """Raise CancelledError when this task was asked to stop. On Python 3.11 a
    cancellation arriving as a timeout expires can be turned into that TimeoutError, and
    redis-py's pub/sub read returns None on a timeout: without this check the loop would
    never see its cancellation and shutdown would wait forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _text(value: Any, limit: int = 64) -> str:
    """A value read from Redis, shortened and printable, for a log line."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return repr(str(value)[:limit])


class RedisOverrideStore:
    """The overrides of a fleet, in Redis (``redis_client``: a ``redis.asyncio.Redis``
    answering bytes). ``push(document)`` sends ``data.overrides`` to this replica's OPA
    (an :class:`~authz.runtime.overrides.OpaOverrideWriter`; raises PolicyError).
    ``clock`` is Unix seconds; ``on_change(count)`` reports the active count,
    ``on_pushed()`` runs once OPA holds a changed list (clear the decision cache then),
    ``on_expired(override)`` once per fleet for each expiry (audit it),
    ``on_refused()`` for each entry refused. Implements
    :class:`~authz.runtime.overrides.OverrideBackend`.

    State for readiness: ``loaded`` (a snapshot was read at least once), ``in_opa``
    (the last push to OPA succeeded), ``version`` (of the snapshot; None after a local
    change, so the next step re-reads)."""

    def __init__(
        self,
        redis_client: Any,
        push: Callable[[dict[str, Any]], Awaitable[None]],
        *,
        timeout_s: float = TIMEOUT_S,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[int], None] | None = None,
        on_pushed: Callable[[], None] | None = None,
        on_expired: Callable[[Override], None] | None = None,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self._redis = redis_client
        self._push = push
        self._timeout_s = timeout_s
        self._clock = clock
        self._on_change = on_change
        self._on_pushed = on_pushed
        self._on_expired = on_expired
        self._on_refused = on_refused
        self._add = redis_client.register_script(_ADD_LUA)
        self._delete = redis_client.register_script(_DELETE_LUA)
        self._load = redis_client.register_script(_LOAD_LUA)
        self._items: dict[str, Override] = {}
        self._offset_s = 0.0  # Redis time minus this clock, as last seen
        self._pushed: dict[str, Any] | None = None
        self._pushed_at = -REPUSH_S
        self._lock = asyncio.Lock()
        self.version: bytes | None = None
        self.loaded = False
        self.in_opa = False  # the last push to OPA succeeded

    # -- time -------------------------------------------------------------------------
    def observe_time(self, seconds: bytes | int, micros: bytes | int) -> None:
        """Note Redis's ``TIME`` (as it answered): this replica's expiry checks then run
        on Redis's clock (offset by the time the reply took, well under a second)."""
        self._offset_s = int(seconds) + int(micros) / 1e6 - self._clock()

    def _now(self) -> float:
        return self._clock() + self._offset_s

    async def now(self) -> float:
        """Redis's clock (Unix seconds): a new override's TTL counts from it, so every
        replica agrees when it ends. Raises OverridesUnavailable when Redis does not
        answer."""
        seconds, micros = await self._call("read the time", self._redis.time())
        self.observe_time(seconds, micros)
        return float(int(seconds) + int(micros) / 1e6)

    # -- reads ------------------------------------------------------------------------
    def active(self) -> list[Override]:
        """Unexpired overrides of the last snapshot, oldest first."""
        now = self._now()
        return sorted(
            (o for o in self._items.values() if o.expires_at > now), key=lambda o: o.created_at
        )

    def document(self) -> dict[str, Any]:
        """The ``data.overrides`` document for OPA (active entries only)."""
        return {o.id: o.opa_document() for o in self.active()}

    # -- changes ----------------------------------------------------------------------
    async def add(self, override: Override) -> bool:
        """Store ``override`` in Redis (expiring at its ``expires_at``, which
        :meth:`now` counted), tell the fleet, push the list to this replica's OPA.
        Returns whether OPA was updated. Raises TooManyOverrides at the cap,
        OverridesUnavailable when Redis does not answer."""
        value = orjson.dumps(asdict(override))
        if len(value) > MAX_ENTRY_BYTES:
            raise AdminRequestError(f"override: larger than {MAX_ENTRY_BYTES} bytes stored")
        expires_ms = int(override.expires_at * 1000)
        keys = [IDS_KEY, ENTRY_PREFIX + override.id, OVERRIDES_VERSION_KEY]
        args = [override.id, value, expires_ms, MAX_ACTIVE_OVERRIDES, CHANNEL]
        version = await self._call("grant an override", self._add(keys=keys, args=args))
        if int(version) < 0:
            raise TooManyOverrides(
                f"{MAX_ACTIVE_OVERRIDES} active overrides already: delete one or wait for "
                "one to expire"
            )
        async with self._lock:
            self._items[override.id] = override
            self.version = None  # the snapshot is ours now, not a version's: re-read it
            self._changed()
            return await self._push_document(force=True)

    async def remove(self, override_id: str) -> tuple[Override | None, bool]:
        """Delete an override from Redis, tell the fleet, push the list to this
        replica's OPA. Returns the override deleted (None when Redis had no entry by
        that id; a malformed entry is deleted all the same and returned as a stand-in
        naming only its id) and whether OPA was updated. Raises OverridesUnavailable
        when Redis does not answer."""
        keys = [IDS_KEY, ENTRY_PREFIX + override_id, OVERRIDES_VERSION_KEY]
        args = [override_id, CHANNEL, MAX_ENTRY_BYTES]
        reply = await self._call("delete an override", self._delete(keys=keys, args=args))
        async with self._lock:
            known = self._items.pop(override_id, None)
            self.version = None
            if int(reply[0]) == 0:
                return None, True
            removed = known or self._deleted(override_id, reply[1])
            self._changed()
            return removed, await self._push_document(force=True)

    def _deleted(self, override_id: str, value: Any) -> Override:
        """The entry a delete removed, as Redis held it; a malformed one (logged) as a
        stand-in that names its id and grants nothing."""
        try:
            if isinstance(value, int):
                raise ValueError(_REFUSALS.get(value, "refused"))
            return parse_persisted_override(orjson.loads(value))
        except Exception as exc:  # JSON, TypeError, ValueError, ConfigError (the path)
            self._refused(override_id, exc)
        return Override(
            id=override_id,
            effect="deny",
            decision_path="",
            match={},
            reason="malformed entry in Redis, deleted",
            actor="",
            created_at=0.0,
            expires_at=0.0,
        )

    # -- sync -------------------------------------------------------------------------
    async def refresh(self) -> bool:
        """Read the whole list from Redis (one atomic script), replace the snapshot, log
        and audit the expiries this replica claims, push to OPA. Returns whether OPA
        was updated. Raises OverridesUnavailable when Redis does not answer (the last
        snapshot stays)."""
        async with self._lock:
            reply = await self._call(
                "read the overrides",
                self._load(
                    keys=[IDS_KEY, OVERRIDES_VERSION_KEY],
                    args=[
                        ENTRY_PREFIX,
                        MAX_ACTIVE_OVERRIDES,
                        MAX_ENTRY_BYTES,
                        MAX_VERSION_BYTES,
                        _MAX_ID,
                    ],
                ),
            )
            seconds, micros, version, entries = reply
            self.observe_time(seconds, micros)
            items = self._parse(entries)
            gone = [o for i, o in self._items.items() if i not in items]
            self._items = items
            self.version = version
            first = not self.loaded
            self.loaded = True
            await self._expired(o for o in gone if o.expires_at <= self._now())
            if gone or first or self._pushed != self.document():
                self._changed()
            return await self._push_document(force=False)

    def _parse(self, entries: Any) -> dict[str, Override]:
        items: dict[str, Override] = {}
        for raw_id, value in entries:
            override_id = bytes(raw_id).decode("utf-8", "replace")
            try:
                if isinstance(value, int):
                    raise ValueError(_REFUSALS.get(value, "refused"))
                override = parse_persisted_override(orjson.loads(value))
                if override.id != override_id:
                    raise ValueError(f"id={override.id[:64]!r} is not the indexed id")
            except Exception as exc:  # JSON, TypeError, ValueError, ConfigError (the path)
                self._refused(override_id, exc)
                continue
            items[override.id] = override
        return items

    def _refused(self, override_id: str, exc: BaseException) -> None:
        log.error(
            "override entry in Redis refused",
            extra={"override_id": _text(override_id), "error": str(exc)[:200]},
        )
        if self._on_refused is not None:
            self._on_refused()

    async def sync(self) -> bool:
        """Between reads: drop the overrides expired by now (Redis's clock as last
        seen), claim and log their expiry, and push to OPA when the list changed or
        :data:`REPUSH_S` passed. Never raises; returns whether OPA holds the list."""
        try:
            async with self._lock:
                now = self._now()
                expired = [o for o in self._items.values() if o.expires_at <= now]
                for override in expired:
                    del self._items[override.id]
                if expired:
                    self._changed()
                    await self._expired(expired)
                return await self._push_document(force=False)
        except Exception:  # a bug: retried at the next sync, never ends the loop
            log.exception("cannot sync overrides")
            return False

    async def _expired(self, overrides: Any) -> None:
        """Log (and report through ``on_expired``) each expiry this replica claims first
        in Redis; while Redis is down each replica logs its own (then more than once)."""
        for override in overrides:
            claim = EXPIRED_PREFIX + override.id
            try:
                async with asyncio.timeout(self._timeout_s):
                    claimed = await self._redis.set(
                        claim, b"1", nx=True, pxat=int(override.expires_at * 1000) + _CLAIM_MS
                    )
            except Exception as exc:  # redis.RedisError, OSError, TimeoutError
                log.warning(
                    "cannot claim an override's expiry in Redis; logging it here",
                    extra={"override_id": override.id, "error": type(exc).__name__},
                )
                claimed = True
            if not claimed:
                continue
            log.info("override expired", extra={"override_id": override.id})
            if self._on_expired is not None:
                self._on_expired(override)

    async def _push_document(self, *, force: bool) -> bool:
        document = self.document()
        changed = document != self._pushed
        if not (force or changed or time.monotonic() - self._pushed_at >= REPUSH_S):
            return True
        try:
            await self._push(document)
        except PolicyError as exc:
            log.warning("cannot push overrides to OPA", extra={"code": exc.code})
            self.in_opa = False
            self._pushed_at = -REPUSH_S  # retried at the next step, not in REPUSH_S
            return False
        self.in_opa = True
        self._pushed_at = time.monotonic()
        if changed:
            self._pushed = document
            if self._on_pushed is not None:
                self._on_pushed()
        return True

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(len(self.active()))

    async def _call(self, what: str, call: Awaitable[Any]) -> Any:
        """Await one Redis call within the timeout; any failure is OverridesUnavailable."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return await call
        except Exception as exc:  # redis.RedisError, OSError, TimeoutError, ...
            raise OverridesUnavailable(
                f"cannot {what}: the shared override store (Redis) did not answer "
                f"({type(exc).__name__})"
            ) from exc


class Fleet:
    """This replica's part in the fleet: the :class:`RedisOverrideStore`, the decision
    cache (None: caching off) and the loop that keeps both in step with Redis
    (:meth:`run`). ``redis_client`` is a ``redis.asyncio.Redis`` answering bytes, its
    own (closed by :meth:`close`). ``failure_mode`` is ``AUTHZ_REDIS_FAILURE_MODE``
    (readiness while Redis is down, see the module docstring)."""

    def __init__(
        self,
        redis_client: Any,
        overrides: RedisOverrideStore,
        cache: DecisionCache | None,
        *,
        failure_mode: str = "fallback",
        metrics: Metrics | None = None,
        poll_s: float = POLL_S,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self._redis = redis_client
        self.overrides = overrides
        self._cache = cache
        self._failure_mode = failure_mode
        self._metrics = metrics
        self._poll_s = poll_s
        self._timeout_s = timeout_s
        self._versions = redis_client.register_script(_VERSIONS_LUA)
        self._wake = asyncio.Event()
        self._cache_version: bytes | None = None
        self._pending: str | None = None  # an invalidation not sent yet
        self.available = True
        self.failures = 0
        self.last_read: float | None = None
        if metrics is not None:
            metrics.fleet_redis_available.set(1)

    # -- the cache --------------------------------------------------------------------
    def invalidate(self, why: str) -> None:
        """Empty every other replica's decision cache (this one's caller has emptied its
        own): sent by the loop at once, or when Redis answers again."""
        self._pending = why
        self._wake.set()

    async def _send_invalidation(self) -> None:
        why = self._pending
        if why is None:
            return
        version = int(await self._redis.incr(CACHE_VERSION_KEY))
        await self._redis.publish(CHANNEL, f"cache {version}")
        # Ours: no need to clear again when the loop reads it back, unless another
        # replica's came in between (then the version skipped one).
        if self._cache_version not in (None, str(version - 1).encode()):
            self._clear_cache()
        self._cache_version = str(version).encode()
        self._pending = None
        log.info("decision caches of the fleet invalidated", extra={"why": why})
        if self._metrics is not None:
            self._metrics.fleet_cache_invalidations.labels("sent").inc()

    def _cache_version_seen(self, version: bytes) -> None:
        previous, self._cache_version = self._cache_version, version
        if previous is None or previous == version:
            return
        self._clear_cache()

    def _clear_cache(self) -> None:
        if self._cache is not None:
            self._cache.clear("fleet invalidation")
        if self._metrics is not None:
            self._metrics.fleet_cache_invalidations.labels("received").inc()

    # -- the loop ---------------------------------------------------------------------
    async def start(self) -> None:
        """One step before authz serves: read the overrides and push them to OPA, so a
        new replica enforces every active override from its first request. Never
        raises (a failure is logged; the loop retries, readiness waits)."""
        await self.step()

    async def step(self) -> None:
        """Check the versions; read the overrides when theirs changed, clear the cache
        when its changed, send a pending invalidation; otherwise expire and re-push
        locally. A Redis failure keeps the last known state (logged once per outage)."""
        try:
            async with asyncio.timeout(self._timeout_s):
                seconds, micros, overrides_version, cache_version = await self._versions(
                    keys=[OVERRIDES_VERSION_KEY, CACHE_VERSION_KEY], args=[MAX_VERSION_BYTES]
                )
            self.overrides.observe_time(seconds, micros)
            store = self.overrides
            # After an outage, always re-read: Redis may have restarted with other data
            # under the same version.
            if overrides_version != store.version or not store.loaded or not self.available:
                await store.refresh()
            else:
                await store.sync()
            self._cache_version_seen(cache_version)
            async with asyncio.timeout(self._timeout_s):
                await self._send_invalidation()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # redis.RedisError, OSError, TimeoutError, Overrides...
            self._failed(exc)
            await self.overrides.sync()  # last known overrides: expire, keep OPA fed
            return
        self._recovered()

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self._metrics is not None:
            self._metrics.fleet_sync_failures.inc()
            self._metrics.fleet_redis_available.set(0)
        if self.available:
            self.available = False
            log.error(
                "fleet redis unreachable; enforcing the last known overrides, refusing changes",
                extra={
                    "error": type(exc).__name__,
                    "detail": str(exc)[:200],
                    "mode": self._failure_mode,
                    "overrides": len(self.overrides.active()),
                },
            )

    def _recovered(self) -> None:
        self.last_read = time.monotonic()
        if self._metrics is not None:
            self._metrics.fleet_redis_available.set(1)
        if not self.available:
            self.available = True
            log.warning("fleet redis recovered", extra={"failures": self.failures})

    async def run(self) -> None:
        """Until cancelled: listen on :data:`CHANNEL` (any message wakes the loop) and
        :meth:`step` at each wake-up or every ``poll_s`` seconds."""
        listener = asyncio.create_task(self._listen(), name="fleet-listener")
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_s):
                        await self._wake.wait()
                _raise_if_cancelling()
                self._wake.clear()
                await self.step()
                _raise_if_cancelling()
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    async def _listen(self) -> None:
        """Subscribe and wake the loop on every message (its content is not trusted: the
        loop reads the versions). Resubscribes after a failure, waking the loop then too
        (messages may have been missed)."""
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                self._wake.set()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    _raise_if_cancelling()
                    if message is not None:
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:  # reported by the loop's own failing calls
                _raise_if_cancelling()
                await asyncio.sleep(self._poll_s)
            finally:
                # Bounded: a close on a dead connection must not hold up shutdown.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self._timeout_s):
                        await pubsub.aclose()

    # -- readiness and metrics --------------------------------------------------------
    def readiness(self) -> ReadinessCheck:
        """``/readyz`` check ``overrides``: not ready until the overrides were read once
        and OPA holds them; while Redis is down, ready with ``fallback`` and not with
        ``deny``."""

        async def check() -> tuple[bool, str]:
            count = len(self.overrides.active())
            if not self.overrides.loaded:
                return False, "overrides not read from redis yet"
            if not self.overrides.in_opa:
                return False, f"{count} overrides not pushed to OPA yet"
            if self.available:
                return True, f"redis, {count} active"
            return (
                self._failure_mode != "deny",
                f"redis unreachable ({self._failure_mode}); enforcing {count} last known",
            )

        return check

    def before_scrape(self) -> None:
        """Refresh ``authz_fleet_sync_lag_seconds``."""
        if self._metrics is None:
            return
        if self.last_read is not None:
            self._metrics.fleet_sync_lag.set(time.monotonic() - self.last_read)

    async def close(self) -> None:
        """Close the Redis connections (within ``timeout_s``; never raises)."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._redis.aclose()
        except Exception as exc:  # TimeoutError, OSError: nothing left to do at shutdown
            log.warning("cannot close the fleet's Redis connections", extra={"error": repr(exc)})
