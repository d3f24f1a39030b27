"""authz.runtime.overrides: request validation, the document pushed to OPA, and the store
(push, expiry, push failures, persistence, change reports)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import stat
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from aiohttp import test_utils, web

from authz.core.authorizer import Authorizer
from authz.core.cache import DecisionCache
from authz.core.errors import (
    AdminRequestError,
    ConfigError,
    OpaResponseError,
    OpaUnavailable,
    PolicyError,
    TooManyOverrides,
)
from authz.core.secret import Secret
from authz.runtime import overrides as overrides_module
from authz.runtime.admin import create_admin_app
from authz.runtime.fleet import RedisOverrideStore
from authz.runtime.overrides import (
    MAX_ACTIVE_OVERRIDES,
    MAX_TTL_S,
    OpaOverrideWriter,
    Override,
    OverrideBackend,
    OverrideStore,
    parse_override_request,
)
from authz.stack.supervisor import free_port
from tests.helpers.fakes import FakeEngine, ManualClock, check_request
from tests.helpers.redis_server import RedisServer
from tests.helpers.serve import serve_until_exit

T0 = 1_700_000_000.25
GATEWAY = "authz/gateway/decision"
EGRESS = "authz/egress/decision"


def body(**changes: Any) -> dict[str, Any]:
    """A valid request body with ``changes`` applied (a value of None removes the key)."""
    base: dict[str, Any] = {
        "effect": "allow",
        "decision_path": GATEWAY,
        "match": {"key_id": "key-oncall", "path": "/api/v1/admin/**", "methods": ["GET"]},
        "ttl_seconds": 3600,
        "reason": "INC-123",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def parse(raw: Any, now: float = T0, new_id: str = "ovr-test") -> Override:
    return parse_override_request(raw, actor="alice", now=now, new_id=lambda: new_id)


# --- parse_override_request --------------------------------------------------------------


VALID: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # (id, body, expected Override fields)
    (
        "gateway-allow",
        body(),
        {
            "effect": "allow",
            "decision_path": GATEWAY,
            "match": {"key_id": "key-oncall", "path": "/api/v1/admin/**", "methods": ["GET"]},
            "expires_at": T0 + 3600,
            "reason": "INC-123",
        },
    ),
    (
        "egress-deny-sandbox",
        body(
            effect="deny",
            decision_path=EGRESS,
            match={"sandbox_id": "sb-team-a-1", "service": "openai"},
        ),
        {
            "effect": "deny",
            "decision_path": EGRESS,
            "match": {"sandbox_id": "sb-team-a-1", "service": "openai"},
        },
    ),
    ("key-only", body(match={"key_id": "k"}), {"match": {"key_id": "k"}}),
    ("ttl-float", body(ttl_seconds=1.5), {"expires_at": T0 + 1.5}),
    ("ttl-min", body(ttl_seconds=1), {"expires_at": T0 + 1}),
    ("ttl-max", body(ttl_seconds=MAX_TTL_S), {"expires_at": T0 + MAX_TTL_S}),
    (
        "reason-trimmed",
        body(reason="  INC-9 compromised key \n"),
        {"reason": "INC-9 compromised key"},
    ),
    (
        "id-characters",
        body(match={"key_id": "Key_1.a:b-c", "methods": ["GET", "POST", "DELETE"]}),
        {"match": {"key_id": "Key_1.a:b-c", "methods": ["GET", "POST", "DELETE"]}},
    ),
    ("reason-500-chars", body(reason="r" * 500), {"reason": "r" * 500}),
    (
        # Blocking a sandbox everywhere needs no service; allowing one does (below).
        "egress-deny-every-service",
        body(effect="deny", decision_path=EGRESS, match={"sandbox_id": "sb-team-a-1"}),
        {"effect": "deny", "match": {"sandbox_id": "sb-team-a-1"}},
    ),
]


@pytest.mark.parametrize(
    ("raw", "expected"), [case[1:] for case in VALID], ids=[case[0] for case in VALID]
)
def test_parse_valid(raw: dict[str, Any], expected: dict[str, Any]) -> None:
    override = parse(raw)
    assert (override.id, override.actor, override.created_at) == ("ovr-test", "alice", T0)
    for name, value in expected.items():
        assert getattr(override, name) == value, name


def test_parse_default_ids_are_random() -> None:
    first = parse_override_request(body(), actor="a", now=T0)
    second = parse_override_request(body(), actor="a", now=T0)
    assert re.fullmatch(r"ovr-[0-9a-f]{12}", first.id)
    assert first.id != second.id


def test_parse_does_not_keep_the_callers_match() -> None:
    raw = body()
    override = parse(raw)
    raw["match"]["key_id"] = "someone-else"
    assert override.match["key_id"] == "key-oncall"


INVALID: list[tuple[str, Any, str]] = [
    # (id, body, the field the error must name)
    ("not-an-object", ["allow"], "override:"),
    ("null", None, "override:"),
    ("effect-missing", body(effect=None), "override.effect"),
    ("effect-unknown", body(effect="permit"), "override.effect='permit'"),
    ("effect-uppercase", body(effect="ALLOW"), "override.effect"),
    ("decision-path-missing", body(decision_path=None), "override.decision_path"),
    ("decision-path-leading-slash", body(decision_path="/authz/x"), "override.decision_path"),
    ("decision-path-dots", body(decision_path="authz.gateway"), "override.decision_path"),
    ("match-missing", body(match=None), "override.match"),
    ("match-empty", body(match={}), "override.match"),
    ("match-not-object", body(match=["key_id"]), "override.match"),
    ("match-unknown-field", body(match={"key_id": "k", "role": "admin"}), "'role'"),
    (
        "match-key-and-sandbox",
        body(match={"key_id": "k", "sandbox_id": "sb"}),
        "exactly one of key_id or sandbox_id",
    ),
    ("match-neither", body(match={"service": "openai"}), "exactly one of key_id or sandbox_id"),
    ("key-id-empty", body(match={"key_id": ""}), "override.match.key_id"),
    ("key-id-space", body(match={"key_id": "key one"}), "override.match.key_id"),
    ("key-id-number", body(match={"key_id": 7}), "override.match.key_id"),
    ("key-id-too-long", body(match={"key_id": "k" * 129}), "override.match.key_id"),
    ("sandbox-id-leading-dash", body(match={"sandbox_id": "-sb"}), "override.match.sandbox_id"),
    (
        "service-slash",
        body(match={"sandbox_id": "sb", "service": "a/b"}),
        "override.match.service",
    ),
    ("path-relative", body(match={"key_id": "k", "path": "api/v1"}), "override.match.path"),
    ("path-not-string", body(match={"key_id": "k", "path": 1}), "override.match.path"),
    (
        "path-too-long",
        body(match={"key_id": "k", "path": "/" + "a" * 256}),
        "override.match.path",
    ),
    (
        "methods-lowercase",
        body(match={"key_id": "k", "methods": ["get"]}),
        "override.match.methods",
    ),
    ("methods-empty", body(match={"key_id": "k", "methods": []}), "override.match.methods"),
    ("methods-string", body(match={"key_id": "k", "methods": "GET"}), "override.match.methods"),
    ("methods-digit", body(match={"key_id": "k", "methods": ["G3T"]}), "override.match.methods"),
    ("ttl-missing", body(ttl_seconds=None), "override.ttl_seconds"),
    ("ttl-zero", body(ttl_seconds=0), "override.ttl_seconds=0"),
    ("ttl-negative", body(ttl_seconds=-5), "override.ttl_seconds=-5"),
    ("ttl-too-big", body(ttl_seconds=MAX_TTL_S + 1), f"override.ttl_seconds={MAX_TTL_S + 1}"),
    ("ttl-bool", body(ttl_seconds=True), "override.ttl_seconds=True"),
    ("ttl-string", body(ttl_seconds="3600"), "override.ttl_seconds='3600'"),
    ("reason-missing", body(reason=None), "override.reason"),
    ("reason-blank", body(reason="   "), "override.reason"),
    ("reason-not-string", body(reason=123), "override.reason"),
    ("reason-too-long", body(reason="r" * 501), "override.reason"),
    # Issue #13, finding 10: an egress allow override without a service let the sandbox
    # reach every service.
    (
        "egress-allow-without-service",
        body(decision_path=EGRESS, match={"sandbox_id": "sb-team-a-1"}),
        "override.match.service",
    ),
    (
        "egress-allow-empty-service",
        body(decision_path=EGRESS, match={"sandbox_id": "sb-team-a-1", "service": ""}),
        "override.match.service",
    ),
]


@pytest.mark.parametrize(
    ("raw", "field"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID]
)
def test_a_bad_override_body_is_an_admin_request_error_naming_the_field(
    raw: Any, field: str
) -> None:
    # AdminRequestError (400 on the admin API), never ConfigError: settings stay startup's.
    with pytest.raises(AdminRequestError) as caught:
        parse(raw)
    assert field in str(caught.value)


# --- Override.opa_document ---------------------------------------------------------------


def test_opa_document() -> None:
    override = parse(body(ttl_seconds=90.5))
    document = override.opa_document()
    assert set(document) == {
        "id",
        "effect",
        "decision_path",
        "match",
        "reason",
        "actor",
        "created_at",
        "expires_at",
        "expires_at_ns",
    }
    assert {k: document[k] for k in ("id", "effect", "decision_path", "reason", "actor")} == {
        "id": "ovr-test",
        "effect": "allow",
        "decision_path": GATEWAY,
        "reason": "INC-123",
        "actor": "alice",
    }
    assert document["match"] == {
        "key_id": "key-oncall",
        "path": "/api/v1/admin/**",
        "methods": ["GET"],
    }
    assert document["created_at"] == T0
    expires = datetime.fromisoformat(document["expires_at"])
    assert expires.utcoffset() is not None  # RFC 3339 needs the offset
    assert expires.timestamp() == pytest.approx(T0 + 90.5, abs=1e-6)
    assert isinstance(document["expires_at_ns"], int)
    assert document["expires_at_ns"] == pytest.approx((T0 + 90.5) * 1e9, abs=1e3)
    assert document["expires_at_ns"] == pytest.approx(expires.timestamp() * 1e9, abs=1e3)
    json.dumps(document)  # plain JSON for OPA


def test_opa_document_expiry_is_utc() -> None:
    document = parse(body(ttl_seconds=60), now=0.0).opa_document()
    assert document["expires_at"] == datetime(1970, 1, 1, 0, 1, tzinfo=UTC).isoformat()
    assert document["expires_at_ns"] == 60 * 10**9


# --- OverrideStore -----------------------------------------------------------------------


class FakeOpa:
    """The push callable: records every document, or raises ``error`` when set."""

    def __init__(self) -> None:
        self.documents: list[dict[str, Any]] = []
        self.error: PolicyError | None = None

    async def push(self, document: dict[str, Any]) -> None:
        if self.error is not None:
            raise self.error
        self.documents.append(json.loads(json.dumps(document)))


def override(override_id: str, ttl_s: float = 3600, key_id: str = "key-a") -> Override:
    raw = body(match={"key_id": key_id}, ttl_seconds=ttl_s)
    return parse(raw, now=ManualClock(T0)(), new_id=override_id)


def file_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def opa() -> FakeOpa:
    return FakeOpa()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


async def test_add_pushes_the_document(opa: FakeOpa, clock: ManualClock) -> None:
    store = OverrideStore(opa.push, clock=clock)
    first = override("ovr-1")
    assert await store.add(first) is True
    assert opa.documents == [{"ovr-1": first.opa_document()}]
    second = override("ovr-2", key_id="key-b")
    assert await store.add(second) is True
    assert opa.documents[-1] == {"ovr-1": first.opa_document(), "ovr-2": second.opa_document()}
    assert store.active() == [first, second]
    assert store.document() == opa.documents[-1]


async def test_remove(opa: FakeOpa, clock: ManualClock) -> None:
    store = OverrideStore(opa.push, clock=clock)
    first, second = override("ovr-1"), override("ovr-2")
    await store.add(first)
    await store.add(second)
    assert await store.remove("ovr-1") == (first, True)
    assert opa.documents[-1] == {"ovr-2": second.opa_document()}
    assert store.active() == [second]
    pushes = len(opa.documents)
    assert await store.remove("ovr-unknown") == (None, True)
    assert len(opa.documents) == pushes  # nothing changed, nothing pushed


async def test_expired_entries_are_excluded_and_dropped_at_sync(
    opa: FakeOpa, clock: ManualClock
) -> None:
    counts: list[int] = []
    store = OverrideStore(opa.push, clock=clock, on_change=counts.append)
    short, long = override("ovr-short", ttl_s=60), override("ovr-long", ttl_s=600)
    await store.add(short)
    await store.add(long)
    clock.now = T0 + 60  # expires_at is exclusive
    assert store.active() == [long]
    assert set(store.document()) == {"ovr-long"}
    assert await store.sync() is True
    assert opa.documents[-1] == {"ovr-long": long.opa_document()}
    assert counts == [1, 2, 1]
    # Dropped from the store, not only hidden: a later sync does not report it again.
    await store.sync()
    assert counts == [1, 2, 1]
    assert await store.remove("ovr-short") == (None, True)


@pytest.mark.parametrize(
    "error",
    [OpaUnavailable("connection refused"), OpaResponseError("HTTP 500")],
    ids=["unavailable", "response-error"],
)
async def test_push_failure_keeps_the_override_for_a_later_sync(
    opa: FakeOpa, clock: ManualClock, error: PolicyError
) -> None:
    store = OverrideStore(opa.push, clock=clock)
    kept = override("ovr-1")
    opa.error = error
    assert await store.add(kept) is False
    assert store.active() == [kept]
    assert opa.documents == []
    assert await store.sync() is False
    opa.error = None
    assert await store.sync() is True
    assert opa.documents == [{"ovr-1": kept.opa_document()}]


async def test_remove_with_push_failure_reports_it(opa: FakeOpa, clock: ManualClock) -> None:
    store = OverrideStore(opa.push, clock=clock)
    first = override("ovr-1")
    await store.add(first)
    opa.error = OpaUnavailable("down")
    assert await store.remove("ovr-1") == (first, False)
    assert store.active() == []
    opa.error = None
    assert await store.sync() is True
    assert opa.documents[-1] == {}


async def test_watch_pushes_periodically(opa: FakeOpa, clock: ManualClock) -> None:
    # OPA keeps pushed data in memory only: the list is pushed again and again.
    three = asyncio.Event()

    async def push(document: dict[str, Any]) -> None:
        await opa.push(document)
        if len(opa.documents) >= 3:
            three.set()

    store = OverrideStore(push, clock=clock)
    store._items["ovr-1"] = override("ovr-1")  # kept without an add(): only watch() pushes
    task = asyncio.create_task(store.watch(0.01))
    try:
        async with asyncio.timeout(2):
            await three.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert opa.documents[:3] == [{"ovr-1": override("ovr-1").opa_document()}] * 3


# --- persistence -------------------------------------------------------------------------


async def test_persisted_with_mode_0600_and_reloaded(
    opa: FakeOpa, clock: ManualClock, tmp_path: Path
) -> None:
    path = tmp_path / "overrides.json"
    store = OverrideStore(opa.push, path=path, clock=clock)
    first = override("ovr-1")
    second = parse(
        body(effect="deny", decision_path=EGRESS, match={"sandbox_id": "sb-1", "service": "x"}),
        new_id="ovr-2",
    )
    await store.add(first)
    await store.add(second)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert file_names(tmp_path) == ["overrides.json"]  # no temp files left behind
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert [item["id"] for item in saved["overrides"]] == ["ovr-1", "ovr-2"]

    other = FakeOpa()
    reloaded = OverrideStore(other.push, path=path, clock=clock)
    assert reloaded.active() == [first, second]
    assert other.documents == []  # loading does not push; the next sync does
    assert await reloaded.sync() is True
    assert other.documents == [store.document()]


async def test_removal_and_expiry_are_persisted(
    opa: FakeOpa, clock: ManualClock, tmp_path: Path
) -> None:
    path = tmp_path / "overrides.json"
    store = OverrideStore(opa.push, path=path, clock=clock)
    await store.add(override("ovr-gone", ttl_s=60))
    await store.add(override("ovr-removed"))
    await store.add(override("ovr-kept"))
    await store.remove("ovr-removed")
    clock.now = T0 + 61
    await store.sync()
    assert [o.id for o in OverrideStore(opa.push, path=path, clock=clock).active()] == ["ovr-kept"]
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert [item["id"] for item in saved["overrides"]] == ["ovr-kept"]


async def test_existing_file_is_rewritten_with_mode_0600(
    opa: FakeOpa, clock: ManualClock, tmp_path: Path
) -> None:
    path = tmp_path / "overrides.json"
    path.write_text('{"overrides": []}', encoding="utf-8")
    path.chmod(0o644)
    store = OverrideStore(opa.push, path=path, clock=clock)
    await store.add(override("ovr-1"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_unwritable_file_does_not_fail_add(
    opa: FakeOpa, clock: ManualClock, tmp_path: Path
) -> None:
    store = OverrideStore(opa.push, path=tmp_path / "missing" / "overrides.json", clock=clock)
    assert await store.add(override("ovr-1")) is True
    assert [o.id for o in store.active()] == ["ovr-1"]


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        '{"overrides": [1]}',
        '{"overrides": [{"id": "ovr-1"}]}',
        '{"overrides": [{"id": "ovr-1", "unknown": 1}]}',
        "",
    ],
    ids=["not-json", "array", "entry-not-object", "entry-missing-fields", "entry-unknown", "empty"],
)
def test_corrupt_file_raises_config_error(opa: FakeOpa, tmp_path: Path, text: str) -> None:
    path = tmp_path / "overrides.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        OverrideStore(opa.push, path=path)
    assert str(path) in str(caught.value)


async def test_on_change_reports_active_count(opa: FakeOpa, clock: ManualClock) -> None:
    counts: list[int] = []
    store = OverrideStore(opa.push, clock=clock, on_change=counts.append)
    await store.add(override("ovr-1", ttl_s=10))
    await store.add(override("ovr-2"))
    await store.add(override("ovr-3"))
    await store.remove("ovr-3")
    await store.remove("ovr-unknown")
    clock.now = T0 + 10
    await store.add(override("ovr-4"))  # ovr-1 expired but is not dropped yet: not counted
    await store.sync()
    assert counts == [1, 2, 3, 2, 2, 2]


class RecordingOpa:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.data: dict[str, Any] = {}

    async def put_data(self, path: str, value: Any, timeout_s: float) -> None:
        self.calls.append(("PUT", path))
        self.data[path] = value

    async def delete_data(self, path: str, timeout_s: float) -> None:
        self.calls.append(("DELETE", path))
        self.data.pop(path, None)


async def test_writer_puts_each_entry_and_deletes_only_its_own() -> None:
    opa = RecordingOpa()
    opa.data["overrides/other-replica"] = {"id": "other-replica"}
    writer = OpaOverrideWriter(opa)
    await writer({"ovr-1": {"id": "ovr-1"}, "ovr-2": {"id": "ovr-2"}})
    await writer({"ovr-2": {"id": "ovr-2"}})
    assert opa.calls == [
        ("PUT", "overrides/ovr-1"),
        ("PUT", "overrides/ovr-2"),
        ("DELETE", "overrides/ovr-1"),
        ("PUT", "overrides/ovr-2"),
    ]
    assert set(opa.data) == {"overrides/other-replica", "overrides/ovr-2"}


# --- overrides and the decision cache ----------------------------------------------------


PATH = "authz/gateway/decision"


async def test_deny_override_is_not_masked_by_decisions_cached_while_it_was_pushed() -> None:
    # OverrideStore.add() clears the decision cache (on_change) *before* the push to OPA
    # lands. A request decided in between is answered from the OPA state without the
    # override and cached; when the push completes nothing clears the cache again, so
    # the blocked key keeps being allowed from the cache for up to the cache TTL (and
    # likewise after an add whose push failed, when the periodic sync pushes it later).
    # README: "deny blocks it at once"; "Entries are dropped when ... an override is
    # granted".
    opa_overrides: dict[str, Any] = {}
    release = asyncio.Event()

    async def push(document: Mapping[str, Any]) -> None:
        await release.wait()  # the PUT to OPA is in flight
        opa_overrides.clear()
        opa_overrides.update(document)

    def policy(path: str, document: Mapping[str, Any]) -> Any:
        if any(o["effect"] == "deny" for o in opa_overrides.values()):
            return {"allowed": False, "http_status": 403, "reason": "blocked_by_override"}
        return {"allowed": True, "reason": "allowed"}

    cache = DecisionCache(ttl_s=5.0)
    store = OverrideStore(push, on_pushed=lambda: cache.clear("overrides changed"))
    authorizer = Authorizer(
        FakeEngine(policy),
        default_decision_path=PATH,
        credential_headers=("x-api-key",),
        timeout_s=1.0,
        cache=cache,
    )
    request = check_request(headers={"x-api-key": "leaked"})
    override = parse_override_request(
        {
            "effect": "deny",
            "decision_path": PATH,
            "match": {"key_id": "key-leaked"},
            "ttl_seconds": 600,
            "reason": "key leaked",
        },
        actor="oncall",
        now=time.time(),
        new_id=lambda: "ovr-1",
    )
    granting = asyncio.create_task(store.add(override))
    await asyncio.sleep(0)  # add() has cleared the cache and is pushing
    during = await authorizer.check(request)  # decided without the override; cached
    assert during.response.HasField("ok_response")
    release.set()
    assert await granting is True  # the admin API answers 201, "pushed": true
    after = await authorizer.check(request)
    assert not after.response.HasField("ok_response"), (
        f"blocked key still allowed from the cache (cached_from={after.record.cached_from})"
    )


# --- the overrides file ------------------------------------------------------------------


FILE_T0 = 1_700_000_000.0


async def _push(document: dict[str, Any]) -> None:
    return None


def _override(override_id: str, effect: str = "deny") -> Override:
    body = {
        "effect": effect,
        "decision_path": "authz/gateway/decision",
        "match": {"key_id": "key-a", "path": "/api/v1/**"},
        "ttl_seconds": 3600,
        "reason": "INC-1",
    }
    return parse_override_request(body, actor="alice", now=FILE_T0, new_id=lambda: override_id)


def _entry(**changes: Any) -> dict[str, Any]:
    """A persisted entry (as the store writes it) with ``changes`` applied."""
    return {**asdict(_override("ovr-1")), **changes}


def _store(path: Path) -> OverrideStore:
    return OverrideStore(_push, path=path, clock=lambda: FILE_T0)


async def test_write_is_fsynced_then_renamed_then_the_directory_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "overrides.json"
    store = _store(path)
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(info.st_mode) else "file", str(info.st_ino)))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        same_dir = Path(src).parent == Path(dst).parent == tmp_path
        events.append(("replace", str(os.stat(src).st_ino), str(same_dir)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    await store.add(_override("ovr-1"))
    written = str(path.stat().st_ino)
    assert events == [
        ("fsync", "file", written),
        ("replace", written, "True"),
        ("fsync", "dir", str(os.stat(tmp_path).st_ino)),
    ]
    assert [o.id for o in _store(path).active()] == ["ovr-1"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
async def test_a_failed_write_leaves_the_previous_file_intact_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "overrides.json"
    store = _store(path)
    await store.add(_override("ovr-1"))
    before = path.read_bytes()

    def fail(*_: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, failing, fail)
    await store.add(_override("ovr-2"))  # kept in memory and pushed; persisting failed
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["overrides.json"]
    assert [o.id for o in _store(path).active()] == ["ovr-1"]


async def test_file_is_0600_even_over_a_stale_world_readable_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "overrides.json"
    for stale in (f".{path.name}.{os.getpid()}.tmp", f".{path.name}.tmp"):
        (tmp_path / stale).write_text("stale")
        (tmp_path / stale).chmod(0o644)
    store = _store(path)
    await store.add(_override("ovr-1"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


CORRUPT = [
    pytest.param(b"", id="empty"),
    pytest.param(json.dumps({"overrides": [_entry()]}).encode()[:60], id="torn"),
    pytest.param(b'{"overrides": [\xff]}', id="not-utf8"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deeply-nested"),
    pytest.param(b'{"overrides": "abc"}', id="overrides-not-a-list"),
    pytest.param(json.dumps({"overrides": [_entry(match="key_id")]}).encode(), id="match-str"),
    pytest.param(json.dumps({"overrides": [_entry(match={})]}).encode(), id="match-empty"),
    pytest.param(
        json.dumps({"overrides": [_entry(expires_at="tomorrow")]}).encode(), id="expiry-str"
    ),
    pytest.param(json.dumps({"overrides": [_entry(created_at=None)]}).encode(), id="created-null"),
    pytest.param(json.dumps({"overrides": [_entry(effect="maybe")]}).encode(), id="effect"),
    pytest.param(json.dumps({"overrides": [_entry(id=["x"])]}).encode(), id="id-not-str"),
    pytest.param(
        json.dumps({"overrides": [_entry(decision_path="/x.y")]}).encode(), id="decision-path"
    ),
    pytest.param(json.dumps({"overrides": [_entry(reason=5)]}).encode(), id="reason-number"),
    pytest.param(json.dumps({"overrides": [_entry(extra=[])]}).encode(), id="extra-list"),
    pytest.param(json.dumps({"overrides": [_entry(expires_at=1e20)]}).encode(), id="year-3e12"),
    pytest.param(json.dumps({"overrides": [_entry(match={"key_id": 5})]}).encode(), id="key-int"),
    pytest.param(json.dumps({"overrides": [_entry(unknown=1)]}).encode(), id="unknown-field"),
]


@pytest.mark.parametrize("content", CORRUPT)
def test_corrupt_file_at_startup_is_one_line_config_error_naming_the_file(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "overrides.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        _store(path)
    message = str(caught.value)
    assert message.startswith(f"overrides file {str(path)!r}: ")
    assert "\n" not in message
    assert len(message) < 400


def test_overrides_file_over_the_byte_cap_is_refused_unparsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is read bounded: a well-formed file longer than the cap is refused (not
    read whole, not parsed), the one-line error naming the file and the cap."""
    path = tmp_path / "overrides.json"
    path.write_bytes(json.dumps({"overrides": [_entry()]}).encode())
    monkeypatch.setattr(overrides_module, "MAX_FILE_BYTES", path.stat().st_size - 1)
    with pytest.raises(ConfigError) as caught:
        _store(path)
    assert str(caught.value) == (
        f"overrides file {str(path)!r}: larger than {path.stat().st_size - 1} bytes"
    )


