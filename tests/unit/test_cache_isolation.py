"""Decision cache: identity isolation and memory bounds (found in review)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

from authz.core.authorizer import Authorizer
from authz.core.cache import DecisionCache
from tests.unit.fakes import LARGE_JSON_BODY, FakeEngine, bytes_retained_per_check

PATH = "authz/gateway/decision"
GOOD_KEY = "ak_demo_admin_0001"


def _gateway(path: str, document: Mapping[str, Any]) -> Any:
    """The gateway policy's shape: allow only the one good key's digest."""
    if (
        document.get("credentials", {}).get("x-api-key")
        == hashlib.sha256(GOOD_KEY.encode()).hexdigest()
    ):
        return {"allowed": True, "reason": "allowed"}
    return {"allowed": False, "http_status": 401, "reason": "invalid_api_key"}


def raw_header_request(api_key: str) -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy sends it with ext_authz ``encode_raw_headers: true``:
    headers only in ``header_map`` (raw values), ``headers`` left empty. authz.core.input
    supports this form (it hashes credentials found there)."""
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host, http.scheme = "GET", "/api/v1/admin/users", "gw", "http"
    http.header_map.CopyFrom(
        base_pb2.HeaderMap(
            headers=[
                base_pb2.HeaderValue(key=":path", raw_value=b"/api/v1/admin/users"),
                base_pb2.HeaderValue(key="x-api-key", raw_value=api_key.encode()),
            ]
        )
    )
    request.attributes.source.CopyFrom(attribute_context_pb2.AttributeContext.Peer())
    request.attributes.source.address.socket_address.address = "10.0.0.1"
    return request


async def test_cache_key_covers_raw_header_map() -> None:
    # cache_key() hashes http.headers only; with encode_raw_headers the credentials live
    # in http.header_map, which the key ignores. A request with a wrong key then reuses
    # the admin's cached allow.
    authorizer = Authorizer(
        FakeEngine(_gateway),
        default_decision_path=PATH,
        credential_headers=("x-api-key",),
        timeout_s=0.3,
        cache=DecisionCache(),
    )
    admin = await authorizer.check(raw_header_request(GOOD_KEY))
    assert admin.response.HasField("ok_response")
    attacker = await authorizer.check(raw_header_request("wrong"))
    assert not attacker.response.HasField("ok_response"), (
        f"wrong key allowed from the cache (cached_from={attacker.record.cached_from})"
    )


async def test_cache_memory_is_bounded_for_unauthenticated_requests() -> None:
    # Every decision is cached, unauthenticated denies included, with the full input
    # document (request body, parsed body) and the body again in the key. Expired
    # entries are only dropped when the same key is looked up again or the LRU bound
    # (10,000 entries by default) pushes them out, so the memory stays. A JSON body of
    # 63 KB (under the gateway's max_request_bytes 65536) like [{},{},...] costs about
    # 1.6 MB per entry: 10,000 anonymous requests pin ~16 GB.
    cache = DecisionCache()  # defaults, as the server builds it
    authorizer = Authorizer(
        FakeEngine(
            {"allowed": False, "http_status": 401, "reason": "missing_api_key"}, record=False
        ),
        default_decision_path=PATH,
        credential_headers=("x-api-key",),
        timeout_s=5.0,
        cache=cache,
    )
    assert len(LARGE_JSON_BODY) < 65536
    n = 100
    per_entry = await bytes_retained_per_check(authorizer, n)
    assert len(cache) <= n
    projected_gb = per_entry * 10_000 / 1e9
    assert projected_gb < 1.0, f"a full default cache would hold {projected_gb:.1f} GB"
