"""Overrides and the decision cache: a deny override blocks at once (found in review)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from authz.core.authorizer import Authorizer
from authz.core.cache import DecisionCache
from authz.runtime.overrides import OverrideStore, parse_override_request
from tests.helpers.fakes import FakeEngine, check_request

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
