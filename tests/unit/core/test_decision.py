"""authz.core.decision: OPA's result -> Decision.

Forms and error wording follow opa-envoy-plugin ``envoyauth/response.go`` (``expected
allowed to be of type 'boolean' but got ...``), with JSON type names; the extension fields
follow ``docs/contract.md``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from authz.core import decision as decision_module
from authz.core.decision import (
    CredentialRef,
    Decision,
    RateLimitRef,
    TunnelRef,
    json_type,
    parse_decision,
)
from authz.core.errors import InvalidDecision, UnsafeHeaderMutation
from authz.core.headers import is_token


@pytest.mark.parametrize("allowed", [True, False], ids=["allow", "deny"])
def test_boolean_form(allowed: bool) -> None:
    decision = parse_decision(allowed)
    assert decision.allowed is allowed
    assert decision.form == "boolean"
    assert decision.headers == ()
    assert decision.body is None
    assert decision.http_status is None
    assert dict(decision.dynamic_metadata) == {}
    assert decision.reason is None
    assert decision.rate_limit is None


@pytest.mark.parametrize(
    ("result", "found"),
    [("true", "string"), (1, "number"), (0.5, "number"), (None, "null"), ([True], "array")],
    ids=["string", "int", "float", "null", "array"],
)
def test_other_top_level_types_are_invalid(result: Any, found: str) -> None:
    with pytest.raises(InvalidDecision, match=f"'{found}'"):
        parse_decision(result)


def test_object_without_allowed_is_invalid() -> None:
    with pytest.raises(InvalidDecision, match='missing "allowed"'):
        parse_decision({"headers": {"x-a": "1"}})


@pytest.mark.parametrize(
    ("allowed", "found"),
    [("true", "string"), (1, "number"), (None, "null"), ([], "array"), ({}, "object")],
    ids=["string", "number", "null", "array", "object"],
)
def test_allowed_must_be_boolean(allowed: Any, found: str) -> None:
    with pytest.raises(InvalidDecision) as caught:
        parse_decision({"allowed": allowed})
    assert str(caught.value) == f"expected allowed to be of type 'boolean' but got '{found}'"


def test_object_form_parses_every_field() -> None:
    decision = parse_decision(
        {
            "allowed": True,
            "headers": {"X-User-Id": "u-1", "x-roles": ["admin", "user"]},
            "response_headers_to_add": [{"x-ratelimit-limit": "60"}, {"Cache-Control": "no-store"}],
            "request_headers_to_remove": ["X-Api-Key", "cookie"],
            "query_parameters_to_set": {"api_version": "2", "tag": ["a", "b"]},
            "query_parameters_to_remove": ["api_key"],
            "body": "ok",
            "http_status": 200,
            "dynamic_metadata": {"tenant": "t1", "nested": {"n": 1}},
            "authz": {
                "reason": "allowed",
                "rate_limit": {
                    "tier": "premium",
                    "key": "key-demo-admin",
                    "requests_per_minute": 600,
                },
                "identity": {"key_id": "key-demo-admin", "role": "admin"},
            },
            "ignored_extension": {"anything": True},
        }
    )
    assert decision.allowed is True
    assert decision.form == "object"
    # Names are lowercased; list values become one pair each, in order.
    assert decision.headers == (("x-user-id", "u-1"), ("x-roles", "admin"), ("x-roles", "user"))
    assert decision.response_headers_to_add == (
        ("x-ratelimit-limit", "60"),
        ("cache-control", "no-store"),
    )
    assert decision.request_headers_to_remove == ("x-api-key", "cookie")
    assert decision.query_parameters_to_set == (("api_version", "2"), ("tag", "a"), ("tag", "b"))
    assert decision.query_parameters_to_remove == ("api_key",)
    # The plugin reads body and http_status on a deny only: on an allow, ignored.
    assert decision.body is None
    assert decision.http_status is None
    assert decision.ignored == ("body", "http_status")
    assert dict(decision.dynamic_metadata) == {"tenant": "t1", "nested": {"n": 1}}
    assert decision.reason == "allowed"
    assert decision.rate_limit == RateLimitRef(
        tier="premium", key="key-demo-admin", requests_per_minute=600
    )
    assert dict(decision.identity) == {"key_id": "key-demo-admin", "role": "admin"}


@pytest.mark.parametrize("field", ["headers", "response_headers_to_add"])
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"x-a": "1"}, (("x-a", "1"),)),
        ({"x-a": ["1", "2"]}, (("x-a", "1"), ("x-a", "2"))),
        ({"x-a": []}, ()),
        ({"x-a": ""}, (("x-a", ""),)),
        ({"X-Mixed-Case": "v"}, (("x-mixed-case", "v"),)),
        ([{"x-a": "1"}, {"x-b": "2"}, {"x-a": "3"}], (("x-a", "1"), ("x-b", "2"), ("x-a", "3"))),
        ({}, ()),
        ([], ()),
        # Envoy forwards these; RFC 9110 allows HTAB and obs-text in values.
        ({"x-a": "a\tb é"}, (("x-a", "a\tb é"),)),
    ],
    ids=[
        "string",
        "list",
        "empty-list",
        "empty-string",
        "lowercased",
        "list-of-objects",
        "empty-object",
        "empty-array",
        "tab-and-non-ascii",
    ],
)
def test_header_forms(field: str, raw: Any, expected: tuple[tuple[str, str], ...]) -> None:
    decision = parse_decision({"allowed": True, field: raw})
    assert getattr(decision, field) == expected


# (field, value, field label in the message, expected type, JSON type found)
TYPE_ERRORS: list[tuple[str, Any, str, str, str]] = [
    ("headers", "x-a: 1", "headers", "object", "string"),
    ("headers", [1], "headers", "object", "number"),
    ("headers", [["x-a", "1"]], "headers", "object", "array"),
    ("headers", {"x-a": 1}, "headers['x-a'] value", "string", "number"),
    ("headers", {"x-a": True}, "headers['x-a'] value", "string", "boolean"),
    ("headers", {"x-a": None}, "headers['x-a'] value", "string", "null"),
    ("headers", {"x-a": ["1", None]}, "headers['x-a'] value", "string", "null"),
    ("headers", {"x-a": {"v": "1"}}, "headers['x-a'] value", "string", "object"),
    ("response_headers_to_add", True, "response_headers_to_add", "object", "boolean"),
    (
        "response_headers_to_add",
        {"x-a": 2.5},
        "response_headers_to_add['x-a'] value",
        "string",
        "number",
    ),
    ("request_headers_to_remove", "x-a", "request_headers_to_remove", "array", "string"),
    ("request_headers_to_remove", {"x-a": True}, "request_headers_to_remove", "array", "object"),
    (
        "request_headers_to_remove",
        ["x-a", 1],
        "request_headers_to_remove value",
        "string",
        "number",
    ),
    ("query_parameters_to_set", [], "query_parameters_to_set", "object", "array"),
    (
        "query_parameters_to_set",
        {"k": 1},
        "query_parameters_to_set['k']",
        "string or array",
        "number",
    ),
    (
        "query_parameters_to_set",
        {"k": None},
        "query_parameters_to_set['k']",
        "string or array",
        "null",
    ),
    (
        "query_parameters_to_set",
        {"k": ["a", 2]},
        "query_parameters_to_set['k'] value",
        "string",
        "number",
    ),
    ("query_parameters_to_remove", "api_key", "query_parameters_to_remove", "array", "string"),
    (
        "query_parameters_to_remove",
        ["a", None],
        "query_parameters_to_remove value",
        "string",
        "null",
    ),
    ("body", 1, "body", "string", "number"),
    ("body", None, "body", "string", "null"),
    ("body", {"error": "x"}, "body", "string", "object"),
    ("http_status", "403", "http_status", "number", "string"),
    ("http_status", True, "http_status", "number", "boolean"),
    ("http_status", None, "http_status", "number", "null"),
    ("dynamic_metadata", "x", "dynamic_metadata", "object", "string"),
    ("dynamic_metadata", [], "dynamic_metadata", "object", "array"),
    ("reason", 7, "authz.reason", "string", "number"),
    ("reason", None, "authz.reason", "string", "null"),
    ("source", 1, "authz.source", "string", "number"),
    ("source", ["override"], "authz.source", "string", "array"),
    ("rate_limit", "premium", "authz.rate_limit", "object", "string"),
    ("rate_limit", {"key": "k"}, "authz.rate_limit.tier", "string", "null"),
    ("rate_limit", {"tier": 1, "key": "k"}, "authz.rate_limit.tier", "string", "number"),
    ("rate_limit", {"tier": "t", "key": 5}, "authz.rate_limit.key", "string", "number"),
    ("rate_limit", {"tier": "t"}, "authz.rate_limit.key", "string", "null"),
    (
        "rate_limit",
        {"tier": "t", "key": "k"},
        "authz.rate_limit.requests_per_minute",
        "number",
        "null",
    ),
    ("identity", [], "authz.identity", "object", "array"),
    ("identity", {"role": 1}, "authz.identity.role", "string", "number"),
    ("identity", {"role": ["a"]}, "authz.identity.role", "string", "array"),
]


@pytest.mark.parametrize(
    ("field", "value", "label", "expected", "found"),
    TYPE_ERRORS,
    ids=[f"{case[0]}-{case[2]}-{case[4]}" for case in TYPE_ERRORS],
)
def test_wrong_type_names_field_and_json_type(
    field: str, value: Any, label: str, expected: str, found: str
) -> None:
    # Each field is read for the outcome that uses it; authz's own under "authz".
    allowed = field not in ("body", "http_status")
    raw = {field: value} if label.split(".")[0] != "authz" else {"authz": {field: value}}
    with pytest.raises(InvalidDecision) as caught:
        parse_decision({"allowed": allowed, **raw})
    assert str(caught.value) == f"expected {label} to be of type '{expected}' but got '{found}'"


@pytest.mark.parametrize(
    ("field", "allowed"),
    [("headers", True), ("headers", False), ("response_headers_to_add", True)],
    ids=["headers-allow", "headers-deny", "response-headers-allow"],
)
@pytest.mark.parametrize(
    "value",
    ["a\r\nx-injected: 1", "a\nb", "a\rb", "a\x00b", ["ok", "bad\r\n"]],
    ids=["crlf", "lf", "cr", "nul", "in-list"],
)
def test_header_value_with_cr_lf_or_nul_is_an_unsafe_header_mutation(
    field: str, value: Any, allowed: bool
) -> None:
    """Envoy 1.40 answers 503 for such a value on an allow and splits it into two response
    headers on a deny (tests/integration/test_envoy_header_mutations.py): refused, with its
    own code, on every outcome that would send it."""
    with pytest.raises(
        UnsafeHeaderMutation, match=f"^{field}\\['x-a'\\]: value contains CR, LF or NUL"
    ):
        parse_decision({"allowed": allowed, field: {"x-a": value}})


@pytest.mark.parametrize("field", ["headers", "response_headers_to_add"])
@pytest.mark.parametrize(
    "name",
    ["bad name", "x:y", ":authority", "", "x\r\ny", "x-a\n", "é", "x(y)"],
    ids=["space", "colon", "pseudo-header", "empty", "crlf", "trailing-lf", "non-ascii", "parens"],
)
def test_invalid_header_name_is_an_unsafe_header_mutation(field: str, name: str) -> None:
    with pytest.raises(UnsafeHeaderMutation) as caught:
        parse_decision({"allowed": True, field: {name: "v"}})
    assert str(caught.value).startswith(f"{field}: ")
    assert "is not a valid header name" in str(caught.value)
    assert caught.value.code == "unsafe_header_mutation"


@pytest.mark.parametrize(
    "name",
    ["bad name", "x:y", ":authority", "", "x\r\ny", "é"],
    ids=["space", "colon", "pseudo-header", "empty", "crlf", "non-ascii"],
)
def test_removing_an_invalid_header_name_is_ignored_as_envoy_ignores_it(name: str) -> None:
    """Envoy 1.40 leaves the request as it is for such a removal (the integration test
    above): no header can have that name, so there is nothing to remove and nothing unsafe."""
    decision = parse_decision(
        {"allowed": True, "request_headers_to_remove": ["X-Api-Key", name, "cookie"]}
    )
    assert decision.request_headers_to_remove == ("x-api-key", "cookie")
    assert decision.ignored == ("request_headers_to_remove",)


@pytest.mark.parametrize(
    ("status", "expected"),
    [(200, 200), (401, 401), (403, 403), (429, 429), (503, 503), (403.0, 403)],
    ids=["200", "401", "403", "429", "503", "integral-float"],
)
def test_valid_http_status(status: Any, expected: int) -> None:
    decision = parse_decision({"allowed": False, "http_status": status})
    assert decision.http_status == expected
    assert type(decision.http_status) is int


@pytest.mark.parametrize(
    ("status", "fragment"),
    [
        (999, "999"),
        (0, "0"),
        (99, "99"),
        (600, "600"),
        (-403, "-403"),
        (1.5, "1.5"),
        (403.5, "403.5"),
        ("403", "'string'"),
        (True, "'boolean'"),
        ([403], "'array'"),
    ],
    ids=["999", "zero", "99", "600", "negative", "1.5", "403.5", "string", "true", "array"],
)
def test_invalid_http_status(status: Any, fragment: str) -> None:
    with pytest.raises(InvalidDecision) as caught:
        parse_decision({"allowed": False, "http_status": status})
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    "reason",
    ["allowed", "missing_api_key", "rate_limited", "a", "tier2_exceeded", "a" * 64],
    ids=["allowed", "missing_api_key", "rate_limited", "one-letter", "digits", "64-chars"],
)
def test_snake_case_reason_is_accepted(reason: str) -> None:
    assert parse_decision({"allowed": False, "authz": {"reason": reason}}).reason == reason


@pytest.mark.parametrize(
    "reason",
    [
        "MissingApiKey",
        "missing-api-key",
        "missing api key",
        "1st_reason",
        "_private",
        "",
        "a" * 65,
        "ok\n",
    ],
    ids=[
        "camel",
        "kebab",
        "spaces",
        "leading-digit",
        "leading-underscore",
        "empty",
        "65-chars",
        "newline",
    ],
)
def test_non_snake_case_reason_is_rejected(reason: str) -> None:
    with pytest.raises(InvalidDecision, match="is not a snake_case code"):
        parse_decision({"allowed": False, "authz": {"reason": reason}})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"allowed": True, "authz": {"source": "namespace_default"}}, "namespace_default"),
        ({"allowed": False, "authz": {"source": "override"}}, "override"),
        ({"allowed": True}, None),
        (True, None),
    ],
    ids=["namespace-default", "override", "absent", "boolean-form"],
)
def test_source(raw: object, expected: str | None) -> None:
    assert parse_decision(raw).source == expected


def test_non_snake_case_source_is_rejected() -> None:
    with pytest.raises(
        InvalidDecision, match=re.escape("authz.source 'Policy Rule' is not a snake_case code")
    ):
        parse_decision({"allowed": True, "authz": {"source": "Policy Rule"}})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"tier": "premium", "key": "key-demo-admin", "requests_per_minute": 600},
            RateLimitRef("premium", "key-demo-admin", 600),
        ),
        (
            {"tier": "free", "key": "k", "requests_per_minute": 5, "extra": 1},
            RateLimitRef("free", "k", 5),
        ),
        (
            {"tier": "std", "key": "k", "requests_per_minute": 60, "burst": 10},
            RateLimitRef("std", "k", 60, 10),
        ),
        ({"tier": "u", "key": "k", "requests_per_minute": -1}, RateLimitRef("u", "k", -1)),
        ({"tier": "z", "key": "k", "requests_per_minute": 0.0}, RateLimitRef("z", "k", 0)),
    ],
    ids=["typical", "extra-field-ignored", "with-limits", "unlimited", "zero-float"],
)
def test_rate_limit_shape(raw: dict[str, Any], expected: RateLimitRef) -> None:
    assert parse_decision({"allowed": True, "authz": {"rate_limit": raw}}).rate_limit == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tier": "", "key": "k"}, "must not be empty"),
        ({"tier": "t", "key": ""}, "must not be empty"),
        (
            {"tier": "t", "key": "k", "requests_per_minute": "60"},
            "requests_per_minute to be of type 'number' but got 'string'",
        ),
        (
            {"tier": "t", "key": "k", "requests_per_minute": True},
            "requests_per_minute to be of type 'number' but got 'boolean'",
        ),
        ({"tier": "t", "key": "k", "requests_per_minute": -2}, "integer >= -1"),
        ({"tier": "t", "key": "k", "requests_per_minute": 1.5}, "integer >= -1"),
        ({"tier": "t", "key": "k", "requests_per_minute": 5, "burst": 0}, "integer >= 1"),
    ],
    ids=[
        "empty-tier",
        "empty-key",
        "rpm-string",
        "rpm-bool",
        "rpm-below",
        "rpm-fraction",
        "burst-0",
    ],
)
def test_rate_limit_errors(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidDecision, match=re.escape(message)):
        parse_decision({"allowed": True, "authz": {"rate_limit": raw}})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"ref": "openai", "header": "Authorization", "format": "Bearer {secret}"},
            CredentialRef("openai", "authorization", "Bearer {secret}"),
        ),
        ({"ref": "anthropic", "header": "x-api-key"}, CredentialRef("anthropic", "x-api-key")),
    ],
    ids=["formatted", "default-format"],
)
def test_credential_shape(raw: dict[str, Any], expected: CredentialRef) -> None:
    assert parse_decision({"allowed": True, "authz": {"credential": raw}}).credential == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("openai", "expected authz.credential to be of type 'object' but got 'string'"),
        ({"header": "x"}, "expected authz.credential.ref to be of type 'string' but got 'null'"),
        ({"ref": "../etc", "header": "x"}, "is not a secret reference"),
        (
            {"ref": "a", "header": 1},
            "expected authz.credential.header to be of type 'string' but got 'number'",
        ),
        ({"ref": "a", "header": "bad header"}, "is not a valid header name"),
        ({"ref": "a", "header": "x", "format": "no placeholder"}, "exactly once"),
        ({"ref": "a", "header": "x", "format": "{secret}{secret}"}, "exactly once"),
        ({"ref": "a", "header": "x", "format": "{secret}\r\nx: y"}, "exactly once"),
        (
            {"ref": "a", "header": "x", "format": 5},
            "expected authz.credential.format to be of type 'string' but got 'number'",
        ),
    ],
    ids=[
        "not-object",
        "no-ref",
        "bad-ref",
        "header-type",
        "header-syntax",
        "no-placeholder",
        "two-placeholders",
        "crlf",
        "format-type",
    ],
)
def test_credential_errors(raw: Any, message: str) -> None:
    with pytest.raises(InvalidDecision, match=re.escape(message)):
        parse_decision({"allowed": True, "authz": {"credential": raw}})


@pytest.mark.parametrize(
    "raw",
    [{}, {"key_id": "key-demo-admin"}, {"key_id": "k", "role": "admin", "tenant": "t1"}],
    ids=["empty", "key-id", "several"],
)
def test_identity_shape(raw: dict[str, str]) -> None:
    assert dict(parse_decision({"allowed": True, "authz": {"identity": raw}}).identity) == raw


def test_decision_is_immutable_and_detached_from_the_result() -> None:
    result: dict[str, Any] = {
        "allowed": True,
        "dynamic_metadata": {"tenant": "t1"},
        "authz": {"identity": {"role": "admin"}},
    }
    decision = parse_decision(result)
    result["dynamic_metadata"]["tenant"] = "changed"
    result["authz"]["identity"]["role"] = "changed"
    assert decision.dynamic_metadata["tenant"] == "t1"
    assert decision.identity["role"] == "admin"
    with pytest.raises(TypeError):
        decision.identity["role"] = "x"  # type: ignore[index]
    with pytest.raises(TypeError):
        decision.dynamic_metadata["tenant"] = "x"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.allowed = False  # type: ignore[misc]


def test_defaults_are_not_shared_mutable_state() -> None:
    first, second = Decision(allowed=True), Decision(allowed=False)
    with pytest.raises(TypeError):
        first.dynamic_metadata["x"] = 1  # type: ignore[index]
    assert dict(second.dynamic_metadata) == {}


@pytest.mark.parametrize(
    ("result", "code"),
    [
        (True, "allowed"),
        (False, "denied"),
        ({"allowed": True}, "allowed"),
        ({"allowed": False, "authz": {"reason": "missing_api_key"}}, "missing_api_key"),
        ({"allowed": True, "authz": {"reason": "trusted_network"}}, "trusted_network"),
    ],
    ids=["bool-allow", "bool-deny", "object-no-reason", "deny-reason", "allow-reason"],
)
def test_reason_code_falls_back_to_allowed_or_denied(result: Any, code: str) -> None:
    assert parse_decision(result).reason_code == code


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (None, "null"),
        (True, "boolean"),
        (False, "boolean"),
        (0, "number"),
        (1.5, "number"),
        ("", "string"),
        ([], "array"),
        ({}, "object"),
    ],
    ids=["null", "true", "false", "int", "float", "string", "array", "object"],
)
def test_json_type(value: Any, name: str) -> None:
    assert json_type(value) == name


# Common opa-envoy-plugin idioms that use top-level names authz once read as its own
# extensions: the plugin accepts every one, so authz must too (issue #15, "the rule").
PLUGIN_IDIOMS: list[tuple[str, Any]] = [
    ("reason", "User is not allowed to access this resource"),
    ("reason", 403),
    ("identity", {"user": {"name": "alice", "groups": ["dev"]}, "authenticated": True}),
    ("source", "ldap"),
    ("rate_limit", 100),
    ("rate_limit", {"tier": "gold", "key": "k"}),
    ("credential", "basic"),
    ("cache_ttl_s", "1h"),
    ("override", True),
    ("override", {"id": "not an id!"}),
]


@pytest.mark.parametrize("allowed", [True, False], ids=["allow", "deny"])
@pytest.mark.parametrize(
    ("name", "value"), PLUGIN_IDIOMS, ids=[f"{n}-{json_type(v)}" for n, v in PLUGIN_IDIOMS]
)
def test_plugin_idiom_top_level_fields_never_make_a_decision_invalid(
    allowed: bool, name: str, value: Any
) -> None:
    decision = parse_decision({"allowed": allowed, name: value})
    assert decision.allowed is allowed
    # Not read as authz's extensions either: they mean what the policy means.
    assert decision.reason is None
    assert decision.source is None
    assert decision.rate_limit is None
    assert decision.credential is None
    assert decision.override_id is None
    assert decision.cache_ttl_s is None
    assert dict(decision.identity) == {}


def test_authz_extensions_are_read_from_the_authz_key_only() -> None:
    decision = parse_decision(
        {
            "allowed": True,
            "reason": "Free text the plugin policy shows",
            "authz": {
                "reason": "allowed",
                "source": "policy_rule",
                "identity": {"key_id": "k1", "role": "admin"},
                "rate_limit": {"tier": "gold", "key": "k1", "requests_per_minute": 60},
                "credential": {"ref": "openai", "header": "authorization"},
                "override": {"id": "o1", "reason": "why"},
                "cache_ttl_s": 5,
            },
        }
    )
    assert decision.reason == "allowed"
    assert decision.source == "policy_rule"
    assert dict(decision.identity) == {"key_id": "k1", "role": "admin"}
    assert decision.rate_limit == RateLimitRef("gold", "k1", 60)
    assert decision.credential == CredentialRef("openai", "authorization")
    assert decision.override_id == "o1"
    assert decision.cache_ttl_s == 5.0
    assert decision.ignored == ()


@pytest.mark.parametrize(
    "value", ["admin", 1, None, ["reason"]], ids=["string", "number", "null", "array"]
)
def test_authz_key_that_is_not_an_object_is_ignored_and_reported(value: Any) -> None:
    decision = parse_decision({"allowed": False, "authz": value})
    assert decision.allowed is False
    assert decision.reason is None
    assert decision.ignored == ("authz",)


# What the plugin never reads for an outcome (internal/internal.go ``check``): on an
# allow, ``body`` and ``http_status``; on a deny, the allow-only request/response edits.
IGNORED_FOR_OUTCOME: list[tuple[bool, dict[str, Any], tuple[str, ...]]] = [
    (True, {"http_status": "teapot", "body": {"error": "x"}}, ("body", "http_status")),
    (True, {"http_status": 200, "body": "ok"}, ("body", "http_status")),
    (True, {"http_status": 99999}, ("http_status",)),
    (
        False,
        {
            "request_headers_to_remove": "x-a",
            "response_headers_to_add": 7,
            "query_parameters_to_set": [1],
            "query_parameters_to_remove": {"a": 1},
        },
        (
            "query_parameters_to_remove",
            "query_parameters_to_set",
            "request_headers_to_remove",
            "response_headers_to_add",
        ),
    ),
    (False, {"response_headers_to_add": {"x-ok": "1"}}, ("response_headers_to_add",)),
]


@pytest.mark.parametrize(
    ("allowed", "fields", "ignored"),
    IGNORED_FOR_OUTCOME,
    ids=["allow-malformed", "allow-wellformed", "allow-bad-status", "deny-malformed", "deny-ok"],
)
def test_fields_the_plugin_ignores_for_the_outcome_are_ignored_not_invalid(
    allowed: bool, fields: dict[str, Any], ignored: tuple[str, ...]
) -> None:
    decision = parse_decision({"allowed": allowed, **fields})
    assert decision.allowed is allowed
    assert decision.ignored == ignored
    # Ignored means unused: nothing of them reaches the Decision.
    assert decision.body is None
    assert decision.http_status is None
    assert decision.response_headers_to_add == ()
    assert decision.request_headers_to_remove == ()
    assert decision.query_parameters_to_set == ()
    assert decision.query_parameters_to_remove == ()


@pytest.mark.parametrize(
    "result",
    [True, False, {"allowed": True, "headers": {"x-a": "1"}}, {"allowed": False, "body": "no"}],
    ids=["bool-allow", "bool-deny", "object-allow", "object-deny"],
)
def test_fields_the_outcome_uses_are_not_reported_ignored(result: Any) -> None:
    assert parse_decision(result).ignored == ()


# -- authz.tunnel (egress tunnels, issue 18) ----------------------------------------------


def test_tunnel_is_parsed_on_an_allow() -> None:
    decision = parse_decision(
        {"allowed": True, "authz": {"tunnel": {"host": "pypi.org", "port": 443.0}}}
    )
    assert decision.tunnel == TunnelRef("pypi.org", 443)


@pytest.mark.parametrize(
    "tunnel",
    [
        "pypi.org:443",
        {"host": "pypi.org"},
        {"host": "PyPI.org", "port": 443},
        {"host": "pypi.org\r\nx", "port": 443},
        {"host": "", "port": 443},
        {"host": "a" * 300, "port": 443},
        {"host": "pypi.org", "port": 0},
        {"host": "pypi.org", "port": 65536},
        {"host": "pypi.org", "port": True},
        {"host": "pypi.org", "port": "443"},
        {"host": "pypi.org", "port": 443.5},
    ],
    ids=[
        "not-object",
        "no-port",
        "uppercase",
        "crlf",
        "empty",
        "too-long",
        "port-0",
        "port-65536",
        "port-bool",
        "port-string",
        "port-fraction",
    ],
)
def test_malformed_tunnel_is_an_invalid_decision(tunnel: Any) -> None:
    with pytest.raises(InvalidDecision, match=r"authz\.tunnel"):
        parse_decision({"allowed": True, "authz": {"tunnel": tunnel}})


# -- issue 19: the hot-path replacements of dataclasses.replace -------------------------

# A decision with every field away from its default, so a field the fast copy dropped or
# swapped would show as a difference from dataclasses.replace.
_EVERY_FIELD_SET = Decision(
    allowed=True,
    form="object",
    headers=(("x-a", "1"), ("x-a", "2")),
    response_headers_to_add=(("x-r", "1"),),
    request_headers_to_remove=("authorization",),
    query_parameters_to_set=(("q", "v"),),
    query_parameters_to_remove=("drop",),
    body="b",
    http_status=418,
    dynamic_metadata={"key_id": "k1"},
    reason="allowed",
    rate_limit=RateLimitRef(tier="t", key="key:k1", requests_per_minute=60, burst=5),
    identity={"key_id": "k1"},
    credential=CredentialRef(ref="r", header="x-c", format="Bearer {secret}"),
    tunnel=TunnelRef(host="api.example.com", port=443),
    override_id="o1",
    cache_ttl_s=1.5,
    source="policy_rule",
    ignored=("body",),
)
_DECISIONS = [
    pytest.param(_EVERY_FIELD_SET, id="every-field-set"),
    pytest.param(Decision(allowed=False), id="defaults"),
    pytest.param(parse_decision(True), id="boolean-allow"),
]
_NEW_HEADERS = [
    pytest.param((), id="empty"),
    pytest.param((("x-ratelimit-limit", "60"), ("x-ratelimit-remaining", "59")), id="two"),
]


def test_every_field_set_differs_from_defaults() -> None:
    """The corpus's first decision exercises every field (a new field must be set there)."""
    defaults = Decision(allowed=False)
    for field in dataclasses.fields(Decision):
        assert getattr(_EVERY_FIELD_SET, field.name) != getattr(defaults, field.name), field.name


