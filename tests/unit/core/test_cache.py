"""authz.core.cache: the decision cache keyed by the canonical input (every field a policy
reads, credentials in any header form; per-request noise aside), bounded in bytes, never
undone by an evaluation in flight; TTL, jitter, LRU, revision and clears."""

from __future__ import annotations

import hashlib
import sys
import tracemalloc
from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

from authz.core.authorizer import Authorizer
from authz.core.cache import (
    DEFAULT_MAX_BYTES,
    ENTRY_OVERHEAD,
    DecisionCache,
    KeyDeclaration,
    cache_key,
    declared_key,
    entry_size,
    parse_declarations,
)
from authz.core.decision import Decision
from authz.core.errors import ConfigError
from authz.core.input import build_input
from authz.core.opa import Evaluation
from authz.core.response import response_prototype
from authz.runtime.config import DEFAULT_DECISION_CACHE_MAX_BYTES, load
from tests.helpers.fakes import (
    LARGE_JSON_BODY,
    FakeEngine,
    ManualClock,
    bytes_retained_per_check,
    check_request,
)

PATH = "authz/gateway/decision"
GOOD_KEY = "ak_good_0001"
GOOD_DIGEST = hashlib.sha256(GOOD_KEY.encode()).hexdigest()
CREDENTIALS = ("x-api-key", "authorization")


def gateway(path: str, document: Mapping[str, Any]) -> Any:
    """The gateway policy's shape, as OPA returns it (a fresh object per answer): an allow
    naming the key for the good key, an anonymous 401 otherwise."""
    if document.get("credentials", {}).get("x-api-key") == GOOD_DIGEST:
        return orjson.loads(
            orjson.dumps(
                {
                    "allowed": True,
                    "headers": {"x-authz-key-id": "key-good", "x-authz-role": "admin"},
                    "request_headers_to_remove": ["x-api-key", "authorization"],
                    "authz": {
                        "reason": "allowed",
                        "identity": {"key_id": "key-good", "role": "admin", "tier": "default"},
                    },
                    "dynamic_metadata": {"key_id": "key-good", "role": "admin"},
                }
            )
        )
    return {"allowed": False, "http_status": 401, "authz": {"reason": "missing_api_key"}}


def authorizer_over(cache: DecisionCache, answer: Any = gateway, **kwargs: Any) -> Authorizer:
    return Authorizer(
        FakeEngine(answer, record=False),
        default_decision_path=PATH,
        credential_headers=CREDENTIALS,
        timeout_s=5.0,
        cache=cache,
        **kwargs,
    )


def document(request: external_auth_pb2.CheckRequest) -> dict[str, Any]:
    return build_input(request, CREDENTIALS)


def key_of(request: external_auth_pb2.CheckRequest, path: str = PATH) -> bytes:
    return cache_key(path, document(request))


# -- the key: a digest of everything the policy sees, volatile parts aside ----------------


def _set(mutate: Callable[[external_auth_pb2.CheckRequest], None]) -> Any:
    def changed() -> external_auth_pb2.CheckRequest:
        request = check_request(headers={"x-api-key": GOOD_KEY})
        mutate(request)
        return request

    return changed


def _destination_port(r: external_auth_pb2.CheckRequest) -> None:
    r.attributes.destination.address.socket_address.port_value = 8443


def _sni(r: external_auth_pb2.CheckRequest) -> None:
    r.attributes.tls_session.sni = "admin.internal"


def _peer_certificate(r: external_auth_pb2.CheckRequest) -> None:
    r.attributes.source.certificate = "-----BEGIN CERTIFICATE-----\nMIIB...\n"


def _metadata_context(r: external_auth_pb2.CheckRequest) -> None:
    r.attributes.metadata_context.filter_metadata["jwt"].update({"sub": "alice"})


def _route_metadata(r: external_auth_pb2.CheckRequest) -> None:
    r.attributes.route_metadata_context.filter_metadata["route"].update({"tier": "gold"})


def _principal(r: external_auth_pb2.CheckRequest) -> None:
    r.attributes.source.principal = "spiffe://cluster/ns/a/sa/b"


def _raw_header(r: external_auth_pb2.CheckRequest) -> None:
    r.attributes.request.http.header_map.headers.add(key="x-role", raw_value=b"admin")


def _query(r: external_auth_pb2.CheckRequest) -> None:
    r.attributes.request.http.path = "/api/v1/status?admin=1"


MUTATIONS = {
    "destination-port": _destination_port,
    "tls-sni": _sni,
    "peer-certificate": _peer_certificate,
    "metadata-context": _metadata_context,
    "route-metadata": _route_metadata,
    "source-principal": _principal,
    "raw-header-map": _raw_header,
    "query": _query,
}


