"""authz.core.input: CheckRequest -> OPA input document.

Expected values follow opa-envoy-plugin (``envoyauth/request.go``, ``request_test.go``,
``protomap_test.go``): Go's ``url.PathUnescape`` / ``url.ParseQuery`` semantics, body
parsing and truncation rules, and ``protomap`` (JSON names, only set fields, bytes as
base64, enums as numbers). Credential masking follows ``docs/contract.md``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from typing import Any

import orjson
import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf.json_format import ParseDict

from authz.core.authorizer import Authorizer, Outcome
from authz.core.errors import ConfigError, DecisionPathError, RequestError
from authz.core.input import (
    _MAX_JOSE_HEADER,
    MAX_BASIC_CREDENTIALS,
    MAX_BODY_BYTES,
    MAX_FORM_FIELDS,
    MAX_JSON_DEPTH,
    MAX_MULTIPART_HEADER_BYTES,
    MAX_MULTIPART_PARTS,
    MAX_PART_HEADER_BYTES,
    MAX_PART_HEADERS,
    MAX_QUERY_FIELDS,
    BodyParsing,
    GrpcDescriptors,
    build_input,
    mask_credential,
    parse_body,
    parse_proxy_basic,
)
from authz.core.mode import Control, Mode
from authz.core.opa import OpaClient
from authz.runtime.config import load
from tests.helpers.fakes import ListSink, check_request

# The default credential headers of docs/contract.md plus proxy-authorization.
CREDENTIAL_HEADERS = ("x-api-key", "authorization", "proxy-authorization", "x-sandbox-token")


def check_request_json(
    http: dict[str, Any] | None = None, **attributes: Any
) -> external_auth_pb2.CheckRequest:
    """A CheckRequest from its protobuf JSON form, as the plugin's tests build theirs."""
    attrs: dict[str, Any] = dict(attributes)
    if http is not None:
        attrs["request"] = {"http": http}
    return ParseDict({"attributes": attrs}, external_auth_pb2.CheckRequest())


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def document_for(http: dict[str, Any], headers: tuple[str, ...] = ()) -> dict[str, Any]:
    return build_input(check_request_json(http), headers)


# --- parsed_path / parsed_query ------------------------------------------------------

PATH_CASES = [
    # (path, parsed_path, parsed_query)
    ("/my/test/path", ["my", "test", "path"], {}),
    ("/my/test/path?a=1", ["my", "test", "path"], {"a": ["1"]}),
    ("/my/test/path?a=1&b=2", ["my", "test", "path"], {"a": ["1"], "b": ["2"]}),
    # From request_test.go: %2F decodes before the split, so it separates segments.
    ("%2Fmy%2Ftest%2Fpath?a=1&a=new%0aline", ["my", "test", "path"], {"a": ["1", "new\nline"]}),
    ("//x/people", ["x", "people"], {}),
    ("//admin/dashboard?a=1", ["admin", "dashboard"], {"a": ["1"]}),
    ("//a/b%2Fc", ["a", "b", "c"], {}),
    ("/a%20b/c", ["a b", "c"], {}),
    # '+' is a space only in the query (QueryUnescape), not in the path (PathUnescape).
    ("/a+b?q=a+b", ["a+b"], {"q": ["a b"]}),
    ("/caf%C3%A9", ["café"], {}),
    ("/api/v1/", ["api", "v1", ""], {}),
    ("/", [""], {}),
    ("", [""], {}),
    ("/x?a=1&a=2&b=3", ["x"], {"a": ["1", "2"], "b": ["3"]}),
    ("/x?q=hello+world&plus=a%2Bb", ["x"], {"q": ["hello world"], "plus": ["a+b"]}),
    ("/x?flag", ["x"], {"flag": [""]}),
    ("/x?flag&k=", ["x"], {"flag": [""], "k": [""]}),
    ("/x?", ["x"], {}),
    ("/x?&&a=1&", ["x"], {"a": ["1"]}),
    ("/x?a%20b=c", ["x"], {"a b": ["c"]}),
    ("/x?a=1=2", ["x"], {"a": ["1=2"]}),
    # Only the first '?' splits path from query.
    ("/x?next=/y?z", ["x"], {"next": ["/y?z"]}),
]


@pytest.mark.parametrize(
    ("path", "parsed_path", "parsed_query"),
    PATH_CASES,
    ids=[case[0] or "<empty>" for case in PATH_CASES],
)
def test_parsed_path_and_query(
    path: str, parsed_path: list[str], parsed_query: dict[str, list[str]]
) -> None:
    document = document_for({"path": path})
    assert document["parsed_path"] == parsed_path
    assert document["parsed_query"] == parsed_query


def test_invalid_utf8_in_path_is_replaced_not_kept() -> None:
    # Go keeps the raw byte; OPA's JSON encoding then shows U+FFFD. The document must
    # stay encodable by orjson (what policy.py sends to OPA).
    document = document_for({"path": "/a%FF?k=%FF"})
    assert document["parsed_path"] == ["a\ufffd"]
    assert document["parsed_query"] == {"k": ["\ufffd"]}
    orjson.dumps(document)


@pytest.mark.parametrize(
    "path",
    ["/a%zz", "/a%2", "/a%", "/x?a=%zz", "/x?%zz=1", "/x?a=1;b=2", "/x?a=1&b=2;c"],
    ids=[
        "path-bad-hex",
        "path-short-escape",
        "path-lone-percent",
        "query-value-bad-hex",
        "query-key-bad-hex",
        "query-semicolon",
        "query-semicolon-later-pair",
    ],
)
def test_malformed_path_or_query_is_request_error(path: str) -> None:
    with pytest.raises(RequestError):
        document_for({"path": path})


# --- parsed_body / truncated_body ----------------------------------------------------

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data; boundary=foo"

# The plugin's request_test.go fixtures use bare LF line endings; Go accepts them.
MULTIPART_TEXT_LF = (
    '--foo\nContent-Disposition: form-data; name="foo"\nContent-Type: text/plain\n\nbar\n--foo--\n'
)
MULTIPART_TEXT_AND_JSON = (
    "--foo\r\n"
    'Content-Disposition: form-data; name="foo"\r\n'
    "Content-Type: text/plain\r\n\r\n"
    "bar\r\n"
    "--foo\r\n"
    'Content-Disposition: form-data; name="bar"\r\n'
    "Content-Type: application/json;\r\n\r\n"
    '{"name": "bar"}\r\n'
    "--foo\r\n"
    'Content-Disposition: form-data; name="foo"\r\n\r\n'
    "baz\r\n"
    "--foo--\r\n"
)
MULTIPART_SKIPPED_PARTS = (
    "--foo\r\n"
    "Content-Disposition: form-data\r\n\r\n"  # no name
    "anonymous\r\n"
    "--foo\r\n"
    'Content-Disposition: attachment; name="att"\r\n\r\n'  # not form-data
    "attached\r\n"
    "--foo\r\n"
    'Content-Disposition: form-data; name="kept"\r\n\r\n'
    "yes\r\n"
    "--foo--\r\n"
)
NON_ASCII_JSON = '{"name": "José"}'  # 16 characters, 17 UTF-8 bytes