@pytest.mark.parametrize("headers", _NEW_HEADERS)
@pytest.mark.parametrize("decision", _DECISIONS)
def test_with_headers_equals_dataclasses_replace(
    decision: Decision, headers: tuple[tuple[str, str], ...]
) -> None:
    fast = decision.with_headers(headers)
    assert fast == dataclasses.replace(decision, headers=headers)
    assert type(fast) is Decision
    assert fast is not decision


@pytest.mark.parametrize("headers", _NEW_HEADERS)
@pytest.mark.parametrize("decision", _DECISIONS)
def test_with_response_headers_equals_dataclasses_replace(
    decision: Decision, headers: tuple[tuple[str, str], ...]
) -> None:
    fast = decision.with_response_headers(headers)
    assert fast == dataclasses.replace(decision, response_headers_to_add=headers)
    assert type(fast) is Decision
    assert fast is not decision


# --- issue 19: the cheaper miss path parses as before ----------------------------------
# The header and code checks before issue 19, verbatim, swapped into the module to give
# the reference parse.


def _reference_header_name(field_name: str, name: str) -> str:
    if not is_token(name):
        raise UnsafeHeaderMutation(f"{field_name}: {name[:64]!r} is not a valid header name")
    return name.lower()


def _reference_headers(field_name: str, raw: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(raw, dict):
        objects = [raw]
    elif isinstance(raw, list):
        objects = raw
    else:
        raise decision_module._type_error(field_name, "object", raw)
    out: list[tuple[str, str]] = []
    for obj in objects:
        if not isinstance(obj, dict):
            raise decision_module._type_error(field_name, "object", obj)
        for name, value in obj.items():
            key = _reference_header_name(field_name, name)
            values = value if isinstance(value, list) else [value]
            out.extend((key, decision_module._header_value(field_name, name, v)) for v in values)
    return tuple(out)


def _reference_code(name: str, raw: Any) -> str:
    if not isinstance(raw, str):
        raise decision_module._type_error(name, "string", raw)
    if not decision_module._REASON.fullmatch(raw):
        raise InvalidDecision(f"{name} {raw[:64]!r} is not a snake_case code")
    return raw


def _reference_allow_fields(result: Any, fields: dict[str, Any], ignored: list[str]) -> None:
    if "response_headers_to_add" in result:
        fields["response_headers_to_add"] = _reference_headers(
            "response_headers_to_add", result["response_headers_to_add"]
        )
    if "request_headers_to_remove" in result:
        names = decision_module._strings(
            "request_headers_to_remove", result["request_headers_to_remove"]
        )
        valid = tuple(name.lower() for name in names if is_token(name))
        if len(valid) != len(names):
            ignored.append("request_headers_to_remove")
        fields["request_headers_to_remove"] = valid
    if "query_parameters_to_set" in result:
        fields["query_parameters_to_set"] = decision_module._query_to_set(
            result["query_parameters_to_set"]
        )
    if "query_parameters_to_remove" in result:
        fields["query_parameters_to_remove"] = decision_module._strings(
            "query_parameters_to_remove", result["query_parameters_to_remove"]
        )


def _reference_parse(result: Any) -> Any:
    """parse_decision with the checks before issue 19: the Decision, or the error (type
    and message)."""
    saved = (
        decision_module._headers,
        decision_module._code,
        decision_module._allow_fields,
        decision_module._header_name,
    )
    (
        decision_module._headers,
        decision_module._code,
        decision_module._allow_fields,
        decision_module._header_name,
    ) = (_reference_headers, _reference_code, _reference_allow_fields, _reference_header_name)
    try:
        return _outcome(result)
    finally:
        (
            decision_module._headers,
            decision_module._code,
            decision_module._allow_fields,
            decision_module._header_name,
        ) = saved


def _outcome(result: Any) -> Any:
    try:
        return parse_decision(result)
    except (InvalidDecision, UnsafeHeaderMutation, TypeError) as exc:
        return type(exc), str(exc)


class _OddLower(str):
    """A header name whose lower() is not str.lower's."""

    __slots__ = ()

    def lower(self) -> str:
        return "x-odd"


class _EqualToEverything(str):
    """A code that claims to equal any string (and hashes as ``allowed``)."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return hash("allowed")


class _Impostor(str):
    """A valid code that claims to equal any string and hashes as an invalid one."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return hash("not a code!")


class _HidesCr(str):
    """A header value whose ``in`` never finds anything (it holds a CR)."""

    __slots__ = ()

    def __contains__(self, other: object) -> bool:
        return False


_GATEWAY = {
    "allowed": True,
    "authz": {
        "reason": "allowed",
        "source": "policy_rule",
        "rate_limit": {"tier": "standard", "key": "key:k1", "requests_per_minute": 600},
        "identity": {"key_id": "k1", "role": "reader", "tier": "standard"},
    },
    "headers": {"x-authz-key-id": "k1", "x-authz-role": "reader", "x-authz-tier": "standard"},
    "request_headers_to_remove": ["authorization", "x-api-key"],
    "dynamic_metadata": {"key_id": "k1", "role": "reader", "tier": "standard"},
}
# Each result is parsed in this order, twice over (the second time with every name and
# code it holds already known), after a fresh start: cases that need a name known before
# them follow the case that makes it known.
_PARSE_CORPUS = [
    pytest.param(True, id="boolean-allow"),
    pytest.param(False, id="boolean-deny"),
    pytest.param(_GATEWAY, id="gateway-allow"),
    pytest.param(
        {
            "allowed": False,
            "http_status": 401,
            "headers": {"WWW-Authenticate": "ApiKey", "content-type": "application/json"},
            "authz": {"reason": "invalid_api_key", "source": "deny"},
        },
        id="gateway-deny-mixed-case-name",
    ),
    pytest.param(
        {
            "allowed": True,
            "headers": [{"X-A": ["1", "2"]}, {"x-a": "3", "X-B": ""}],
            "response_headers_to_add": {"Set-Cookie": ["a=1", "b=2"]},
            "request_headers_to_remove": ["X-A", "bad name", "Cookie", "", "x-a"],
        },
        id="lists-repeats-invalid-removals",
    ),
    pytest.param({"allowed": True, "headers": {"X-A": 1}}, id="int-value"),
    pytest.param({"allowed": True, "headers": {"X-A": None}}, id="null-value"),
    pytest.param({"allowed": True, "headers": {"X-A": ["ok", 2]}}, id="int-in-list"),
    pytest.param({"allowed": True, "headers": {"X-A": [["nested"]]}}, id="list-in-list"),
    pytest.param({"allowed": True, "headers": {"X-A": "a\rb"}}, id="cr"),
    pytest.param({"allowed": True, "headers": {"X-A": "a\nb"}}, id="lf"),
    pytest.param({"allowed": True, "headers": {"X-A": "ab\x00"}}, id="nul-last"),
    pytest.param({"allowed": True, "headers": {"X-A": ["ok", "\r\n"]}}, id="crlf-in-list"),
    pytest.param({"allowed": True, "headers": {"X-A": "v", "x b": "v"}}, id="bad-name-after"),
    pytest.param({"allowed": True, "headers": {"x b": "\r"}}, id="bad-name-bad-value"),
    pytest.param({"allowed": True, "headers": {"X-A": "\r", "x b": "v"}}, id="bad-value-first"),
    pytest.param({"allowed": True, "headers": {1: "v"}}, id="int-name"),
    pytest.param({"allowed": True, "headers": {"": "v"}}, id="empty-name"),
    pytest.param({"allowed": True, "headers": {"x-" + "a" * 100: "v"}}, id="long-name"),
    pytest.param({"allowed": True, "headers": {"ü-name": "v"}}, id="non-ascii-name"),
    pytest.param({"allowed": True, "headers": {"X-A": "ü ✓"}}, id="non-ascii-value"),
    pytest.param({"allowed": True, "headers": {_OddLower("X-A"): "v"}}, id="odd-lower-known"),
    pytest.param({"allowed": True, "headers": {_OddLower("X-New"): "v"}}, id="odd-lower-new"),
    pytest.param({"allowed": True, "headers": {"X-New": "v"}}, id="after-odd-lower"),
    pytest.param(
        {"allowed": True, "request_headers_to_remove": [_OddLower("X-A")]},
        id="odd-lower-removal",
    ),
    pytest.param({"allowed": True, "headers": {"X-A": _OddLower("v")}}, id="str-subclass-value"),
    pytest.param({"allowed": True, "headers": "x"}, id="headers-not-object"),
    pytest.param({"allowed": True, "headers": [{"X-A": "v"}, "x"]}, id="list-of-non-object"),
    pytest.param({"allowed": True, "request_headers_to_remove": "x-a"}, id="removal-not-list"),
    pytest.param({"allowed": True, "request_headers_to_remove": [1]}, id="removal-not-string"),
    pytest.param({"allowed": True, "authz": {"reason": "Allowed"}}, id="code-uppercase"),
    pytest.param({"allowed": True, "authz": {"reason": 1}}, id="code-int"),
    pytest.param({"allowed": True, "authz": {"reason": "a" * 65}}, id="code-too-long"),
    pytest.param({"allowed": True, "authz": {"reason": "allowed\n"}}, id="code-newline"),
    pytest.param(
        {"allowed": True, "authz": {"reason": _EqualToEverything("NOT A CODE")}},
        id="code-equal-to-everything",
    ),
    pytest.param({"allowed": True, "authz": {"reason": _Impostor("allowed")}}, id="impostor"),
    pytest.param({"allowed": True, "authz": {"reason": "not a code!"}}, id="after-impostor"),
    pytest.param({"allowed": True, "headers": {"X-A": _HidesCr("a\rb")}}, id="value-hides-cr"),
    pytest.param(
        {"allowed": True, "authz": {"source": "policy_rule", "reason": "policy_rule"}},
        id="codes-known",
    ),
    pytest.param(
        {"allowed": False, "headers": {"X-A": ["1", "\x00"]}, "authz": {"reason": "x"}},
        id="deny-nul-in-list",
    ),
]


@pytest.fixture
def fresh_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decision_module, "_NAMES", {})
    monkeypatch.setattr(decision_module, "_CODES", set())


