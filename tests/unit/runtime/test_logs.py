"""Structured logs: header redaction, the JSON formatter, and the decision log."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import authz
from authz.core.headers import CREDENTIAL_HEADERS
from authz.core.record import DecisionRecord
from authz.core.secret import MASK
from authz.runtime import config, logs
from authz.runtime.logs import DecisionLog, JsonFormatter, redact_document, redact_headers

# --- redact_headers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "extra", "expected"),
    [
        (
            {"authorization": "Bearer t", "accept": "application/json"},
            (),
            {"authorization": MASK, "accept": "application/json"},
        ),
        (
            {"Authorization": "Bearer t", "X-Api-Key": "k", "COOKIE": "s=1"},
            (),
            {"Authorization": MASK, "X-Api-Key": MASK, "COOKIE": MASK},
        ),
        (
            {
                "proxy-authorization": "Basic x",
                "set-cookie": "s=1",
                "x-sandbox-token": "t",
                "x-request-id": "r",
            },
            (),
            {
                "proxy-authorization": MASK,
                "set-cookie": MASK,
                "x-sandbox-token": MASK,
                "x-request-id": "r",
            },
        ),
        (
            {"x-upstream-token": "t", "x-other": "o"},
            ("x-upstream-token",),
            {"x-upstream-token": MASK, "x-other": "o"},
        ),
        (
            {"X-Upstream-Token": "t", "x-api-key": "k"},
            ("X-UPSTREAM-TOKEN",),
            {"X-Upstream-Token": MASK, "x-api-key": MASK},
        ),
        ({}, ("x-a",), {}),
    ],
    ids=[
        "authorization",
        "case-insensitive",
        "every-default-name",
        "extra-name",
        "extra-name-case-insensitive",
        "empty",
    ],
)
def test_redact_headers(
    headers: dict[str, str], extra: Iterable[str], expected: dict[str, str]
) -> None:
    original = dict(headers)
    assert redact_headers(headers, extra) == expected
    assert headers == original  # a copy; the caller's map is untouched


@pytest.mark.parametrize("name", CREDENTIAL_HEADERS, ids=CREDENTIAL_HEADERS)
def test_redact_headers_masks_every_credential_header(name: str) -> None:
    # One list (authz.core.headers): every header stripped on egress as a credential
    # (api-key and x-goog-api-key too) is masked here.
    assert name in logs.SENSITIVE_HEADERS
    assert redact_headers({name.title(): "secret-value", "accept": "*/*"}) == {
        name.title(): MASK,
        "accept": "*/*",
    }


# --- redact_document -------------------------------------------------------------------

DIGEST = "0" * 63 + "1"


def _document(headers: dict[str, str]) -> dict[str, Any]:
    entries = [{"key": name, "value": value} for name, value in headers.items()]
    http = {"path": "/", "headers": dict(headers), "headerMap": {"headers": entries}}
    return {"attributes": {"request": {"http": http}}}


def _stored(document: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    http = document["attributes"]["request"]["http"]
    return http["headers"], {e["key"]: e["value"] for e in http["headerMap"]["headers"]}


@pytest.mark.parametrize("name", CREDENTIAL_HEADERS, ids=CREDENTIAL_HEADERS)
def test_redact_document_masks_every_credential_header_in_clear(name: str) -> None:
    # A credential header authz did not hash (e.g. a document built with fewer credential
    # headers) never reaches the audit trail in clear, in either header form.
    stored = redact_document(_document({name: "secret-value", "accept": "*/*"}))
    for headers in _stored(stored):
        assert headers == {name: MASK, "accept": "*/*"}


@pytest.mark.parametrize(
    "value",
    [f"sha256:{DIGEST}", f"Bearer sha256:{DIGEST}", f"Basic sha256:{DIGEST}"],
    ids=["digest", "bearer-digest", "basic-digest"],
)
@pytest.mark.parametrize("name", CREDENTIAL_HEADERS, ids=CREDENTIAL_HEADERS)
def test_redact_document_keeps_credential_digests(name: str, value: str) -> None:
    # What authz.core.input put in place of the credential stays: replay needs the digest.
    stored = redact_document(_document({name: value}))
    for headers in _stored(stored):
        assert headers == {name: value}


@pytest.mark.parametrize(
    "value",
    [f"sha256:{DIGEST} trailing", f"sha256:{DIGEST[:-1]}", f"Bearer x sha256:{DIGEST}", "sha256:"],
    ids=["trailing-text", "short", "two-words", "empty-digest"],
)
def test_redact_document_masks_what_only_looks_like_a_digest(value: str) -> None:
    stored = redact_document(_document({"cookie": value}))
    for headers in _stored(stored):
        assert headers == {"cookie": MASK}


# --- JsonFormatter ---------------------------------------------------------------------


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A private logger writing JSON lines to a StringIO."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("authz.test.logs")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log, stream
    log.removeHandler(handler)
    log.propagate = True


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize(
    ("level", "extra", "expected_extra"),
    [
        (logging.INFO, {}, {}),
        (logging.WARNING, {"code": "config_error", "n": 3}, {"code": "config_error", "n": 3}),
        (logging.DEBUG, {"where": Path("/x/y")}, {"where": "/x/y"}),
        (
            logging.ERROR,
            {"time": "forged", "level": "forged", "logger": "forged"},
            {},
        ),
    ],
    ids=["plain", "extra-fields", "extra-not-json-uses-str", "extra-cannot-overwrite-core"],
)
def test_formatter_line(
    logger: tuple[logging.Logger, io.StringIO],
    level: int,
    extra: dict[str, Any],
    expected_extra: dict[str, Any],
) -> None:
    log, stream = logger
    log.log(level, "hello %s", "world", extra=extra)
    text = stream.getvalue()
    assert text.count("\n") == 1
    assert text.endswith("\n")
    [line] = lines(stream)
    time = line.pop("time")
    assert datetime.fromisoformat(time).utcoffset() is not None
    assert line == {
        "level": logging.getLevelName(level).lower(),
        "logger": "authz.test.logs",
        "msg": "hello world",
        **expected_extra,
    }


def test_formatter_exception(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra={"code": "internal_error"})
    assert stream.getvalue().count("\n") == 1  # the traceback stays inside the one line
    [line] = lines(stream)
    assert (line["level"], line["msg"], line["code"]) == ("error", "failed", "internal_error")
    assert line["exc"].startswith("Traceback (most recent call last):")
    assert line["exc"].endswith("ValueError: boom")


def test_formatter_no_exc_without_exception(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    log.error("no traceback")
    assert "exc" not in lines(stream)[0]


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, restored after the test (configure() replaces its handlers)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_configure_routes_root_to_stream(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    logs.configure("WARNING", stream)
    logging.getLogger("authz.any").info("dropped")
    logging.getLogger("authz.any").warning("kept")
    assert [(line["level"], line["msg"]) for line in lines(stream)] == [("warning", "kept")]


# --- DecisionLog -----------------------------------------------------------------------


def record(decision_id: str, **overrides: Any) -> DecisionRecord:
    fields: dict[str, Any] = {
        "decision_id": decision_id,
        "timestamp": 1_700_000_000.5,
        "decision_path": "authz/gateway/decision",
        "allowed": True,
        "reason": "allowed",
        "http_status": 200,
        "revision": "r1",
        "identity": {"key_id": "key-a"},
        "document": {"attributes": {"request": {"http": {"headers": {"cookie": "SECRET"}}}}},
    } | overrides
    return DecisionRecord(**fields)


def test_decision_log_one_line_per_record() -> None:
    stream = io.StringIO()
    sink = DecisionLog(stream)
    records = [record("d-1"), record("d-2", allowed=False, reason="denied", http_status=403)]
    for item in records:
        sink.record(item)
    text = stream.getvalue()
    assert text.count("\n") == 2
    assert text.endswith("\n")
    assert lines(stream) == [item.log_fields() for item in records]
    assert "SECRET" not in text


def test_decision_log_type_cannot_be_overwritten_by_identity() -> None:
    # identity is policy-controlled; "type" is what log shippers route decision lines on
    stream = io.StringIO()
    DecisionLog(stream).record(record("d-1", identity={"type": "service", "key_id": "key-a"}))
    [line] = lines(stream)
    assert line["type"] == "decision"


def test_decision_log_defaults_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    DecisionLog().record(record("d-out"))
    out = capsys.readouterr().out
    assert json.loads(out)["decision_id"] == "d-out"


class BrokenStream(io.StringIO):
    """A stream whose write or flush fails like a full disk or a closed pipe."""

    def __init__(self, fail_on: str) -> None:
        super().__init__()
        self.fail_on = fail_on

    def write(self, text: str) -> int:
        if self.fail_on == "write":
            raise BrokenPipeError("pipe closed")
        return super().write(text)

    def flush(self) -> None:
        if self.fail_on == "flush":
            raise OSError(28, "No space left on device")
        super().flush()


def closed_stream() -> io.StringIO:
    stream = io.StringIO()
    stream.close()
    return stream


@pytest.mark.parametrize(
    ("make_stream", "written"),
    [
        (closed_stream, None),
        (lambda: BrokenStream("write"), []),
        (lambda: BrokenStream("flush"), ["d-1", "d-2"]),
    ],
    ids=["closed", "write-oserror", "flush-oserror"],
)
def test_decision_log_survives_broken_stream(
    make_stream: Callable[[], io.StringIO], written: list[str] | None
) -> None:
    stream = make_stream()
    sink = DecisionLog(stream)
    sink.record(record("d-1"))  # must not raise
    sink.record(record("d-2"))
    if written is not None:
        assert [line["decision_id"] for line in lines(stream)] == written


class FlushCounting(io.StringIO):
    """A stream that shows what a reader would see: only what was flushed."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed = ""
        self.flushes = 0

    def flush(self) -> None:
        super().flush()
        self.flushes += 1
        self.flushed = self.getvalue()