BODY_CASES: list[tuple[str, dict[str, str], str, bytes, Any, bool]] = [
    # (id, headers, body, raw_body, parsed_body, truncated_body)
    ("no-content-type", {"content-length": "0"}, "", b"", None, False),
    ("no-content-type-with-body", {}, '{"a": 1}', b"", None, False),
    ("unsupported-content-type", {"content-type": "text/html"}, "<p>", b"", None, False),
    ("json-string", {"content-type": JSON}, '"foo"', b"", "foo", False),
    ("json-boolean", {"content-type": JSON}, "true", b"", True, False),
    ("json-number", {"content-type": JSON}, "42", b"", 42, False),
    ("json-null", {"content-type": JSON}, "null", b"", None, False),
    (
        "json-object",
        {"content-type": JSON},
        '{"firstname": "foo", "lastname": "bar"}',
        b"",
        {"firstname": "foo", "lastname": "bar"},
        False,
    ),
    ("json-array", {"content-type": JSON}, '["hello", "opa"]', b"", ["hello", "opa"], False),
    (
        "json-special-chars",
        {"content-type": JSON},
        r'["\"", "\\", "\/", "\n", "\u0041"]',
        b"",
        ['"', "\\", "/", "\n", "A"],
        False,
    ),
    ("json-with-charset", {"content-type": f"{JSON}; charset=utf-8"}, "[1]", b"", [1], False),
    ("json-empty", {"content-type": JSON}, "", b"", None, False),
    (
        "json-raw-body",
        {"content-type": JSON},
        "",
        b'{"firstname": "foo"}',
        {"firstname": "foo"},
        False,
    ),
    (
        "json-body-wins-over-raw-body",
        {"content-type": JSON},
        '{"from": "body"}',
        b'{"from": "raw"}',
        {"from": "body"},
        False,
    ),
    (
        "form",
        {"content-type": FORM},
        "firstname=foo&lastname=bar&lastname=foobar",
        b"",
        {"firstname": ["foo"], "lastname": ["bar", "foobar"]},
        False,
    ),
    (
        "form-raw-body",
        {"content-type": FORM},
        "",
        b"firstname=foo&lastname=bar",
        {"firstname": ["foo"], "lastname": ["bar"]},
        False,
    ),
    (
        "form-plus-and-escapes",
        {"content-type": FORM},
        "q=a+b%21&flag",
        b"",
        {"q": ["a b!"], "flag": [""]},
        False,
    ),
    ("form-empty", {"content-type": FORM}, "", b"", None, False),
    (
        "multipart-text-lf",
        {"content-type": MULTIPART},
        MULTIPART_TEXT_LF,
        b"",
        {"foo": ["bar"]},
        False,
    ),
    (
        "multipart-text-and-json",
        {"content-type": MULTIPART},
        MULTIPART_TEXT_AND_JSON,
        b"",
        {"foo": ["bar", "baz"], "bar": [{"name": "bar"}]},
        False,
    ),
    (
        "multipart-raw-body",
        {"content-type": MULTIPART},
        "",
        MULTIPART_TEXT_LF.encode(),
        {"foo": ["bar"]},
        False,
    ),
    (
        "multipart-skips-unnamed-and-non-form-data",
        {"content-type": MULTIPART},
        MULTIPART_SKIPPED_PARTS,
        b"",
        {"kept": ["yes"]},
        False,
    ),
    (
        "multipart-without-boundary",
        {"content-type": "multipart/form-data"},
        MULTIPART_TEXT_LF,
        b"",
        None,
        False,
    ),
    # Truncation: content-length larger than what Envoy sent means a partial body.
    (
        "json-content-length-larger",
        {"content-type": JSON, "content-length": "1000"},
        "true",
        b"",
        None,
        True,
    ),
    (
        "json-raw-body-content-length-larger",
        {"content-type": JSON, "content-length": "1000"},
        "",
        b"true",
        None,
        True,
    ),
    (
        "form-content-length-larger",
        {"content-type": FORM, "content-length": "1000"},
        "a=b",
        b"",
        None,
        True,
    ),
    (
        "multipart-content-length-larger",
        {"content-type": MULTIPART, "content-length": "1000"},
        MULTIPART_TEXT_LF,
        b"",
        None,
        True,
    ),
    (
        "json-content-length-equal",
        {"content-type": JSON, "content-length": "4"},
        "true",
        b"",
        True,
        False,
    ),
    (
        "json-content-length-smaller",
        {"content-type": JSON, "content-length": "1"},
        "true",
        b"",
        True,
        False,
    ),
    (
        "json-content-length-minus-one",
        {"content-type": JSON, "content-length": "-1"},
        "true",
        b"",
        True,
        False,
    ),
    # content-length counts bytes; a non-ASCII body sent whole is not truncated.
    (
        "json-non-ascii-content-length-in-bytes",
        {"content-type": JSON, "content-length": str(len(NON_ASCII_JSON.encode()))},
        NON_ASCII_JSON,
        b"",
        {"name": "José"},
        False,
    ),
    (
        "json-non-ascii-raw-body-content-length-in-bytes",
        {"content-type": JSON, "content-length": str(len(NON_ASCII_JSON.encode()))},
        "",
        NON_ASCII_JSON.encode(),
        {"name": "José"},
        False,
    ),
    # Envoy's explicit marker wins, whatever the content type.
    (
        "partial-body-json",
        {"content-type": JSON, "x-envoy-auth-partial-body": "true"},
        '{"a": 1}',
        b"",
        None,
        True,
    ),
    (
        "partial-body-form",
        {"content-type": FORM, "x-envoy-auth-partial-body": "true"},
        "a=b",
        b"",
        None,
        True,
    ),
    (
        "partial-body-multipart",
        {"content-type": MULTIPART, "x-envoy-auth-partial-body": "true"},
        MULTIPART_TEXT_LF,
        b"",
        None,
        True,
    ),
    ("partial-body-no-content-type", {"x-envoy-auth-partial-body": "true"}, "x", b"", None, True),
    (
        "not-partial-body-json",
        {"content-type": JSON, "x-envoy-auth-partial-body": "false"},
        '{"a": 1}',
        b"",
        {"a": 1},
        False,
    ),
]


@pytest.mark.parametrize(
    ("headers", "body", "raw_body", "parsed_body", "truncated_body"),
    [case[1:] for case in BODY_CASES],
    ids=[case[0] for case in BODY_CASES],
)
def test_parsed_body(
    headers: dict[str, str], body: str, raw_body: bytes, parsed_body: Any, truncated_body: bool
) -> None:
    http: dict[str, Any] = {"path": "/", "headers": headers, "body": body}
    if raw_body:
        http["rawBody"] = base64.b64encode(raw_body).decode()
    document = document_for(http)
    assert document["parsed_body"] == parsed_body
    assert type(document["parsed_body"]) is type(parsed_body)  # 42 stays int, not 42.0
    assert document["truncated_body"] is truncated_body


@pytest.mark.parametrize(
    ("content_type", "raw_body", "parsed_body"),
    [
        (JSON, b'{"a": "\xff"}', {"a": "\ufffd"}),
        (FORM, b"a=\xff", {"a": ["\ufffd"]}),
        (
            MULTIPART,
            b'--foo\r\nContent-Disposition: form-data; name="a"\r\n\r\n\xff\r\n--foo--\r\n',
            {"a": ["\ufffd"]},
        ),
    ],
    ids=["json", "form", "multipart"],
)
def test_invalid_utf8_raw_body_gives_replacement_characters(
    content_type: str, raw_body: bytes, parsed_body: Any
) -> None:
    # Go decodes invalid UTF-8 to U+FFFD when OPA reads or renders the body; the
    # document must stay encodable by orjson, which policy.py uses to send it to OPA.
    http = {"path": "/", "headers": {"content-type": content_type}}
    http["rawBody"] = base64.b64encode(raw_body).decode()
    document = document_for(http)
    assert document["parsed_body"] == parsed_body
    orjson.dumps(document)


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"content-type": JSON}, '["foo" : 42}'),
        ({"content-type": JSON}, "{"),
        ({"content-type": JSON, "content-length": "abc"}, "{}"),
        ({"content-type": FORM}, "a=1;b=2"),
        ({"content-type": FORM}, "a=%zz"),
        (
            {"content-type": MULTIPART},
            '--foo\r\nContent-Disposition: form-data; name="f"\r\n\r\nbar',
        ),
        (
            {"content-type": MULTIPART},
            '--foo\r\nContent-Disposition: form-data; name="f"\r\n'
            "Content-Type: application/json\r\n\r\n{bad\r\n--foo--\r\n",
        ),
    ],
    ids=[
        "json-malformed",
        "json-unterminated",
        "content-length-not-a-number",
        "form-semicolon",
        "form-bad-escape",
        "multipart-no-close-boundary",
        "multipart-json-part-malformed",
    ],
)
def test_malformed_body_is_request_error(headers: dict[str, str], body: str) -> None:
    with pytest.raises(RequestError):
        document_for({"path": "/", "headers": headers, "body": body})


def test_body_parsing_can_be_skipped() -> None:
    # internal_test.go: with skip_request_body_parse neither key is in the input.
    request = check_request_json(
        {"path": "/", "headers": {"content-type": JSON}, "body": "not json"}
    )
    document = build_input(request, (), parse_request_body=False)
    assert "parsed_body" not in document
    assert "truncated_body" not in document


# --- attributes (protomap), version, source_principal --------------------------------


