"""Tunnel ends from Envoy's access log service (:mod:`authz.runtime.als`): an answered
CONNECT's entry becomes one chained ``tunnel`` audit entry under the CONNECT decision's
id; hostile or oversized messages and entries are refused and counted, never stored,
never raised, and nothing but the named fields reaches the trail."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from authz.runtime.als import (
    MAX_ENTRIES,
    MAX_MESSAGE_BYTES,
    REFUSALS,
    AccessLogServicer,
    Refused,
    decode_message,
)
from authz.runtime.audit import AuditTrail, read_entries, verify
from tests.helpers.als import DECISION_ID, connect_entry, message

SECRET = "sbtok_must_never_be_stored"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@contextlib.contextmanager
def reader(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


Counts = dict[str, int]


def counting() -> tuple[Counts, Callable[[str, int], None]]:
    counts: Counts = {}

    def count(result: str, n: int) -> None:
        counts[result] = counts.get(result, 0) + n

    return counts, count


def test_answered_connect_becomes_one_chained_tunnel_entry_under_its_decision_id(
    db: Path,
) -> None:
    trail = AuditTrail(db)
    counts, count = counting()
    AccessLogServicer(trail.tunnel, count).handle(
        decode_message(message(connect_entry()).SerializeToString())
    )
    trail.close()
    with reader(db) as conn:
        [entry] = read_entries(conn)
        report = verify(conn)
    assert report.ok, report
    assert (entry.kind, entry.decision_id) == ("tunnel", DECISION_ID)
    assert dict(entry.body) == {
        "sandbox_id": "sb-standard",
        "host": "pypi.org",
        "port": 443,
        "bytes_received": 70_000,
        "bytes_sent": 66_000,
        "duration_ms": 1234,
        "start_time": 1_800_000_000.0,
        "status": 200,
    }
    assert counts == {"audited": 1}


def test_no_header_address_or_other_metadata_reaches_the_entry(db: Path) -> None:
    """Even if an Envoy config logged request headers or extra metadata, only the named
    fields are stored."""
    entry = connect_entry(metadata={"service": SECRET, "credential": SECRET})
    entry.request.request_headers["proxy-authorization"] = f"Basic {SECRET}"
    entry.request.path = f"/?token={SECRET}"
    entry.common_properties.filter_state_objects["authz.sandbox_id"].value = SECRET.encode()
    entry.common_properties.downstream_remote_address.socket_address.address = "10.0.0.7"
    trail = AuditTrail(db)
    AccessLogServicer(trail.tunnel).handle(message(entry))
    trail.close()
    raw = db.read_bytes() + (Path(f"{db}-wal").read_bytes() if Path(f"{db}-wal").exists() else b"")
    assert SECRET.encode() not in raw
    assert b"10.0.0.7" not in raw
    with reader(db) as conn:
        [stored] = read_entries(conn)
    assert set(stored.body) == {
        "sandbox_id",
        "host",
        "port",
        "bytes_received",
        "bytes_sent",
        "duration_ms",
        "start_time",
        "status",
    }


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (connect_entry(method=base_pb2.RequestMethod.GET), "not_connect"),
        (connect_entry(status=403), "not_established"),
        (connect_entry(status=None), "not_established"),
        (connect_entry(metadata={"decision_id": None}), "no_decision_id"),
        (connect_entry(metadata={"decision_id": 7}), "no_decision_id"),
        (connect_entry(metadata={"decision_id": "x" * 129}), "no_decision_id"),
        (connect_entry(metadata={"decision_id": "id\nforged"}), "no_decision_id"),
        (connect_entry(metadata={"sandbox_id": None}), "bad_sandbox_id"),
        (connect_entry(metadata={"sandbox_id": "sb one"}), "bad_sandbox_id"),
        (connect_entry(authority="pypi.org"), "bad_authority"),
        (connect_entry(authority="pypi.org:0"), "bad_authority"),
        (connect_entry(authority="pypi.org:99999"), "bad_authority"),
        (connect_entry(authority="py\x00pi.org:443"), "bad_authority"),
        (connect_entry(authority="a" * 300 + ":443"), "bad_authority"),
        (connect_entry(received=2**60), "bad_counts"),
        (connect_entry(duration_ms=None), "bad_duration"),
        (connect_entry(duration_ms=-5), "bad_duration"),
        (connect_entry(duration_ms=10**13), "bad_duration"),
    ],
    ids=[
        "not-connect",
        "denied",
        "no-status",
        "no-decision-id",
        "decision-id-not-a-string",
        "decision-id-too-long",
        "decision-id-with-newline",
        "no-sandbox",
        "sandbox-with-space",
        "no-port",
        "port-zero",
        "port-too-big",
        "nul-in-host",
        "host-too-long",
        "absurd-byte-count",
        "no-duration",
        "negative-duration",
        "absurd-duration",
    ],
)
def test_entry_that_is_not_an_answered_well_formed_connect_is_refused_and_counted(
    entry: accesslog_pb2.HTTPAccessLogEntry, reason: str
) -> None:
    assert reason in REFUSALS
    stored: list[tuple[str, Mapping[str, Any]]] = []
    counts, count = counting()
    AccessLogServicer(lambda i, b: stored.append((i, b)), count).handle(
        message(entry, connect_entry())
    )
    assert counts == {reason: 1, "audited": 1}
    assert [i for i, _ in stored] == [DECISION_ID]  # the good entry beside it still counts


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xff\xff", "undecodable"),
        (b"\x0a" + b"\xff" * 10, "undecodable"),
        (
            message(connect_entry(authority="a" * MAX_MESSAGE_BYTES)).SerializeToString(),
            "oversized",
        ),
    ],
    ids=["garbage", "truncated", "oversized"],
)
def test_message_that_is_not_a_bounded_access_log_message_is_refused(
    data: bytes, reason: str
) -> None:
    decoded = decode_message(data)
    assert isinstance(decoded, Refused)
    assert decoded.reason == reason
    counts, count = counting()
    AccessLogServicer(lambda i, b: pytest.fail("stored"), count).handle(decoded)
    assert counts == {reason: 1}


def test_message_with_too_many_entries_is_refused_as_a_whole() -> None:
    stored: list[str] = []
    counts, count = counting()
    entries = [connect_entry() for _ in range(MAX_ENTRIES + 1)]
    AccessLogServicer(lambda i, b: stored.append(i), count).handle(message(*entries))
    assert stored == []
    assert counts == {"too_many_entries": MAX_ENTRIES + 1}


def test_tcp_entries_are_refused() -> None:
    msg = als_pb2.StreamAccessLogsMessage()
    msg.tcp_logs.log_entry.add().common_properties.duration.FromMilliseconds(5)
    msg.tcp_logs.log_entry.add()
    counts, count = counting()
    AccessLogServicer(lambda i, b: pytest.fail("stored"), count).handle(msg)
    assert counts == {"tcp_entry": 2}


async def test_stream_survives_refusals_and_a_failing_sink() -> None:
    """StreamAccessLogs consumes the whole stream and answers, whatever it carries."""
    calls: list[str] = []

    def sink(decision_id: str, body: Mapping[str, Any]) -> None:
        calls.append(decision_id)
        if len(calls) == 1:
            raise RuntimeError("a bug in the sink")

    async def stream() -> AsyncIterator[als_pb2.StreamAccessLogsMessage | Refused]:
        yield Refused("undecodable", 0)
        yield message(connect_entry())
        yield message(connect_entry())

    counts, count = counting()
    response = await AccessLogServicer(sink, count).StreamAccessLogs(stream(), None)  # type: ignore[arg-type]
    assert isinstance(response, als_pb2.StreamAccessLogsResponse)
    assert calls == [DECISION_ID, DECISION_ID]
    assert counts == {"undecodable": 1, "audited": 1}
