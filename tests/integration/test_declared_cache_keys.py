"""The shipped policies' declared cache keys (docs/contract.md, "Declared cache keys")
never merge requests the policy decides differently.

The bundle is built from the repository's policy/ by scripts/build-policy-bundle with
test keys and sandboxes as a data overlay, served by a real OPA, with one TTL override
pushed to ``data.overrides`` as authz pushes them. The declarations are read from the
bundle (``data.authz.meta.cache_keys``) as authz reads them.

For each policy a table of requests varies what the policy decides on (credentials,
method, path, spelling of the path, forged identity headers, preview, service, host) and
also what it must not depend on (request ids, user agents, trace headers, query strings,
other headers, source address, scheme). Each request's input is then crossed with every
other: ``graft(a, b)`` is input ``b`` with the declared fields of ``a`` copied in, so it
shares ``a``'s declared key and takes everything undeclared from ``b``. Every graft must
get ``a``'s decision from OPA. And the corpus is strong enough to notice a field left out:
dropping any one declared field (or the header prefixes) from the declaration makes some
graft decide differently (``test_every_declared_field_is_needed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from authz.core.cache import HEADERS_PATH, KeyDeclaration, declared_key, parse_declarations
from authz.core.input import build_input
from authz.core.opa import OpaClient
from authz.runtime.config import DEFAULT_CREDENTIAL_HEADERS, load
from authz.runtime.preview import PreviewRequest, preview_input
from authz.runtime.server import build_runtime
from authz.tools.launch import free_port
from tests.helpers.fakes import check_request
from tests.helpers.opa_server import running_opa

GATEWAY = "authz/gateway/decision"
EGRESS = "authz/egress/decision"
REVISION = "declared-keys-test"
KEYS = {
    "admin": {"id": "k-admin", "enabled": True, "role": "admin", "rate_limit_tier": "premium"},
    "user": {"id": "k-user", "enabled": True, "role": "user", "rate_limit_tier": "standard"},
    "viewer": {"id": "k-viewer", "enabled": True, "role": "viewer", "rate_limit_tier": "default"},
    "off": {"id": "k-off", "enabled": False, "role": "user", "rate_limit_tier": "default"},
}
SANDBOXES = {
    "sb-premium": {"tier": "premium", "enabled": True},
    "sb-restricted": {"tier": "restricted", "enabled": True},
    "sb-off": {"tier": "standard", "enabled": False},
}
# A deny override for the user key on one path, as authz's admin API pushes it.
OVERRIDES = {
    "o-1": {
        "id": "o-1",
        "decision_path": GATEWAY,
        "effect": "deny",
        "match": {"key_id": "k-user", "path": "/api/v1/items/7", "methods": ["GET"]},
        "reason": "test",
        "actor": "test",
        "created_at": 0,
        "expires_at": "2200-01-01T00:00:00Z",
        "expires_at_ns": 7258118400000000000,
    },
    "o-2": {
        "id": "o-2",
        "decision_path": EGRESS,
        "effect": "allow",
        "match": {"sandbox_id": "sb-restricted", "service": "openai", "path": "/v1/models"},
        "reason": "test",
        "actor": "test",
        "created_at": 0,
        "expires_at": "2200-01-01T00:00:00Z",
        "expires_at_ns": 7258118400000000000,
    },
}

# What each request varies beyond the policy's own inputs: noise the key must ignore.
NOISE: Sequence[dict[str, str]] = (
    {"x-request-id": "r-1", "user-agent": "curl/8.0"},
    {
        "x-request-id": "r-2",
        "user-agent": "Mozilla/5.0",
        "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
    },
    {"x-b3-traceid": "c" * 32, "accept": "application/json", "x-forwarded-for": "10.9.9.9"},
    {"cookie": "session=1", "x-custom": "anything", "accept-language": "de"},
)
QUERIES = ("", "?page=2", "?q=a&q=b&debug=1", "?admin=true")


def _secret(name: str) -> str:
    return f"test-secret-{name}-0123456789abcdef"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# (label, method, path, headers): the policy's inputs the key must keep apart.
GATEWAY_REQUESTS: Sequence[tuple[str, str, str, dict[str, str]]] = (
    ("admin reads admin", "GET", "/api/v1/admin/users", {"x-api-key": _secret("admin")}),
    ("user reads admin", "GET", "/api/v1/admin/users", {"x-api-key": _secret("user")}),
    ("user reads an item", "GET", "/api/v1/items/1", {"x-api-key": _secret("user")}),
    ("user reads the overridden item", "GET", "/api/v1/items/7", {"x-api-key": _secret("user")}),
    ("user deletes an item", "DELETE", "/api/v1/items/1", {"x-api-key": _secret("user")}),
    ("viewer deletes an item", "DELETE", "/api/v1/items/1", {"x-api-key": _secret("viewer")}),
    ("viewer reads an item", "get", "/api/v1/items/1", {"x-api-key": _secret("viewer")}),
    ("admin, suffixed spelling", "GET", "/api/v1/Admin.json", {"x-api-key": _secret("user")}),
    ("dot segment", "GET", "/api/v1/items/%2e%2e/admin", {"x-api-key": _secret("user")}),
    ("path parameter", "GET", "/api/v1/admin;x/users", {"x-api-key": _secret("user")}),
    ("outside the API", "GET", "/other", {"x-api-key": _secret("admin")}),
    ("status", "HEAD", "/api/v1/status", {"x-api-key": _secret("viewer")}),
    ("disabled key", "GET", "/api/v1/items/1", {"x-api-key": _secret("off")}),
    ("unknown key", "GET", "/api/v1/items/1", {"x-api-key": _secret("nobody")}),
    ("no key", "GET", "/api/v1/items/1", {}),
    ("bearer", "GET", "/api/v1/items/1", {"authorization": "Bearer " + _secret("admin")}),
    ("basic scheme", "GET", "/api/v1/items/1", {"authorization": "Basic " + _secret("admin")}),
    (
        "forged identity",
        "GET",
        "/api/v1/items/1",
        {"x-api-key": _secret("user"), "x-authz-role": "admin"},
    ),
    (
        "forged other",
        "GET",
        "/api/v1/items/1",
        {"x-api-key": _secret("user"), "x-authz-Tenant": "t"},
    ),
    ("cookie credential", "GET", "/api/v1/items/1", {"x-api-key": _secret("user"), "cookie": "c"}),
)

EGRESS_REQUESTS: Sequence[tuple[str, str, str, dict[str, str]]] = (
    ("premium openai", "POST", "/v1/chat/completions", {"@service": "openai"}),
    ("premium slack", "POST", "/api/chat.postMessage", {"@service": "slack"}),
    ("premium github denied", "GET", "/repos/o/r/keys", {"@service": "github"}),
    ("premium github write", "PATCH", "/repos/o/r/issues/1", {"@service": "github"}),
    ("premium github repo write", "POST", "/repos/o/r", {"@service": "github"}),
    ("premium unknown service", "GET", "/x", {"@service": "nope"}),
    ("restricted openai", "GET", "/v1/models", {"@service": "openai", "@sandbox": "sb-restricted"}),
    ("restricted httpbin", "GET", "/get", {"@service": "httpbin", "@sandbox": "sb-restricted"}),
    ("restricted httpbin put", "PUT", "/get", {"@service": "httpbin", "@sandbox": "sb-restricted"}),
    ("by host", "GET", "/get", {"@host": "httpbin", "@sandbox": "sb-restricted"}),
    ("by host, other", "GET", "/get", {"@host": "openai", "@sandbox": "sb-restricted"}),
    ("disabled", "GET", "/get", {"@service": "httpbin", "@sandbox": "sb-off"}),
    ("unknown sandbox", "GET", "/get", {"@service": "httpbin", "@sandbox": "sb-nope"}),
    ("no token", "GET", "/get", {"@service": "httpbin", "@sandbox": "sb-restricted", "@token": ""}),
    (
        "wrong token",
        "GET",
        "/get",
        {"@service": "httpbin", "@sandbox": "sb-restricted", "@token": "x"},
    ),
    ("no sandbox", "GET", "/get", {"@service": "httpbin", "@sandbox": ""}),
    ("bad path", "GET", "/anything/%2e%2e", {"@service": "httpbin"}),
    ("sandbox header", "GET", "/get", {"@service": "httpbin", "x-sandbox-extra": "1"}),
    ("authz header", "GET", "/get", {"@service": "httpbin", "x-authz-key-id": "k"}),
)


def gateway_inputs() -> list[tuple[str, dict[str, Any]]]:
    inputs = []
    for i, (label, method, path, headers) in enumerate(GATEWAY_REQUESTS):
        noise = NOISE[i % len(NOISE)]
        request = check_request(
            method=method, path=path + QUERIES[i % len(QUERIES)], headers={**noise, **headers}
        )
        inputs.append((label, build_input(request, DEFAULT_CREDENTIAL_HEADERS)))
    for key in ("admin", "viewer", "nobody"):
        preview = PreviewRequest(
            identity=("key_id", f"k-{key}"),
            method="POST",
            path="/api/v1/admin/users",
            decision_path=GATEWAY,
        )
        inputs.append((f"preview {key}", preview_input(preview, DEFAULT_CREDENTIAL_HEADERS)))
    return inputs


def egress_inputs() -> list[tuple[str, dict[str, Any]]]:
    inputs = []
    for i, (label, method, path, spec) in enumerate(EGRESS_REQUESTS):
        sandbox = spec.get("@sandbox", "sb-premium")
        token = spec.get("@token", _secret(sandbox))
        headers = {k: v for k, v in spec.items() if not k.startswith("@")}
        if sandbox:
            headers["x-sandbox-id"] = sandbox
        if token:
            headers["x-sandbox-token"] = token
        if "@host" in spec:
            headers[":authority"] = spec["@host"] + ":443"
        extensions = {"decision_path": EGRESS}
        if "@service" in spec:
            extensions["service"] = spec["@service"]
        noise = NOISE[i % len(NOISE)]
        request = check_request(
            method=method,
            path=path + QUERIES[i % len(QUERIES)],
            headers={**noise, **headers},
            context_extensions=extensions,
        )
        if "@host" in spec:
            request.attributes.request.http.host = spec["@host"] + ":443"
        else:
            request.attributes.request.http.host = f"egress-{i}"
        inputs.append((label, build_input(request, DEFAULT_CREDENTIAL_HEADERS)))
    preview = PreviewRequest(
        identity=("sandbox_id", "sb-premium"),
        method="GET",
        path="/v1/models",
        service="openai",
        decision_path=EGRESS,
    )
    inputs.append(("preview", preview_input(preview, DEFAULT_CREDENTIAL_HEADERS)))
    return inputs


def _set(document: dict[str, Any], field: tuple[str, ...], found: list[Any]) -> None:
    """Put ``found`` (``[value]`` or ``[]`` for absent) at ``field`` of ``document``."""
    node = document
    for name in field[:-1]:
        child = node.get(name)
        if not isinstance(child, dict):
            if not found:
                return
            child = node[name] = {}
        node = child
    if found:
        node[field[-1]] = copy.deepcopy(found[0])
    else:
        node.pop(field[-1], None)


def _get(document: dict[str, Any], field: tuple[str, ...]) -> list[Any]:
    node: Any = document
    for name in field:
        if not isinstance(node, dict) or name not in node:
            return []
        node = node[name]
    return [node]


def graft(a: dict[str, Any], b: dict[str, Any], declaration: KeyDeclaration) -> dict[str, Any]:
    """Input ``b`` with ``a``'s declared fields (and prefixed headers): ``a``'s key."""
    out = copy.deepcopy(b)
    for field in declaration.fields:
        _set(out, field, _get(a, field))
    if declaration.header_prefixes:
        prefixes = declaration.header_prefixes
        (a_headers,) = _get(a, HEADERS_PATH) or [{}]
        (out_headers,) = _get(out, HEADERS_PATH) or [{}]
        kept = {k: v for k, v in out_headers.items() if not k.lower().startswith(prefixes)}
        kept.update({k: v for k, v in a_headers.items() if k.lower().startswith(prefixes)})
        _set(out, HEADERS_PATH, [kept])
    return out


def comparable(result: Any) -> Any:
    """OPA's decision without the TTL hint (it counts down with the clock, not the input;
    the cache caps an entry's life by it)."""
    result = copy.deepcopy(result)
    if isinstance(result, dict) and isinstance(result.get("authz"), dict):
        result["authz"].pop("cache_ttl_s", None)
    return result