def test_attributes_use_json_names_and_only_set_fields() -> None:
    # Passed through as given (Structs and maps of strings):
    source = {
        "address": {"socketAddress": {"address": "10.0.0.7", "portValue": 53011}},
        "service": "dummy",
        "labels": {"foo": "bar"},
        "principal": "spiffe://cluster.local/ns/agents/sa/runner",
    }
    extensions = {"decision_path": "authz/egress/decision", "route_name": "r1"}
    metadata = {
        "filterMetadata": {
            "envoy.filters.http.jwt_authn": {"sub": "agent-1", "count": 1, "roles": ["a", "b"]}
        }
    }
    # The string fields of the HTTP request too (size and rawBody, below, change form).
    http = {
        "id": "13359530607844510314",
        "method": "POST",
        "headers": {":authority": "api.example.com", "accept": "*/*"},
        "path": "/api/v1/products",
        "host": "api.example.com",
        "scheme": "https",
        "protocol": "HTTP/1.1",
    }
    request = check_request_json(
        {
            **http,
            "size": "12",
            "rawBody": base64.b64encode(b"firstname=foo&lastname=bar").decode(),
        },
        source=source,
        destination={
            "address": {
                "socketAddress": {"address": "10.0.0.1", "portValue": 8080, "protocol": "UDP"}
            }
        },
        contextExtensions=extensions,
        metadataContext=metadata,
        tlsSession={"sni": "api.example.com"},
    )
    request.attributes.request.time.FromSeconds(1_700_000_000)

    document = build_input(request, ())

    assert document["attributes"] == {
        "source": source,
        # Enums are numbers in protomap (UDP = 1), not protojson's names.
        "destination": {
            "address": {"socketAddress": {"address": "10.0.0.1", "portValue": 8080, "protocol": 1}}
        },
        "contextExtensions": extensions,
        # A Struct is plain JSON, not {"fields": {...: {"stringValue": ...}}}.
        "metadataContext": metadata,
        "tlsSession": {"sni": "api.example.com"},
        "request": {
            "time": {"seconds": 1_700_000_000},
            "http": {
                **http,
                # int64 is a number here (protojson would make it the string "12").
                "size": 12,
                # Bytes are standard base64 (the value from request_test.go).
                "rawBody": "Zmlyc3RuYW1lPWZvbyZsYXN0bmFtZT1iYXI=",
            },
        },
    }
    assert type(document["attributes"]["request"]["http"]["size"]) is int
    assert document["source_principal"] == "spiffe://cluster.local/ns/agents/sa/runner"
    # Everything else authz adds; nothing more.
    assert set(document) == {
        "attributes",
        "version",
        "parsed_path",
        "parsed_query",
        "parsed_body",
        "truncated_body",
        "source_principal",
        "credentials",
    }
    json.loads(json.dumps(document))


def test_bytes_are_base64() -> None:
    document = document_for({"path": "/", "rawBody": base64.b64encode(b"\x00\xffhello").decode()})
    assert document["attributes"]["request"]["http"]["rawBody"] == "AP9oZWxsbw=="


def test_empty_request_has_only_the_computed_fields() -> None:
    document = build_input(external_auth_pb2.CheckRequest(), CREDENTIAL_HEADERS)
    assert document == {
        "version": {"ext_authz": "v3", "encoding": "protojson"},
        "parsed_path": [""],
        "parsed_query": {},
        "parsed_body": None,
        "truncated_body": False,
        "credentials": {},
    }


def test_version_is_v3_protojson_and_a_fresh_copy() -> None:
    first = document_for({"path": "/"})
    assert first["version"] == {"ext_authz": "v3", "encoding": "protojson"}
    first["version"]["ext_authz"] = "tampered"
    assert document_for({"path": "/"})["version"]["ext_authz"] == "v3"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"principal": "spiffe://test-domain/path"}, "spiffe://test-domain/path"),
        ({"service": "svc"}, None),
        (None, None),
    ],
    ids=["set", "peer-without-principal", "no-source"],
)
def test_source_principal(source: dict[str, str] | None, expected: str | None) -> None:
    attributes: dict[str, Any] = {} if source is None else {"source": source}
    document = build_input(check_request_json({"path": "/"}, **attributes), ())
    assert document.get("source_principal") == expected
    assert ("source_principal" in document) is (expected is not None)


# --- credentials ---------------------------------------------------------------------

API_KEY = "ak_live_9f8e7d6c5b4a3f2e1d0c"
TOKEN = "sk-proj-Zx81QwErTy7UiOp"
SANDBOX = "sbx_4c2a91d7e0f3"


def header_map(*entries: tuple[str, str], raw: bool = True) -> dict[str, Any]:
    """Envoy's ``header_map`` form (``encode_raw_headers: true``): values in raw_value."""
    if raw:
        return {
            "headers": [
                {"key": k, "rawValue": base64.b64encode(v.encode()).decode()} for k, v in entries
            ]
        }
    return {"headers": [{"key": k, "value": v} for k, v in entries]}


def _one(
    case_id: str, http: dict[str, Any], header: str, secret: str
) -> tuple[str, dict[str, Any], dict[str, str], str]:
    """A :data:`CREDENTIAL_CASES` row whose only credential is ``header`` carrying
    ``secret``: ``input.credentials`` holds its digest alone."""
    return (case_id, http, {header: sha256(secret)}, secret)


CREDENTIAL_CASES: list[tuple[str, dict[str, Any], dict[str, str], str]] = [
    # (id, http, expected input.credentials, the secret that must not appear)
    _one("x-api-key", {"headers": {"x-api-key": API_KEY}}, "x-api-key", API_KEY),
    _one("x-api-key-padded", {"headers": {"x-api-key": f"  {API_KEY} "}}, "x-api-key", API_KEY),
    _one("bearer", {"headers": {"authorization": f"Bearer {TOKEN}"}}, "authorization", TOKEN),
    _one("bearer-no-scheme", {"headers": {"authorization": TOKEN}}, "authorization", TOKEN),
    _one(
        "proxy-authorization",
        {"headers": {"proxy-authorization": f"Bearer {TOKEN}"}},
        "proxy-authorization",
        TOKEN,
    ),
    _one("x-sandbox-token", {"headers": {"x-sandbox-token": SANDBOX}}, "x-sandbox-token", SANDBOX),
    (
        "several",
        {"headers": {"x-api-key": API_KEY, "authorization": f"Bearer {TOKEN}", "accept": "*/*"}},
        {"x-api-key": sha256(API_KEY), "authorization": sha256(TOKEN)},
        TOKEN,
    ),
    _one(
        "header-map-raw-value",
        {"headerMap": header_map(("x-api-key", API_KEY))},
        "x-api-key",
        API_KEY,
    ),
    _one(
        "header-map-raw-value-bearer",
        {"headerMap": header_map(("authorization", f"Bearer {TOKEN}"))},
        "authorization",
        TOKEN,
    ),
    _one(
        "header-map-value",
        {"headerMap": header_map(("x-api-key", API_KEY), raw=False)},
        "x-api-key",
        API_KEY,
    ),
    _one(
        "header-map-mixed-case-key",
        {"headerMap": header_map(("X-Api-Key", API_KEY))},
        "x-api-key",
        API_KEY,
    ),
    _one(
        "headers-and-header-map",
        {"headers": {"x-api-key": API_KEY}, "headerMap": header_map(("x-api-key", API_KEY))},
        "x-api-key",
        API_KEY,
    ),
    ("absent", {"headers": {"accept": "*/*"}}, {}, API_KEY),
]


@pytest.mark.parametrize(
    ("http", "credentials", "secret"),
    [case[1:] for case in CREDENTIAL_CASES],
    ids=[case[0] for case in CREDENTIAL_CASES],
)
def test_credentials_are_hashed_and_never_in_clear(
    http: dict[str, Any], credentials: dict[str, str], secret: str
) -> None:
    document = document_for({"path": "/", **http}, CREDENTIAL_HEADERS)
    assert document["credentials"] == credentials
    dumped = json.dumps(document)
    assert secret not in dumped
    assert base64.b64encode(secret.encode()).decode() not in dumped
    for digest in credentials.values():
        assert f"sha256:{digest}" in dumped


@pytest.mark.parametrize(
    ("name", "value", "masked"),
    [
        ("x-api-key", API_KEY, f"sha256:{sha256(API_KEY)}"),
        ("authorization", f"Bearer {TOKEN}", f"Bearer sha256:{sha256(TOKEN)}"),
        ("authorization", f"bearer   {TOKEN}", f"bearer sha256:{sha256(TOKEN)}"),
        ("authorization", TOKEN, f"sha256:{sha256(TOKEN)}"),
        ("proxy-authorization", f"Basic {TOKEN}", f"Basic sha256:{sha256(TOKEN)}"),
        ("x-sandbox-token", SANDBOX, f"sha256:{sha256(SANDBOX)}"),
    ],
    ids=[
        "api-key",
        "bearer",
        "bearer-lowercase-extra-spaces",
        "no-scheme",
        "proxy-basic",
        "sandbox",
    ],
)
def test_credential_header_value_is_replaced(name: str, value: str, masked: str) -> None:
    document = document_for(
        {"path": "/", "headers": {name: value, "accept": "*/*"}}, CREDENTIAL_HEADERS
    )
    headers = document["attributes"]["request"]["http"]["headers"]
    assert headers == {name: masked, "accept": "*/*"}


