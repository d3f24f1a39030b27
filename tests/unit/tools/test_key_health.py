"""authz.tools.key_health: key statuses at an injected time, window boundaries, invalid expiry
dates, unused keys from last-seen times, bundle/data loading and the audit last-seen
query."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import sqlite3
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from authz.core.errors import DataFileError
from authz.core.rfc3339 import DAY_S, parse_rfc3339
from authz.runtime import audit
from authz.runtime.audit import AuditTrail
from authz.tools import bundle_data, key_health, key_health_report
from authz.tools.key_health import (
    HealthReport,
    KeyHealth,
    Status,
    assess,
    load_api_keys,
    load_data,
    read_last_seen,
    report_json,
    report_text,
)
from tests.helpers.key_health import NOW, decision, digest, entry, iso, write_audit, write_bundle

# 2026-01-01T00:00:00Z
WINDOW = 14.0
UNUSED = 30.0


# A field value meaning "leave the field out of the entry".
ABSENT: Any = object()


# --- parse_rfc3339 ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-01T00:00:00Z", NOW),
        ("2026-01-01T02:00:00+02:00", NOW),
        ("2025-12-31T19:30:00-04:30", NOW),
        ("2026-01-01T00:00:00.250Z", NOW + 0.25),
        ("2026-01-01T00:00:00.123456789Z", NOW + 0.123456789),
        ("2026-01-01T00:00:00.1234567891Z", NOW + 0.123456789),
        ("\u0662\u0660\u0662\u0666-01-01T00:00:00Z", None),
        ("2026-01-01", None),
        ("2026-01-01T00:00:00", None),
        ("2026-01-01 00:00:00Z", None),
        ("2026-01-01t00:00:00z", None),
        ("2026-02-30T00:00:00Z", None),
        ("2026-13-01T00:00:00Z", None),
        ("2026-01-01T24:00:00Z", None),
        ("2026-01-01T00:00:60Z", None),
        ("2026-01-01T00:00:00+24:00", None),
        ("2026-01-01T00:00:00+01:60", None),
        ("2026-01-01T00:00:00+0100", None),
        ("never", None),
        ("", None),
    ],
    ids=[
        "utc",
        "plus-offset",
        "minus-half-hour-offset",
        "millis",
        "nanos",
        "more-than-nanos",
        "non-ascii-digits",
        "date-only",
        "no-offset",
        "space-separator",
        "lower-case",
        "feb-30",
        "month-13",
        "hour-24",
        "second-60",
        "offset-24h",
        "offset-minute-60",
        "offset-no-colon",
        "word",
        "empty",
    ],
)
def test_parse_rfc3339(text: str, expected: float | None) -> None:
    parsed = parse_rfc3339(text)
    if expected is None:
        assert parsed is None
    else:
        assert parsed == pytest.approx(expected, abs=1e-6)


# --- statuses --------------------------------------------------------------------------

SEEN_RECENTLY = {"key-a": NOW - 1 * DAY_S}

STATUS_CASES: list[tuple[str, dict[str, Any], dict[str, float] | None, Status]] = [
    ("plain-no-audit", {}, None, Status.OK),
    ("plain-seen", {}, SEEN_RECENTLY, Status.OK),
    ("far-expiry", {"expires_at": iso(NOW + 90 * DAY_S)}, SEEN_RECENTLY, Status.OK),
    ("expired", {"expires_at": iso(NOW - DAY_S)}, SEEN_RECENTLY, Status.EXPIRED),
    ("expires-now", {"expires_at": iso(NOW)}, SEEN_RECENTLY, Status.EXPIRED),
    ("expires-in-1s", {"expires_at": iso(NOW + 1)}, SEEN_RECENTLY, Status.EXPIRING),
    ("expiring", {"expires_at": iso(NOW + 3 * DAY_S)}, SEEN_RECENTLY, Status.EXPIRING),
    (
        "expiring-at-window",
        {"expires_at": iso(NOW + WINDOW * DAY_S)},
        SEEN_RECENTLY,
        Status.EXPIRING,
    ),
    (
        "window-plus-1s",
        {"expires_at": iso(NOW + WINDOW * DAY_S + 1)},
        SEEN_RECENTLY,
        Status.OK,
    ),
    ("invalid-date", {"expires_at": "2026-02-30T00:00:00Z"}, SEEN_RECENTLY, Status.INVALID_EXPIRY),
    ("invalid-format", {"expires_at": "next tuesday"}, None, Status.INVALID_EXPIRY),
    ("invalid-number", {"expires_at": 1767225600}, None, Status.INVALID_EXPIRY),
    ("invalid-null", {"expires_at": None}, None, Status.INVALID_EXPIRY),
    ("disabled", {"enabled": False}, SEEN_RECENTLY, Status.DISABLED),
    ("enabled-absent", {"enabled": ABSENT}, SEEN_RECENTLY, Status.DISABLED),
    (
        "disabled-beats-expired",
        {"enabled": False, "expires_at": iso(NOW - DAY_S)},
        None,
        Status.DISABLED,
    ),
    ("disabled-beats-invalid", {"enabled": False, "expires_at": "x"}, None, Status.DISABLED),
    ("disabled-beats-unused", {"enabled": False}, {}, Status.DISABLED),
    ("never-seen", {}, {}, Status.UNUSED),
    ("seen-by-another-key-only", {}, {"key-b": NOW}, Status.UNUSED),
    ("seen-long-ago", {}, {"key-a": NOW - 45 * DAY_S}, Status.UNUSED),
    ("seen-exactly-window-ago", {}, {"key-a": NOW - UNUSED * DAY_S}, Status.UNUSED),
    ("seen-just-inside-window", {}, {"key-a": NOW - UNUSED * DAY_S + 1}, Status.OK),
    ("expired-beats-unused", {"expires_at": iso(NOW - DAY_S)}, {}, Status.EXPIRED),
    ("expiring-beats-unused", {"expires_at": iso(NOW + DAY_S)}, {}, Status.EXPIRING),
    ("invalid-beats-unused", {"expires_at": "x"}, {}, Status.INVALID_EXPIRY),
    (
        "namespace-key-without-role",
        {"namespace": "labs/research", "role": ABSENT, "rate_limit_tier": ABSENT},
        SEEN_RECENTLY,
        Status.OK,
    ),
]


@pytest.mark.parametrize(
    ("fields", "last_seen", "status"),
    [case[1:] for case in STATUS_CASES],
    ids=[case[0] for case in STATUS_CASES],
)
def test_status(fields: dict[str, Any], last_seen: dict[str, float] | None, status: Status) -> None:
    key = entry()
    for name, value in fields.items():
        if value is ABSENT:
            key.pop(name, None)
        else:
            key[name] = value
    report = assess(
        {digest("key-a"): key},
        now=NOW,
        last_seen=last_seen,
        expiring_days=WINDOW,
        unused_days=UNUSED,
    )
    assert [k.status for k in report.keys] == [status]
    assert report.needs_action is (status not in (Status.OK, Status.DISABLED))


@pytest.mark.parametrize(
    ("window", "at_window"),
    [(0.0, Status.EXPIRED), (1.0, Status.EXPIRING), (30.0, Status.EXPIRING)],
    ids=["0d", "1d", "30d"],
)
def test_expiring_window_boundary_follows_the_setting(window: float, at_window: Status) -> None:
    def status(expires: float) -> Status:
        keys = {digest("key-a"): entry(expires_at=iso(expires))}
        return assess(keys, now=NOW, expiring_days=window).keys[0].status

    assert status(NOW + window * DAY_S) is at_window
    assert status(NOW + window * DAY_S + 1) is Status.OK


@pytest.mark.parametrize(
    ("window", "seen_ago_s", "expected"),
    [
        (7.0, 7 * DAY_S, Status.UNUSED),
        (7.0, 7 * DAY_S - 1, Status.OK),
        (90.0, 89 * DAY_S, Status.OK),
        (90.0, 91 * DAY_S, Status.UNUSED),
    ],
    ids=["7d-at-window", "7d-inside", "90d-inside", "90d-outside"],
)
def test_unused_window_follows_the_setting(
    window: float, seen_ago_s: float, expected: Status
) -> None:
    report = assess(
        {digest("key-a"): entry()},
        now=NOW,
        last_seen={"key-a": NOW - seen_ago_s},
        unused_days=window,
    )
    assert report.keys[0].status is expected


def test_unused_not_checked_without_last_seen() -> None:
    report = assess({digest("key-a"): entry()}, now=NOW, last_seen=None)
    assert not report.unused_checked
    assert report.keys[0].status is Status.OK
    assert assess({digest("key-a"): entry()}, now=NOW, last_seen={}).unused_checked


def test_key_health_fields() -> None:
    expires = iso(NOW + 2 * DAY_S)
    report = assess(
        {digest("key-a"): entry(expires_at=expires, namespace="labs/research")},
        now=NOW,
        last_seen={"key-a": NOW - 60},
    )
    (key,) = report.keys
    assert (key.key_id, key.enabled, key.namespace) == ("key-a", True, "labs/research")
    assert (key.expires_at_text, key.expires_at) == (expires, NOW + 2 * DAY_S)
    assert key.last_seen == NOW - 60
    assert key.needs_action


# --- needs_action ------------------------------------------------------------------------

ACTION_CASES: list[tuple[str, list[dict[str, Any]], bool]] = [
    ("no-keys", [], False),
    ("all-ok", [entry("a"), entry("b")], False),
    ("disabled-only", [entry("a", enabled=False)], False),
    (
        "disabled-and-expired-only",
        [entry("a", enabled=False, expires_at=iso(NOW - DAY_S))],
        False,
    ),
    ("one-expired", [entry("a"), entry("b", expires_at=iso(NOW - DAY_S))], True),
    ("one-expiring", [entry("a"), entry("b", expires_at=iso(NOW + DAY_S))], True),
    ("one-invalid", [entry("a"), entry("b", expires_at="soon")], True),
    ("one-unused", [entry("a"), entry("never-seen")], True),
]


@pytest.mark.parametrize(
    ("entries", "needs_action"),
    [case[1:] for case in ACTION_CASES],
    ids=[case[0] for case in ACTION_CASES],
)
def test_needs_action(entries: list[dict[str, Any]], needs_action: bool) -> None:
    seen = {e["id"]: NOW - DAY_S for e in entries if e["id"] != "never-seen"}
    report = assess({digest(e["id"]): e for e in entries}, now=NOW, last_seen=seen)
    assert report.needs_action is needs_action
    assert report.needs_action == any(key.needs_action for key in report.keys)


def test_report_is_sorted_by_status_then_id_and_counts_every_status() -> None:
    keys = {
        digest("z-ok"): entry("z-ok"),
        digest("b-expired"): entry("b-expired", expires_at=iso(NOW - DAY_S)),
        digest("a-ok"): entry("a-ok"),
        digest("c-disabled"): entry("c-disabled", enabled=False),
        digest("d-expiring"): entry("d-expiring", expires_at=iso(NOW + DAY_S)),
    }
    report = assess(keys, now=NOW)
    assert [k.key_id for k in report.keys] == [
        "c-disabled",
        "b-expired",
        "d-expiring",
        "a-ok",
        "z-ok",
    ]
    assert report.counts() == {
        Status.DISABLED: 1,
        Status.INVALID_EXPIRY: 0,
        Status.EXPIRED: 1,
        Status.EXPIRING: 1,
        Status.UNUSED: 0,
        Status.OK: 2,
    }


# --- malformed data ------------------------------------------------------------------------

MALFORMED: list[tuple[str, Any, str]] = [
    ("api-keys-not-object", ["x"], "api_keys: expected an object but got array"),
    ("entry-not-object", {digest("a"): "key-a"}, "expected an object but got string"),
    ("id-missing", {digest("a"): {"enabled": True}}, "expected a non-empty string id"),
    ("id-empty", {digest("a"): {"id": "", "enabled": True}}, "non-empty string id"),
    ("id-number", {digest("a"): {"id": 7, "enabled": True}}, "non-empty string id"),
    (
        "enabled-string",
        {digest("a"): {"id": "key-a", "enabled": "true"}},
        "(key-a): expected enabled to be a boolean",
    ),
    (
        "namespace-number",
        {digest("a"): {"id": "key-a", "enabled": True, "namespace": 3}},
        "(key-a): expected namespace to be a string",
    ),
    (
        "duplicate-id",
        {digest("a"): entry("key-a"), digest("b"): entry("key-a")},
        "id 'key-a' is used by two entries",
    ),
]


@pytest.mark.parametrize(
    ("api_keys", "message"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_data_names_the_entry_not_the_digest(api_keys: Any, message: str) -> None:
    with pytest.raises(DataFileError) as caught:
        assess(api_keys, now=NOW)
    text = str(caught.value)
    assert message in text
    for full in (digest("a"), digest("b")):
        assert full not in text
    if isinstance(api_keys, dict):  # the entry is findable by a short digest prefix
        assert f"{digest('a')[:8]}…" in text


def test_negative_window_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        assess({}, now=NOW, expiring_days=-1)


# --- presentation --------------------------------------------------------------------------


def sample_report() -> tuple[HealthReport, dict[str, Any]]:
    keys = {
        digest("key-ok"): entry("key-ok"),
        digest("key-old"): entry("key-old", expires_at="2025-01-01T00:00:00Z"),
        digest("key-off"): entry("key-off", enabled=False, namespace="labs/x"),
    }
    return assess(keys, now=NOW, last_seen={"key-ok": NOW - 3600}), keys


def test_report_json() -> None:
    report, keys = sample_report()
    data = report_json(report)
    assert json.loads(json.dumps(data)) == data
    assert data["now"] == "2026-01-01T00:00:00Z"
    assert data["needs_action"] is True
    assert data["unused_checked"] is True
    assert data["counts"] == {
        "disabled": 1,
        "invalid_expiry": 0,
        "expired": 1,
        "expiring": 0,
        "unused": 0,
        "ok": 1,
    }
    assert data["keys"] == [
        {
            "id": "key-off",
            "status": "disabled",
            "needs_action": False,
            "enabled": False,
            "namespace": "labs/x",
            "expires_at": None,
            "last_seen": None,
        },
        {
            "id": "key-old",
            "status": "expired",
            "needs_action": True,
            "enabled": True,
            "namespace": None,
            "expires_at": "2025-01-01T00:00:00Z",
            "last_seen": None,
        },
        {
            "id": "key-ok",
            "status": "ok",
            "needs_action": False,
            "enabled": True,
            "namespace": None,
            "expires_at": None,
            "last_seen": "2025-12-31T23:00:00Z",
        },
    ]
    assert not any(d in json.dumps(data) for d in keys)


def test_report_text() -> None:
    report, keys = sample_report()
    text = report_text(report)
    lines = text.splitlines()
    assert lines[0].startswith("key health at 2026-01-01T00:00:00Z: expiring within 14 days")
    assert lines[1].split() == ["KEY", "STATUS", "EXPIRES", "LAST", "SEEN", "NAMESPACE"]
    assert lines[2].split()[:2] == ["key-off", "disabled"]
    assert "2025-01-01T00:00:00Z (365.0d ago)" in lines[3]
    assert "2025-12-31T23:00:00Z (0.0d ago)" in lines[4]
    assert (
        lines[-2] == "3 keys: 1 disabled, 0 invalid_expiry, 1 expired, 0 expiring, 0 unused, 1 ok"
    )
    assert lines[-1].startswith("ACTION NEEDED: 1 key expired")
    assert not any(d[:16] in text for d in keys)


def test_report_text_without_action() -> None:
    report = assess({digest("a"): entry("a")}, now=NOW)
    text = report_text(report)
    assert "unused: not checked (no audit store)" in text
    assert text.splitlines()[-2:] == [
        "1 key: 0 disabled, 0 invalid_expiry, 0 expired, 0 expiring, 0 unused, 1 ok",
        "no action needed",
    ]


# --- loading bundle data ---------------------------------------------------------------------


KEYS = {digest("key-a"): entry("key-a")}


@pytest.mark.parametrize(
    "files",
    [
        {"/data.json": {"gateway": {"api_keys": KEYS, "roles": ["user"]}}},
        {"/gateway/data.json": {"roles": ["user"]}, "/gateway/api_keys/data.json": KEYS},
        {"gateway/api_keys/data.json": KEYS},
        {
            "/data.json": {"gateway": {"roles": ["user"]}},
            "/gateway/api_keys/data.json": {digest("key-a"): KEYS[digest("key-a")]},
        },
    ],
    ids=["merged-root", "per-directory", "no-leading-slash", "root-and-overlay"],
)
def test_load_api_keys_from_bundle(tmp_path: Path, files: Mapping[str, Any]) -> None:
    assert load_api_keys(write_bundle(tmp_path / "authz.tar.gz", files)) == KEYS


def test_load_api_keys_from_directory_and_file(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    (overlay / "gateway" / "api_keys").mkdir(parents=True)
    (overlay / "gateway" / "api_keys" / "data.json").write_text(json.dumps(KEYS))
    (overlay / "gateway" / "data.json").write_text(json.dumps({"roles": ["user"]}))
    assert load_api_keys(overlay) == KEYS
    single = tmp_path / "data.json"
    single.write_text(json.dumps({"gateway": {"api_keys": KEYS}}))
    assert load_api_keys(single) == KEYS


def test_load_data_merges_like_opa(tmp_path: Path) -> None:
    bundle = write_bundle(
        tmp_path / "b.tar.gz",
        {
            "/data.json": {"gateway": {"roles": ["user"]}},
            "/gateway/api_keys/data.json": KEYS,
            "/egress/sandboxes/data.json": {"sb-1": {"enabled": True}},
        },
    )
    assert load_data(bundle) == {
        "gateway": {"roles": ["user"], "api_keys": KEYS},
        "egress": {"sandboxes": {"sb-1": {"enabled": True}}},
    }


def test_the_repository_demo_data_loads(repo_root: Path) -> None:
    keys = load_api_keys(repo_root / "infra/demo/bundle-data")
    report = assess(keys, now=NOW)
    statuses = {k.key_id: k.status for k in report.keys}
    assert statuses["key-demo-expired"] is Status.EXPIRED
    assert statuses["key-demo-disabled"] is Status.DISABLED


LOAD_ERRORS: list[tuple[str, Any, str]] = [
    ("missing", None, "no such file or directory"),
    ("not-gzip", b"plain text", "not a readable bundle"),
    ("bad-json-member", {"/gateway/api_keys/data.json": b"{oops"}, "data.json: invalid JSON"),
    ("no-api-keys", {"/data.json": {"gateway": {"roles": []}}}, "no data.gateway.api_keys"),
    ("api-keys-array", {"/data.json": {"gateway": {"api_keys": []}}}, "is array, not an object"),
    (
        "conflict",
        {"/data.json": {"gateway": {"api_keys": 1}}, "/gateway/api_keys/data.json": KEYS},
        "data.gateway.api_keys conflicts with another file",
    ),
]


@pytest.mark.parametrize(
    ("content", "message"),
    [case[1:] for case in LOAD_ERRORS],
    ids=[case[0] for case in LOAD_ERRORS],
)
def test_load_errors_name_the_file(tmp_path: Path, content: Any, message: str) -> None:
    path = tmp_path / "authz.tar.gz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        write_bundle(path, content)
    with pytest.raises(DataFileError) as caught:
        load_api_keys(path)
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_invalid_json_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text("{not json")
    with pytest.raises(DataFileError, match=r"data\.json: invalid JSON"):
        load_api_keys(path)


# JSON nested past the parser's recursion limit; small, so the byte cap does not catch it.
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000


def _hostile_data(tmp_path: Path, form: str, raw: bytes) -> Path:
    """``raw`` as the api_keys data file of a bundle, a source directory or one file."""
    if form == "bundle":
        return write_bundle(tmp_path / "authz.tar.gz", {"/gateway/api_keys/data.json": raw})
    if form == "directory":
        (tmp_path / "data/gateway/api_keys").mkdir(parents=True)
        (tmp_path / "data/gateway/api_keys/data.json").write_bytes(raw)
        return tmp_path / "data"
    (tmp_path / "data.json").write_bytes(raw)
    return tmp_path / "data.json"


@pytest.mark.parametrize("form", ["bundle", "directory", "file"])
def test_deeply_nested_data_is_a_data_file_error_not_a_recursion_error(
    tmp_path: Path, form: str
) -> None:
    with pytest.raises(DataFileError, match="nested too deeply"):
        load_data(_hostile_data(tmp_path, form, DEEP_JSON))


@pytest.mark.parametrize("form", ["bundle", "directory", "file"])
def test_every_data_file_form_is_capped_in_bytes(
    tmp_path: Path, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bundle_data, "_MAX_DATA_BYTES", 16)
    with pytest.raises(DataFileError, match="larger than 16 bytes"):
        load_data(_hostile_data(tmp_path, form, json.dumps({"k": "x" * 32}).encode()))


# --- last seen, from a real audit trail ---------------------------------------------------------


def test_read_last_seen(tmp_path: Path) -> None:
    db = write_audit(
        tmp_path / "audit.db",
        [
            decision("key-a", NOW - 5 * DAY_S),
            decision("key-a", NOW - 1 * DAY_S),
            decision("key-a", NOW - 3 * DAY_S),
            decision("key-b", NOW - 40 * DAY_S, allowed=False),  # a deny is still a use
            decision(None, NOW),  # no key (e.g. missing_api_key, egress)
        ],
        admin=True,
    )
    assert read_last_seen(db) == {"key-a": NOW - 1 * DAY_S, "key-b": NOW - 40 * DAY_S}


def test_read_last_seen_while_the_writer_is_open(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    trail = AuditTrail(db, retention_days=None, max_records=None)
    try:
        trail.record(decision("key-a", NOW))
        deadline = time.monotonic() + 5
        while trail.written < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert read_last_seen(db) == {"key-a": NOW}
        trail.record(decision("key-a", NOW + 10))  # the writer still writes afterwards
    finally:
        trail.close()
    assert read_last_seen(db) == {"key-a": NOW + 10}


def test_read_last_seen_skips_unparseable_bodies(tmp_path: Path) -> None:
    db = write_audit(tmp_path / "audit.db", [decision("key-a", NOW)])
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "INSERT INTO audit VALUES (99, 'decision', ?, 'x', '{broken', 'p', 'h')", (NOW + 1,)
        )
    conn.close()
    assert read_last_seen(db) == {"key-a": NOW}


def test_read_last_seen_is_read_only(tmp_path: Path) -> None:
    db = write_audit(tmp_path / "audit.db", [decision("key-a", NOW)])
    before = db.read_bytes()
    read_last_seen(db)
    assert db.read_bytes() == before
    missing = tmp_path / "missing.db"
    with pytest.raises(DataFileError, match="no audit database"):
        read_last_seen(missing)
    assert not missing.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"not a database" * 100, "cannot read the audit trail"), (b"", "no such table")],
    ids=["not-sqlite", "empty-file"],
)
def test_read_last_seen_errors_name_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "audit.db"
    path.write_bytes(content)
    with pytest.raises(DataFileError) as caught:
        read_last_seen(path)
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


# --- the key health parts ----------------------------------------------------------------


NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DIGEST = "ab" * 32
PART_KEYS = {DIGEST: {"id": "key-a", "enabled": True}}


def test_key_health_old_names_are_the_parts() -> None:
    assert key_health.load_api_keys is bundle_data.load_api_keys
    assert key_health.load_data is bundle_data.load_data
    assert key_health.read_last_seen is audit.read_last_seen
    assert key_health.report_text is key_health_report.report_text
    assert key_health.report_json is key_health_report.report_json


@pytest.mark.parametrize("module", ["sqlite3", "tarfile", "io", "pathlib", "os"])
def test_key_health_assessment_does_no_io(module: str) -> None:
    tree = ast.parse(Path(key_health.__file__).read_text(encoding="utf-8"))
    imported = {
        name.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert module not in imported
    assert "open" not in {
        n.func.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }


def _tar(path: Path, members: dict[str, Any]) -> Path:
    with tarfile.open(path, "w:gz") as bundle:
        for name, value in members.items():
            raw = json.dumps(value).encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            bundle.addfile(info, io.BytesIO(raw))
    return path


def _source(kind: str, tmp_path: Path) -> Path:
    if kind == "json":
        path = tmp_path / "data.json"
        path.write_text(json.dumps({"gateway": {"api_keys": PART_KEYS}}), encoding="utf-8")
        return path
    if kind == "directory":
        target = tmp_path / "tree" / "gateway" / "api_keys" / "data.json"
        target.parent.mkdir(parents=True)
        target.write_text(json.dumps(PART_KEYS), encoding="utf-8")
        return tmp_path / "tree"
    return _tar(tmp_path / "b.tar.gz", {"/gateway/api_keys/data.json": PART_KEYS})


@pytest.mark.parametrize("kind", ["json", "directory", "bundle"])
def test_bundle_data_reads_the_same_keys_from_every_source(tmp_path: Path, kind: str) -> None:
    assert bundle_data.load_api_keys(_source(kind, tmp_path)) == PART_KEYS


def test_bundle_data_refuses_an_oversized_member_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bundle_data, "_MAX_DATA_BYTES", 10)
    path = _tar(tmp_path / "b.tar.gz", {"/gateway/api_keys/data.json": PART_KEYS})
    with pytest.raises(DataFileError, match=r"b\.tar\.gz:/gateway/api_keys/data\.json: larger"):
        bundle_data.load_api_keys(path)


def _audit_db(path: Path, rows: list[tuple[str, float, Any]]) -> Path:
    conn = audit.connect(path)
    with conn:
        for seq, (kind, when, body) in enumerate(rows, start=1):
            conn.execute(
                "INSERT INTO audit VALUES (?, ?, ?, 'd', ?, 'p', 'h')",
                (seq, kind, when, body if isinstance(body, str) else json.dumps(body)),
            )
    conn.close()
    return path


def test_audit_read_last_seen_is_the_newest_decision_per_key(tmp_path: Path) -> None:
    db = _audit_db(
        tmp_path / "audit.db",
        [
            ("decision", NOW - 50, {"key_id": "key-a"}),
            ("decision", NOW - 10, {"key_id": "key-a"}),
            ("decision", NOW - 30, {"key_id": "key-b"}),
            ("admin", NOW, {"key_id": "key-b"}),  # an admin action is not a use
            ("decision", NOW, {"service": "github"}),  # no key
            ("decision", NOW + 5, "{not json"),
        ],
    )
    assert audit.read_last_seen(db) == {"key-a": NOW - 10, "key-b": NOW - 30}


def test_audit_read_last_seen_never_writes(tmp_path: Path) -> None:
    db = _audit_db(tmp_path / "audit.db", [("decision", NOW, {"key_id": "key-a"})])
    # The writer (authz) holds the database open meanwhile, as when it runs; closed at the
    # end, not left to the collector (Python 3.13 warns about that).
    with contextlib.closing(sqlite3.connect(db)) as writer:
        writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        audit.read_last_seen(db)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


REPORT = HealthReport(
    now=NOW,
    expiring_days=14.0,
    unused_days=30.0,
    unused_checked=True,
    keys=(
        KeyHealth("key-old", Status.EXPIRED, True, "2025-12-01T00:00:00Z", NOW - 31 * 86400, None),
        KeyHealth("key-ok", Status.OK, True, None, None, NOW - 86400, "team-a"),
    ),
)


def test_key_health_report_json_renders_a_report_built_by_hand() -> None:
    rendered = key_health_report.report_json(REPORT)
    assert rendered["now"] == "2026-01-01T00:00:00Z"
    assert rendered["needs_action"] is True
    assert rendered["counts"] == {str(s): int(s in (Status.EXPIRED, Status.OK)) for s in Status}
    assert [(k["id"], k["status"], k["last_seen"]) for k in rendered["keys"]] == [
        ("key-old", "expired", None),
        ("key-ok", "ok", "2025-12-31T00:00:00Z"),
    ]


def test_key_health_report_text_renders_a_report_built_by_hand() -> None:
    lines = key_health_report.report_text(REPORT).splitlines()
    assert lines[0].startswith("key health at 2026-01-01T00:00:00Z")
    assert lines[2].split()[:2] == ["key-old", "expired"]
    assert "31.0d ago" in lines[2]
    assert "never" in lines[2]
    assert lines[3].split()[:2] == ["key-ok", "ok"]
    assert lines[3].endswith("team-a")
    assert (
        lines[-2] == "2 keys: 0 disabled, 0 invalid_expiry, 1 expired, 0 expiring, 0 unused, 1 ok"
    )
    assert lines[-1].startswith("ACTION NEEDED: 1 key")
