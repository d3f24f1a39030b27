"""``authz keys health``: exit codes 0/1/2, the table and the JSON, against a real bundle
.tar.gz and a real audit store written by AuditTrail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from authz.core.rfc3339 import DAY_S
from authz.tools.cli import main
from tests.helpers.key_health import NOW, decision, digest, entry, iso, write_audit, write_bundle

NOW_TEXT = iso(NOW)


def bundle(tmp_path: Path, *entries: dict[str, Any]) -> Path:
    keys = {digest(e["id"]): e for e in entries}
    return write_bundle(
        tmp_path / "authz.tar.gz",
        {"/data.json": {"gateway": {"api_keys": keys, "roles": ["user"]}}},
    )


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main(["keys", "health", "--now", NOW_TEXT, *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


HEALTHY = (entry("key-a"), entry("key-b", expires_at=iso(NOW + 90 * DAY_S)))


@pytest.mark.parametrize(
    ("entries", "seen", "extra", "code", "status"),
    [
        (HEALTHY, ("key-a", "key-b"), (), 0, None),
        ((*HEALTHY, entry("key-off", enabled=False)), ("key-a", "key-b"), (), 0, "disabled"),
        (HEALTHY, ("key-a",), (), 1, "unused"),
        (HEALTHY, ("key-a", "key-b"), ("--expiring-days", "100"), 1, "expiring"),
        (HEALTHY, ("key-a", "key-b"), ("--now", iso(NOW + 91 * DAY_S)), 1, "expired"),
        (
            (*HEALTHY, entry("key-c", expires_at="soon")),
            ("key-a", "key-b", "key-c"),
            (),
            1,
            "invalid_expiry",
        ),
    ],
    ids=["healthy", "disabled-is-not-actionable", "unused", "expiring", "expired", "invalid"],
)
def test_exit_codes(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    entries: tuple[dict[str, Any], ...],
    seen: tuple[str, ...],
    extra: tuple[str, ...],
    code: int,
    status: str | None,
) -> None:
    db = write_audit(tmp_path / "audit.db", [decision(k, NOW - DAY_S) for k in seen])
    got, out, err = run(capsys, "--bundle", bundle(tmp_path, *entries), "--audit", db, *extra)
    assert (got, err) == (code, "")
    verdict = out.rstrip().splitlines()[-1]
    assert verdict.startswith("ACTION NEEDED") if code else verdict == "no action needed"
    if status is not None:
        assert any(line.split()[1:2] == [status] for line in out.splitlines()[2:])
    for e in entries:
        assert digest(e["id"]) not in out  # keys are named by id only
        assert digest(e["id"])[:16] not in out


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = write_audit(
        tmp_path / "audit.db",
        [decision("key-a", NOW - 2 * DAY_S), decision("key-old", NOW - 60 * DAY_S)],
    )
    path = bundle(
        tmp_path,
        entry("key-a"),
        entry("key-old"),
        entry("key-soon", expires_at=iso(NOW + 3 * DAY_S)),
        entry("key-off", enabled=False),
    )
    code, out, _ = run(capsys, "--bundle", path, "--audit", db, "--json", "--unused-days", "45")
    assert code == 1
    report = json.loads(out)
    assert report["now"] == NOW_TEXT
    assert (report["expiring_days"], report["unused_days"]) == (14.0, 45.0)
    assert report["needs_action"] is True
    assert {k["id"]: k["status"] for k in report["keys"]} == {
        "key-off": "disabled",
        "key-soon": "expiring",
        "key-old": "unused",
        "key-a": "ok",
    }
    seen = {k["id"]: k["last_seen"] for k in report["keys"]}
    assert seen["key-a"] == iso(NOW - 2 * DAY_S)
    assert seen["key-soon"] is None
    assert report["counts"]["unused"] == 1
    assert digest("key-a") not in out


def test_json_healthy_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--bundle", bundle(tmp_path, entry("key-a")), "--json")
    assert code == 0
    report = json.loads(out)
    assert (report["needs_action"], report["unused_checked"]) == (False, False)


def test_key_is_an_alias_of_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = bundle(tmp_path, entry("key-a", expires_at=iso(NOW - DAY_S)))
    assert main(["key", "health", "--bundle", str(path), "--now", NOW_TEXT]) == 1
    assert "key-a" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing-bundle", "no such file or directory"),
        ("missing-audit", "no audit database"),
        ("not-a-bundle", "not a readable bundle"),
        ("no-api-keys", "no data.gateway.api_keys"),
        ("malformed-entry", "expected a non-empty string id"),
        ("not-an-audit-db", "cannot read the audit trail"),
    ],
)
def test_bad_input_exits_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, message: str
) -> None:
    path = bundle(tmp_path, entry("key-a"))
    db = write_audit(tmp_path / "audit.db", [decision("key-a", NOW)])
    named = path
    if setup == "missing-bundle":
        path = named = tmp_path / "nope.tar.gz"
    elif setup == "missing-audit":
        db = named = tmp_path / "nope.db"
    elif setup == "not-a-bundle":
        path.write_bytes(b"\x00" * 64)
    elif setup == "no-api-keys":
        write_bundle(path, {"/data.json": {"gateway": {"roles": []}}})
    elif setup == "malformed-entry":
        write_bundle(path, {"/gateway/api_keys/data.json": {digest("x"): {"enabled": True}}})
        named = Path(digest("x")[:8])
    elif setup == "not-an-audit-db":
        db.write_bytes(b"garbage" * 100)
        named = db
    code, out, err = run(capsys, "--bundle", path, "--audit", db)
    assert (code, out) == (2, "")
    assert err.startswith("error: ")
    assert message in err
    assert str(named) in err
    assert digest("x") not in err


@pytest.mark.parametrize(
    "args",
    [
        ["keys", "health"],
        ["keys", "health", "--bundle", "b", "--expiring-days", "-1"],
        ["keys", "health", "--bundle", "b", "--expiring-days", "soon"],
        ["keys", "health", "--bundle", "b", "--unused-days", "0"],
        ["keys", "health", "--bundle", "b", "--unused-days", "inf"],
        ["keys", "health", "--bundle", "b", "--now", "2026-01-01"],
    ],
    ids=["no-bundle", "negative", "word", "unused-0", "unused-inf", "now-not-rfc3339"],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(args)
    assert caught.value.code == 2
    assert "usage:" in capsys.readouterr().err
