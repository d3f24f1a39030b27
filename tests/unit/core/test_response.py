"""authz.core.response: Decision -> CheckResponse, and the failure-status table.

Allow/deny shapes follow opa-envoy-plugin ``internal/internal.go``; header append actions,
the JSON deny body and fail-closed error responses follow ``docs/contract.md`` and
Envoy's ``config.core.v3.HeaderValueOption`` (an unset ``append_action`` appends).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from types import MappingProxyType
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict
from google.rpc import code_pb2, status_pb2

from authz.core import errors
from authz.core.decision import Decision, RateLimitRef, parse_decision
from authz.core.errors import AuthzError
from authz.core.response import build_response, error_response, response_prototype, status_for

DECISION_ID = "6f1c2b8e-3d4a-4f5b-9c6d-7e8f9a0b1c2d"
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD


def header_triples(options: Any) -> list[tuple[str, str, int]]:
    return [(o.header.key, o.header.value, o.append_action) for o in options]


def metadata(response: external_auth_pb2.CheckResponse) -> dict[str, Any]:
    return MessageToDict(response.dynamic_metadata)


def denied_headers(response: external_auth_pb2.CheckResponse) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for option in response.denied_response.headers:
        out.setdefault(option.header.key, []).append(option.header.value)
    return out


# --- allow ---------------------------------------------------------------------------


def test_allow_maps_every_field_to_ok_response() -> None:
    decision = Decision(
        allowed=True,
        form="object",
        headers=(("x-user-id", "u-1"), ("x-role", "admin"), ("x-user-id", "u-2")),
        response_headers_to_add=(("x-ratelimit-limit", "60"), ("x-ratelimit-limit", "61")),
        request_headers_to_remove=("x-api-key", "cookie"),
        query_parameters_to_set=(("api_version", "2"), ("tag", "a")),
        query_parameters_to_remove=("api_key",),
        dynamic_metadata=MappingProxyType({"tenant": "t1"}),
        reason="allowed",
        rate_limit=RateLimitRef("premium", "key-demo-admin", 600),
    )
    response = build_response(decision, DECISION_ID)

    assert response.status.code == code_pb2.OK
    assert response.WhichOneof("http_response") == "ok_response"
    ok = response.ok_response
    # The first value of a name overwrites what the client sent; later ones append. The
    # decision id goes upstream too, overwriting any the client forged.
    assert header_triples(ok.headers) == [
        ("x-user-id", "u-1", OVERWRITE),
        ("x-role", "admin", OVERWRITE),
        ("x-user-id", "u-2", APPEND),
        ("x-authz-decision-id", DECISION_ID, OVERWRITE),
    ]
    assert header_triples(ok.response_headers_to_add) == [
        ("x-ratelimit-limit", "60", OVERWRITE),
        ("x-ratelimit-limit", "61", APPEND),
    ]
    assert list(ok.headers_to_remove) == ["x-api-key", "cookie"]
    assert [(q.key, q.value) for q in ok.query_parameters_to_set] == [
        ("api_version", "2"),
        ("tag", "a"),
    ]
    assert list(ok.query_parameters_to_remove) == ["api_key"]
    assert metadata(response) == {"tenant": "t1", "decision_id": DECISION_ID}


def test_append_action_is_set_explicitly_even_for_overwrite() -> None:
    # OVERWRITE_IF_EXISTS_OR_ADD is not the enum's zero value, but an explicit action is
    # what keeps a client-forged header from surviving on newer Envoy.
    assert OVERWRITE != 0
    response = build_response(Decision(allowed=True, headers=(("x-a", "1"),)), DECISION_ID)
    assert response.ok_response.headers[0].append_action == OVERWRITE


def test_boolean_allow_only_adds_the_decision_id() -> None:
    response = build_response(Decision(allowed=True), DECISION_ID)
    assert response.status.code == code_pb2.OK
    assert response.WhichOneof("http_response") == "ok_response"
    ok = response.ok_response
    assert header_triples(ok.headers) == [("x-authz-decision-id", DECISION_ID, OVERWRITE)]
    assert list(ok.headers_to_remove) == []
    assert list(ok.response_headers_to_add) == []
    assert list(ok.query_parameters_to_set) == []
    assert list(ok.query_parameters_to_remove) == []
    assert metadata(response) == {"decision_id": DECISION_ID}


@pytest.mark.parametrize(
    ("headers", "to_remove", "removed"),
    [
        ((), ("x-api-key",), ["x-api-key"]),
        # Envoy removes after it adds, so removing a header the policy sets would drop it.
        ((("x-user-id", "u-1"),), ("x-user-id", "x-api-key"), ["x-api-key"]),
        # A policy may keep the decision id off the upstream request (egress).
        ((), ("x-authz-decision-id",), ["x-authz-decision-id"]),
    ],
    ids=["plain", "set-and-removed", "decision-id-header"],
)
def test_headers_to_remove_never_drops_a_header_being_set(
    headers: tuple[tuple[str, str], ...], to_remove: tuple[str, ...], removed: list[str]
) -> None:
    decision = Decision(allowed=True, headers=headers, request_headers_to_remove=to_remove)
    ok = build_response(decision, DECISION_ID).ok_response
    assert list(ok.headers_to_remove) == removed
    assert {option.header.key for option in ok.headers} >= {name for name, _ in headers}


def test_policy_cannot_replace_the_decision_id() -> None:
    decision = Decision(allowed=True, dynamic_metadata=MappingProxyType({"decision_id": "forged"}))
    assert metadata(build_response(decision, DECISION_ID))["decision_id"] == DECISION_ID


@pytest.mark.parametrize(
    "response",
    [
        build_response(Decision(allowed=True), DECISION_ID),
        build_response(Decision(allowed=False), DECISION_ID),
        build_response(Decision(allowed=False, body="no", http_status=401), DECISION_ID),
        error_response(errors.OpaUnavailable("down"), DECISION_ID),
    ],
    ids=["allow", "deny", "deny-with-body", "error"],
)
def test_decision_id_is_always_in_dynamic_metadata(
    response: external_auth_pb2.CheckResponse,
) -> None:
    assert metadata(response)["decision_id"] == DECISION_ID


# --- deny ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "error"),
    [(None, "denied"), ("missing_api_key", "missing_api_key")],
    ids=["no-reason", "with-reason"],
)
def test_deny_defaults_to_403_with_json_body(reason: str | None, error: str) -> None:
    response = build_response(Decision(allowed=False, reason=reason), DECISION_ID)
    assert response.status.code == code_pb2.PERMISSION_DENIED
    assert response.WhichOneof("http_response") == "denied_response"
    denied = response.denied_response
    assert denied.status.code == 403
    assert json.loads(denied.body) == {"error": error, "decision_id": DECISION_ID}
    headers = denied_headers(response)
    assert headers["content-type"] == ["application/json"]
    assert headers["x-authz-decision-id"] == [DECISION_ID]


def test_deny_keeps_policy_status_headers_body_and_metadata() -> None:
    decision = Decision(
        allowed=False,
        form="object",
        headers=(("www-authenticate", 'Bearer realm="api"'), ("content-type", "text/plain")),
        body="please log in",
        http_status=401,
        dynamic_metadata=MappingProxyType({"tenant": "t1"}),
    )
    response = build_response(decision, DECISION_ID)
    denied = response.denied_response
    assert denied.status.code == 401
    assert denied.body == "please log in"
    assert denied_headers(response) == {
        "www-authenticate": ['Bearer realm="api"'],
        "content-type": ["text/plain"],
        "x-authz-decision-id": [DECISION_ID],
    }
    assert all(option.append_action == OVERWRITE for option in denied.headers)
    assert metadata(response) == {"tenant": "t1", "decision_id": DECISION_ID}


@pytest.mark.parametrize("name", ["content-type", "Content-Type"], ids=["lower", "mixed-case"])
def test_deny_without_body_has_one_content_type_that_describes_authzs_json_body(
    name: str,
) -> None:
    """A policy's content-type on a deny without a body would label authz's JSON body
    wrongly, or (both sent) twice: the body is authz's, so is its one content-type."""
    decision = parse_decision(
        {"allowed": False, "headers": {name: "text/html", "x-keep": "1"}, "http_status": 401}
    )
    response = build_response(decision, DECISION_ID)
    headers = denied_headers(response)
    assert headers["content-type"] == ["application/json"]
    assert headers["x-keep"] == ["1"]
    assert json.loads(response.denied_response.body)["error"] == "denied"


