"""authz.tools.replay and ``authz audit replay/verify/tail`` on a real OPA.

Two bundles are built from the repository's policy/ by scripts/build-policy-bundle with
generated keys as a data overlay; they differ only in the keys' data:

============  ==============================  ================================
key           v1                              v2
============  ==============================  ================================
viewer        viewer, enabled                 disabled        (allow -> deny)
promoted      viewer                          user            (deny -> allow)
old           disabled                        enabled, expired (reason only)
admin         admin                           admin           (unchanged)
============  ==============================  ================================

The audit trail is filled with what v1 actually decided (each input evaluated on a real
OPA serving v1), recorded through AuditTrail as the server does.
"""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import subprocess
import tarfile
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from authz.core.decision import parse_decision
from authz.core.input import build_input
from authz.core.opa import OpaClient
from authz.core.record import DecisionRecord
from authz.runtime.audit import AuditEntry, AuditTrail, read_entries
from authz.runtime.config import DEFAULT_CREDENTIAL_HEADERS
from authz.stack.supervisor import free_port, http_ok
from authz.tools.cli import main
from authz.tools.keys import digest, generate_key
from authz.tools.replay import ReplayChange, ReplayReport, describe, opa_serving, replay
from tests.helpers.fakes import check_request

GATEWAY = "authz/gateway/decision"
T0 = 1_760_000_000.0
# name -> (v1 entry, v2 entry) without the id
KEYS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "viewer": (
        {"enabled": True, "role": "viewer", "rate_limit_tier": "default"},
        {"enabled": False, "role": "viewer", "rate_limit_tier": "default"},
    ),
    "promoted": (
        {"enabled": True, "role": "viewer", "rate_limit_tier": "default"},
        {"enabled": True, "role": "user", "rate_limit_tier": "default"},
    ),
    "old": (
        {"enabled": False, "role": "user", "rate_limit_tier": "default"},
        {
            "enabled": True,
            "role": "user",
            "rate_limit_tier": "default",
            "expires_at": "2024-01-01T00:00:00Z",
        },
    ),
    "admin": (
        {"enabled": True, "role": "admin", "rate_limit_tier": "premium"},
        {"enabled": True, "role": "admin", "rate_limit_tier": "premium"},
    ),
}
# The recorded requests: (decision id, key name or None, method, path), in log order.
REQUESTS = [
    ("d-viewer", "viewer", "GET", "/api/v1/items?api_key=SECRET"),
    ("d-promoted", "promoted", "POST", "/api/v1/items"),
    ("d-old", "old", "GET", "/api/v1/status"),
    ("d-admin", "admin", "GET", "/api/v1/admin/users"),
    ("d-anonymous", None, "GET", "/api/v1/status"),
]
# What v1 decided for each request, and what v2 decides (replay's before/after strings).
V1 = {
    "d-viewer": "allow (allowed)",
    "d-promoted": "deny (role_not_allowed)",
    "d-old": "deny (disabled_api_key)",
    "d-admin": "allow (allowed)",
    "d-anonymous": "deny (missing_api_key)",
}
V2_CHANGES = {
    "d-viewer": ("allow (allowed)", "deny (disabled_api_key)"),
    "d-promoted": ("deny (role_not_allowed)", "allow (allowed)"),
    "d-old": ("deny (disabled_api_key)", "deny (expired_api_key)"),
}
V2_SUMMARY = (
    "evaluated 5: unchanged 2, changed 3 (allow->deny 1, deny->allow 1, reason only 1), "
    "errors 0, skipped {skipped}"
)


@dataclass(frozen=True)
class Bundles:
    v1: Path
    v2: Path
    # A bundle with no authz.gateway package: every replayed decision is undefined.
    other: Path


def write_overlay(root: Path, keys: dict[str, str], version: int) -> Path:
    entries = {
        digest(keys[name]): {"id": f"key-{name}", **specs[version]} for name, specs in KEYS.items()
    }
    target = root / "gateway/api_keys/data.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(entries), encoding="utf-8")
    return root