def _ids(text: str) -> list[str]:
    return [json.loads(line)["decision_id"] for line in text.splitlines()]


async def test_decision_log_lines_reach_the_stream_by_the_next_loop_turn() -> None:
    stream = FlushCounting()
    sink = DecisionLog(stream)
    for n in range(3):
        sink.record(record(f"d-{n}"))
    assert stream.flushes == 0  # one flush for the turn, not one per line
    await asyncio.sleep(0)
    assert (_ids(stream.flushed), stream.flushes) == (["d-0", "d-1", "d-2"], 1)
    sink.record(record("d-3"))
    await asyncio.sleep(0)
    assert (_ids(stream.flushed), stream.flushes) == (["d-0", "d-1", "d-2", "d-3"], 2)


def test_decision_log_without_a_running_loop_flushes_each_line() -> None:
    stream = FlushCounting()
    sink = DecisionLog(stream)
    sink.record(record("d-1"))
    assert (_ids(stream.flushed), stream.flushes) == (["d-1"], 1)


@pytest.mark.parametrize(
    "make_stream", [FlushCounting, lambda: BrokenStream("flush")], ids=["ok", "flush-oserror"]
)
async def test_decision_log_flush_writes_out_a_pending_turn(
    make_stream: Callable[[], io.StringIO],
) -> None:
    # Shutdown calls flush(): what the turn wrote is out even if the loop never turns
    # again; a broken stream does not raise.
    stream = make_stream()
    sink = DecisionLog(stream)
    sink.record(record("d-1"))
    sink.flush()
    if isinstance(stream, FlushCounting):
        assert (_ids(stream.flushed), stream.flushes) == (["d-1"], 1)
    await asyncio.sleep(0)  # the scheduled flush finds nothing left and does not raise