def test_header_map_entry_is_replaced_and_raw_value_dropped() -> None:
    http = {
        "path": "/",
        "headerMap": header_map(("authorization", f"Bearer {TOKEN}"), ("accept", "*/*")),
    }
    entries = document_for(http, CREDENTIAL_HEADERS)["attributes"]["request"]["http"]["headerMap"][
        "headers"
    ]
    assert entries == [
        {"key": "authorization", "value": f"Bearer sha256:{sha256(TOKEN)}"},
        # Non-credential entries keep Envoy's raw_value form.
        {"key": "accept", "rawValue": base64.b64encode(b"*/*").decode()},
    ]


def test_only_configured_headers_are_credentials() -> None:
    http = {"path": "/", "headers": {"x-api-key": API_KEY, "authorization": "Bearer public"}}
    document = document_for(http, ("x-api-key",))
    assert document["credentials"] == {"x-api-key": sha256(API_KEY)}
    assert document["attributes"]["request"]["http"]["headers"]["authorization"] == "Bearer public"


def test_building_the_input_does_not_change_the_request() -> None:
    request = check_request_json({"path": "/", "headers": {"x-api-key": API_KEY}})
    build_input(request, CREDENTIAL_HEADERS)
    assert request.attributes.request.http.headers["x-api-key"] == API_KEY


@pytest.mark.parametrize(
    ("name", "value", "hashed"),
    [
        ("x-api-key", API_KEY, API_KEY),
        ("x-api-key", f"\t{API_KEY}  ", API_KEY),
        # Only authorization headers have a scheme; elsewhere the whole value is hashed.
        ("x-api-key", f"Bearer {TOKEN}", f"Bearer {TOKEN}"),
        ("authorization", f"Bearer {TOKEN}", TOKEN),
        ("authorization", f"Bearer {TOKEN}  ", TOKEN),
        ("proxy-authorization", f"Bearer {TOKEN}", TOKEN),
    ],
    ids=[
        "plain",
        "trimmed",
        "scheme-ignored-elsewhere",
        "bearer",
        "bearer-trailing-space",
        "proxy",
    ],
)
def test_mask_credential_digest(name: str, value: str, hashed: str) -> None:
    digest, masked = mask_credential(name, value)
    assert digest == hashlib.sha256(hashed.encode()).hexdigest()
    assert masked.endswith(f"sha256:{digest}")
    assert hashed not in masked


# RFC 9110 section 5.5: a field value's leading/trailing optional whitespace is SP or HTAB
# only. Other Unicode whitespace (str.strip() removes it) is part of the value, so a key
# padded with U+00A0 or U+2003 must not hash to the key itself.
UNICODE_SPACES = ["\u00a0", "\u2003", "\u3000", "\x0b", "\x0c", "\x85"]


@pytest.mark.parametrize("space", UNICODE_SPACES, ids=lambda s: f"U+{ord(s):04X}")
@pytest.mark.parametrize(
    ("name", "template"),
    [
        ("x-api-key", "{s}{key}"),
        ("x-api-key", "{key}{s}"),
        ("authorization", "Bearer {key}{s}"),
        ("authorization", "Bearer {s}{key}"),
        ("authorization", "{s}Bearer {key}"),
    ],
    ids=["key-leading", "key-trailing", "bearer-trailing", "bearer-leading", "scheme-leading"],
)
def test_mask_credential_trims_only_rfc9110_whitespace(
    name: str, template: str, space: str
) -> None:
    padded = template.format(s=space, key=API_KEY)
    digest, _ = mask_credential(name, padded)
    assert digest != sha256(API_KEY)
    # SP around the same key is optional whitespace (HTAB too, but RFC 9110 section 11.4
    # puts only SP between the scheme and the credentials): trimmed.
    digest, _ = mask_credential(name, template.format(s=" ", key=API_KEY))
    assert digest == sha256(API_KEY)


# ----------------------------------------------------------------------------------------
# Bodies that cannot be parsed or serialized are a 400 decision, never an escape.


PATH = "authz/gateway/decision"


async def _check_before_opa(
    request: external_auth_pb2.CheckRequest, control: Control | None = None
) -> tuple[Outcome, ListSink]:
    """``request`` checked by an authorizer that always parses bodies, over the real OPA
    client to a port nothing listens on (1): for requests decided before OPA is asked.
    Returns the outcome and the sink that received its record."""
    sink = ListSink()
    engine = OpaClient("http://127.0.0.1:1")
    authorizer = Authorizer(
        engine,
        default_decision_path=PATH,
        credential_headers=("x-api-key",),
        timeout_s=5.0,
        parse_body=BodyParsing.ALWAYS,
        control=control,
        sinks=[sink],
    )
    try:
        return await authorizer.check(request), sink
    finally:
        await engine.close()


@pytest.mark.parametrize(
    "body",
    ["[" * 300 + "]" * 300, "[" * 5000 + "]" * 5000],
    ids=["orjson-depth-limit", "json-recursion"],
)
@pytest.mark.parametrize("mode", [Mode.ENFORCE, Mode.DRY_RUN], ids=["enforce", "dry-run"])
async def test_unserializable_json_body_is_an_invalid_request_decision(
    body: str, mode: Mode
) -> None:
    # README: "invalid_request 400: path/query/body of the request cannot be parsed".
    # A JSON body nested deeper than orjson's 255 levels (or json's recursion limit) is
    # such a body (a lone surrogate escape is not: Go reads it as U+FFFD, and so does
    # authz, test_json_body_reads_as_go_encoding_json): a recorded invalid_request
    # decision (decision log, metrics, audit trail), never a bare 500, and in dry-run it
    # is not blocked.
    request = check_request(
        method="POST", path="/api/v1/items", body=body, headers={"content-type": "application/json"}
    )
    outcome, sink = await _check_before_opa(request, Control(mode))
    assert len(sink.records) == 1
    if mode is Mode.ENFORCE:
        assert outcome.record.reason == "invalid_request"
    else:  # dry-run: nothing is blocked
        assert outcome.response.HasField("ok_response")


# --- bounded work before authentication ------------------------------------------------
# Body parsing runs before any credential is looked at, so it is linear in the body
# (python-multipart scans with bytes.find; email.parser is quadratic in a part's header
# and recurses on nested comments) and capped: the bytes parsed, the parts, each part's
# headers, and form fields. Over a cap is a precise 400 or, for the size, "not parsed"
# (truncated_body).


def multipart_of(*parts: bytes) -> bytes:
    return b"".join(b"--foo\r\n" + part + b"\r\n" for part in parts) + b"--foo--\r\n"


def field(name: str, value: bytes = b"x", *headers: bytes) -> bytes:
    disposition = f'Content-Disposition: form-data; name="{name}"\r\n'.encode()
    return disposition + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + value


def parse(content_type: str, payload: bytes) -> tuple[Any, bool]:
    return parse_body({"content-type": content_type}, "", payload)


def test_multipart_parts_up_to_the_cap_parse_and_one_more_is_refused() -> None:
    parts = [field("a")] * MAX_MULTIPART_PARTS
    assert parse(MULTIPART, multipart_of(*parts)) == ({"a": ["x"] * MAX_MULTIPART_PARTS}, False)
    with pytest.raises(RequestError, match=f"more than {MAX_MULTIPART_PARTS} parts"):
        parse(MULTIPART, multipart_of(*parts, field("a")))


def test_form_fields_up_to_the_cap_parse_and_one_more_is_refused() -> None:
    at_cap = "&".join(["a=x"] * MAX_FORM_FIELDS).encode()
    assert parse(FORM, at_cap) == ({"a": ["x"] * MAX_FORM_FIELDS}, False)
    with pytest.raises(RequestError, match=f"more than {MAX_FORM_FIELDS} fields"):
        parse(FORM, at_cap + b"&a=x")


def long_header(size: int) -> bytes:
    """``Content-Type: text/plain;a=b;a=b...`` of exactly ``size`` bytes: with 8,000
    parameters, email.parser spent 0.8 s on it."""
    head = b"Content-Type: text/plain"
    return head + (b";a=b" * size)[: size - len(head)]


@pytest.mark.parametrize(
    "part",
    [
        field("a", b"x", long_header(MAX_PART_HEADER_BYTES + 1)),
        field("a", b"x", long_header(32_000)),
        field("a", b"x", *([b"X-Filler: y"] * MAX_PART_HEADERS)),  # + Content-Disposition
        field("a", b"x", b"Content-Type: text/plain" + b"(" * 5000 + b")" * 5000),
    ],
    ids=[
        "header-one-byte-over",
        "header-8000-params",
        "too-many-headers",
        "nested-comments",
    ],
)
def test_multipart_part_headers_over_the_cap_are_refused(part: bytes) -> None:
    with pytest.raises(RequestError, match="multipart"):
        parse(MULTIPART, multipart_of(part))


def test_multipart_part_header_at_the_cap_parses() -> None:
    part = field("a", b"x", long_header(MAX_PART_HEADER_BYTES))
    assert parse(MULTIPART, multipart_of(part)) == ({"a": ["x"]}, False)


