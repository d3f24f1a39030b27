"""Key health in its parts: the pure assessment (authz.tools.key_health), the bundle data
loader (authz.tools.bundle_data), the read-only audit query (authz.runtime.audit) and the
rendering (authz.tools.key_health_report). Each part works on its own; the old names in
key_health are the parts themselves."""

from __future__ import annotations

import ast
import io
import json
import sqlite3
import tarfile
from pathlib import Path
from typing import Any

import pytest

from authz.core.errors import DataFileError
from authz.runtime import audit
from authz.tools import bundle_data, key_health, key_health_report
from authz.tools.key_health import HealthReport, KeyHealth, Status

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DIGEST = "ab" * 32
KEYS = {DIGEST: {"id": "key-a", "enabled": True}}


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
        path.write_text(json.dumps({"gateway": {"api_keys": KEYS}}), encoding="utf-8")
        return path
    if kind == "directory":
        target = tmp_path / "tree" / "gateway" / "api_keys" / "data.json"
        target.parent.mkdir(parents=True)
        target.write_text(json.dumps(KEYS), encoding="utf-8")
        return tmp_path / "tree"
    return _tar(tmp_path / "b.tar.gz", {"/gateway/api_keys/data.json": KEYS})


@pytest.mark.parametrize("kind", ["json", "directory", "bundle"])
def test_bundle_data_reads_the_same_keys_from_every_source(tmp_path: Path, kind: str) -> None:
    assert bundle_data.load_api_keys(_source(kind, tmp_path)) == KEYS


def test_bundle_data_refuses_an_oversized_member_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bundle_data, "_MAX_DATA_BYTES", 10)
    path = _tar(tmp_path / "b.tar.gz", {"/gateway/api_keys/data.json": KEYS})
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
    sqlite3.connect(db).execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
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
