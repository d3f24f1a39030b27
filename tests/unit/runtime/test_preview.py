"""The admin preview: request validation, the input it builds, the answer."""

from __future__ import annotations

from typing import Any

import pytest

from authz.core.errors import AdminRequestError, OpaTimeout, RequestError, UndefinedDecision
from authz.runtime.preview import (
    EGRESS_DECISION_PATH,
    PreviewRequest,
    parse_preview_request,
    preview,
    preview_input,
)
from tests.helpers.fakes import FakeEngine

GATEWAY = "authz/gateway/decision"
CREDENTIAL_HEADERS = ("x-api-key", "authorization", "x-sandbox-token")


def parse(body: Any) -> PreviewRequest:
    return parse_preview_request(body, default_decision_path=GATEWAY)


def test_key_defaults() -> None:
    request = parse({"key_id": "key-demo-user", "path": "/api/v1/items"})
    assert request == PreviewRequest(
        decision_path=GATEWAY,
        identity=("key_id", "key-demo-user"),
        method="GET",
        path="/api/v1/items",
    )


def test_sandbox_defaults_to_the_egress_path() -> None:
    request = parse({"sandbox_id": "sb-1", "service": "openai", "method": "POST", "path": "/v1/x"})
    assert request.decision_path == EGRESS_DECISION_PATH
    assert request.identity == ("sandbox_id", "sb-1")
    assert (request.method, request.service) == ("POST", "openai")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "expected a JSON object"),
        ({"path": "/x"}, "exactly one of key_id or sandbox_id"),
        ({"key_id": "k", "sandbox_id": "s", "path": "/x"}, "exactly one of key_id or sandbox_id"),
        ({"key_id": "", "path": "/x"}, "preview.key_id='': not an id"),
        ({"key_id": 7, "path": "/x"}, "preview.key_id=7: not an id"),
        ({"sandbox_id": "a b", "path": "/x"}, "preview.sandbox_id='a b': not an id"),
        ({"key_id": "k"}, "preview.path=None: expected a /path"),
        ({"key_id": "k", "path": "x"}, "preview.path='x': expected a /path"),
        ({"key_id": "k", "path": "/x", "method": "get"}, "preview.method='get'"),
        ({"key_id": "k", "path": "/x", "service": "a/../b c"}, "preview.service="),
        ({"key_id": "k", "path": "/x", "decision_path": "/bad/"}, "preview.decision_path="),
        ({"key_id": "k", "path": "/x", "headers": []}, "preview.headers"),
        ({"key_id": "k", "path": "/x", "headers": {"X-Up": "1"}}, "preview.headers['X-Up']"),
        ({"key_id": "k", "path": "/x", "headers": {"a": 1}}, "preview.headers['a']"),
        ({"key_id": "k", "path": "/x", "headers": {"a": "1\n2"}}, "preview.headers['a']"),
        ({"key_id": "k", "path": "/x", "body": {"a": 1}}, "preview.body"),
        ({"key_id": "k", "path": "/x", "api_key": "ak_x"}, "unknown field(s) ['api_key']"),
        (
            {"key_id": "k", "path": "/x", "headers": {f"h{n}": "1" for n in range(65)}},
            "preview.headers: expected an object of at most 64",
        ),
        ({"key_id": "k", "path": "/x", "headers": {"a" * 129: "1"}}, "preview.headers['aaaa"),
        (
            {"key_id": "k", "path": "/x", "body": "x" * 8193},
            "preview.body: expected a string of at most 8192 characters",
        ),
    ],
    ids=[
        "not-object",
        "no-identity",
        "both-identities",
        "empty-id",
        "number-id",
        "space-in-id",
        "no-path",
        "relative-path",
        "lowercase-method",
        "bad-service",
        "bad-decision-path",
        "headers-not-object",
        "header-name-uppercase",
        "header-value-number",
        "header-value-newline",
        "body-not-string",
        "unknown-field",
        "65-headers",
        "header-name-129",
        "body-8193",
    ],
)
def test_a_bad_preview_body_is_an_admin_request_error_naming_the_field(
    body: Any, message: str
) -> None:
    # AdminRequestError (400 on the admin API), never ConfigError: settings stay startup's.
    with pytest.raises(AdminRequestError) as info:
        parse(body)
    assert message in str(info.value)


def test_a_preview_body_exactly_at_every_cap_is_accepted() -> None:
    # The other side of the 65-headers / header-name-129 / body-8193 refusals above.
    headers = {f"h{n}": "1" for n in range(63)} | {"a" * 128: "1"}
    request = parse({"key_id": "k", "path": "/x", "headers": headers, "body": "x" * 8192})
    assert len(request.headers) == 64
    assert len(request.body) == 8192