@pytest.mark.parametrize("mutate", MUTATIONS.values(), ids=MUTATIONS.keys())
def test_key_changes_with_every_input_field_a_policy_reads(
    mutate: Callable[[external_auth_pb2.CheckRequest], None],
) -> None:
    # Destination port, SNI, peer certificate, metadata_context and route metadata
    # included: two inputs a policy tells apart never share an entry.
    base = check_request(headers={"x-api-key": GOOD_KEY})
    assert key_of(base) != key_of(_set(mutate)())


def _volatile(r: external_auth_pb2.CheckRequest) -> None:
    http = r.attributes.request.http
    http.id = "99"
    http.headers["x-request-id"] = "other"
    http.headers["traceparent"] = "00-1-2-01"
    r.attributes.request.time.FromSeconds(1_800_000_000)
    r.attributes.source.address.socket_address.port_value = 61000


def test_key_ignores_request_ids_tracing_time_and_source_port() -> None:
    base = check_request(headers={"x-api-key": GOOD_KEY, "x-request-id": "one"})
    assert key_of(base) == key_of(_set(_volatile)())


def test_key_is_a_sha256_digest_per_decision_path() -> None:
    request = check_request(headers={"x-api-key": GOOD_KEY, "x-big": "v" * 50_000})
    key = key_of(request)
    assert isinstance(key, bytes)
    assert len(key) == 32
    assert key != key_of(request, "authz/egress/decision")


@pytest.mark.parametrize("header", ["x-api-key", "x-sandbox-id"], ids=["credential", "identity"])
def test_ignored_headers_never_cover_a_credential_or_identity(header: str) -> None:
    # An ignored credential header would let two callers' requests share one entry.
    cache = DecisionCache(ignore_headers=[header])
    alice = cache.key(PATH, document(check_request(headers={header: "alice"})))
    mallory = cache.key(PATH, document(check_request(headers={header: "mallory"})))
    assert alice != mallory


# -- bounded in bytes -------------------------------------------------------------------


def _junk_headers(seed: str, total: int) -> dict[str, str]:
    """``total`` bytes of distinct random-looking header values (SHAKE-256 of ``seed``),
    in 1 KB headers: nothing two requests share, nothing that compresses."""
    return {
        f"x-junk-{i}": hashlib.shake_256(f"{seed}/{i}".encode()).hexdigest(500)
        for i in range(total // 1000)
    }


async def test_distinct_keyless_requests_with_big_headers_cannot_fill_the_cache() -> None:
    # A keyless 401 cached with its headers in the key, bounded by count only, would let
    # ~4,000 distinct keyless requests OOM a 512 Mi pod and evict legitimate callers.
    cache = DecisionCache(max_bytes=1 << 20)
    authorizer = authorizer_over(cache)
    legitimate = check_request(headers={"x-api-key": GOOD_KEY})
    first = await authorizer.check(legitimate)
    for i in range(4000):
        headers = _junk_headers(f"keyless-{i}", 4000)
        await authorizer.check(
            check_request(method="POST", path="/api/v1/admin/users", headers=headers)
        )
        assert cache.bytes <= cache.max_bytes
    again = await authorizer.check(legitimate)
    assert again.record.cached_from == first.record.decision_id  # not evicted


async def test_distinct_identified_requests_with_big_headers_stay_under_the_byte_bound() -> None:
    # A caller with a valid key can make every request distinct too: the bound holds in
    # bytes (the accounting) and in the memory the process keeps (tracemalloc).
    bound, n = 1 << 18, 1500
    cache = DecisionCache(max_bytes=bound, max_entries=1_000_000)
    authorizer = authorizer_over(cache)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            headers = {"x-api-key": GOOD_KEY, **_junk_headers(f"identified-{i}", 4000)}
            await authorizer.check(check_request(path=f"/api/v1/items/{i}", headers=headers))
            assert cache.bytes <= bound
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0 < len(cache) < n  # evicted by bytes, not by count
    assert retained <= bound, f"the cache holds {retained} bytes, bound {bound}"


async def test_an_entrys_accounted_size_covers_the_memory_it_keeps() -> None:
    cache = DecisionCache(max_bytes=1 << 30, max_entries=1_000_000)
    authorizer = authorizer_over(cache)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(500):
            request = check_request(path=f"/api/v1/items/{i}", headers={"x-api-key": GOOD_KEY})
            await authorizer.check(request)
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) == 500
    assert retained <= cache.bytes, f"kept {retained / 500:.0f} B per entry, accounted less"