# --- the decision log in OPA's schema ---------------------------------------------------

SECRET = "sk-live-SECRET-0123456789"
OPA_KEYS = {"type", "level", "msg", "time", "labels", "decision_id", "path", "timestamp"}


def opa_lines(*records: DecisionRecord, **options: Any) -> list[dict[str, Any]]:
    stream = io.StringIO()
    sink = DecisionLog(stream, format="opa", instance_id="inst-1", **options)
    for item in records:
        sink.record(item)
    text = stream.getvalue()
    assert text.count("\n") == len(records)
    return lines(stream)


def http_document(
    headers: dict[str, str], path: str = "/items?page=2", **http: Any
) -> dict[str, Any]:
    entries = [{"key": name, "value": value} for name, value in headers.items()]
    return {
        "attributes": {
            "request": {
                "http": {
                    "method": "GET",
                    "path": path,
                    "headers": dict(headers),
                    "headerMap": {"headers": entries},
                    **http,
                }
            }
        },
        "parsed_query": {"page": ["2"]},
    }


OPA_RECORD_CASES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    # (record fields, what the event holds: top-level values, "authz" for custom.authz)
    (
        {"opa_result": {"allowed": True}, "revisions": {"authz": "r1"}, "peer": "ipv4:1.2.3.4:5"},
        {
            "result": {"allowed": True},
            "bundles": {"authz": {"revision": "r1"}},
            "requested_by": "1.2.3.4:5",
            "authz": {"result": "allow", "decision": "allow", "reason": "allowed"},
        },
    ),
    (
        {
            "allowed": False,
            "decision_allowed": False,
            "reason": "role_not_allowed",
            "http_status": 403,
            "opa_result": {"allowed": False, "reason": "role_not_allowed"},
            "revisions": {"authz": "r1", "data": ""},
        },
        {
            "result": {"allowed": False, "reason": "role_not_allowed"},
            "bundles": {"authz": {"revision": "r1"}, "data": {}},
            "authz": {"result": "deny", "decision": "deny", "http_status": 403},
        },
    ),
    (
        {"cached_from": "d-0", "opa_result": {"allowed": True}},
        {"authz": {"cached_from": "d-0"}, "metrics_cache_hit": 1},
    ),
    (
        {
            "allowed": True,
            "decision_allowed": False,
            "fail_open": True,
            "reason": "opa_unavailable",
            "http_status": 503,
            "error": "connection refused",
        },
        {
            "error": "connection refused",
            "revision": "r1",
            "authz": {"fail_open": True, "result": "allow", "decision": "deny"},
        },
    ),
    (
        {"mode": "bypass", "reason": "bypass", "document": None, "identity": {}},
        {"no": ("input", "result", "requested_by", "error"), "authz": {"mode": "bypass"}},
    ),
    (
        {"identity": {"key_id": "key-a", "role": "admin"}},
        {"authz": {"identity": {"key_id": "key-a", "role": "admin"}}},
    ),
]