def body_of_size(content_type: str, size: int) -> bytes:
    """A valid body of ``content_type`` of exactly ``size`` bytes."""
    if content_type == MULTIPART:
        empty = multipart_of(field("a", b""))
        return multipart_of(field("a", b"x" * (size - len(empty))))
    if content_type == FORM:
        return b"a=" + b"x" * (size - 2)
    return b'"' + b"x" * (size - 2) + b'"'


@pytest.mark.parametrize("content_type", [MULTIPART, FORM, "application/json"])
def test_body_over_the_parse_cap_is_not_parsed(content_type: str) -> None:
    at_cap = body_of_size(content_type, MAX_BODY_BYTES)
    assert len(at_cap) == MAX_BODY_BYTES
    parsed, truncated = parse(content_type, at_cap)
    assert parsed is not None
    assert truncated is False
    over = body_of_size(content_type, MAX_BODY_BYTES + 1)
    assert parse(content_type, over) == (None, True)


@pytest.mark.parametrize(
    "body",
    [
        multipart_of(field("a", b"x", long_header(32_000))),
        multipart_of(field("a", b"x", b"Content-Type: text/plain" + b"(" * 5000 + b")" * 5000)),
        multipart_of(*[field("a")] * 1000),  # 61 KB: within MAX_BODY_BYTES
    ],
    ids=["long-part-header", "nested-comments", "1000-parts"],
)
async def test_hostile_multipart_without_a_key_is_a_400_deny(body: bytes) -> None:
    request = check_request(
        method="POST",
        path="/api/v1/items",
        body=body.decode("latin-1"),
        headers={"content-type": MULTIPART},
    )
    outcome, _ = await _check_before_opa(request)
    assert outcome.record.reason == "invalid_request"
    assert outcome.record.http_status == 400


@pytest.mark.parametrize(
    ("body", "parsed"),
    [
        (b"preamble\r\n" + multipart_of(field("a")), {"a": ["x"]}),
        (b"\r\n" + multipart_of(field("a")), {"a": ["x"]}),
        # LF mode (Go: the first delimiter line ends in a bare LF); a CR in a value stays.
        (
            b'--foo\nContent-Disposition: form-data; name="a"\n\nline 1\nline 2\r\n--foo--\n',
            {"a": ["line 1\nline 2\r"]},
        ),
        (
            multipart_of(
                field(
                    "a", b"caf=C3=A9 =\r\nau lait", b"Content-Transfer-Encoding: quoted-printable"
                )
            ),
            {"a": ["café au lait"]},
        ),
        (
            multipart_of(field("j", b'{"k": [1]}', b"Content-Type: application/json")),
            {"j": [{"k": [1]}]},
        ),
        (
            multipart_of(field("f", b"\x00\xff", b"Content-Type: application/octet-stream")),
            {"f": ["\x00\ufffd"]},
        ),
        (multipart_of(field("caf\u00e9", b"x")), {"caf\u00e9": ["x"]}),
        (
            multipart_of(b'Content-Disposition: form-data; name="a"; filename="a.txt"\r\n\r\nx'),
            {"a": ["x"]},
        ),
        (multipart_of(b"Content-Disposition: form-data\r\n\r\nx"), {}),
        (multipart_of(b"Content-Type: text/plain\r\n\r\nx"), {}),
        (multipart_of(field("a")) + b"epilogue", {"a": ["x"]}),
    ],
    ids=[
        "preamble",
        "leading-crlf",
        "lf-mode",
        "quoted-printable",
        "json-part",
        "binary-part",
        "utf8-name",
        "file-part",
        "no-name",
        "no-disposition",
        "epilogue",
    ],
)
def test_multipart_reads_as_go_mime_multipart(body: bytes, parsed: Any) -> None:
    assert parse(MULTIPART, body) == (parsed, False)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data; boundary=", multipart_of(field("a"))),
        (f"multipart/form-data; boundary={'b' * 300}", b"--" + b"b" * 300 + b"\r\n"),
        (MULTIPART, b"no delimiter at all"),
        (MULTIPART, b"--foo\r\n" + field("a")),
        (MULTIPART, b"--foo\r\nno colon here\r\n\r\nx\r\n--foo--\r\n"),
    ],
    ids=["empty-boundary", "boundary-too-long", "no-delimiter", "no-closing", "bad-header"],
)
def test_malformed_multipart_is_a_request_error(content_type: str, body: bytes) -> None:
    with pytest.raises(RequestError, match="multipart"):
        parse(content_type, body)


def test_multipart_headers_over_the_total_cap_are_refused() -> None:
    # Each part's header is within MAX_PART_HEADER_BYTES; all of them together are not.
    disposition = b'Content-Disposition: form-data; name="a"; x="' + b";" * 900 + b'"'
    per_part = len(disposition)
    fits = MAX_MULTIPART_HEADER_BYTES // per_part
    parts = [disposition + b"\r\n\r\nx"] * fits
    assert parse(MULTIPART, multipart_of(*parts)) == ({"a": ["x"] * fits}, False)
    with pytest.raises(RequestError, match=f"exceed {MAX_MULTIPART_HEADER_BYTES} bytes"):
        parse(MULTIPART, multipart_of(*parts, disposition + b"\r\n\r\nx"))


def test_malformed_multipart_logs_nothing_itself(caplog: pytest.LogCaptureFixture) -> None:
    # python-multipart logs a WARNING per malformed body; a caller without a key could fill
    # the log with them. The decision log already records the RequestError's message.
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RequestError):
        parse(MULTIPART, b"--foo\r\nno colon here\r\n\r\nx\r\n--foo--\r\n")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# --- a body is parsed only where the route asks (bounded work before authentication) ---

JSON_HEADERS = {"content-type": "application/json"}


def document_with(
    mode: BodyParsing | bool, extensions: dict[str, str] | None = None, body: str = '{"a": 1}'
) -> dict[str, Any]:
    request = check_request(
        method="POST", headers=JSON_HEADERS, body=body, context_extensions=extensions
    )
    return build_input(request, ("x-api-key",), parse_request_body=mode)


@pytest.mark.parametrize(
    ("mode", "extensions", "parsed"),
    [
        (BodyParsing.ROUTE, None, False),
        (BodyParsing.ROUTE, {"parse_body": "false"}, False),
        (BodyParsing.ROUTE, {"parse_body": "true"}, True),
        (BodyParsing.ALWAYS, None, True),
        (BodyParsing.ALWAYS, {"parse_body": "false"}, True),
        (BodyParsing.NEVER, {"parse_body": "true"}, False),
        (True, None, True),  # the old boolean: every body, as opa-envoy-plugin
        (False, {"parse_body": "true"}, False),
    ],
    ids=[
        "route-not-asked",
        "route-says-false",
        "route-asks",
        "always",
        "always-ignores-route",
        "never-ignores-route",
        "bool-true-is-always",
        "bool-false-is-never",
    ],
)
def test_body_is_parsed_only_where_the_mode_and_route_say(
    mode: BodyParsing | bool, extensions: dict[str, str] | None, parsed: bool
) -> None:
    document = document_with(mode, extensions)
    if parsed:
        assert (document["parsed_body"], document["truncated_body"]) == ({"a": 1}, False)
    else:  # as opa-envoy-plugin's skip_request_body_parse: neither key is set
        assert "parsed_body" not in document
        assert "truncated_body" not in document
    # The body itself still reaches the policy as Envoy sent it.
    assert document["attributes"]["request"]["http"]["body"] == '{"a": 1}'


def test_hostile_body_on_a_route_that_does_not_ask_is_never_parsed() -> None:
    hostile = multipart_of(field("a", b"x", b"Content-Type: text/plain" + b"(" * 5000))
    request = check_request(
        method="POST", headers={"content-type": MULTIPART}, body=hostile.decode("latin-1")
    )
    document = build_input(request, (), parse_request_body=BodyParsing.ROUTE)
    assert "parsed_body" not in document


@pytest.mark.parametrize("value", ["yes", "True", "1", ""], ids=repr)
def test_route_parse_body_other_than_true_or_false_is_a_route_error(value: str) -> None:
    with pytest.raises(DecisionPathError) as caught:
        document_with(BodyParsing.ROUTE, {"parse_body": value})
    assert f"parse_body={value!r}" in str(caught.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("route", BodyParsing.ROUTE),
        ("Always", BodyParsing.ALWAYS),
        ("never", BodyParsing.NEVER),
        ("true", BodyParsing.ALWAYS),  # the old boolean setting keeps its meaning
        ("false", BodyParsing.NEVER),
    ],
)
def test_parse_body_setting(value: str, expected: BodyParsing) -> None:
    assert load({"AUTHZ_PARSE_BODY": value}).parse_body is expected