def test_serve_with_a_corrupt_overrides_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "overrides.json"
    path.write_bytes(b"[" * 100_000)
    env = {
        **os.environ,
        "AUTHZ_GRPC_ADDR": f"127.0.0.1:{free_port()}",
        "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
        "AUTHZ_OPA_URL": f"http://127.0.0.1:{free_port()}",
        "AUTHZ_AUDIT_DB": str(tmp_path / "audit.db"),
        "AUTHZ_OVERRIDES_FILE": str(path),
    }
    done = serve_until_exit(env)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, output
    assert "Traceback" not in output
    lines = [json.loads(line) for line in output.splitlines()]  # JSON log lines only
    errors = [line["msg"] for line in lines if line["level"] == "error"]
    assert len(errors) == 1, output
    assert errors[0].startswith(f"invalid configuration: overrides file {str(path)!r}: ")


async def test_a_good_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "overrides.json"
    store = _store(path)
    await store.add(_override("ovr-1"))
    await store.add(_override("ovr-2", effect="allow"))
    assert _store(path).document() == store.document()


# --- limits and the sync loop ------------------------------------------------------------


LIMITS_T0 = 1_700_000_000.0
TOKEN = "adm-t0ken-" + "0123456789abcdef" * 2


def _limits_override(override_id: str, ttl_s: float = 3600, now: float = LIMITS_T0) -> Override:
    body = {
        "effect": "deny",
        "decision_path": "authz/gateway/decision",
        "match": {"key_id": f"key-{override_id}"},
        "ttl_seconds": ttl_s,
        "reason": "INC-1",
    }
    return parse_override_request(body, actor="alice", now=now, new_id=lambda: override_id)