@pytest.mark.parametrize(
    ("fields", "expected"),
    OPA_RECORD_CASES,
    ids=["allow", "deny-two-bundles", "cache-hit", "fail-open-error", "bypass", "identity"],
)
def test_opa_event_carries_the_decision_in_opa_fields(
    fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    timings = {"duration_s": 0.0123, "opa_duration_s": 0.0025}
    [event] = opa_lines(record("d-1", **(timings | fields)))
    assert set(event) >= OPA_KEYS
    assert (event["type"], event["msg"], event["level"]) == (
        "openpolicyagent.org/decision_logs",
        "Decision Log",
        "info",
    )
    assert event["decision_id"] == "d-1"
    assert event["path"] == "authz/gateway/decision"
    assert event["labels"] == {"id": "inst-1", "version": authz.__version__, "app": "authz"}
    assert event["req_id"] == 1
    assert event["metrics"]["timer_server_handler_ns"] == 12_300_000
    cache_hit = expected.get("metrics_cache_hit", 0)
    assert event["metrics"]["counter_authz_decision_cache_hit"] == cache_hit
    # A reused decision took no OPA round trip.
    assert ("timer_authz_opa_request_ns" in event["metrics"]) is (cache_hit == 0)
    for key in ("result", "bundles", "requested_by", "error", "revision"):
        if key in expected:
            assert event[key] == expected[key]
    for key in expected.get("no", ()):
        assert key not in event
    authz_fields = event["custom"]["authz"]
    assert authz_fields.items() >= expected["authz"].items()
    # What OPA's schema already carries is not repeated under custom.authz.
    assert not {"decision_id", "time", "decision_path", "duration_ms", "error"} & set(authz_fields)


@pytest.mark.parametrize(
    ("timestamp", "expected_timestamp", "expected_time"),
    [
        (1_700_000_000.5, "2023-11-14T22:13:20.5Z", "2023-11-14T22:13:20Z"),
        (1_700_000_000.0, "2023-11-14T22:13:20Z", "2023-11-14T22:13:20Z"),
        (1_700_000_000.123456, "2023-11-14T22:13:20.123456Z", "2023-11-14T22:13:20Z"),
        (0.000001, "1970-01-01T00:00:00.000001Z", "1970-01-01T00:00:00Z"),
    ],
    ids=["half-second", "whole-second", "microseconds", "epoch"],
)
def test_opa_event_timestamp_is_go_rfc3339_nano(
    timestamp: float, expected_timestamp: str, expected_time: str
) -> None:
    # Go's time.RFC3339Nano (trailing zeros dropped) and the console logger's RFC3339.
    [event] = opa_lines(record("d-1", timestamp=timestamp))
    assert (event["timestamp"], event["time"]) == (expected_timestamp, expected_time)


def test_opa_event_req_id_counts_per_process() -> None:
    events = opa_lines(record("d-1"), record("d-2"), record("d-3"))
    assert [e["req_id"] for e in events] == [1, 2, 3]
    assert len({e["labels"]["id"] for e in events}) == 1


@pytest.mark.parametrize("name", CREDENTIAL_HEADERS, ids=CREDENTIAL_HEADERS)
def test_opa_event_never_holds_a_credential_header_in_clear(name: str) -> None:
    document = http_document({name: f"Bearer {SECRET}", "accept": "*/*"})
    result = {
        "allowed": True,
        "headers": {name: SECRET},
        "response_headers_to_add": [{"key": name.upper(), "value": SECRET}],
    }
    [event] = opa_lines(record("d-1", document=document, opa_result=result))
    assert SECRET not in json.dumps(event)
    headers = event["input"]["attributes"]["request"]["http"]["headers"]
    assert headers == {name: MASK, "accept": "*/*"}
    assert set(event["masked"]) == {
        f"/input/attributes/request/http/headers/{name}",
        "/input/attributes/request/http/headerMap/headers/0/value",
        f"/result/headers/{name}",
        "/result/response_headers_to_add/0/value",
    }


@pytest.mark.parametrize(
    ("path", "query"),
    [
        (f"/items?api_key={SECRET}&page=2", {"api_key": [SECRET], "page": ["2"]}),
        (f"/items?page=2&token={SECRET}&token=x", {"token": [SECRET, "x"], "page": ["2"]}),
        (f"/items?Access_Token={SECRET}", {"Access_Token": [SECRET]}),
    ],
    ids=["api-key", "repeated-token", "case-insensitive"],
)
def test_opa_event_never_holds_a_credential_query_parameter_in_clear(
    path: str, query: dict[str, list[str]]
) -> None:
    document = http_document({":path": path}, path=path) | {"parsed_query": query}
    [event] = opa_lines(record("d-1", document=document))
    assert SECRET not in json.dumps(event)
    assert "/input/attributes/request/http/path" in event["masked"]
    assert "/input/attributes/request/http/headers/:path" in event["masked"]


def test_opa_event_masks_configured_credential_headers() -> None:
    document = http_document({"x-upstream-token": SECRET})
    [event] = opa_lines(record("d-1", document=document), credential_headers=("X-Upstream-Token",))
    assert SECRET not in json.dumps(event)


def test_opa_event_keeps_credential_digests() -> None:
    # What the policy saw (authz.core.input hashed it) is what the log shows.
    digest = f"Bearer sha256:{DIGEST}"
    document = http_document({"authorization": digest})
    [event] = opa_lines(record("d-1", document=document))
    assert event["input"]["attributes"]["request"]["http"]["headers"]["authorization"] == digest
    assert "masked" not in event


@pytest.mark.parametrize(
    ("body", "body_max_bytes", "kept"),
    [("a=1&password=hunter2", 0, False), ("a=1", 64, True), ("x" * 65, 64, False)],
    ids=["default-none", "small-kept", "over-cap-left-out"],
)
def test_opa_event_keeps_a_body_only_within_the_audit_body_cap(
    body: str, body_max_bytes: int, kept: bool
) -> None:
    document = http_document({}, body=body) | {"parsed_body": {"a": "1"}}
    [event] = opa_lines(record("d-1", document=document), body_max_bytes=body_max_bytes)
    http = event["input"]["attributes"]["request"]["http"]
    assert ("body" in http, "parsed_body" in event["input"]) == (kept, kept)
    erased = {"/input/attributes/request/http/body", "/input/parsed_body"}
    assert (erased <= set(event.get("erased", ()))) is not kept


BIG = 200_000
BOUNDED_CASES: list[tuple[str, dict[str, Any]]] = [
    ("authz", {"path": "/" + "p" * BIG}),
    ("authz", {"identity": {f"claim{i}": "v" * 900 for i in range(200)}}),
    ("authz", {"identity": {"key_id": "k" * BIG}, "error": "e" * BIG}),
    ("opa", {"document": http_document({f"x-h{i}": "v" * 900 for i in range(200)})}),
    ("opa", {"document": http_document({}, path="/" + "p" * BIG)}),
    ("opa", {"opa_result": {"allowed": True, "body": "b" * BIG, "n": list(range(BIG))}}),
    ("opa", {"identity": {f"claim{i}": "v" * 900 for i in range(200)}}),
    ("opa", {"decision_path": "a" * BIG, "revisions": {"r" * BIG: "v" * BIG}}),
]


@pytest.mark.parametrize(
    ("format", "fields"),
    BOUNDED_CASES,
    ids=[
        "authz-huge-path",
        "authz-many-identity-fields",
        "authz-huge-values",
        "opa-many-headers",
        "opa-huge-path",
        "opa-huge-result",
        "opa-many-identity-fields",
        "opa-huge-fixed-fields",
    ],
)
@pytest.mark.parametrize("line_max_bytes", [4096, 8192], ids=["4k", "8k"])
def test_decision_line_is_bounded_in_bytes(
    format: str, fields: dict[str, Any], line_max_bytes: int
) -> None:
    stream = io.StringIO()
    DecisionLog(stream, format=format, line_max_bytes=line_max_bytes).record(
        record("d-1", **fields)
    )
    text = stream.getvalue()
    assert text.count("\n") == 1
    assert len(text.encode()) - 1 <= line_max_bytes
    [line] = lines(stream)
    assert line["decision_id"] == "d-1"


def test_opa_line_over_its_cap_names_what_it_erased() -> None:
    document = http_document({f"x-h{i}": "v" * 900 for i in range(20)})
    [event] = opa_lines(record("d-1", document=document), line_max_bytes=8192)
    # INPUT_SHED_ORDER, as far as needed.
    assert event["erased"] == [
        "/input/parsed_query",
        "/input/attributes/request/http/headerMap",
        "/input/attributes/request/http/headers",
    ]
    assert event["input"]["attributes"]["request"]["http"]["method"] == "GET"


def test_opa_event_survives_a_deeply_nested_result() -> None:
    nested: Any = True
    for _ in range(300):
        nested = {"n": nested}
    [event] = opa_lines(record("d-1", opa_result=nested))
    assert event["result"]["n"]["n"]["n"]


@pytest.mark.parametrize(
    ("environ", "format"),
    [({}, "authz"), ({"AUTHZ_DECISION_LOG_FORMAT": "opa"}, "opa")],
    ids=["default-authz", "opa"],
)
def test_decision_log_from_settings_writes_the_configured_format(
    environ: dict[str, str], format: str
) -> None:
    settings = config.load(environ | {"AUTHZ_AUDIT_ROW_MAX_BYTES": "4096"})
    stream = io.StringIO()
    sink = DecisionLog.from_settings(settings, stream)
    sink.record(record("d-1"))
    sink.record(record("d-2", identity={f"c{i}": "v" * 900 for i in range(20)}))
    first, second = lines(stream)
    assert first["type"] == {"authz": "decision", "opa": logs.OPA_EVENT_TYPE}[format]
    # The audit trail's caps: a line within AUTHZ_AUDIT_ROW_MAX_BYTES.
    assert max(len(text.encode()) for text in stream.getvalue().splitlines()) <= 4096
    assert second["decision_id"] == "d-2"


def test_decision_log_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="'json'"):
        DecisionLog(io.StringIO(), format="json")


