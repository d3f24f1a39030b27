"""Structured logs: header redaction, the JSON formatter, and the decision log."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from authz.core.headers import CREDENTIAL_HEADERS
from authz.core.record import DecisionRecord
from authz.core.secret import MASK
from authz.runtime import logs
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
