"""Input building: bodies that must be a 400, never an escape (found in review)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from authz.core.authorizer import Authorizer
from authz.core.errors import ConfigError, DecisionPathError, RequestError
from authz.core.input import (
    MAX_BODY_BYTES,
    MAX_FORM_FIELDS,
    MAX_MULTIPART_HEADER_BYTES,
    MAX_MULTIPART_PARTS,
    MAX_PART_HEADER_BYTES,
    MAX_PART_HEADERS,
    MAX_QUERY_FIELDS,
    BodyParsing,
    build_input,
    parse_body,
)
from authz.core.mode import Control, Mode
from authz.core.opa import OpaClient
from authz.runtime.config import load
from tests.unit.fakes import ListSink, check_request

PATH = "authz/gateway/decision"


@pytest.mark.parametrize(
    "body",
    ["[" * 300 + "]" * 300, "[" * 5000 + "]" * 5000, '{"a": "\\ud800"}'],
    ids=["orjson-depth-limit", "json-recursion", "lone-surrogate"],
)
@pytest.mark.parametrize("mode", [Mode.ENFORCE, Mode.DRY_RUN], ids=["enforce", "dry-run"])
async def test_unserializable_json_body_is_an_invalid_request_decision(
    body: str, mode: Mode
) -> None:
    # README: "invalid_request 400: path/query/body of the request cannot be parsed".
    # A JSON body nested deeper than orjson's 255 levels (or json's recursion limit), or
    # holding a lone surrogate escape (json.loads accepts it, orjson.dumps refuses it),
    # raises JSONEncodeError / RecursionError, which are not AuthzError: Authorizer.check
    # raises, the servicer answers a bare 500 internal_error, and no decision record
    # (decision log, metrics, audit trail) is written. In dry-run the request is blocked.
    sink = ListSink()
    # The real client; nothing listens on port 1, but it never gets that far.
    engine = OpaClient("http://127.0.0.1:1")
    authorizer = Authorizer(
        engine,
        default_decision_path=PATH,
        credential_headers=("x-api-key",),
        timeout_s=5.0,
        parse_body=BodyParsing.ALWAYS,
        control=Control(mode),
        sinks=[sink],
    )
    request = check_request(
        method="POST", path="/api/v1/items", body=body, headers={"content-type": "application/json"}
    )
    try:
        outcome = await authorizer.check(request)
    finally:
        await engine.close()
    assert len(sink.records) == 1
    if mode is Mode.ENFORCE:
        assert outcome.record.reason == "invalid_request"
    else:  # dry-run: nothing is blocked
        assert outcome.response.HasField("ok_response")


# --- bounded work before authentication (issue 13 finding 1) ----------------------------
# input.py parsed multipart bodies with email.parser: a crafted 32-64 KB body cost
# 0.35-0.8 s of CPU on the event loop before any credential was looked at (quadratic in
# a part's header), and a header of nested comments raised RecursionError (a 500). The
# parser is now python-multipart (linear: it scans with bytes.find) behind caps on the
# bytes parsed, the parts, each part's headers, and form fields; over a cap is a precise
# 400 or, for the size, "not parsed" (truncated_body).

MULTIPART = "multipart/form-data; boundary=foo"
FORM = "application/x-www-form-urlencoded"


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
    sink = ListSink()
    engine = OpaClient("http://127.0.0.1:1")  # never reached
    authorizer = Authorizer(
        engine,
        default_decision_path=PATH,
        credential_headers=("x-api-key",),
        timeout_s=5.0,
        parse_body=BodyParsing.ALWAYS,
        sinks=[sink],
    )
    request = check_request(
        method="POST",
        path="/api/v1/items",
        body=body.decode("latin-1"),
        headers={"content-type": MULTIPART},
    )
    try:
        outcome = await authorizer.check(request)
    finally:
        await engine.close()
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


# --- a body is parsed only where the route asks (issue 13: bounded work before auth) ----

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