# A JWT (RFC 7519 compact JWS: header.payload.signature, base64url), and a JWE (five parts).
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNlY3JldA"
JWE = "eyJhbGciOiJSU0EtT0FFUCJ9.a2V5.aXY.Y2lwaGVydGV4dA.dGFn"


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"document": http_document({"x-forwarded-jwt": JWT})}, "input header"),
        ({"document": http_document({}, path=f"/items?jwt={JWT}")}, "input path"),
        ({"document": http_document({}) | {"parsed_query": {"jwt": [JWT]}}}, "input query"),
        ({"opa_result": {"allowed": True, "dynamic_metadata": {"t": JWT}}}, "result"),
        ({"opa_result": {"allowed": True, "body": f"token {JWE} here"}}, "result text"),
        ({"identity": {"token": JWT}}, "identity"),
    ],
    ids=["header", "path", "query", "result", "jwe-in-text", "identity"],
)
@pytest.mark.parametrize("format", ["authz", "opa"])
def test_decision_line_never_holds_a_jwt(fields: dict[str, Any], where: str, format: str) -> None:
    # A bearer JWT passed through to the policy (io.jwt.*) may land anywhere a policy or
    # a client puts it; whatever its name, no line shows it.
    stream = io.StringIO()
    DecisionLog(stream, format=format).record(record("d-1", **fields))
    text = stream.getvalue()
    for part in (*JWT.split("."), *JWE.split(".")[:4]):
        assert part not in text, where
    if format == "opa" and where != "identity":
        assert json.loads(text)["masked"], where