def test_deny_with_empty_policy_body_keeps_it_empty() -> None:
    # body "" is the policy's choice (set), unlike an absent body.
    response = build_response(Decision(allowed=False, body=""), DECISION_ID)
    assert response.denied_response.body == ""
    assert "content-type" not in denied_headers(response)


# --- errors --------------------------------------------------------------------------

SECRET = "sk-live-8f7e6d5c4b3a2910"


def error_classes() -> list[type[AuthzError]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, AuthzError) and cls.__module__ == errors.__name__
    ]


def error_class_for(code: str) -> type[AuthzError]:
    """The class that declares ``code`` (a subclass may keep its parent's)."""
    (cls,) = [cls for cls in error_classes() if cls.__dict__.get("code") == code]
    return cls


# The status a client sees for each failure code, written out (not read from the classes
# under test): the client sent something malformed (4xx), no policy says yes (403, as a
# policy deny), OPA or the budget is unavailable (503, worth retrying), our side is broken
# or misconfigured (500).
FAILURE_STATUSES: list[tuple[str, int]] = [
    ("invalid_request", 400),
    ("too_many_overrides", 409),
    ("undefined_decision", 403),
    ("opa_unavailable", 503),
    ("opa_circuit_open", 503),
    ("opa_timeout", 503),
    ("deadline_exceeded", 503),
    ("credential_unavailable", 503),
    ("rate_limit_unavailable", 503),
    ("address_not_allowed", 403),
    ("destination_unresolved", 502),
    ("overrides_unavailable", 503),
    ("invalid_decision", 500),
    ("unsafe_header_mutation", 500),
    ("invalid_decision_path", 500),
    ("opa_error", 500),
    ("policy_error", 500),
    ("internal_error", 500),
    ("config_error", 500),
    ("invalid_data_file", 500),
    ("invalid_batch", 400),
    ("batch_too_large", 413),
    ("batch_revision_changed", 503),
]