def test_entries_are_evicted_oldest_first_to_fit_the_byte_bound() -> None:
    cache = DecisionCache(max_bytes=10_000, clock=ManualClock(100.0))
    for i in range(100):
        _put(cache, bytes([i]) * 32)
        assert cache.bytes <= 10_000
    assert 0 < len(cache) < 100
    assert cache.get(bytes([99]) * 32) is not None
    assert cache.get(bytes([0]) * 32) is None


def test_an_entry_larger_than_the_bound_is_not_cached() -> None:
    cache = DecisionCache(max_bytes=2_000, clock=ManualClock(100.0))
    _put(cache, b"k" * 32, identity={f"k{i}": "v" * 100 for i in range(50)})
    assert (len(cache), cache.bytes) == (0, 0)


def test_clear_and_expiry_give_the_bytes_back() -> None:
    clock = ManualClock(100.0)
    cache = DecisionCache(ttl_s=5, jitter=0, clock=clock)
    _put(cache, b"a" * 32)
    _put(cache, b"b" * 32)
    assert cache.bytes > 0
    clock.now += 6
    assert cache.get(b"a" * 32) is None
    cache.clear("test")
    assert (len(cache), cache.bytes) == (0, 0)


async def test_decisions_without_identity_are_not_cached() -> None:
    # A deny for a missing or unknown credential names no one (no ``identity``): caching
    # it lets a flood of distinct keyless requests evict legitimate entries.
    cache = DecisionCache()
    authorizer = authorizer_over(cache)
    await authorizer.check(check_request(headers={"x-api-key": "unknown"}))
    await authorizer.check(check_request())
    assert len(cache) == 0
    await authorizer.check(check_request(headers={"x-api-key": GOOD_KEY}))
    assert len(cache) == 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, DEFAULT_DECISION_CACHE_MAX_BYTES),
        ("1048576", 1 << 20),
        ("0", ConfigError),
        ("lots", ConfigError),
    ],
    ids=["default", "one-mib", "zero", "not-a-number"],
)
def test_max_bytes_setting(value: str | None, expected: int | type[ConfigError]) -> None:
    environ = {} if value is None else {"AUTHZ_DECISION_CACHE_MAX_BYTES": value}
    if isinstance(expected, int):
        assert load(environ).decision_cache_max_bytes == expected
        assert DEFAULT_MAX_BYTES == DEFAULT_DECISION_CACHE_MAX_BYTES
    else:
        with pytest.raises(ConfigError, match="AUTHZ_DECISION_CACHE_MAX_BYTES"):
            load(environ)


# -- a clear can never be undone ------------------------------------------------------------


def _put(
    cache: DecisionCache,
    key: bytes,
    *,
    generation: int | None = None,
    identity: Mapping[str, str] | None = None,
) -> None:
    names = dict(identity or {"key_id": "k"})
    decision = Decision(allowed=True, identity=names)
    evaluation = Evaluation({"allowed": True, "authz": {"identity": names}}, {"b": "r1"})
    gen = cache.generation if generation is None else generation
    cache.put(key, decision, evaluation, "d1", generation=gen)


def test_a_put_from_before_a_clear_is_dropped() -> None:
    cache = DecisionCache(clock=ManualClock(100.0))
    started = cache.generation
    cache.clear("overrides changed")
    _put(cache, b"k" * 32, generation=started)
    assert cache.get(b"k" * 32) is None


async def test_an_evaluation_in_flight_across_a_clear_never_puts_its_decision_back() -> None:
    # An override granted (cache cleared) while OPA evaluates with the old overrides:
    # the old decision must not be put back and served until the TTL.
    cache = DecisionCache()

    def clearing(path: str, doc: Mapping[str, Any]) -> Any:
        answer = gateway(path, doc)
        cache.clear("overrides changed")  # lands while OPA is answering
        return answer

    engine = FakeEngine(clearing)
    authorizer = Authorizer(
        engine,
        default_decision_path=PATH,
        credential_headers=CREDENTIALS,
        timeout_s=5.0,
        cache=cache,
    )
    request = check_request(headers={"x-api-key": GOOD_KEY})
    await authorizer.check(request)
    again = await authorizer.check(request)
    assert again.record.cached_from is None
    assert len(engine.calls) == 2