@pytest.mark.usefixtures("fresh_caches")
def test_parse_decision_equals_the_checks_before_issue_19_cold_and_warm() -> None:
    """The corpus in order, twice: each outcome (Decision, field by field, or the error
    and its message) is the reference parse's, whatever names and codes are known."""
    results = [p.values[0] for p in _PARSE_CORPUS]
    ids = [p.id for p in _PARSE_CORPUS]
    for round_ in ("cold", "warm"):
        for case, result in zip(ids, results, strict=True):
            got, expected = _outcome(result), _reference_parse(result)
            assert got == expected, (round_, case)
            if isinstance(expected, Decision):
                assert repr(got) == repr(expected), (round_, case)
                for name in ("headers", "request_headers_to_remove", "reason", "source"):
                    assert [type(v) for v in _flat(getattr(got, name))] == [
                        type(v) for v in _flat(getattr(expected, name))
                    ], (round_, case, name)


def _flat(value: Any) -> list[Any]:
    if isinstance(value, tuple):
        return [leaf for item in value for leaf in _flat(item)]
    return [value]


@pytest.mark.usefixtures("fresh_caches")
def test_known_names_and_codes_are_bounded() -> None:
    for i in range(decision_module._NAMES_MAX + 50):
        parse_decision(
            {
                "allowed": True,
                "headers": {f"x-h{i}": "v", f"x-{i}-" + "a" * 100: "v"},
                "authz": {"reason": f"r{i}"},
            }
        )
    assert len(decision_module._NAMES) == decision_module._NAMES_MAX
    assert max(map(len, decision_module._NAMES)) <= decision_module._NAME_MAX
    assert len(decision_module._CODES) == decision_module._NAMES_MAX
    # Past the bound, names and codes are still checked and lowered.
    assert parse_decision({"allowed": True, "headers": {"X-Late": "v"}}).headers == (
        ("x-late", "v"),
    )
    with pytest.raises(UnsafeHeaderMutation):
        parse_decision({"allowed": True, "headers": {"x late": "v"}})