def test_parse_body_setting_defaults_to_route() -> None:
    assert load({}).parse_body is BodyParsing.ROUTE


@pytest.mark.parametrize("value", ["sometimes", "", "routes"])
def test_bad_parse_body_setting_names_key_and_value(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({"AUTHZ_PARSE_BODY": value})
    assert f"AUTHZ_PARSE_BODY={value!r}" in str(caught.value)
    assert "route, always or never" in str(caught.value)


def test_multipart_request_content_type_over_the_header_cap_is_refused() -> None:
    # The request's own Content-Type goes through the same parameter parser as a part's
    # headers (about 0.4 us per byte of a quoted run of ";"): capped the same way.
    prefix = "multipart/form-data; boundary=foo; x="
    at_cap = prefix + '"' + ";" * (MAX_PART_HEADER_BYTES - len(prefix) - 2) + '"'
    assert len(at_cap) == MAX_PART_HEADER_BYTES
    assert parse(at_cap, multipart_of(field("a"))) == ({"a": ["x"]}, False)
    over = prefix + '"' + ";" * 30_000 + '"'
    with pytest.raises(RequestError, match=f"over {MAX_PART_HEADER_BYTES} bytes"):
        parse(over, multipart_of(field("a")))


def test_query_fields_up_to_the_cap_parse_and_one_more_is_refused() -> None:
    # The query is parsed on every route, before any credential is checked: 60 KB of
    # "a&a&..." (30,000 fields, within Envoy's default 60 KiB of headers) cost 19 ms.
    at_cap = "&".join(["a=x"] * MAX_QUERY_FIELDS)
    document = build_input(check_request(path=f"/api/v1/items?{at_cap}"), ())
    assert document["parsed_query"] == {"a": ["x"] * MAX_QUERY_FIELDS}
    with pytest.raises(RequestError, match=f"more than {MAX_QUERY_FIELDS} fields"):
        build_input(check_request(path=f"/api/v1/items?{at_cap}&a"), ())


# --- the plugin's input, byte for byte (issue 15) ---------------------------------------
# What OPA receives is the input encoded as JSON (authz.core.opa); the plugin hands OPA
# Go strings and json.Number values, which OPA renders with Go's encoding/json. The
# expected texts below are what Go 1.26 prints for the same input.

BAD_UTF8 = b"a\xe2\x82b\xf0\x9f\x98c\xed\xa0\x80d\xff"
# encoding/json: one U+FFFD per invalid byte (utf8.DecodeRune returns size 1 for each).
BAD_UTF8_AS_GO = "a\ufffd\ufffdb\ufffd\ufffd\ufffdc\ufffd\ufffd\ufffdd\ufffd"
BAD_UTF8_ESCAPED = "".join(chr(b) if b < 0x80 else f"%{b:02X}" for b in BAD_UTF8)


def _multipart_value(value: bytes) -> bytes:
    return b'--foo\r\nContent-Disposition: form-data; name="a"\r\n\r\n' + value + b"\r\n--foo--\r\n"


@pytest.mark.parametrize(
    ("http", "where"),
    [
        ({"path": "/" + BAD_UTF8_ESCAPED}, ("parsed_path", 0)),
        ({"path": "/x?k=" + BAD_UTF8_ESCAPED}, ("parsed_query", "k", 0)),
        (
            {
                "path": "/",
                "headers": {"content-type": FORM},
                "rawBody": base64.b64encode(b"k=" + BAD_UTF8).decode(),
            },
            ("parsed_body", "k", 0),
        ),
        (
            {
                "path": "/",
                "headers": {"content-type": JSON},
                "rawBody": base64.b64encode(b'{"k": "' + BAD_UTF8 + b'"}').decode(),
            },
            ("parsed_body", "k"),
        ),
        (
            {
                "path": "/",
                "headers": {"content-type": MULTIPART},
                "rawBody": base64.b64encode(_multipart_value(BAD_UTF8)).decode(),
            },
            ("parsed_body", "a", 0),
        ),
    ],
    ids=["path", "query", "form", "json", "multipart"],
)
def test_invalid_utf8_is_one_replacement_character_per_byte_as_go(
    http: dict[str, Any], where: tuple[Any, ...]
) -> None:
    # Python's "replace" gives one U+FFFD per maximal bad sequence ("\xe2\x82" -> one);
    # the plugin keeps the raw bytes, which OPA reads and renders one U+FFFD per byte.
    value: Any = build_input(check_request_json(http), (), parse_request_body=True)
    for step in where:
        value = value[step]
    assert value == BAD_UTF8_AS_GO


@pytest.mark.parametrize(
    ("body", "sent_to_opa"),
    [
        (b"123456789012345678901234567890", b"123456789012345678901234567890"),
        (
            b"[18446744073709551616, -9223372036854775809]",
            b"[18446744073709551616,-9223372036854775809]",
        ),
        (b"[-1e-400]", b"[-1e-400]"),
        (b"[0.12345678901234567890123]", b"[0.12345678901234567890123]"),
        (b'{"a": 1.50, "b": 1E5, "c": 42}', b'{"a":1.50,"b":1E5,"c":42}'),
        (b'"\\ud800x"', '"\ufffdx"'.encode()),
        (b'"\\udc00\\ud800\\ud800\\udc00"', '"\ufffd\ufffd\U00010000"'.encode()),
        (b'{"\\ud800": 1}', '{"\ufffd":1}'.encode()),
        (b'{"\\ufffd": 1, "\\ud800": 2}', '{"\ufffd":2}'.encode()),
    ],
    ids=[
        "int-beyond-64-bits",
        "ints-just-beyond-uint64-and-int64",
        "exponent-below-double",
        "more-digits-than-a-double",
        "float-text-kept",
        "lone-high-surrogate",
        "lone-low-then-pair",
        "lone-surrogate-in-key",
        "key-equal-after-replacement-last-wins",
    ],
)
def test_json_body_reads_as_go_encoding_json(body: bytes, sent_to_opa: bytes) -> None:
    # The plugin parses with json.Decoder.UseNumber (OPA util.UnmarshalJSON): a number
    # keeps its text exactly, and an escaped lone surrogate reads as U+FFFD.
    parsed, truncated = parse_body({"content-type": JSON}, "", body)
    assert not truncated
    assert orjson.dumps(parsed) == sent_to_opa
    assert orjson.dumps({"input": {"parsed_body": parsed}})  # what authz.core.opa sends


def test_json_body_nesting_within_what_authz_can_encode_is_read() -> None:
    # Go's decoder reads 10,000 levels; authz reads as deep as the documents it encodes
    # (orjson: 255 levels) leave room for, MAX_JSON_DEPTH.
    assert MAX_JSON_DEPTH >= 240
    deep = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    parsed, _ = parse_body({"content-type": JSON}, "", deep)
    wrapped = {"input": {"parsed_body": {"a": [parsed]}}, "row": {}}
    assert orjson.dumps(wrapped).count(b"[") == MAX_JSON_DEPTH + 1
    with pytest.raises(RequestError, match="nested deeper"):
        parse_body({"content-type": JSON}, "", b"[" + deep + b"]")


@pytest.mark.parametrize("body", [b"NaN", b"[Infinity]", b"[-Infinity]", b"[1,]", b"01"])
def test_json_body_go_refuses_is_refused(body: bytes) -> None:
    with pytest.raises(RequestError):
        parse_body({"content-type": JSON}, "", body)


@pytest.mark.parametrize(
    ("payload", "parsed"),
    [
        (
            b'--foo\r\nContent-Disposition: form-data; name="f"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n--foo--\r\n",
            {"f": ["aGVsbG8="]},
        ),
        (b"--foo--\r\n", {}),
    ],
    ids=["base64-part-kept-as-text", "empty-form"],
)
def test_multipart_as_go_next_part(payload: bytes, parsed: Any) -> None:
    # Go's Reader.NextPart decodes quoted-printable only; an empty form is {}.
    assert parse(MULTIPART, payload) == (parsed, False)


@pytest.mark.parametrize(
    ("where", "build"),
    [
        ("query", lambda q: build_input(check_request(path=f"/x?{q}"), ())),
        ("form body", lambda q: parse(FORM, q.encode())),
    ],
    ids=["query", "form"],
)
def test_field_cap_is_go_url_parse_query(where: str, build: Any) -> None:
    # Go 1.26 url.ParseQuery: more than 10,000 parameters, counted as "&" + 1, is an
    # error, so the plugin refuses the request; authz refuses exactly the same ones.
    assert MAX_QUERY_FIELDS == MAX_FORM_FIELDS == 10_000
    at_cap = "&".join(["a=x"] * 10_000)
    build(at_cap)
    for over in (at_cap + "&", "&" * 10_000, at_cap + "&a=x"):
        with pytest.raises(RequestError, match=f"more than 10000 fields in the {where}"):
            build(over)


# --- JWTs reach the policy (issue 15) ---------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_of(header: Any, payload: Any = None, signature: bytes = b"sig") -> str:
    """A JWS compact serialization (RFC 7515 section 7.1) of JSON ``header``/``payload``;
    the signature is not checked here (OPA's io.jwt.decode_verify does that)."""
    parts = [json.dumps(header).encode(), json.dumps(payload or {"sub": "alice"}).encode()]
    return ".".join([*(_b64url(part) for part in parts), _b64url(signature)])


JWT = jwt_of({"alg": "HS256", "typ": "JWT"}, {"sub": "YWxpY2U=", "role": "admin"})


@pytest.mark.parametrize(
    "http",
    [
        {"headers": {"authorization": f"Bearer {JWT}"}},
        {"headers": {"authorization": f"bearer  {JWT} "}},
        {"headers": {"authorization": f"Bearer {jwt_of({'alg': 'none'}, signature=b'')}"}},
    ],
    ids=["bearer", "lowercase-scheme-padded", "unsigned-alg-none"],
)
def test_bearer_jwt_reaches_the_policy_in_clear_and_its_digest_too(http: dict[str, Any]) -> None:
    # The OPA Envoy tutorial's policy runs io.jwt.decode_verify on the bearer token, so
    # the token must reach it as sent; input.credentials still carries its digest.
    document = document_for({"path": "/", **http}, CREDENTIAL_HEADERS)
    sent = http["headers"]["authorization"]
    token = sent.split()[1]
    assert document["attributes"]["request"]["http"]["headers"]["authorization"] == sent
    assert document["credentials"] == {"authorization": sha256(token)}


def test_bearer_jwt_in_the_header_map_reaches_the_policy_in_clear() -> None:
    http = {"path": "/", "headerMap": header_map(("authorization", f"Bearer {JWT}"))}
    document = document_for(http, CREDENTIAL_HEADERS)
    (entry,) = document["attributes"]["request"]["http"]["headerMap"]["headers"]
    assert base64.b64decode(entry["rawValue"]).decode() == f"Bearer {JWT}"
    assert document["credentials"] == {"authorization": sha256(JWT)}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("authorization", f"Bearer {TOKEN}"),
        ("authorization", f"Bearer {TOKEN}.{TOKEN}.{TOKEN}"),  # not base64url JSON
        ("authorization", f"Bearer {jwt_of({'typ': 'JWT'})}"),  # no alg
        ("authorization", f"Bearer {jwt_of(['alg'])}"),  # header not an object
        ("authorization", f"Bearer {JWT}.{_b64url(b'x')}.{_b64url(b'y')}"),  # JWE, 5 parts
        ("authorization", f"Basic {JWT}"),
        ("authorization", JWT),  # no scheme
        ("proxy-authorization", f"Bearer {JWT}"),
        ("x-api-key", JWT),
        ("cookie", f"session={JWT}"),
    ],
    ids=[
        "opaque-bearer",
        "three-parts-not-json",
        "header-without-alg",
        "header-not-an-object",
        "jwe",
        "basic-scheme",
        "no-scheme",
        "proxy-authorization",
        "x-api-key",
        "cookie",
    ],
)
def test_only_a_bearer_jwt_in_authorization_is_passed_through(name: str, value: str) -> None:
    document = document_for(
        {"path": "/", "headers": {name: value}}, (*CREDENTIAL_HEADERS, "cookie")
    )
    masked = document["attributes"]["request"]["http"]["headers"][name]
    assert masked == mask_credential(name, value)[1]
    assert value.split()[-1] not in json.dumps(document)