@pytest.mark.parametrize(
    "error",
    [RuntimeError("bug in the writer"), KeyError("x"), OSError(104, "Connection reset")],
    ids=["runtime-error", "key-error", "os-error"],
)
async def test_sync_loop_survives_any_push_failure_and_pushes_again(error: Exception) -> None:
    pushed: list[dict[str, Any]] = []
    failures = [error, error]

    async def push(document: dict[str, Any]) -> None:
        if failures:
            raise failures.pop()
        pushed.append(document)

    store = OverrideStore(push, clock=lambda: LIMITS_T0)
    store._items["ovr-1"] = _limits_override("ovr-1")  # as if loaded from the file
    watcher = asyncio.create_task(store.watch(0.01))
    try:
        deadline = asyncio.get_running_loop().time() + 5
        while not pushed:
            assert not watcher.done(), watcher
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    assert list(pushed[0]) == ["ovr-1"]


async def test_sync_reports_an_unexpected_push_failure_as_not_pushed() -> None:
    async def push(document: dict[str, Any]) -> None:
        raise RuntimeError("bug")

    store = OverrideStore(push, clock=lambda: LIMITS_T0)
    assert await store.add(_limits_override("ovr-1")) is False
    assert [o.id for o in store.active()] == ["ovr-1"]


async def _ok(document: dict[str, Any]) -> None:
    return None