@pytest.mark.parametrize(
    ("code", "status"), FAILURE_STATUSES, ids=[code for code, _ in FAILURE_STATUSES]
)
def test_error_response_for_every_failure_code(code: str, status: int) -> None:
    cls = error_class_for(code)
    error = cls(f"OPA said no for api key {SECRET} at /v1/data/x")
    response = error_response(error, DECISION_ID)

    assert response.status.code == code_pb2.PERMISSION_DENIED
    denied = response.denied_response
    assert denied.status.code == status
    assert json.loads(denied.body) == {
        "error": code,
        "message": cls.public_message,
        "decision_id": DECISION_ID,
    }
    headers = denied_headers(response)
    assert headers["content-type"] == ["application/json"]
    assert headers["x-authz-decision-id"] == [DECISION_ID]
    assert metadata(response) == {"reason": code, "decision_id": DECISION_ID}
    # Nothing from str(error) reaches Envoy or the client.
    assert str(error) not in denied.body
    assert SECRET not in response.SerializeToString().decode("utf-8", errors="replace")


@pytest.mark.parametrize(
    ("code", "status"), FAILURE_STATUSES, ids=[code for code, _ in FAILURE_STATUSES]
)
def test_status_for_each_failure_code(code: str, status: int) -> None:
    assert status_for(code) == status


@pytest.mark.parametrize(
    "code", ["no_such_code", "", "rate_limited"], ids=["unknown", "empty", "a-reason"]
)
def test_status_for_unknown_code_is_500(code: str) -> None:
    assert status_for(code) == 500


def test_every_error_code_has_a_written_status() -> None:
    codes = {cls.code for cls in error_classes()}
    assert codes == {code for code, _ in FAILURE_STATUSES}


def test_policy_can_keep_the_decision_id_off_the_upstream_request() -> None:
    decision = parse_decision(
        {"allowed": True, "request_headers_to_remove": ["x-authz-decision-id", "x-a"]}
    )
    response = build_response(decision, "00000000-0000-4000-8000-0000000000aa")
    names = [o.header.key for o in response.ok_response.headers]
    assert "x-authz-decision-id" not in names
    assert list(response.ok_response.headers_to_remove) == ["x-authz-decision-id", "x-a"]
    assert response.dynamic_metadata["decision_id"] == "00000000-0000-4000-8000-0000000000aa"


