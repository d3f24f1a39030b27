"""The overrides store holds under bad luck and heavy use: its sync loop outlives any
failure (an OPA restart must get the overrides back), and the active list is capped so
an admin client cannot grow memory, the file and the per-sync OPA writes without bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import test_utils, web

from authz.core.errors import TooManyOverrides
from authz.core.secret import Secret
from authz.runtime.admin import create_admin_app
from authz.runtime.overrides import (
    MAX_ACTIVE_OVERRIDES,
    Override,
    OverrideStore,
    parse_override_request,
)

T0 = 1_700_000_000.0
TOKEN = "adm-t0ken-" + "0123456789abcdef" * 2


def _override(override_id: str, ttl_s: float = 3600, now: float = T0) -> Override:
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

    store = OverrideStore(push, clock=lambda: T0)
    store._items["ovr-1"] = _override("ovr-1")  # as if loaded from the file
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

    store = OverrideStore(push, clock=lambda: T0)
    assert await store.add(_override("ovr-1")) is False
    assert [o.id for o in store.active()] == ["ovr-1"]


async def _ok(document: dict[str, Any]) -> None:
    return None


async def test_active_overrides_are_capped() -> None:
    now = [T0]
    store = OverrideStore(_ok, clock=lambda: now[0])
    for index in range(MAX_ACTIVE_OVERRIDES):
        store._items[f"ovr-{index}"] = _override(f"ovr-{index}", ttl_s=60 + index)
    with pytest.raises(TooManyOverrides, match=f"{MAX_ACTIVE_OVERRIDES} active overrides"):
        await store.add(_override("ovr-new"))
    assert len(store.active()) == MAX_ACTIVE_OVERRIDES
    # Replacing one is fine, and expiry makes room again.
    await store.add(_override("ovr-0"))
    now[0] = T0 + 61
    assert await store.add(_override("ovr-new")) is True


@asynccontextmanager
async def _admin(store: OverrideStore) -> AsyncIterator[test_utils.TestClient[Any, Any]]:
    app: web.Application = create_admin_app({}, overrides=store, token=Secret(TOKEN))
    async with test_utils.TestClient(test_utils.TestServer(app, host="127.0.0.1")) as client:
        yield client


async def test_admin_answers_409_when_the_override_cap_is_reached() -> None:
    store = OverrideStore(_ok)  # the real clock, as the admin API stamps with it
    for index in range(MAX_ACTIVE_OVERRIDES):
        store._items[f"ovr-{index}"] = _override(f"ovr-{index}", now=time.time())
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