def _jwt_with_header_of(encoded_size: int) -> str:
    """A bearer JWT whose base64url JOSE header (an object with ``alg``) is
    ``encoded_size`` characters, give or take the 2 of the last base64 quantum."""
    bare = len(json.dumps({"alg": "HS256", "pad": ""}).encode())
    pad = "x" * (encoded_size * 3 // 4 - bare)
    return jwt_of({"alg": "HS256", "pad": pad})


@pytest.mark.parametrize(
    ("encoded_size", "in_clear"),
    [(_MAX_JOSE_HEADER, True), (_MAX_JOSE_HEADER + 2, False), (1_000_000, False)],
    ids=["at-the-cap", "over-the-cap", "megabyte"],
)
def test_jose_header_over_the_cap_is_never_decoded_and_stays_masked(
    encoded_size: int, in_clear: bool
) -> None:
    # The JOSE header is decoded before any credential is checked: one longer than a real
    # token's never is (the base64 and JSON work stay bounded), so the token is masked.
    token = _jwt_with_header_of(encoded_size)
    header_size = len(token.split(".")[0])
    assert (header_size <= _MAX_JOSE_HEADER) is in_clear
    document = document_for(
        {"path": "/", "headers": {"authorization": f"Bearer {token}"}}, CREDENTIAL_HEADERS
    )
    sent = document["attributes"]["request"]["http"]["headers"]["authorization"]
    assert sent == (f"Bearer {token}" if in_clear else f"Bearer sha256:{sha256(token)}")
    assert document["credentials"] == {"authorization": sha256(token)}


def test_jwt_pass_through_can_be_turned_off() -> None:
    request = check_request_json({"path": "/", "headers": {"authorization": f"Bearer {JWT}"}})
    document = build_input(request, CREDENTIAL_HEADERS, pass_jwts=False)
    assert JWT not in json.dumps(document)
    assert document["credentials"] == {"authorization": sha256(JWT)}


# --- gRPC request bodies with a descriptor set (the plugin's proto-descriptor) ----------


def _descriptor_set() -> bytes:
    """A FileDescriptorSet (what ``protoc --descriptor_set_out`` writes) holding the gRPC
    health service, ``grpc.health.v1.Health``."""
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health_pb2

    files = descriptor_pb2.FileDescriptorSet()
    health_pb2.DESCRIPTOR.CopyToProto(files.file.add())
    return files.SerializeToString()


def _grpc_frame(message: bytes, *, compressed: bool = False, declared: int | None = None) -> bytes:
    """One gRPC length-prefixed message (gRPC over HTTP/2, "Length-Prefixed-Message")."""
    size = len(message) if declared is None else declared
    return bytes([1 if compressed else 0]) + size.to_bytes(4, "big") + message


HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVICE_X = bytes.fromhex("0a01") + b"x"  # HealthCheckRequest{service: "x"}


@pytest.mark.parametrize(
    ("path", "raw_body", "expected"),
    [
        (HEALTH_CHECK, _grpc_frame(SERVICE_X), ({"service": "x"}, False)),
        (HEALTH_CHECK, _grpc_frame(b""), ({}, False)),
        (HEALTH_CHECK, b"", (None, False)),
        ("/grpc.health.v1.Unknown/Check", _grpc_frame(SERVICE_X), (None, False)),
        ("/grpc.health.v1.Health/Unknown", _grpc_frame(SERVICE_X), (None, False)),
        ("/grpc.health.v1.Health/Watch", _grpc_frame(SERVICE_X), ({"service": "x"}, False)),
        (HEALTH_CHECK, _grpc_frame(SERVICE_X, compressed=True), (None, False)),
        (HEALTH_CHECK, _grpc_frame(SERVICE_X, declared=50), (None, True)),
    ],
    ids=[
        "valid",
        "empty-message",
        "without-raw-body",
        "unknown-service",
        "unknown-method",
        "server-streaming-method",
        "compressed",
        "truncated",
    ],
)
def test_grpc_body_is_decoded_with_a_descriptor_set(
    path: str, raw_body: bytes, expected: tuple[Any, bool]
) -> None:
    # request_test.go TestGetParsedBodygRPC, on the health service's descriptors.
    descriptors = GrpcDescriptors.from_bytes(_descriptor_set())
    http = {
        "path": path,
        "method": "POST",
        "headers": {"content-type": "application/grpc"},
        "rawBody": base64.b64encode(raw_body).decode(),
    }
    document = build_input(check_request_json(http), (), grpc_descriptors=descriptors)
    assert (document["parsed_body"], document["truncated_body"]) == expected


@pytest.mark.parametrize(
    ("path", "raw_body"),
    [
        ("/grpc.health.v1.Health/Check/extra", _grpc_frame(SERVICE_X)),
        (HEALTH_CHECK, b"\x00\x00\x00"),
        (HEALTH_CHECK, _grpc_frame(b"\x0a\x05x")),  # a string field longer than the message
    ],
    ids=["path-not-service-and-method", "shorter-than-a-frame-header", "not-the-message"],
)
def test_malformed_grpc_body_is_request_error(path: str, raw_body: bytes) -> None:
    descriptors = GrpcDescriptors.from_bytes(_descriptor_set())
    http = {
        "path": path,
        "headers": {"content-type": "application/grpc"},
        "rawBody": base64.b64encode(raw_body).decode(),
    }
    with pytest.raises(RequestError):
        build_input(check_request_json(http), (), grpc_descriptors=descriptors)


def test_grpc_body_without_a_descriptor_set_is_not_parsed() -> None:
    http = {
        "path": HEALTH_CHECK,
        "headers": {"content-type": "application/grpc"},
        "rawBody": base64.b64encode(_grpc_frame(SERVICE_X)).decode(),
    }
    document = build_input(check_request_json(http), ())
    assert (document["parsed_body"], document["truncated_body"]) == (None, False)


def _grpc_body_of_size(size: int) -> bytes:
    """A gRPC frame of exactly ``size`` bytes holding one HealthCheckRequest."""
    from grpc_health.v1 import health_pb2

    # Frame header (5) + field tag (1) + a 3-byte length varint (16 KiB..2 MiB) + service.
    message = health_pb2.HealthCheckRequest(service="x" * (size - 9)).SerializeToString()
    return _grpc_frame(message)


def test_grpc_body_over_the_parse_cap_is_not_decoded() -> None:
    # The same byte cap as every other body (MAX_BODY_BYTES): a larger gRPC message is
    # reported truncated, never decoded.
    descriptors = GrpcDescriptors.from_bytes(_descriptor_set())

    def parsed(raw_body: bytes) -> tuple[Any, bool]:
        http = {
            "path": HEALTH_CHECK,
            "headers": {"content-type": "application/grpc"},
            "rawBody": base64.b64encode(raw_body).decode(),
        }
        document = build_input(check_request_json(http), (), grpc_descriptors=descriptors)
        return document["parsed_body"], document["truncated_body"]

    at_cap = _grpc_body_of_size(MAX_BODY_BYTES)
    assert len(at_cap) == MAX_BODY_BYTES
    assert parsed(at_cap) == ({"service": "x" * (MAX_BODY_BYTES - 9)}, False)
    over = _grpc_body_of_size(MAX_BODY_BYTES + 1)
    assert len(over) == MAX_BODY_BYTES + 1
    assert parsed(over) == (None, True)


@pytest.mark.parametrize("data", [b"\xff\xff", b""], ids=["not-a-descriptor-set", "empty"])
def test_bad_descriptor_set_is_a_config_error(data: bytes) -> None:
    if data:
        with pytest.raises(ConfigError, match="descriptor set"):
            GrpcDescriptors.from_bytes(data)
    else:  # an empty set parses but declares no service: refused too
        with pytest.raises(ConfigError, match="no service"):
            GrpcDescriptors.from_bytes(data)


@pytest.mark.parametrize(
    "body",
    [b'{"n": 1e400}', b"[-1e309]", b"[" + b"9" * 400 + b"]", b'[1.5, "\\ud800", 1e400]'],
    ids=["exponent", "just-beyond", "long-integer", "after-a-float-and-a-surrogate"],
)
def test_json_number_beyond_the_double_range_is_refused(body: bytes) -> None:
    # The plugin evaluates such a number (json.Number); authz refuses it: what it keeps of
    # an input (audit trail, its verification) is read back with orjson, which reads no
    # number beyond the IEEE double range (docs/contract.md).
    with pytest.raises(RequestError, match="beyond the IEEE double range"):
        parse_body({"content-type": JSON}, "", body)


@pytest.mark.parametrize(
    ("declared", "refused"),
    [
        ("7", False),
        ("+7", False),
        ("-1", False),
        ("7 ", True),
        (" 7", True),
        ("0x7", True),
        ("99999999999999999999", True),
        ("9223372036854775807", False),
        ("", True),
        # Past Python's int() digit limit (4300): refused as out of range, never a
        # ValueError (a 500); leading zeros do not count, as in Go.
        ("9" * 5000, True),
        ("0" * 5000 + "7", False),
        ("-" + "0" * 5000 + "1", False),
    ],
    ids=[
        "plain",
        "plus",
        "minus-one",
        "trailing-space",
        "leading-space",
        "hex",
        "beyond-int64",
        "int64-max",
        "empty",
        "beyond-int-digit-limit",
        "leading-zeros-past-int-digit-limit",
        "minus-one-leading-zeros-past-int-digit-limit",
    ],
)
def test_content_length_reads_as_go_parse_int(declared: str, refused: bool) -> None:
    # The plugin reads content-length with strconv.ParseInt(s, 10, 64) and refuses a body
    # whose length does not parse (400 request_parse_error); Python's int() would accept
    # surrounding whitespace and any size.
    headers = {"content-type": "application/json", "content-length": declared}
    if refused:
        with pytest.raises(RequestError, match="invalid content-length"):
            parse_body(headers, '{"a":1}', b"")
    else:
        parse_body(headers, '{"a":1}', b"")


@pytest.mark.parametrize(
    ("number", "expected"),
    [(1.0, 1), (-0.0, 0), (2.5, 2.5), (1e300, 1e300), (12345678.0, 12345678)],
    ids=["one", "negative-zero", "fraction", "beyond-2-53", "integral"],
)
def test_struct_numbers_read_as_the_plugin_writes_them(number: float, expected: object) -> None:
    # Struct numbers are doubles; Go writes an integral float64 without a fraction, so the
    # plugin's policy sees 1 where json.marshal of authz's input said 1.0.
    request = check_request()
    request.attributes.metadata_context.filter_metadata["m"].update({"n": number})
    document = build_input(request, ())
    value = document["attributes"]["metadataContext"]["filterMetadata"]["m"]["n"]
    assert value == expected
    assert type(value) is type(expected)


# --- Proxy-Authorization: Basic (egress identity from the standard proxy settings) ------


def _basic(user_pass: str) -> str:
    return "Basic " + base64.b64encode(user_pass.encode()).decode()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (_basic(f"sb-1:{SANDBOX}"), {"user": "sb-1", "password_sha256": sha256(SANDBOX)}),
        (
            "bAsIc " + _basic(f"sb-1:{SANDBOX}")[6:],
            {"user": "sb-1", "password_sha256": sha256(SANDBOX)},
        ),
        # RFC 7617: the password may itself hold ':'.
        (_basic("sb-1:a:b"), {"user": "sb-1", "password_sha256": sha256("a:b")}),
        (f"  {_basic('sb-1:t')} \t", {"user": "sb-1", "password_sha256": sha256("t")}),
    ],
    ids=["basic", "scheme-case", "colon-in-password", "ows"],
)
def test_proxy_basic_gives_user_and_password_digest(value: str, expected: dict[str, str]) -> None:
    assert parse_proxy_basic(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        f"Bearer {TOKEN}",
        "Basic",
        "Basic ",
        _basic("no-colon"),
        _basic(":password-without-user"),
        _basic("sb-1:"),
        _basic("sb 1:t"),
        _basic("sb-1:t\r\nx"),
        _basic("sb-\u00e91:t"),
        "Basic " + base64.b64encode(b"sb-1:\xff\xfe").decode(),
        "Basic c2ItMTp0eA",  # unpadded (a length not a multiple of 4)
        "Basic c2ItMTp0==x",
        "Basic c2I!MTp0",
        "Basic " + "A" * (MAX_BASIC_CREDENTIALS + 4),
        "Basic  " + "QUFB" * 100_000,
    ],
    ids=[
        "bearer",
        "scheme-only",
        "scheme-space",
        "no-colon",
        "empty-user",
        "empty-password",
        "space-in-user",
        "crlf-in-password",
        "non-ascii-user",
        "not-utf8",
        "unpadded",
        "junk-after-padding",
        "not-base64",
        "over-cap",
        "huge",
    ],
)
def test_proxy_basic_malformed_is_none(value: str) -> None:
    assert parse_proxy_basic(value) is None


def test_proxy_basic_reaches_the_input_as_user_and_digest_only() -> None:
    value = _basic(f"sb-1:{SANDBOX}")
    document = document_for(
        {"path": "/", "headers": {"proxy-authorization": value}}, CREDENTIAL_HEADERS
    )
    assert document["proxy_authorization"] == {"user": "sb-1", "password_sha256": sha256(SANDBOX)}
    dumped = json.dumps(document)
    assert SANDBOX not in dumped
    assert value.split()[1] not in dumped


@pytest.mark.parametrize(
    "headers",
    [{}, {"proxy-authorization": f"Bearer {TOKEN}"}, {"authorization": _basic("sb-1:t")}],
    ids=["absent", "other-scheme", "authorization-header"],
)
def test_proxy_authorization_field_only_for_a_basic_proxy_authorization(
    headers: dict[str, str],
) -> None:
    document = document_for({"path": "/", "headers": headers}, CREDENTIAL_HEADERS)
    assert "proxy_authorization" not in document