def _nested(depth: int, leaf: Any, wrap: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = wrap(value)
    return value


@pytest.mark.parametrize("allowed", [True, False], ids=["allow", "deny"])
@pytest.mark.parametrize(
    "metadata",
    [
        _nested(200, "x", lambda v: {"a": v}),
        {"a": _nested(200, "x", lambda v: [v])},
        _nested(600, "x", lambda v: {"a": v}),  # past Python's recursion limit
    ],
    ids=["objects", "arrays", "objects-past-the-python-recursion-limit"],
)
def test_dynamic_metadata_too_deep_for_protobuf_is_an_invalid_decision(
    allowed: bool, metadata: dict[str, Any]
) -> None:
    # Protobuf refuses a Struct nested past its recursion limit (as Envoy would refuse to
    # read it): the policy's decision is invalid, never an unexpected DecodeError (500
    # internal_error, with a traceback logged per request).
    decision = parse_decision({"allowed": allowed, "dynamic_metadata": metadata})
    with pytest.raises(errors.InvalidDecision, match="dynamic_metadata"):
        build_response(decision, "d-1")


# --- issue 19: responses built in place are byte-identical to constructed ones ---------


def _reference_options(headers: Any) -> list[base_pb2.HeaderValueOption]:
    """The response building before issue 19, verbatim (constructed messages): the
    oracle for the in-place one."""
    seen: set[str] = set()
    options = []
    for name, value in headers:
        action = APPEND if name in seen else OVERWRITE
        seen.add(name)
        options.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=name, value=value), append_action=action
            )
        )
    return options


def _reference_metadata(decision_id: str, extra: Any) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    if extra:
        metadata.update(dict(extra))
    metadata["decision_id"] = decision_id
    return metadata


def _reference_denied(
    status: int, headers: Any, body: str, decision_id: str, extra: Any
) -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=_reference_options(headers),
            body=body,
        ),
        dynamic_metadata=_reference_metadata(decision_id, extra),
    )


def _reference_build(decision: Decision, decision_id: str) -> external_auth_pb2.CheckResponse:
    header = "x-authz-decision-id"
    if decision.allowed:
        upstream = [h for h in decision.headers if h[0] != header]
        if header not in decision.request_headers_to_remove:
            upstream.append((header, decision_id))
        set_names = {name for name, _ in upstream}
        ok = external_auth_pb2.OkHttpResponse(
            headers=_reference_options(upstream),
            headers_to_remove=[
                name for name in decision.request_headers_to_remove if name not in set_names
            ],
            response_headers_to_add=_reference_options(decision.response_headers_to_add),
            query_parameters_to_remove=list(decision.query_parameters_to_remove),
            query_parameters_to_set=[
                base_pb2.QueryParameter(key=k, value=v) for k, v in decision.query_parameters_to_set
            ],
        )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=ok,
            dynamic_metadata=_reference_metadata(decision_id, decision.dynamic_metadata),
        )
    headers = [*(h for h in decision.headers if h[0] != header), (header, decision_id)]
    body = decision.body
    if body is None:
        headers = [h for h in headers if h[0] != "content-type"]
        headers.append(("content-type", "application/json"))
        body = json.dumps(
            {"error": decision.reason_code, "decision_id": decision_id}, separators=(",", ":")
        )
    return _reference_denied(
        decision.http_status or 403, headers, body, decision_id, decision.dynamic_metadata
    )


