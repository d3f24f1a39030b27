"""Generated hostile CheckRequests against the shipped policy on a real OPA.

Hypothesis writes the requests (methods, paths with every kind of encoding, header maps of
any shape, bodies of any content type); the pipeline is the production one
(``server.build_authorizer`` over ``OpaClient``), the policy is ``policy/`` as shipped with
one API key and one sandbox overlaid, and both decision paths are configured to fail open.
Whatever a client sends, these hold:

- ``Authorizer.check`` always returns a CheckResponse (it never raises);
- nothing is allowed without the valid credential, and OPA being up, nothing fails open;
- client-side garbage is a 4xx deny, never a 5xx;
- an allow never forwards a credential header the client sent (it is removed, or replaced
  by the one the decision injects).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.core.authorizer import Authorizer
from authz.core.headers import CREDENTIAL_HEADERS
from authz.core.opa import OpaClient
from authz.core.secret import Secret
from authz.runtime.config import load
from authz.runtime.server import build_authorizer
from authz.tools.keys import digest
from tests.helpers.fakes import check_request
from tests.helpers.opa_server import running_opa

GATEWAY = "authz/gateway/decision"
EGRESS = "authz/egress/decision"
API_KEY = "ak_fuzz_" + "k" * 40
SANDBOX_ID, SANDBOX_TOKEN = "sb-fuzz", "st_fuzz_" + "t" * 40
SERVICES = ("httpbin", "openai", "anthropic", "github", "slack")
EXAMPLES = 300
# A method and path the policy allows on each service (and on the gateway) for the
# credential above.
ALLOWED = {
    "httpbin": ("GET", "/get"),
    "openai": ("GET", "/v1/models"),
    "anthropic": ("POST", "/v1/messages"),
    "github": ("GET", "/user"),
    "slack": ("POST", "/api/chat.postMessage"),
}


class _AllSecrets:
    """Every credential reference resolves (a missing secret is not what is tested)."""

    def get(self, ref: str) -> Secret:
        return Secret(f"secret-of-{ref}")


@pytest.fixture(scope="module")
def opa_url(
    opa_bin: str, repo_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """OPA serving the shipped ``policy/`` with one key and one sandbox overlaid."""
    base = tmp_path_factory.mktemp("hostile")
    overlay = {
        "gateway": {
            "api_keys": {
                digest(API_KEY): {
                    "id": "key-fuzz",
                    "role": "admin",
                    "rate_limit_tier": "unlimited",
                    "enabled": True,
                }
            }
        },
        "egress": {
            "sandboxes": {
                SANDBOX_ID: {
                    "token_sha256": digest(SANDBOX_TOKEN),
                    "tier": "admin",
                    "enabled": True,
                }
            }
        },
    }
    (base / "data.json").write_text(json.dumps(overlay), encoding="utf-8")
    with running_opa(
        opa_bin, str(repo_root / "policy"), str(base / "data.json"), log_path=base / "opa.log"
    ) as url:
        yield url


@pytest.fixture(scope="module")
def authorizer_and_loop(opa_url: str) -> Iterator[tuple[Authorizer, asyncio.AbstractEventLoop]]:
    """The production pipeline over the real OPA, on a loop of its own (Hypothesis runs
    each example synchronously)."""
    loop = asyncio.new_event_loop()
    settings_ = load({"AUTHZ_FAIL_OPEN_PATHS": f"{GATEWAY},{EGRESS}", "AUTHZ_OPA_URL": opa_url})

    async def connect() -> OpaClient:  # aiohttp binds its pool to the running loop
        return OpaClient(opa_url)

    engine = loop.run_until_complete(connect())
    authorizer = build_authorizer(settings_, engine, sinks=(), credentials=_AllSecrets())
    yield authorizer, loop
    loop.run_until_complete(engine.close())
    loop.close()


_TOKEN_CHARS = st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_.!#$%&'*+^`|~")
_header_names = st.one_of(
    st.sampled_from(
        [
            *CREDENTIAL_HEADERS,
            "x-sandbox-id",
            "content-type",
            "content-length",
            "host",
            "x-forwarded-for",
            "x-envoy-auth-partial-body",
            "x-authz-role",
            "transfer-encoding",
        ]
    ),
    st.text(_TOKEN_CHARS, min_size=1, max_size=20),
    st.text(min_size=1, max_size=8),
)
_header_values = st.one_of(
    st.text(max_size=64),
    st.sampled_from(
        [
            API_KEY,
            f"Bearer {API_KEY}",
            f" {API_KEY}\u00a0",
            SANDBOX_TOKEN,
            SANDBOX_ID,
            "application/json",
            "multipart/form-data; boundary=b",
            "application/x-www-form-urlencoded",
            "-1",
            "99999999999999999999",
            "true",
        ]
    ),
)
_paths = st.one_of(
    st.sampled_from(
        [
            "/api/v1/items",
            "/api/v1/admin/users",
            "/api/v1/admin;x/users",
            "/api/v1/admin%2fusers",
            "/api/v1/%61dmin/users",
            "/v1/models",
            "/repos/o/r/hooks",
            "/api/v1/items?a=%zz",
            "/api/v1/items?a=1;b=2",
            "//api/v1/../v1/admin/users",
            "/%",
            "*",
            "",
        ]
    ),
    st.text(max_size=40).map(lambda s: "/" + s),
)
_bodies = st.one_of(
    st.just(""),
    st.text(max_size=200),
    st.sampled_from(
        [
            '{"a":' * 300 + "1" + "}" * 300,
            "[" * 400 + "]" * 400,
            "a=1&" * 500,
            '--b\r\nContent-Disposition: form-data; name="x"\r\n\r\nv\r\n--b--\r\n',
            "--b\r\n" * 300,
            "\x00\xff",
        ]
    ),
)


@st.composite
def hostile_requests(draw: st.DrawFn) -> tuple[external_auth_pb2.CheckRequest, bool]:
    """``(request, carries the valid credential for its path)``. Half the requests carry
    the valid credential, and half of those a method and path the policy allows, so
    allows (and what they forward) are exercised too."""
    egress = draw(st.booleans())
    headers = draw(st.dictionaries(_header_names.map(str.lower), _header_values, max_size=12))
    headers = {k: v for k, v in headers.items() if not k.startswith(":")}
    extensions = {"decision_path": GATEWAY}
    if egress:
        extensions = {"decision_path": EGRESS, "service": draw(st.sampled_from(SERVICES))}
    if draw(st.booleans()):
        if egress:
            headers.update({"x-sandbox-id": SANDBOX_ID, "x-sandbox-token": SANDBOX_TOKEN})
        else:
            headers["x-api-key"] = API_KEY
    method = draw(st.sampled_from(["GET", "POST", "PATCH", "DELETE", "PUT", "get", "FOO", ""]))
    path = draw(_paths)
    if draw(st.booleans()):
        service = extensions.get("service", "")
        method, path = ALLOWED.get(service, ("GET", "/api/v1/items"))
    request = check_request(
        method=method,
        path=path,
        headers=headers,
        body=draw(_bodies),
        context_extensions=extensions,
    )
    if egress:
        valid = (headers.get("x-sandbox-id"), headers.get("x-sandbox-token")) == (
            SANDBOX_ID,
            SANDBOX_TOKEN,
        )
    else:
        valid = headers.get("x-api-key") == API_KEY or (
            "x-api-key" not in headers and headers.get("authorization") == f"Bearer {API_KEY}"
        )
    return request, valid


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples every run: CI never flakes on a new draw
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=hostile_requests())
def test_generated_requests_never_allow_without_a_credential_never_5xx_never_leak(
    authorizer_and_loop: tuple[Authorizer, asyncio.AbstractEventLoop],
    case: tuple[external_auth_pb2.CheckRequest, bool],
) -> None:
    authorizer, loop = authorizer_and_loop
    request, valid = case
    outcome = loop.run_until_complete(authorizer.check(request, time_remaining_s=5.0))
    record = outcome.record
    assert not record.fail_open, f"failed open with OPA up: {record.error}"
    if outcome.response.HasField("ok_response"):
        assert valid, f"allowed without the valid credential: {record.reason}"
        ok = outcome.response.ok_response
        removed = set(ok.headers_to_remove)
        injected = {option.header.key.lower() for option in ok.headers}
        sent = set(request.attributes.request.http.headers)
        leaked = {h for h in CREDENTIAL_HEADERS if h in sent and h not in removed | injected}
        assert not leaked, f"an allow forwards the client's credential headers {leaked}"
    else:
        status = outcome.response.denied_response.status.code
        assert 400 <= status < 500, f"{status} for client input: {record.reason} {record.error}"