def build_policy_bundle(repo_root: Path, overlay: Path, out: Path, name: str) -> Path:
    result = subprocess.run(
        [
            str(repo_root / "scripts/build-policy-bundle"),
            "--data",
            str(overlay),
            "--out",
            str(out),
            "--name",
            name,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return out / f"{name}.tar.gz"


@pytest.fixture(scope="module")
def api_keys() -> dict[str, str]:
    return {name: generate_key() for name in KEYS}


@pytest.fixture(scope="module")
def bundles(
    repo_root: Path,
    opa_bin: str,
    api_keys: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Bundles:
    base = tmp_path_factory.mktemp("bundles")
    v1 = build_policy_bundle(repo_root, write_overlay(base / "o1", api_keys, 0), base, "v1")
    v2 = build_policy_bundle(repo_root, write_overlay(base / "o2", api_keys, 1), base, "v2")
    source = base / "other-src"
    source.mkdir()
    (source / "other.rego").write_text(
        'package authz.other\n\ndecision := {"allowed": true}\n', encoding="utf-8"
    )
    other = base / "other.tar.gz"
    built = subprocess.run(
        [opa_bin, "build", "-b", str(source), "-o", str(other)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    return Bundles(v1, v2, other)


def documents(api_keys: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(decision id, input document) for REQUESTS, built as the server builds them."""
    result = []
    for decision_id, key, method, path in REQUESTS:
        headers = {"x-api-key": api_keys[key]} if key else {}
        request = check_request(method=method, path=path, headers=headers)
        result.append((decision_id, build_input(request, DEFAULT_CREDENTIAL_HEADERS)))
    return result


async def decide_all(url: str, docs: list[tuple[str, dict[str, Any]]]) -> list[DecisionRecord]:
    """Evaluate each document on the OPA at ``url``; the records the server would write."""
    client = OpaClient(url)
    records = []
    try:
        for n, (decision_id, document) in enumerate(docs, start=1):
            evaluation = await client.evaluate(GATEWAY, document, 5.0)
            decision = parse_decision(evaluation.result)
            http = document["attributes"]["request"]["http"]
            request_id = str(http["headers"].get("x-request-id") or http.get("id", ""))
            method, path = http["method"], http["path"].split("?", 1)[0]
            records.append(
                DecisionRecord(
                    decision_id=decision_id,
                    timestamp=T0 + n,
                    decision_path=GATEWAY,
                    allowed=decision.allowed,
                    reason=decision.reason_code,
                    http_status=decision.http_status or (200 if decision.allowed else 403),
                    policy_allowed=decision.allowed,
                    policy_reason=decision.reason_code,
                    revision=evaluation.revision,
                    identity=decision.identity,
                    request_id=request_id,
                    method=method,
                    path=path,
                    document=document,
                )
            )
    finally:
        await client.close()
    return records


@pytest.fixture(scope="module")
def audit_db(
    bundles: Bundles,
    opa_bin: str,
    api_keys: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """An audit trail of v1's decisions, an admin entry, a bypass decision (no input) and
    an OPA failure (no policy decision)."""
    docs = documents(api_keys)
    with opa_serving(bundles.v1, opa_bin, free_port()) as url:
        records = asyncio.run(decide_all(url, docs))
    assert {
        r.decision_id: f"{'allow' if r.allowed else 'deny'} ({r.reason})" for r in records
    } == V1
    path = tmp_path_factory.mktemp("audit") / "audit.db"
    trail = AuditTrail(path, retention_days=None)  # T0 is fixed, long before today
    trail.record(records[0])
    trail.admin("set_mode", {"mode": "dry-run", "reason": "rollout"}, "adm-1")
    for record in records[1:]:
        trail.record(record)
    trail.record(DecisionRecord("d-bypass", T0 + 10, GATEWAY, True, "bypass", 200, mode="bypass"))
    trail.record(
        DecisionRecord(
            "d-opa-down",
            T0 + 11,
            GATEWAY,
            False,
            "opa_unavailable",
            503,
            error="OPA unreachable",
            document=docs[0][1],
        )
    )
    trail.close()
    return path


@pytest.fixture(scope="module")
def opa_v2(bundles: Bundles, opa_bin: str) -> Iterator[str]:
    with opa_serving(bundles.v2, opa_bin, free_port()) as url:
        yield url


@pytest.fixture
async def v2_client(opa_v2: str) -> AsyncIterator[OpaClient]:
    client = OpaClient(opa_v2)
    yield client
    await client.close()


def entries(path: Path) -> list[AuditEntry]:
    with closing(sqlite3.connect(path)) as conn:
        return list(read_entries(conn))


def seq_of(path: Path, decision_id: str) -> int:
    return next(e.seq for e in entries(path) if e.decision_id == decision_id)


# --- replay() ----------------------------------------------------------------------------


async def replay_on(bundle: Path, audit_db: Path, opa_bin: str) -> ReplayReport:
    """Replay ``audit_db`` against ``bundle`` served by a fresh OPA."""
    with opa_serving(bundle, opa_bin, free_port()) as url:
        client = OpaClient(url)
        try:
            return await replay(entries(audit_db), client)
        finally:
            await client.close()


async def test_replay_against_v2_reports_the_changes(audit_db: Path, v2_client: OpaClient) -> None:
    report = await replay(entries(audit_db), v2_client)
    # Skipped: the admin entry, the bypass decision (no input), the OPA failure (no policy).
    assert (report.evaluated, report.unchanged, report.errors, report.skipped) == (5, 2, 0, 3)
    assert report.summary() == V2_SUMMARY.format(skipped=3)
    assert [(c.decision_id, c.before, c.after) for c in report.changed] == [
        (decision_id, *V2_CHANGES[decision_id]) for decision_id in V2_CHANGES
    ]
    viewer = report.changed[0]
    assert viewer.seq == seq_of(audit_db, "d-viewer")
    assert viewer.decision_path == GATEWAY
    assert viewer.identity == {"key_id": "key-viewer", "role": "viewer"}
    assert viewer.time == "2025-10-09T08:53:21.000+00:00"


async def test_replay_against_the_recorded_bundle_changes_nothing(
    audit_db: Path, bundles: Bundles, opa_bin: str
) -> None:
    report = await replay_on(bundles.v1, audit_db, opa_bin)
    assert (report.evaluated, report.unchanged, report.changed, report.errors) == (5, 5, [], 0)


async def test_replay_counts_errors_as_changes(
    audit_db: Path, bundles: Bundles, opa_bin: str
) -> None:
    report = await replay_on(bundles.other, audit_db, opa_bin)
    assert (report.evaluated, report.unchanged, report.errors) == (5, 0, 5)
    assert {c.after for c in report.changed} == {"error (undefined_decision)"}
    assert [c.before for c in report.changed] == list(V1.values())


def test_describe() -> None:
    change = ReplayChange(
        7,
        "d-1",
        "2025-01-01T00:00:00.000+00:00",
        GATEWAY,
        {"key_id": "key-a", "role": "viewer"},
        "allow (allowed)",
        "deny (disabled_api_key)",
    )
    assert describe(change) == (
        "#7 2025-01-01T00:00:00.000+00:00 d-1 authz/gateway/decision key_id=key-a role=viewer: "
        "allow (allowed) -> deny (disabled_api_key)"
    )
    anonymous = ReplayChange(8, "d-2", "t", GATEWAY, {}, "deny (x)", "deny (y)")
    assert describe(anonymous) == "#8 t d-2 authz/gateway/decision : deny (x) -> deny (y)"


# --- opa_serving -------------------------------------------------------------------------


def tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a gzip file",
        tar_gz({"/policy.rego": b"package authz.broken\n\nallow if {\n"}),
        tar_gz({"/data.json": b"{not json"}),
    ],
    ids=["not-gzip", "rego-syntax-error", "bad-data-json"],
)
def test_opa_serving_corrupt_bundle_raises(tmp_path: Path, opa_bin: str, content: bytes) -> None:
    bundle = tmp_path / "corrupt.tar.gz"
    bundle.write_bytes(content)
    with pytest.raises(RuntimeError, match="OPA exited"), opa_serving(bundle, opa_bin, free_port()):
        pytest.fail("OPA served a corrupt bundle")


def test_opa_serving_stops_opa(bundles: Bundles, opa_bin: str) -> None:
    with opa_serving(bundles.v1, opa_bin, free_port()) as url:
        assert http_ok(f"{url}/health?bundles")
    assert not http_ok(f"{url}/health")


# --- authz audit verify / tail / replay --------------------------------------------------


@pytest.fixture
def db_copy(audit_db: Path, tmp_path: Path) -> Path:
    """A copy of the module's audit database a test may tamper with."""
    copy = tmp_path / "audit.db"
    with closing(sqlite3.connect(audit_db)) as src, closing(sqlite3.connect(copy)) as dst:
        src.backup(dst)
    return copy


def test_cli_verify_ok(audit_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--db", str(audit_db), "verify"]) == 0
    out, err = capsys.readouterr()
    assert out == "ok: 8 entries, chain intact (entries 1..8)\n"
    assert err == ""


def test_cli_verify_uses_authz_audit_db(
    audit_db: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AUTHZ_AUDIT_DB", str(audit_db))
    assert main(["audit", "verify"]) == 0
    assert capsys.readouterr().out.startswith("ok: 8 entries")


@pytest.mark.parametrize(
    ("tamper", "entry"),
    [
        (
            "UPDATE audit SET body = replace(body, 'deny', 'allow') WHERE seq = 3",
            "3 (decision d-promoted)",
        ),
        ("DELETE FROM audit WHERE seq = 4", "5 (decision d-admin)"),
        ("DELETE FROM audit WHERE seq = 8", "8:"),
    ],
    ids=["edited", "deleted", "truncated"],
)
def test_cli_verify_tampered(
    db_copy: Path, capsys: pytest.CaptureFixture[str], tamper: str, entry: str
) -> None:
    with closing(sqlite3.connect(db_copy)) as conn, conn:
        conn.execute(tamper)
    assert main(["audit", "--db", str(db_copy), "verify"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"BROKEN at entry {entry}")


def test_cli_verify_does_not_write(audit_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = audit_db.read_bytes()
    assert main(["audit", "--db", str(audit_db), "verify"]) == 0
    capsys.readouterr()
    assert audit_db.read_bytes() == before


@pytest.mark.parametrize("with_input", [False, True], ids=["default", "input"])
def test_cli_tail(audit_db: Path, capsys: pytest.CaptureFixture[str], with_input: bool) -> None:
    args = ["audit", "--db", str(audit_db), "tail", "--limit", "2"]
    assert main([*args, "--input"] if with_input else args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    rows = [json.loads(line) for line in lines]
    assert [(r["seq"], r["kind"], r["decision_id"]) for r in rows] == [
        (7, "decision", "d-bypass"),
        (8, "decision", "d-opa-down"),
    ]
    assert "input" not in rows[0]  # a bypass decision has no input
    assert ("input" in rows[1]) is with_input
    assert "SECRET" not in "".join(lines)


def test_cli_tail_default_shows_admin_entries(
    audit_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "--db", str(audit_db), "tail"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["seq"] for r in rows] == list(range(1, 9))
    assert rows[1] == {
        "seq": 2,
        "kind": "admin",
        "action": "set_mode",
        "mode": "dry-run",
        "reason": "rollout",
    }
    assert all("input" not in r for r in rows)


@pytest.fixture
def cli_opa(opa_bin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``authz audit replay`` starts the test's OPA binary (``AUTHZ_OPA_BIN``)."""
    monkeypatch.setenv("AUTHZ_OPA_BIN", opa_bin)


def _cli_replay(audit_db: Path, bundle: Path, *options: str) -> int:
    """``authz audit --db audit_db replay --bundle bundle [options]``: its exit code."""
    return main(["audit", "--db", str(audit_db), "replay", "--bundle", str(bundle), *options])


@pytest.mark.usefixtures("cli_opa")
def test_cli_replay(audit_db: Path, bundles: Bundles, capsys: pytest.CaptureFixture[str]) -> None:
    # Decisions change: exit 1, so the command can gate a CI job.
    assert _cli_replay(audit_db, bundles.v2) == 1
    lines = capsys.readouterr().out.splitlines()
    # Only decision entries are replayed: the admin entry is not even counted.
    assert lines[0] == V2_SUMMARY.format(skipped=2)
    assert len(lines) == 1 + len(V2_CHANGES)
    for line, (decision_id, (before, after)) in zip(lines[1:], V2_CHANGES.items(), strict=True):
        assert f" {decision_id} {GATEWAY} " in line
        assert line.startswith(f"#{seq_of(audit_db, decision_id)} ")
        assert line.endswith(f": {before} -> {after}")
    assert "key_id=key-viewer role=viewer" in lines[1]


@pytest.mark.usefixtures("cli_opa")
def test_cli_replay_limit(
    audit_db: Path, bundles: Bundles, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli_replay(audit_db, bundles.v2, "--limit", "4") == 0
    lines = capsys.readouterr().out.splitlines()
    # The last 4 decisions: d-admin, d-anonymous (unchanged), d-bypass, d-opa-down (skipped).
    assert lines == [
        "evaluated 2: unchanged 2, changed 0 (allow->deny 0, deny->allow 0, reason only 0), "
        "errors 0, skipped 2"
    ]


@pytest.mark.parametrize(
    "command",
    [["verify"], ["tail"], ["replay", "--bundle", "{bundle}"]],
    ids=["verify", "tail", "replay"],
)
def test_cli_missing_db(
    tmp_path: Path, bundles: Bundles, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    missing = tmp_path / "nope.db"
    args = [arg.format(bundle=bundles.v2) for arg in command]
    assert main(["audit", "--db", str(missing), *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"no audit database at {missing}" in err
    assert not missing.exists()  # read-only tools never create one


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "no audit database (AUTHZ_AUDIT_DB or --db)"),
        (None, "no audit database at authz-audit.db"),
    ],
    ids=["disabled", "default-absent"],
)
def test_cli_no_db_configured(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    value: str | None,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    if value is None:
        monkeypatch.delenv("AUTHZ_AUDIT_DB", raising=False)
    else:
        monkeypatch.setenv("AUTHZ_AUDIT_DB", value)
    assert main(["audit", "verify"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("bundle_name", "content", "message"),
    [("absent.tar.gz", None, "no bundle at"), ("corrupt.tar.gz", b"garbage", "OPA exited")],
    ids=["missing", "corrupt"],
)
@pytest.mark.usefixtures("cli_opa")
def test_cli_replay_bad_bundle(
    audit_db: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    bundle_name: str,
    content: bytes | None,
    message: str,
) -> None:
    bundle = tmp_path / bundle_name
    if content is not None:
        bundle.write_bytes(content)
    assert _cli_replay(audit_db, bundle) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err


@pytest.mark.parametrize(
    "command",
    [["verify"], ["tail", "--limit", "1"]],
    ids=["verify", "tail"],
)
def test_cli_db_option_after_the_subcommand(
    audit_db: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    # `authz audit verify --db X` is how an operator types it; it must not be a usage error.
    code: int | str | None
    try:
        code = main(["audit", *command, "--db", str(audit_db)])
    except SystemExit as exc:  # argparse
        code = f"usage error, exit {exc.code}"
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out