_GATEWAY_ALLOW = {
    "allowed": True,
    "authz": {
        "reason": "allowed",
        "source": "policy_rule",
        "rate_limit": {"tier": "standard", "key": "key:k1", "requests_per_minute": 600},
        "identity": {"key_id": "k1", "role": "reader", "tier": "standard"},
    },
    "headers": {"x-authz-key-id": "k1", "x-authz-role": "reader", "x-authz-tier": "standard"},
    "request_headers_to_remove": ["authorization", "x-api-key", "x-authz-role"],
    "dynamic_metadata": {"key_id": "k1", "role": "reader", "tier": "standard"},
}
_RATE_LIMIT_HEADERS = (("x-ratelimit-limit", "600"), ("x-ratelimit-remaining", "599"))
_RESPONSE_CORPUS = [
    pytest.param(parse_decision(True), id="boolean-allow"),
    pytest.param(parse_decision(False), id="boolean-deny"),
    pytest.param(parse_decision({"allowed": True}), id="object-allow-nothing-set"),
    pytest.param(parse_decision(_GATEWAY_ALLOW), id="gateway-allow"),
    pytest.param(
        parse_decision(_GATEWAY_ALLOW).with_response_headers(_RATE_LIMIT_HEADERS),
        id="gateway-allow-rate-limited",
    ),
    pytest.param(
        parse_decision(
            {
                "allowed": True,
                "headers": [{"x-a": ["1", "2"]}, {"x-b": "ü ✓", "x-a": "3"}],
                "response_headers_to_add": {"set-cookie": ["a=1", "b=2"]},
                "request_headers_to_remove": ["x-a", "x-authz-decision-id", "cookie"],
                "query_parameters_to_set": {"page": "2", "q": ""},
                "query_parameters_to_remove": ["token", "sig"],
                "dynamic_metadata": {"decision_id": "policy's", "n": 1.5, "b": False, "z": None},
            }
        ),
        id="allow-every-field-repeated-names-decision-id-removed",
    ),
    pytest.param(
        parse_decision(
            {
                "allowed": True,
                "headers": {"x-authz-decision-id": "forged"},
                "dynamic_metadata": {"nested": {"list": [1, {"a": None}, "s"]}, "e": {}},
            }
        ),
        id="allow-forged-decision-id-nested-metadata",
    ),
    pytest.param(
        parse_decision({"allowed": False, "authz": {"reason": "invalid_api_key"}}),
        id="deny-json-body",
    ),
    pytest.param(
        parse_decision(
            {
                "allowed": False,
                "http_status": 429,
                "headers": {"content-type": "text/plain", "retry-after": ["1", "2"]},
                "dynamic_metadata": {"big": 2**60, "neg": -1},
            }
        ),
        id="deny-status-own-content-type-replaced",
    ),
    pytest.param(
        parse_decision({"allowed": False, "body": "", "headers": {"content-type": "x/y"}}),
        id="deny-empty-body",
    ),
    pytest.param(
        parse_decision({"allowed": False, "body": "nö", "dynamic_metadata": {"l": [[], [True]]}}),
        id="deny-body-nested-metadata",
    ),
    pytest.param(
        Decision(allowed=False, http_status=0, headers=(("x-authz-decision-id", "forged"),)),
        id="deny-status-zero-forged-decision-id",
    ),
    pytest.param(
        Decision(allowed=True, dynamic_metadata=MappingProxyType({"k": "v"})),
        id="allow-read-only-metadata",
    ),
    pytest.param(
        Decision(
            allowed=True,
            dynamic_metadata={"t": True, "zero": 0, "f": -0.0, "u": "ü", "inf": 1e308, "n": None},
        ),
        id="allow-every-scalar-metadata",
    ),
    pytest.param(
        Decision(allowed=True, request_headers_to_remove=("x-authz-decision-id",)),
        id="allow-empty-ok-response",
    ),
]


@pytest.mark.parametrize("decision", _RESPONSE_CORPUS)
def test_build_response_bytes_equal_constructed_messages(decision: Decision) -> None:
    built = build_response(decision, DECISION_ID)
    expected = _reference_build(decision, DECISION_ID)
    assert built.SerializeToString(deterministic=True) == expected.SerializeToString(
        deterministic=True
    )
    assert built == expected


@pytest.mark.parametrize("code", [code for code, _ in FAILURE_STATUSES])
def test_error_response_bytes_equal_constructed_messages(code: str) -> None:
    error = error_class_for(code)("detail")
    built = error_response(error, DECISION_ID)
    body = {"error": error.code}
    if error.public_message:
        body["message"] = error.public_message
    body["decision_id"] = DECISION_ID
    expected = _reference_denied(
        error.http_status,
        [("content-type", "application/json"), ("x-authz-decision-id", DECISION_ID)],
        json.dumps(body, separators=(",", ":")),
        DECISION_ID,
        {"reason": error.code},
    )
    assert built.SerializeToString(deterministic=True) == expected.SerializeToString(
        deterministic=True
    )