@pytest.mark.parametrize("format", ["authz", "opa"])
def test_decision_line_survives_an_integer_orjson_cannot_write(format: str) -> None:
    # A JSON integer beyond 64 bits (the plugin keeps them; so may the input) still gives
    # the decision its line, without the parts that hold it.
    big = {"n": 2**70}
    stream = io.StringIO()
    DecisionLog(stream, format=format).record(
        record("d-1", document={"parsed_body": big}, opa_result={"allowed": True, **big})
    )
    [line] = lines(stream)
    assert line["decision_id"] == "d-1"
    if format == "opa":
        assert {"/input", "/result"} <= set(line["erased"])


def test_opa_line_masked_names_only_what_is_still_there() -> None:
    # A masked header shed for size leaves no pointer to it.
    headers = {"cookie": SECRET} | {f"x-h{i}": "v" * 900 for i in range(20)}
    [event] = opa_lines(record("d-1", document=http_document(headers)))
    assert "/input/attributes/request/http/headers" in event["erased"]
    assert "masked" not in event
    assert SECRET not in json.dumps(event)


def test_opa_event_knows_every_field_of_the_authz_line() -> None:
    # A field added to DecisionRecord.log_fields must not pass for the policy's identity
    # in an OPA line (custom.authz.identity).
    full = record(
        "d-1",
        identity={},
        decision_allowed=False,
        policy_allowed=False,
        fail_open=True,
        tier="t",
        override_id="o",
        source="s",
        cached_from="c",
        error="e",
    )
    assert set(full.log_fields()) <= logs._AUTHZ_FIELDS
    [event] = opa_lines(full)
    assert "identity" not in event["custom"]["authz"]