async def test_active_overrides_are_capped() -> None:
    now = [LIMITS_T0]
    store = OverrideStore(_ok, clock=lambda: now[0])
    for index in range(MAX_ACTIVE_OVERRIDES):
        store._items[f"ovr-{index}"] = _limits_override(f"ovr-{index}", ttl_s=60 + index)
    with pytest.raises(TooManyOverrides, match=f"{MAX_ACTIVE_OVERRIDES} active overrides"):
        await store.add(_limits_override("ovr-new"))
    assert len(store.active()) == MAX_ACTIVE_OVERRIDES
    # Replacing one is fine, and expiry makes room again.
    await store.add(_limits_override("ovr-0"))
    now[0] = LIMITS_T0 + 61
    assert await store.add(_limits_override("ovr-new")) is True


@asynccontextmanager
async def _admin(store: OverrideBackend) -> AsyncIterator[test_utils.TestClient[Any, Any]]:
    app: web.Application = create_admin_app({}, overrides=store, token=Secret(TOKEN))
    async with test_utils.TestClient(test_utils.TestServer(app, host="127.0.0.1")) as client:
        yield client


async def test_admin_answers_409_when_the_override_cap_is_reached() -> None:
    store = OverrideStore(_ok)  # the real clock, as the admin API stamps with it
    for index in range(MAX_ACTIVE_OVERRIDES):
        store._items[f"ovr-{index}"] = _limits_override(f"ovr-{index}", now=time.time())
    body = {
        "effect": "deny",
        "decision_path": "authz/gateway/decision",
        "match": {"key_id": "k2"},
        "ttl_seconds": 60,
        "reason": "INC-2",
    }
    async with _admin(store) as client:
        resp = await client.post(
            "/v1/overrides", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert resp.status == 409
        assert (await resp.json())["error"] == "too_many_overrides"
    assert len(store.active()) == MAX_ACTIVE_OVERRIDES


# --- the admin API over either store -----------------------------------------------------

_GRANT = {
    "effect": "deny",
    "decision_path": "authz/gateway/decision",
    "match": {"key_id": "k2"},
    "ttl_seconds": 60,
    "reason": "INC-3",
}
_AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_admin_stamps_a_grant_with_the_stores_clock() -> None:
    store = OverrideStore(_ok, clock=ManualClock(FILE_T0))
    async with _admin(store) as client:
        resp = await client.post("/v1/overrides", json=_GRANT, headers=_AUTH)
        assert resp.status == 201
    [stored] = store.active()
    assert (stored.created_at, stored.expires_at) == (FILE_T0, FILE_T0 + 60)


def _fleet_store(redis_server: RedisServer, pushed: list[dict[str, Any]]) -> RedisOverrideStore:
    async def push(document: dict[str, Any]) -> None:
        pushed.append(document)

    client = redis.asyncio.Redis.from_url(
        redis_server.url, socket_timeout=1.0, socket_connect_timeout=1.0
    )
    return RedisOverrideStore(client, push)


async def test_admin_grants_and_deletes_through_the_fleet_store_on_redis_time(
    redis_server: RedisServer,
) -> None:
    pushed: list[dict[str, Any]] = []
    store = _fleet_store(redis_server, pushed)
    other = _fleet_store(redis_server, [])
    try:
        async with _admin(store) as client:
            resp = await client.post("/v1/overrides", json=_GRANT, headers=_AUTH)
            assert resp.status == 201, await resp.text()
            created = await resp.json()
            assert created["pushed"] is True
            assert created["id"] in pushed[-1]
            await other.refresh()  # another replica reads the same entry
            assert [o.id for o in other.active()] == [created["id"]]
            assert other.active()[0].created_at == created["created_at"]
            redis_now = await other.now()
            assert redis_now - 5 < created["created_at"] <= redis_now
            resp = await client.delete(f"/v1/overrides/{created['id']}", headers=_AUTH)
            assert resp.status == 200
            resp = await client.delete(f"/v1/overrides/{created['id']}", headers=_AUTH)
            assert resp.status == 404
        await other.refresh()
        assert other.active() == []
    finally:
        await store._redis.aclose()
        await other._redis.aclose()


@pytest.mark.parametrize("method", ["POST", "DELETE"], ids=["grant", "delete"])
async def test_admin_answers_503_overrides_unavailable_while_the_fleet_store_is_down(
    redis_server: RedisServer, method: str
) -> None:
    pushed: list[dict[str, Any]] = []
    store = _fleet_store(redis_server, pushed)
    try:
        await store.add(
            parse_override_request(_GRANT, actor="a", now=await store.now(), new_id=lambda: "o1")
        )
        redis_server.stop()
        async with _admin(store) as client:
            if method == "POST":
                resp = await client.post("/v1/overrides", json=_GRANT, headers=_AUTH)
            else:
                resp = await client.delete("/v1/overrides/o1", headers=_AUTH)
            assert resp.status == 503
            assert (await resp.json())["error"] == "overrides_unavailable"
            assert resp.headers["Retry-After"] == "1"
            listed = await client.get("/v1/overrides", headers=_AUTH)
            assert [o["id"] for o in (await listed.json())["overrides"]] == ["o1"]
        assert [o.id for o in store.active()] == ["o1"]  # still enforced, unchanged
    finally:
        await store._redis.aclose()