# --- issue 19: a cached allow's response prototype gives the same bytes -----------------

_OTHER_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
_PER_REQUEST_HEADERS = [
    (),
    _RATE_LIMIT_HEADERS,
    (("ratelimit-limit", "600"), ("ratelimit-remaining", "0"), ("set-cookie", "a=1")),
]


@pytest.mark.parametrize("decision", _RESPONSE_CORPUS)
@pytest.mark.parametrize(
    "response_headers", _PER_REQUEST_HEADERS, ids=["no-headers", "rate-limit", "repeated"]
)
def test_response_from_prototype_bytes_equal_constructed_messages(
    decision: Decision, response_headers: tuple[tuple[str, str], ...]
) -> None:
    """Per request the decision gets its own response headers (a rate limit) and a
    decision id; the response built from the cached decision's prototype is the
    constructed one, byte for byte, for two requests in a row (nothing of the first
    stays), and the prototype itself is unchanged by them."""
    prototype = response_prototype(decision)
    if not decision.allowed:
        assert prototype is None  # a deny's headers and body hold the decision id
        return
    if any(
        type(v) not in (str, int, float, bool, type(None))
        for v in decision.dynamic_metadata.values()
    ):
        assert prototype is None  # nested metadata: its depth is checked per response
        return
    assert prototype is not None
    before = prototype.message.SerializeToString(deterministic=True)
    per_request = decision.with_response_headers(
        (*decision.response_headers_to_add, *response_headers)
    )
    for decision_id in (DECISION_ID, _OTHER_ID):
        built = build_response(per_request, decision_id, prototype)
        expected = _reference_build(per_request, decision_id)
        assert built.SerializeToString(deterministic=True) == expected.SerializeToString(
            deterministic=True
        )
        assert built == expected
    assert prototype.message.SerializeToString(deterministic=True) == before


_PROTOTYPED = parse_decision(
    {
        **_GATEWAY_ALLOW,
        "query_parameters_to_set": {"page": "2"},
        "query_parameters_to_remove": ["token"],
    }
)


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param(dataclasses.replace(_PROTOTYPED, allowed=False), id="now-a-deny"),
        pytest.param(
            _PROTOTYPED.with_headers((*_PROTOTYPED.headers, ("x-credential", "secret"))),
            id="credential-header-added",
        ),
        pytest.param(
            dataclasses.replace(_PROTOTYPED, headers=(("x-authz-key-id", "k1"),)),
            id="other-headers",
        ),
        pytest.param(
            dataclasses.replace(_PROTOTYPED, request_headers_to_remove=("cookie",)),
            id="other-removals",
        ),
        pytest.param(
            dataclasses.replace(_PROTOTYPED, query_parameters_to_set=(("page", "3"),)),
            id="other-query-to-set",
        ),
        pytest.param(
            dataclasses.replace(_PROTOTYPED, query_parameters_to_remove=("sig",)),
            id="other-query-to-remove",
        ),
        pytest.param(
            dataclasses.replace(_PROTOTYPED, dynamic_metadata=MappingProxyType({"k": "v"})),
            id="other-metadata",
        ),
        pytest.param(
            dataclasses.replace(
                _PROTOTYPED,
                request_headers_to_remove=(
                    *_PROTOTYPED.request_headers_to_remove,
                    "x-authz-decision-id",
                ),
            ),
            id="decision-id-header-removed",
        ),
    ],
)
def test_a_prototype_is_used_only_for_the_decision_fields_it_was_built_from(
    changed: Decision,
) -> None:
    """A prototype given with a decision that differs in anything it holds (a deny, a
    credential header added after the cache, any other field) is not used: the response
    is the one the decision itself gives."""
    prototype = response_prototype(_PROTOTYPED)
    assert prototype is not None
    built = build_response(changed, DECISION_ID, prototype)
    expected = _reference_build(changed, DECISION_ID)
    assert built.SerializeToString(deterministic=True) == expected.SerializeToString(
        deterministic=True
    )