@pytest.mark.parametrize(
    ("peer", "requested_by"),
    [
        ("ipv4:127.0.0.1:50000", "127.0.0.1:50000"),
        ("ipv6:%5B::1%5D:50000", "[::1]:50000"),
        ("ipv6:[::1]:50000", "[::1]:50000"),
        ("unix:/run/authz.sock", "unix:/run/authz.sock"),
        ("10.0.0.1:1", "10.0.0.1:1"),
    ],
    ids=["ipv4", "ipv6-escaped", "ipv6", "unix", "plain"],
)
def test_opa_event_requested_by_is_the_peer_address_as_opa_writes_one(
    peer: str, requested_by: str
) -> None:
    # gRPC names a peer "ipv4:host:port" (grpc.ServicerContext.peer); OPA writes the
    # client address as Go's net/http RemoteAddr, "host:port" / "[v6]:port".
    [event] = opa_lines(record("d-1", peer=peer))
    assert event["requested_by"] == requested_by


# --- the authz line's shortcut (logs._authz_line) -----------------------------------------

VALUE_MAX = config.DEFAULT_AUDIT_VALUE_MAX_BYTES
LINE_MAX = config.DEFAULT_AUDIT_ROW_MAX_BYTES


class _RenamingKey(str):
    """A str whose str() is another string: _cap writes str(key)."""

    __slots__ = ()

    def __str__(self) -> str:
        return "renamed"


class _OddStr(str):
    __slots__ = ()


