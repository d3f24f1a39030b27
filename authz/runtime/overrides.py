"""TTL overrides: temporary, audited exceptions granted through the admin API.

An operator grants an exception with a reason and a time to live, e.g. "let key
``key-oncall`` read ``/api/v1/admin/**`` for one hour: INC-123", or blocks a compromised
key or sandbox at once. Overrides never bypass authentication: they apply only to a
request whose key or sandbox is valid, and the policy still decides. authz keeps the list
(persisted to a JSON file) and pushes it to OPA as ``data.overrides`` (outside the
bundle roots, so bundle activations keep it); the gateway and egress policies consult it
and name the override in their decision (``override.id``), which the decision log and
audit trail record. Expiry is enforced twice: by the policies (``expires_at_ns``) and by
authz, which drops expired entries and re-pushes the list whenever it changes and every
few seconds (an OPA restart loses pushed data).

This module's :class:`OverrideStore` is one process's list (a file). With
``AUTHZ_REDIS_URL`` a fleet of replicas shares one list in Redis instead
(:class:`authz.runtime.fleet.RedisOverrideStore`); both serve the admin API through
:class:`OverrideBackend` and push with :class:`OpaOverrideWriter`.

Each entry is written on its own (``PUT`` / ``DELETE /v1/data/overrides/<id>``, see
:class:`OpaOverrideWriter`), so several authz replicas sharing one OPA never overwrite
each other's entries. Entry shape::

    {"<id>": {"id": "<id>", "effect": "allow" | "deny", "decision_path": "authz/gateway/decision",
              "match": {"key_id": "...", "path": "/api/v1/admin/**", "methods": ["GET"]},
              "reason": "...", "actor": "...", "created_at": <unix s>,
              "expires_at": "<RFC 3339>", "expires_at_ns": <unix ns>}}
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import orjson

from authz.core.errors import AdminRequestError, ConfigError, PolicyError, TooManyOverrides
from authz.core.opa import parse_decision_path
from authz.runtime.files import read_capped, write_private

__all__ = [
    "MAX_ACTIVE_OVERRIDES",
    "MAX_FILE_BYTES",
    "MAX_TTL_S",
    "OPA_DATA_PATH",
    "OpaOverrideWriter",
    "Override",
    "OverrideBackend",
    "OverrideStore",
    "parse_override_request",
    "parse_persisted_override",
]

OPA_DATA_PATH: Final = "overrides"
MAX_TTL_S: Final = 7 * 86400
# Overrides are a few temporary exceptions; the cap bounds memory, the file and the OPA
# writes of every sync (one PUT per entry). A request body is at most 16 KiB, so at most
# about 16 MiB in all.
MAX_ACTIVE_OVERRIDES: Final = 1000
# The persisted file's cap: twice the entries' bound (room for entries expired but not yet
# dropped, and the timestamps and ids added to each); a longer file is refused unread.
MAX_FILE_BYTES: Final = 2 * MAX_ACTIVE_OVERRIDES * 16 * 1024
_MATCH_KEYS: Final = frozenset({"key_id", "sandbox_id", "service", "path", "methods"})
_ID_FIELD: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_METHOD: Final = re.compile(r"[A-Z]{1,16}")

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Override:
    """One override. Times are Unix seconds. ``match`` holds ``key_id`` or
    ``sandbox_id`` (required: an override is always about one identity) and optionally
    ``service``, ``path`` (a glob like the policies' path rules) and ``methods``."""

    id: str
    effect: str
    decision_path: str
    match: Mapping[str, Any]
    reason: str
    actor: str
    created_at: float
    expires_at: float
    extra: Mapping[str, Any] = field(default_factory=dict)

    def opa_document(self) -> dict[str, Any]:
        """The entry as the policies read it from ``data.overrides[id]``."""
        return {
            "id": self.id,
            "effect": self.effect,
            "decision_path": self.decision_path,
            "match": dict(self.match),
            "reason": self.reason,
            "actor": self.actor,
            "created_at": self.created_at,
            "expires_at": datetime.fromtimestamp(self.expires_at, UTC).isoformat(),
            "expires_at_ns": int(self.expires_at * 1e9),
        }


def parse_override_request(
    body: Any, *, actor: str, now: float, new_id: Callable[[], str] | None = None
) -> Override:
    """Validate an admin API request body into an Override. Raises AdminRequestError naming
    the field and the bad value. Body: ``{"effect", "decision_path", "match", "ttl_seconds",
    "reason"}``. An ``allow`` override naming a ``sandbox_id`` must name its ``service``
    (the egress policy ignores one that does not); a ``deny`` may block every service."""
    if not isinstance(body, dict):
        raise AdminRequestError("override: expected a JSON object")
    effect = body.get("effect")
    if effect not in ("allow", "deny"):
        raise AdminRequestError(f"override.effect={effect!r}: expected 'allow' or 'deny'")
    try:  # the settings' parser, so ConfigError
        decision_path = parse_decision_path(
            "override.decision_path", str(body.get("decision_path", ""))
        )
    except ConfigError as exc:
        raise AdminRequestError(str(exc)) from None
    match = body.get("match")
    if not isinstance(match, dict) or not match:
        raise AdminRequestError("override.match: expected an object with key_id or sandbox_id")
    unknown = set(match) - _MATCH_KEYS
    if unknown:
        raise AdminRequestError(f"override.match: unknown field(s) {sorted(unknown)}")
    if ("key_id" in match) == ("sandbox_id" in match):
        raise AdminRequestError("override.match: exactly one of key_id or sandbox_id is required")
    for name in ("key_id", "sandbox_id", "service"):
        if name in match and not (
            isinstance(match[name], str) and _ID_FIELD.fullmatch(match[name])
        ):
            raise AdminRequestError(f"override.match.{name}={match[name]!r}: not an id")
    if effect == "allow" and "sandbox_id" in match and "service" not in match:
        # Without one the sandbox could reach every configured service (least privilege).
        raise AdminRequestError(
            "override.match.service: an allow override for a sandbox must name the service"
        )
    if "path" in match and not (
        isinstance(match["path"], str)
        and match["path"].startswith("/")
        and len(match["path"]) <= 256
    ):
        raise AdminRequestError(f"override.match.path={match.get('path')!r}: expected a /path glob")
    if "methods" in match and not (
        isinstance(match["methods"], list)
        and match["methods"]
        and all(isinstance(m, str) and _METHOD.fullmatch(m) for m in match["methods"])
    ):
        raise AdminRequestError(
            f"override.match.methods={match.get('methods')!r}: expected [GET, ...]"
        )
    ttl = body.get("ttl_seconds")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 1 <= ttl <= MAX_TTL_S:
        raise AdminRequestError(f"override.ttl_seconds={ttl!r}: expected 1..{MAX_TTL_S} seconds")
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
        raise AdminRequestError(
            "override.reason: a non-empty reason (at most 500 characters) is required"
        )
    override_id = (new_id or (lambda: "ovr-" + secrets.token_hex(6)))()
    return Override(
        id=override_id,
        effect=effect,
        decision_path=decision_path,
        match=dict(match),
        reason=reason.strip(),
        actor=actor,
        created_at=now,
        expires_at=now + float(ttl),
    )


_FIELDS: Final = frozenset(f.name for f in fields(Override))
# datetime's range ends in year 9999: a later expiry could not be rendered for OPA.
_MAX_TIME: Final = 253_402_300_799.0


def parse_persisted_override(item: Any) -> Override:
    """An entry of the overrides file as :meth:`OverrideStore._changed` wrote it
    (``asdict(Override)``; also an entry read from Redis, :mod:`authz.runtime.fleet`),
    checked so that nothing read from disk or Redis can fail later.
    Raises TypeError or ValueError naming the field (never quoting more than 64
    characters of a value)."""
    if not isinstance(item, dict):
        raise TypeError("expected an object")
    if set(item) - _FIELDS or _FIELDS - {"extra"} - set(item):
        raise ValueError(f"expected the fields {sorted(_FIELDS)}, got {sorted(item)[:16]}")
    for name in ("id", "effect", "decision_path", "reason", "actor"):
        if not isinstance(item[name], str):
            raise TypeError(f"{name}: expected a string")
    if not _ID_FIELD.fullmatch(item["id"]):
        raise ValueError(f"id={item['id'][:64]!r}: not an id")
    if item["effect"] not in ("allow", "deny"):
        raise ValueError(f"effect={item['effect'][:64]!r}: expected 'allow' or 'deny'")
    parse_decision_path("decision_path", item["decision_path"][:256])
    for name in ("created_at", "expires_at"):
        value = item[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name}: expected a number of Unix seconds")
        if not 0 <= value <= _MAX_TIME:
            raise ValueError(f"{name}={value!r}: out of range")
    match = item["match"]
    if not isinstance(match, dict) or not ({"key_id", "sandbox_id"} & set(match)):
        raise ValueError("match: expected an object with key_id or sandbox_id")
    if set(match) - _MATCH_KEYS:
        raise ValueError(f"match: unknown field(s) {sorted(set(match) - _MATCH_KEYS)[:8]}")
    for name in ("key_id", "sandbox_id", "service", "path"):
        if name in match and not isinstance(match[name], str):
            raise TypeError(f"match.{name}: expected a string")
    methods = match.get("methods", [])
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise TypeError("match.methods: expected a list of strings")
    if not isinstance(item.get("extra", {}), dict):
        raise TypeError("extra: expected an object")
    return Override(**item)


class OverrideBackend(Protocol):
    """What the admin API needs of an override store: :class:`OverrideStore` (one
    process, a file) or :class:`authz.runtime.fleet.RedisOverrideStore` (a fleet)."""

    def active(self) -> list[Override]:
        """Unexpired overrides, oldest first."""
        ...

    async def now(self) -> float:
        """The time a new override's TTL counts from (Unix seconds); raises
        :class:`~authz.core.errors.OverridesUnavailable` when the store cannot say."""
        ...

    async def add(self, override: Override) -> bool:
        """Keep ``override``; returns whether OPA was updated. Raises TooManyOverrides,
        OverridesUnavailable."""
        ...

    async def remove(self, override_id: str) -> tuple[Override | None, bool]:
        """Drop an override; returns it (None if unknown) and whether OPA was updated.
        Raises OverridesUnavailable."""
        ...


class OverrideStore:
    """The active overrides; persisted to ``path`` (JSON, mode 0600, replaced atomically
    and fsynced at every change: :func:`~authz.runtime.files.write_private`) when given, pushed to
    OPA by ``push(document)`` (an async callable raising PolicyError on failure).
    ``clock`` is Unix seconds. ``on_change(count)`` reports the active count at every
    local change (metrics); ``on_pushed()`` runs once OPA holds a changed list (clear the
    decision cache then: not before, or decisions taken meanwhile would be kept)."""

    def __init__(
        self,
        push: Callable[[dict[str, Any]], Awaitable[None]],
        *,
        path: Path | None = None,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[int], None] | None = None,
        on_pushed: Callable[[], None] | None = None,
    ) -> None:
        self._push = push
        self._on_pushed = on_pushed
        self._path = path
        self._clock = clock
        self._on_change = on_change
        self._items: dict[str, Override] = {}
        self._pushed: dict[str, Any] | None = None
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        """Read the persisted list. Raises ConfigError (one line, naming the file) when it
        cannot be read, is not UTF-8 JSON (parsed by orjson: linear, nesting capped) or
        holds an entry that is not a well-formed override."""
        where = f"overrides file {str(path)!r}"
        data = read_capped(path, MAX_FILE_BYTES, where)
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid UTF-8 JSON ({exc})") from None
        items = raw.get("overrides", []) if isinstance(raw, dict) else None
        if not isinstance(items, list):
            raise ConfigError(f'{where}: expected {{"overrides": [...]}}')
        for index, item in enumerate(items):
            try:
                override = parse_persisted_override(item)
            except (ConfigError, TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: entry {index}: {exc}") from None
            self._items[override.id] = override

    def active(self) -> list[Override]:
        """Unexpired overrides, oldest first."""
        now = self._clock()
        return sorted(
            (o for o in self._items.values() if o.expires_at > now), key=lambda o: o.created_at
        )

    def document(self) -> dict[str, Any]:
        """The ``data.overrides`` document for OPA (active entries only)."""
        return {o.id: o.opa_document() for o in self.active()}

    async def now(self) -> float:
        """This process's clock (Unix seconds): one process is its own time source."""
        return self._clock()

    async def add(self, override: Override) -> bool:
        """Keep ``override``, persist it and push the list to OPA. Returns whether OPA was
        updated; if not, the periodic :meth:`sync` pushes it when OPA answers again.
        Raises TooManyOverrides when :data:`MAX_ACTIVE_OVERRIDES` are active already (and
        ``override`` replaces none of them)."""
        active = self.active()
        if len(active) >= MAX_ACTIVE_OVERRIDES and override.id not in {o.id for o in active}:
            raise TooManyOverrides(
                f"{MAX_ACTIVE_OVERRIDES} active overrides already: delete one or wait for "
                "one to expire"
            )
        self._items[override.id] = override
        self._changed()
        return await self.sync()

    async def remove(self, override_id: str) -> tuple[Override | None, bool]:
        """Drop an override; returns it (None if unknown) and whether OPA was updated."""
        removed = self._items.pop(override_id, None)
        if removed is None:
            return None, True
        self._changed()
        return removed, await self.sync()

    async def sync(self) -> bool:
        """Drop expired entries and push the document to OPA. Returns whether the push
        succeeded; never raises (a failure is logged and retried at the next call)."""
        try:
            await self._sync()
        except PolicyError as exc:
            log.warning("cannot push overrides to OPA", extra={"code": exc.code})
            return False
        except Exception:  # any bug: retried at the next sync, never ends the loop
            log.exception("cannot push overrides to OPA")
            return False
        return True

    async def _sync(self) -> None:
        now = self._clock()
        expired = [i for i, o in self._items.items() if o.expires_at <= now]
        for override_id in expired:
            log.info("override expired", extra={"override_id": override_id})
            del self._items[override_id]
        if expired:
            self._changed()
        # Pushed on every sync: OPA keeps pushed data in memory only, so a restarted OPA
        # gets the overrides back within one interval.
        document = self.document()
        await self._push(document)
        if document != self._pushed:
            # OPA now holds a new list: decisions taken against the old one (cached while
            # the push was in flight, or after a failed push) are stale.
            self._pushed = document
            if self._on_pushed is not None:
                self._on_pushed()

    async def watch(self, interval_s: float) -> None:
        """Call :meth:`sync` every ``interval_s`` seconds until cancelled; a failed sync
        (whatever the error) is retried at the next one, so a restarted OPA always gets
        the overrides back."""
        while True:
            await self.sync()
            await asyncio.sleep(interval_s)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(len(self.active()))
        if self._path is None:
            return
        data = {"overrides": [asdict(o) for o in self._items.values()]}
        try:
            # Atomic and durable: a crash leaves the old list or the new one, never a torn
            # file that would stop authz from starting.
            write_private(self._path, json.dumps(data, indent=2).encode("utf-8"))
        except OSError as exc:
            log.error(
                "cannot persist overrides",
                extra={"overrides_file": str(self._path), "error": str(exc)},
            )


class OpaDataClient(Protocol):
    """The two OPA data API calls the writer needs (:class:`~authz.core.opa.OpaClient`)."""

    async def put_data(self, path: str, value: Any, timeout_s: float) -> None:
        """PUT a document; raises PolicyError."""
        ...

    async def delete_data(self, path: str, timeout_s: float) -> None:
        """DELETE a document (absent is fine); raises PolicyError."""
        ...


class OpaOverrideWriter:
    """The ``push`` of an :class:`OverrideStore` writing to OPA entry by entry: it PUTs
    every entry of the document (again at each sync: OPA may have restarted) and DELETEs
    the entries it wrote before that are gone. Entries other replicas wrote are left
    alone. Raises PolicyError when OPA cannot be updated (the next sync retries)."""

    def __init__(self, client: OpaDataClient, *, timeout_s: float = 1.0) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._written: set[str] = set()

    async def __call__(self, document: Mapping[str, Any]) -> None:
        for override_id in sorted(self._written - set(document)):
            await self._client.delete_data(f"{OPA_DATA_PATH}/{override_id}", self._timeout_s)
            self._written.discard(override_id)
        for override_id, entry in document.items():
            await self._client.put_data(f"{OPA_DATA_PATH}/{override_id}", entry, self._timeout_s)
            self._written.add(override_id)