def test_input_is_built_like_real_traffic_plus_the_preview_identity() -> None:
    request = parse(
        {
            "sandbox_id": "sb-1",
            "service": "openai",
            "method": "POST",
            "path": "/v1/chat/completions?stream=true",
            "headers": {"content-type": "application/json", "x-api-key": "sk-secret"},
            "body": '{"model": "m"}',
        }
    )
    document = preview_input(request, CREDENTIAL_HEADERS)
    http = document["attributes"]["request"]["http"]
    assert document["preview"] == {"sandbox_id": "sb-1"}
    assert (http["method"], http["host"]) == ("POST", "openai")
    assert http["headers"]["host"] == "openai"
    assert document["attributes"]["contextExtensions"] == {
        "decision_path": EGRESS_DECISION_PATH,
        "service": "openai",
    }
    assert document["parsed_path"] == ["v1", "chat", "completions"]
    assert document["parsed_query"] == {"stream": ["true"]}
    assert document["parsed_body"] == {"model": "m"}
    # A credential header in a preview is hashed like any other: OPA never sees it.
    assert "sk-secret" not in str(document)
    assert set(document["credentials"]) == {"x-api-key"}


def test_malformed_query_is_a_request_error() -> None:
    with pytest.raises(RequestError):
        preview_input(parse({"key_id": "k", "path": "/x?a=%zz"}), CREDENTIAL_HEADERS)


DENY = {
    "allowed": False,
    "http_status": 403,
    "authz": {"reason": "role_not_allowed", "source": "deny"},
}
ALLOW = {
    "allowed": True,
    "authz": {
        "reason": "allowed",
        "source": "namespace_default",
        "identity": {"key_id": "key-ns", "role": "viewer", "tier": "standard"},
        "rate_limit": {"tier": "standard", "key": "key:key-ns", "requests_per_minute": 120},
    },
    "headers": {"x-authz-key-id": "key-ns"},
}


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (
            DENY,
            {
                "allowed": False,
                "http_status": 403,
                "reason": "role_not_allowed",
                "source": "deny",
                "identity": {},
                "rate_limit": None,
                "override_id": None,
            },
        ),
        (
            ALLOW,
            {
                "allowed": True,
                "http_status": 200,
                "reason": "allowed",
                "source": "namespace_default",
                "identity": {"key_id": "key-ns", "role": "viewer", "tier": "standard"},
                "rate_limit": {
                    "tier": "standard",
                    "key": "key:key-ns",
                    "requests_per_minute": 120,
                },
                "override_id": None,
            },
        ),
        (
            {
                "allowed": True,
                "authz": {"reason": "allowed_by_override", "override": {"id": "ovr-1"}},
            },
            {"source": "policy_rule", "override_id": "ovr-1", "http_status": 200},
        ),
        (
            {
                "allowed": False,
                "authz": {"reason": "blocked", "source": "override", "override": {"id": "o"}},
            },
            {"source": "override", "http_status": 403, "override_id": "o"},
        ),
        (False, {"allowed": False, "source": "deny", "reason": "denied", "http_status": 403}),
        (
            {"allowed": False, "http_status": 401, "authz": {"reason": "invalid_api_key"}},
            {"source": "deny", "http_status": 401, "ignored": []},
        ),
        (
            # One object for both outcomes (a plugin idiom): the allow ignores the deny's
            # fields, and the preview says which, so a policy author sees it.
            {"allowed": True, "http_status": 403, "body": "no", "reason": "Free text"},
            {
                "allowed": True,
                "http_status": 200,
                "reason": "allowed",
                "ignored": ["body", "http_status"],
            },
        ),
    ],
    ids=[
        "deny",
        "allow-namespace",
        "no-source-allow",
        "override-deny",
        "boolean",
        "401",
        "ignored-fields",
    ],
)
async def test_preview_answer(result: Any, expected: dict[str, Any]) -> None:
    engine = FakeEngine(result, revision="rev-9")
    request = parse({"key_id": "key-ns", "path": "/api/v1/items"})
    answer = await preview(engine, request, credential_headers=CREDENTIAL_HEADERS, timeout_s=0.3)
    assert answer["decision_path"] == GATEWAY
    assert answer["revision"] == "rev-9"
    for key, value in expected.items():
        assert answer[key] == value, key
    [(path, document, timeout_s)] = engine.calls
    assert (path, document["preview"], timeout_s) == (GATEWAY, {"key_id": "key-ns"}, 0.3)
    assert "headers" not in answer  # what the upstream would get is not the question


@pytest.mark.parametrize(
    "error", [OpaTimeout("slow"), UndefinedDecision("none")], ids=["timeout", "undefined"]
)
async def test_preview_raises_policy_errors(error: Exception) -> None:
    request = parse({"key_id": "k", "path": "/x"})
    with pytest.raises(type(error)):
        await preview(
            FakeEngine(error), request, credential_headers=CREDENTIAL_HEADERS, timeout_s=0.3
        )