@pytest.fixture(scope="module")
def opa_url(
    repo_root: Path, opa_bin: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    base = tmp_path_factory.mktemp("declared")
    overlay = base / "overlay"
    (overlay / "gateway" / "api_keys").mkdir(parents=True)
    (overlay / "egress" / "sandboxes").mkdir(parents=True)
    keys = {_digest(_secret(name)): entry for name, entry in KEYS.items()}
    (overlay / "gateway" / "api_keys" / "data.json").write_text(json.dumps(keys))
    sandboxes = {
        name: {**entry, "token_sha256": _digest(_secret(name))} for name, entry in SANDBOXES.items()
    }
    (overlay / "egress" / "sandboxes" / "data.json").write_text(json.dumps(sandboxes))
    built = subprocess.run(
        [
            str(repo_root / "scripts/build-policy-bundle"),
            "--data",
            str(overlay),
            "--out",
            str(base),
            "--name",
            "declared",
            "--revision",
            REVISION,
            "--skip-tests",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    with running_opa(
        opa_bin,
        "--bundle",
        str(base / "declared.tar.gz"),
        log_path=base / "opa.log",
        ready_path="/health?bundles",
    ) as url:
        yield url


async def _declarations(client: OpaClient) -> dict[str, KeyDeclaration]:
    evaluation = await client.evaluate("authz/meta/cache_keys", {}, 10.0)
    declarations, problems = parse_declarations(evaluation.result)
    assert problems == []
    assert evaluation.revision == REVISION
    return declarations


async def _mismatches(
    client: OpaClient,
    path: str,
    inputs: list[tuple[str, dict[str, Any]]],
    declaration: KeyDeclaration,
) -> list[str]:
    """Every graft whose decision differs from its donor's: ``"a <- b"`` labels."""
    decided = [comparable((await client.evaluate(path, doc, 10.0)).result) for _, doc in inputs]
    mismatches = []
    for i, (label_a, a) in enumerate(inputs):
        key = declared_key(path, REVISION, a, declaration)
        grafts = [graft(a, b, declaration) for _, b in inputs]
        results = await asyncio.gather(*(client.evaluate(path, g, 10.0) for g in grafts))
        for (label_b, _), g, result in zip(inputs, grafts, results, strict=True):
            assert declared_key(path, REVISION, g, declaration) == key
            if comparable(result.result) != decided[i]:
                mismatches.append(f"{label_a} <- {label_b}")
    return mismatches


@pytest.fixture
async def client(opa_url: str) -> Any:
    opa = OpaClient(opa_url)
    await opa.put_data("overrides", OVERRIDES, 10.0)
    yield opa
    await opa.close()


CASES = [(GATEWAY, gateway_inputs), (EGRESS, egress_inputs)]


@pytest.mark.parametrize(("path", "inputs"), CASES, ids=["gateway", "egress"])
async def test_declared_key_never_merges_requests_the_policy_decides_differently(
    client: OpaClient, path: str, inputs: Any
) -> None:
    declaration = (await _declarations(client))[path]
    corpus = inputs()
    decisions = {
        json.dumps(comparable((await client.evaluate(path, doc, 10.0)).result), sort_keys=True)
        for _, doc in corpus
    }
    assert len(decisions) >= 8, "the corpus must reach many different decisions"
    assert await _mismatches(client, path, corpus, declaration) == []


def _weakened(declaration: KeyDeclaration) -> Iterator[tuple[str, KeyDeclaration]]:
    for i, field in enumerate(declaration.fields):
        rest = declaration.fields[:i] + declaration.fields[i + 1 :]
        yield "/".join(field), replace(declaration, fields=rest)
    if declaration.header_prefixes:
        yield "header_prefixes", replace(declaration, header_prefixes=())


# A declared field also covered by another one: leaving it out alone changes nothing.
# The egress policy reads its id header by a name from data (x-sandbox-id), which the
# x-sandbox- prefix covers too; the field keeps the key right if the data renames it.
REDUNDANT = {(EGRESS, "attributes/request/http/headers/x-sandbox-id")}


@pytest.mark.parametrize(("path", "inputs"), CASES, ids=["gateway", "egress"])
async def test_every_declared_field_is_needed(client: OpaClient, path: str, inputs: Any) -> None:
    declaration = (await _declarations(client))[path]
    corpus = inputs()
    unnoticed = []
    for name, weaker in _weakened(declaration):
        if (path, name) in REDUNDANT:
            continue
        if not await _mismatches(client, path, corpus, weaker):
            unnoticed.append(name)
    assert unnoticed == [], "declared fields whose omission no graft notices"


async def test_the_server_keys_its_cache_on_the_bundles_declarations(
    opa_url: str, tmp_path: Path
) -> None:
    """Wiring: build_runtime's bundle watcher hands the declarations to the decision
    cache, so requests that differ only in undeclared fields share one decision, and a
    declared field still tells them apart."""
    settings = load(
        {
            "AUTHZ_OPA_URL": opa_url,
            "AUTHZ_GRPC_ADDR": f"127.0.0.1:{free_port()}",
            "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
            "AUTHZ_AUDIT_DB": "",
            "AUTHZ_DECISION_LOG": "false",
        }
    )
    async with contextlib.AsyncExitStack() as stack:
        runtime = await build_runtime(settings, stack)
        await runtime.watcher.poll_once()
        authorizer = runtime.live.authorizer
        assert authorizer is not None
        key = {"x-api-key": _secret("user")}

        async def check(path: str, **headers: str) -> Any:
            return await authorizer.check(check_request(path=path, headers={**key, **headers}))

        for _ in range(50):  # the background watcher may be first to read them
            first = await check("/api/v1/items/1?a=1", **{"user-agent": "a", "x-request-id": "1"})
            again = await check("/api/v1/items/1?b=2", **{"user-agent": "b", "x-request-id": "2"})
            if again.record.cached_from is not None:
                break
            await asyncio.sleep(0.05)
        # A round whose `first` was itself a hit (the cache filled after the previous
        # round's `again` missed) shares that decision: the one both came from.
        assert again.record.cached_from == (first.record.cached_from or first.record.decision_id)
        other = await check("/api/v1/items/2?a=1", **{"user-agent": "a", "x-request-id": "3"})
        assert other.record.cached_from is None