@pytest.mark.parametrize(
    ("ignored", "credentials"),
    [("X-Api-Key", None), ("x-sandbox-id", None), ("x-tenant-key", "x-api-key,x-tenant-key")],
    ids=["shipped-credential", "identity", "configured-credential"],
)
def test_ignore_headers_setting_refuses_credential_and_identity_headers(
    ignored: str, credentials: str | None
) -> None:
    environ = {"AUTHZ_DECISION_CACHE_IGNORE_HEADERS": f"x-correlation-id,{ignored}"}
    if credentials is not None:
        environ["AUTHZ_CREDENTIAL_HEADERS"] = credentials
    with pytest.raises(
        ConfigError, match=f"AUTHZ_DECISION_CACHE_IGNORE_HEADERS.*{ignored.lower()}"
    ):
        load(environ)
    assert load({"AUTHZ_DECISION_CACHE_IGNORE_HEADERS": "x-correlation-id"})


# ----------------------------------------------------------------------------------------
# Keys ignore only per-request noise; TTL, LRU, revision and clears.


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


# ----------------------------------------------------------------------------------------
# A caller's identity is in the key in every header form; memory stays bounded for
# anonymous requests.


DEMO_KEY = "ak_demo_admin_0001"


def _gateway(path: str, document: Mapping[str, Any]) -> Any:
    """The gateway policy's shape: allow only the one good key's digest."""
    if (
        document.get("credentials", {}).get("x-api-key")
        == hashlib.sha256(DEMO_KEY.encode()).hexdigest()
    ):
        return {"allowed": True, "authz": {"reason": "allowed"}}
    return {"allowed": False, "http_status": 401, "authz": {"reason": "invalid_api_key"}}


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
    # With encode_raw_headers the credentials live in http.header_map only: the key
    # covers them there too, so a request with a wrong key never reuses the admin's
    # cached allow.
    authorizer = Authorizer(
        FakeEngine(_gateway),
        default_decision_path=PATH,
        credential_headers=("x-api-key",),
        timeout_s=0.3,
        cache=DecisionCache(),
    )
    admin = await authorizer.check(raw_header_request(DEMO_KEY))
    assert admin.response.HasField("ok_response")
    attacker = await authorizer.check(raw_header_request("wrong"))
    assert not attacker.response.HasField("ok_response"), (
        f"wrong key allowed from the cache (cached_from={attacker.record.cached_from})"
    )