def _nested(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


# Records (as DecisionRecord overrides) for which the shortcut must give the slow path's
# bytes: each condition of the shortcut has a case that only it keeps right.
AUTHZ_LINE_CASES: list[tuple[dict[str, Any], str]] = [
    ({}, "ordinary"),
    ({"identity": {}}, "no-identity"),
    (
        {"identity": {"key_id": "k", "role": "r"}, "tier": "t", "cached_from": "d-0"},
        "cache-hit",
    ),
    ({"error": "opa unreachable", "fail_open": True, "policy_allowed": False}, "error"),
    ({"identity": {"tenant": {"id": "t-1", "tags": ["a", "b"]}}}, "identity-nested"),
    ({"identity": {"deep": _nested(70, "x")}}, "identity-too-deep"),
    ({"identity": {"deep": _nested(63, "x")}}, "identity-just-deep-enough"),
    ({"identity": {"list": ["x" * (VALUE_MAX + 1)]}}, "identity-nested-string-over-cap"),
    ({"identity": {"tuple": ("a", 1)}}, "identity-tuple"),
    ({"identity": {"sub": JWT}}, "jwt-identity-value"),
    ({"identity": {JWT: "x"}}, "jwt-identity-key"),
    ({"identity": {"note": f"token {JWE} seen"}}, "jwe-inside-text"),
    ({"path": f"/items?jwt={JWT}"}, "jwt-path"),
    ({"request_id": JWT}, "jwt-request-id"),
    ({"identity": {"sub": "eyJ-not-a-jwt"}}, "eyj-not-a-jwt"),
    ({"identity": {"a": "x" * (VALUE_MAX - 1)}}, "ascii-under-cap"),
    ({"identity": {"a": "x" * VALUE_MAX}}, "ascii-at-cap"),
    ({"identity": {"a": "x" * (VALUE_MAX + 1)}}, "ascii-over-cap"),
    ({"identity": {"x" * (VALUE_MAX + 1): "a"}}, "key-over-cap"),
    ({"identity": {"a": "é" * (VALUE_MAX // 2)}}, "2-byte-at-cap"),
    ({"identity": {"a": "é" * (VALUE_MAX // 2) + "x"}}, "2-byte-over-cap"),
    ({"identity": {"a": "😀" * (VALUE_MAX // 4)}}, "4-byte-at-cap"),
    ({"identity": {"a": "😀" * (VALUE_MAX // 4 + 1)}}, "4-byte-over-cap"),
    ({"path": "/" + "€" * 400}, "3-byte-path-over-cap"),
    ({"identity": {"a": '"\\\n' * (VALUE_MAX // 3)}}, "escapes-near-cap"),
    ({"identity": {f"f{i}": "v" * 900 for i in range(10)}}, "line-over-line-cap"),
    ({"identity": {f"f{i}": "v" * 100 for i in range(70)}}, "line-near-line-cap"),
    ({"identity": {"big": 2**64}}, "int-beyond-64-bits"),
    ({"identity": {"big": -(2**63)}}, "int-64-bit"),
    ({"identity": {"f": 1.5e308, "g": -0.0, "h": float("nan"), "i": float("inf")}}, "floats"),
    ({"identity": {"b": True, "n": None, "i": 7}}, "scalars"),
    ({"identity": {1: "a"}}, "key-not-a-string"),
    ({"identity": {_RenamingKey("k"): "a"}}, "key-str-subclass"),
    ({"identity": {"k": _OddStr("x" * (VALUE_MAX + 1))}}, "value-str-subclass-over-cap"),
    ({"identity": {"s": "\ud800"}}, "lone-surrogate"),
    ({"identity": {"s": "\ud800" * (VALUE_MAX + 1)}}, "lone-surrogates-over-cap"),
]


def _outcome(make: Callable[[], bytes]) -> bytes | str:
    try:
        return make()
    except Exception as exc:  # both ways must fail alike
        return type(exc).__name__


@pytest.mark.parametrize(
    ("value_max", "line_max"), [(VALUE_MAX, LINE_MAX), (64, 512)], ids=["default-caps", "small"]
)
@pytest.mark.parametrize(
    "overrides", [case for case, _ in AUTHZ_LINE_CASES], ids=[i for _, i in AUTHZ_LINE_CASES]
)
def test_authz_line_shortcut_writes_the_slow_paths_bytes(
    overrides: dict[str, Any], value_max: int, line_max: int
) -> None:
    base = {"request_id": "r-1", "method": "GET", "path": "/items"}
    rec = record("d-1", **base | overrides)
    fast = _outcome(lambda: logs._authz_line(rec.log_fields(), value_max, line_max))
    slow = _outcome(lambda: logs._authz_line_slow(rec.log_fields(), value_max, line_max))
    assert fast == slow


def test_authz_line_shortcut_takes_an_ordinary_line_without_the_slow_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The shortcut must actually be the path of an ordinary line (else the test above
    # proves nothing about what runs).
    rec = record("d-1", identity={"key_id": "key-a", "role": "reader"}, tier="standard")
    expected = DecisionLog(io.StringIO()).line(rec)

    def refuse(*_: Any) -> bytes:
        raise AssertionError("slow path taken")

    monkeypatch.setattr(logs, "_authz_line_slow", refuse)
    assert DecisionLog(io.StringIO()).line(rec) == expected