async def test_cache_memory_is_bounded_for_unauthenticated_requests() -> None:
    # A JSON body of 63 KB (under the gateway's max_request_bytes 65536) like
    # [{},{},...] parses into ~1.6 MB of objects: were anonymous denies cached with
    # their input document, a full default cache (10,000 entries) would pin ~16 GB.
    cache = DecisionCache()  # defaults, as the server builds it
    authorizer = Authorizer(
        FakeEngine(
            {"allowed": False, "http_status": 401, "authz": {"reason": "missing_api_key"}},
            record=False,
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


# -- declared keys: a policy names what its decision depends on --------------------------

DECLARED = KeyDeclaration(
    fields=(("credentials",), ("parsed_path",), ("attributes", "request", "http", "method")),
    header_prefixes=("x-authz-",),
)
OTHER_PATH = "authz/other/decision"


def declared_cache(revision: str = "r1") -> DecisionCache:
    """A cache at ``revision`` whose gateway path declares DECLARED (read from it)."""
    cache = DecisionCache()
    cache.observe_revision(revision)
    cache.declare(revision, {PATH: DECLARED})
    return cache


def keyed(cache: DecisionCache, **kwargs: Any) -> bytes:
    """The gateway path's key of ``check_request(**kwargs)``."""
    key = cache.key(PATH, document(check_request(**kwargs)))
    assert key is not None
    return key


def test_a_path_without_a_declaration_keeps_the_exact_input_key() -> None:
    cache = declared_cache()
    request = check_request(headers={"x-api-key": GOOD_KEY, "user-agent": "a"})
    assert cache.key(OTHER_PATH, document(request)) == cache_key(
        OTHER_PATH, document(request), cache.volatile
    )
    # And so it tells apart what the declared path merges.
    other = check_request(headers={"x-api-key": GOOD_KEY, "user-agent": "b"})
    assert cache.key(OTHER_PATH, document(request)) != cache.key(OTHER_PATH, document(other))


def test_without_declarations_every_path_keeps_the_exact_input_key() -> None:
    cache = DecisionCache()
    cache.observe_revision("r1")
    request = check_request(headers={"x-api-key": GOOD_KEY})
    assert cache.key(PATH, document(request)) == cache_key(PATH, document(request), cache.volatile)


@pytest.mark.parametrize(
    "noise",
    [
        {"path": "/api/v1/status?page=2"},
        {"headers": {"x-api-key": GOOD_KEY, "user-agent": "curl/8"}},
        {"headers": {"x-api-key": GOOD_KEY, "x-request-id": "r-9", "traceparent": "00-x"}},
        {"headers": {"x-api-key": GOOD_KEY, "accept": "text/html", "cookie": "c=1"}},
    ],
    ids=["query-string", "user-agent", "request-id-and-trace", "other-headers"],
)
def test_declared_key_merges_requests_that_differ_only_in_undeclared_fields(
    noise: dict[str, Any],
) -> None:
    cache = declared_cache()
    base = keyed(cache, headers={"x-api-key": GOOD_KEY})
    assert keyed(cache, **{"headers": {"x-api-key": GOOD_KEY}, **noise}) == base


@pytest.mark.parametrize(
    "change",
    [
        {"headers": {"x-api-key": "another"}},
        {"headers": {}},
        {"headers": {"x-api-key": GOOD_KEY}, "method": "POST"},
        {"headers": {"x-api-key": GOOD_KEY}, "path": "/api/v1/admin"},
        {"headers": {"x-api-key": GOOD_KEY, "x-authz-role": "admin"}},
        {"headers": {"x-api-key": GOOD_KEY, "X-Authz-Role": "admin"}},
    ],
    ids=["key", "no-key", "method", "path", "prefixed-header", "prefixed-header-any-case"],
)
def test_declared_key_separates_requests_that_differ_in_a_declared_field(
    change: dict[str, Any],
) -> None:
    cache = declared_cache()
    assert keyed(cache, **change) != keyed(cache, headers={"x-api-key": GOOD_KEY})


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"credentials": {}}, {}),  # present but empty vs absent
        ({"credentials": None}, {}),  # null vs absent
        ({"parsed_path": ["a", "b"]}, {"parsed_path": ["a/b"]}),
        ({"parsed_path": ["a\u0000b"]}, {"parsed_path": ["a", "b"]}),
        ({"parsed_path": ['a","b']}, {"parsed_path": ["a", "b"]}),  # JSON-looking value
        (
            {"credentials": {"x": "1"}, "parsed_path": []},
            {"credentials": {}, "parsed_path": ["x", "1"]},
        ),
    ],
    ids=["empty-vs-absent", "null-vs-absent", "segments-vs-slash", "nul", "quotes", "shifted"],
)
def test_hostile_declared_values_never_collide(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert declared_key(PATH, "r1", a, DECLARED) != declared_key(PATH, "r1", b, DECLARED)


def test_declared_and_exact_keys_never_share_a_domain() -> None:
    request = document(check_request(headers={"x-api-key": GOOD_KEY}))
    everything = KeyDeclaration(fields=tuple((name,) for name in request))
    assert declared_key(PATH, "r1", request, everything) != cache_key(PATH, request)


def test_declared_key_names_the_revision_it_was_declared_by() -> None:
    # A decision of bundle r2 (which may read more of the input) put under a key computed
    # with r1's declaration must never be found once r2's declaration is in use.
    request = document(check_request(headers={"x-api-key": GOOD_KEY}))
    assert declared_key(PATH, "r1", request, DECLARED) != declared_key(
        PATH, "r2", request, DECLARED
    )


def test_declarations_of_another_revision_are_not_used() -> None:
    cache = declared_cache("r1")
    cache.observe_revision("r2")  # a new bundle: its declarations are not read yet
    request = check_request(headers={"x-api-key": GOOD_KEY})
    assert cache.declarations == {}
    assert cache.key(PATH, document(request)) == cache_key(PATH, document(request), cache.volatile)
    cache.declare("r2", {PATH: DECLARED})
    assert cache.key(PATH, document(request)) == declared_key(
        PATH, "r2", document(request), DECLARED
    )


def test_changed_declarations_drop_every_entry() -> None:
    cache = declared_cache()
    key = keyed(cache, headers={"x-api-key": GOOD_KEY})
    evaluation = Evaluation(None, {"authz": "r1"})
    allow = Decision(allowed=True, identity={"key_id": "k"})
    cache.put(key, allow, evaluation, "d1", generation=cache.generation)
    assert cache.get(key) is not None
    cache.declare("r1", {PATH: DECLARED})  # the same declarations: kept
    assert cache.get(key) is not None
    narrower = KeyDeclaration(fields=(("credentials",),))
    cache.declare("r1", {PATH: narrower})
    assert len(cache) == 0


@pytest.mark.parametrize(
    "value",
    [
        "not an object",
        {"input": []},
        {"input": "credentials"},
        {"input": [[]]},
        {"input": [[""]]},
        {"input": [[1]]},
        {"input": [["a"] * 17]},
        {"input": [["a"]] * 65},
        {"input": [["a" * 257]]},
        {"input": [["a"]], "header_prefixes": "x-"},
        {"input": [["a"]], "header_prefixes": [""]},
        {"input": [["a"]], "unknown": 1},
    ],
    ids=[
        "not-object",
        "no-fields",
        "fields-not-list",
        "empty-path",
        "empty-name",
        "non-string",
        "too-deep",
        "too-many",
        "name-too-long",
        "prefixes-not-list",
        "empty-prefix",
        "unknown-field",
    ],
)
def test_a_declaration_authz_cannot_use_is_refused(value: Any) -> None:
    declarations, problems = parse_declarations({PATH: value, OTHER_PATH: {"input": [["a"]]}})
    assert list(declarations) == [OTHER_PATH]
    assert len(problems) == 1
    assert PATH in problems[0]


def test_declared_key_drives_cache_hits_through_the_authorizer() -> None:
    cache = declared_cache("rev-test")  # FakeEngine's revision
    authorizer = authorizer_over(cache)

    async def run() -> tuple[Any, Any]:
        first = await authorizer.check(
            check_request(headers={"x-api-key": GOOD_KEY, "user-agent": "a"})
        )
        again = await authorizer.check(
            check_request(
                path="/api/v1/status?x=1", headers={"x-api-key": GOOD_KEY, "user-agent": "b"}
            )
        )
        return first, again

    import asyncio

    first, again = asyncio.run(run())
    assert again.record.cached_from == first.record.decision_id


def test_declarations_are_never_used_without_a_bundle_revision() -> None:
    # OPA serving policy files (no bundle): a policy change announces no new revision, so
    # a declaration read once could outlive the policy it describes.
    cache = DecisionCache()
    cache.observe_revision("")
    cache.declare("", {PATH: DECLARED})
    request = check_request(headers={"x-api-key": GOOD_KEY})
    assert cache.key(PATH, document(request)) == cache_key(PATH, document(request), cache.volatile)


# -- issue 19: the declaration read once per bundle keys exactly as the walk before it --


def _reference_select(document: Any, field: tuple[str, ...]) -> list[Any]:
    """The selection before issue 19, verbatim: the oracle for the compiled one."""
    node = document
    for name in field:
        if not isinstance(node, Mapping) or name not in node:
            return []
        node = node[name]
    return [node]


def _reference_declared_key(
    path: str, revision: str, document: Mapping[str, Any], declaration: KeyDeclaration
) -> bytes:
    selected: list[Any] = [_reference_select(document, field) for field in declaration.fields]
    if declaration.header_prefixes:
        found = _reference_select(document, ("attributes", "request", "http", "headers"))
        headers = found[0] if found and isinstance(found[0], Mapping) else {}
        prefixes = declaration.header_prefixes
        selected.append({k: v for k, v in headers.items() if str(k).lower().startswith(prefixes)})
    canonical = orjson.dumps([revision, path, selected], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(b"\x01" + canonical).digest()


class _DictSubclass(dict[str, Any]):
    pass


def _http(http: Any) -> dict[str, Any]:
    return {"attributes": {"request": {"http": http}}}


_GATEWAY_DECLARED = KeyDeclaration(
    fields=(
        ("credentials",),
        ("preview",),
        ("parsed_path",),
        ("attributes", "request", "http", "method"),
        ("attributes", "request", "http", "headers", "authorization"),
    ),
    header_prefixes=("x-authz-",),
)
_KEY_DECLARATIONS = [
    pytest.param(_GATEWAY_DECLARED, id="gateway"),
    pytest.param(DECLARED, id="three-fields-and-prefix"),
    pytest.param(
        KeyDeclaration(fields=(("attributes", "request", "http", "headers", "x-sandbox-id"),)),
        id="deep-field-no-prefix",
    ),
    pytest.param(
        KeyDeclaration(fields=(("parsed_path", "0"),), header_prefixes=("x-a", "X-B")),
        id="into-a-list-and-two-prefixes",
    ),
]
_KEY_DOCUMENTS = [
    pytest.param(
        document(
            check_request(
                path="/api/v1/items/1?x=1",
                headers={
                    "x-api-key": GOOD_KEY,
                    "authorization": "Bearer t",
                    "x-authz-role": "admin",
                    "X-Authz-Tier": "gold",
                    "x-a1": "1",
                    "user-agent": "curl/8",
                },
            )
        ),
        id="gateway-request",
    ),
    pytest.param({}, id="empty"),
    pytest.param(
        {"credentials": None, "preview": False, "parsed_path": []}, id="nulls-and-empties"
    ),
    pytest.param({"attributes": None}, id="attributes-null"),
    pytest.param({"attributes": []}, id="attributes-a-list"),
    pytest.param({"attributes": "s"}, id="attributes-a-string"),
    pytest.param(_http({"method": "GET"}), id="no-headers"),
    pytest.param(_http({"headers": ["x-authz-role", "a"]}), id="headers-a-list"),
    pytest.param(_http({"headers": "x-authz-role"}), id="headers-a-string"),
    pytest.param(_http({"headers": None, "method": None}), id="headers-null"),
    pytest.param(
        _http(MappingProxyType({"headers": MappingProxyType({"x-authz-a": "1", "b": "2"})})),
        id="read-only-mappings",
    ),
    pytest.param(
        _http(_DictSubclass(headers=OrderedDict([("x-authz-z", "1"), ("X-AUTHZ-A", "2")]))),
        id="dict-subclasses",
    ),
    pytest.param(_http({"headers": {1: "int-key", "x-authz-n": 2.5}}), id="odd-header-types"),
    pytest.param(
        {"parsed_path": {"0": "zero"}, "credentials": {"x-api-key": "ü"}}, id="path-an-object"
    ),
    pytest.param({"parsed_path": ["a", "b"]}, id="path-a-list"),
]


@pytest.mark.parametrize("document_", _KEY_DOCUMENTS)
@pytest.mark.parametrize("declaration", _KEY_DECLARATIONS)
def test_declared_key_bytes_equal_the_uncompiled_walk(
    declaration: KeyDeclaration, document_: Mapping[str, Any]
) -> None:
    expected = _reference_declared_key(PATH, "r1", document_, declaration)
    assert declared_key(PATH, "r1", document_, declaration) == expected
    cache = DecisionCache()
    cache.observe_revision("r1")
    cache.declare("r1", {PATH: declaration})
    assert cache.key(PATH, document_) == expected


# -- response prototypes (issue 19) -----------------------------------------------------

_ALLOW = Decision(
    allowed=True,
    headers=(("x-authz-key-id", "k1"),),
    request_headers_to_remove=("x-api-key",),
    dynamic_metadata=MappingProxyType({"key_id": "k1"}),
    identity=MappingProxyType({"key_id": "k1"}),
)


def _prototyping_cache(**kwargs: Any) -> DecisionCache:
    cache = DecisionCache(confirm_s=3600, jitter=0, clock=ManualClock(100.0), **kwargs)
    cache.observe_revision("r1")
    return cache


def _put_decision(cache: DecisionCache, k: object, decision: Decision = _ALLOW) -> None:
    evaluation = Evaluation({"allowed": decision.allowed}, {"b": "r1"})
    cache.put(as_key(k), decision, evaluation, "d1", generation=cache.generation)


def test_a_prototype_is_built_once_at_the_first_ask_and_counted_in_the_entry_size() -> None:
    cache = _prototyping_cache()
    _put_decision(cache, "k")
    entry = cache.get(as_key("k"))
    assert entry is not None
    assert entry.prototype is None
    assert not entry.prototyped
    size, total = entry.size, cache.bytes
    prototype = cache.prototype(as_key("k"), entry)
    assert prototype is not None
    assert prototype.message == response_prototype(_ALLOW).message  # type: ignore[union-attr]
    again = cache.get(as_key("k"))
    assert again is not None
    assert again.prototype is prototype
    assert again.prototyped
    assert again.size == size + prototype.size
    assert cache.bytes == total + prototype.size
    assert cache.prototype(as_key("k"), again) is prototype  # not built again
    assert again.decision is entry.decision
    assert again.expires_at == entry.expires_at


@pytest.mark.parametrize(
    "decision",
    [
        Decision(allowed=False, identity=MappingProxyType({"key_id": "k1"})),
        Decision(
            allowed=True,
            dynamic_metadata=MappingProxyType({"nested": {"a": 1}}),
            identity=MappingProxyType({"key_id": "k1"}),
        ),
    ],
    ids=["deny", "nested-metadata"],
)
def test_a_decision_without_a_prototype_is_asked_once_and_costs_nothing(
    decision: Decision,
) -> None:
    cache = _prototyping_cache()
    _put_decision(cache, "k", decision)
    entry = cache.get(as_key("k"))
    assert entry is not None
    total = cache.bytes
    assert cache.prototype(as_key("k"), entry) is None
    again = cache.get(as_key("k"))
    assert again is not None
    assert again.prototyped
    assert again.prototype is None
    assert cache.bytes == total == again.size


def test_a_prototype_that_would_not_fit_is_not_kept() -> None:
    probe = _prototyping_cache()
    _put_decision(probe, "k")
    size = probe.bytes
    cache = _prototyping_cache(max_bytes=size)  # the entry fits, with its prototype not
    _put_decision(cache, "k")
    entry = cache.get(as_key("k"))
    assert entry is not None
    assert cache.prototype(as_key("k"), entry) is None
    assert cache.bytes == size
    assert len(cache) == 1


def test_a_prototype_makes_room_by_dropping_the_least_recently_used() -> None:
    probe = _prototyping_cache()
    _put_decision(probe, "k")
    size = probe.bytes
    entry = probe.get(as_key("k"))
    assert entry is not None
    prototype = probe.prototype(as_key("k"), entry)
    assert prototype is not None
    # Room for three entries without prototypes; one prototype needs one entry's room
    # or more.
    cache = _prototyping_cache(max_bytes=3 * size)
    for k in ("a", "b", "c"):
        _put_decision(cache, k)
    assert len(cache) == 3
    hit = cache.get(as_key("c"))
    assert hit is not None
    assert cache.prototype(as_key("c"), hit) is not None
    assert cache.bytes <= cache.max_bytes
    assert cache.get(as_key("a")) is None  # the least recently used went first
    assert cache.get(as_key("c")) is not None
    assert cache.bytes == sum(e.size for e in cache._entries.values())


def test_a_prototype_is_not_built_for_an_entry_the_key_no_longer_holds() -> None:
    cache = _prototyping_cache()
    _put_decision(cache, "k")
    entry = cache.get(as_key("k"))
    assert entry is not None
    cache.clear("test")
    assert cache.prototype(as_key("k"), entry) is None
    assert cache.bytes == 0
    assert len(cache) == 0


# -- entry size (issue 19): the cheaper walk sums the same ------------------------------


def _reference_footprint(value: Any) -> int:
    """_footprint before issue 19, verbatim."""
    total, stack = 0, [value]
    while stack:
        node = stack.pop()
        total += sys.getsizeof(node)
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return total


class _HashableDict(dict):  # type: ignore[type-arg]
    """A dict that can be a key (walked into as a key all the same)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return 1


class _HashableList(list):  # type: ignore[type-arg]
    def __hash__(self) -> int:  # type: ignore[override]
        return 2


class _Str(str):
    __slots__ = ()


def _deep(levels: int) -> Any:
    value: Any = "leaf"
    for i in range(levels):
        value = {"k": value} if i % 2 else [value]
    return value


_FOOTPRINT_CORPUS = [
    pytest.param(True, id="boolean"),
    pytest.param(None, id="null"),
    pytest.param(
        {
            "allowed": True,
            "authz": {
                "reason": "allowed",
                "rate_limit": {"tier": "standard", "key": "key:k1", "requests_per_minute": 600},
                "identity": {"key_id": "k1", "role": "reader", "tier": "standard"},
            },
            "headers": {"x-authz-key-id": "k1"},
            "request_headers_to_remove": ["authorization", "x-api-key"],
            "dynamic_metadata": {"key_id": "k1", "n": 1.5, "b": False, "z": None, "big": 2**70},
        },
        id="gateway-allow",
    ),
    pytest.param(
        {"allowed": False, "http_status": 429, "body": "ü" * 100, "headers": [{"a": ["1", "2"]}]},
        id="deny-non-ascii-lists",
    ),
    pytest.param({"l": [[], [[]], {}, [{"a": [1, "2", 3.0, None, True]}]]}, id="nested-empties"),
    pytest.param(
        OrderedDict([("a", OrderedDict([("b", [1])])), ("c", MappingProxyType({"d": 1}))]),
        id="dict-subclasses-and-a-mapping",
    ),
    pytest.param(
        {_Str("key"): _Str("value"), 7: 8, (1, 2): (3, 4), 1.5: b"bytes"}, id="odd-keys-values"
    ),
    pytest.param(
        {_HashableDict(a=[1, 2], b="x"): "v", _HashableList([1, "x"]): [_HashableList([2])]},
        id="container-keys",
    ),
    pytest.param([_HashableDict(x=_HashableList([1, {"y": 2}]))], id="container-subclasses"),
    pytest.param(_deep(5000), id="5000-deep"),
    pytest.param({f"k{i}": "v" * i for i in range(300)}, id="wide"),
]


@pytest.mark.parametrize("result", _FOOTPRINT_CORPUS)
def test_entry_size_equals_the_walk_before_issue_19(result: Any) -> None:
    evaluation = Evaluation(result, {"authz": "rev-1", "other": "ü"})
    key = b"k" * 64
    expected = (
        ENTRY_OVERHEAD
        + len(key)
        + 2 * _reference_footprint(result)
        + _reference_footprint(dict(evaluation.revisions))
    )
    assert entry_size(key, evaluation) == expected
