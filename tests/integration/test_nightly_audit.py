"""scripts/nightly-audit: audit verify + keys health in one cron-friendly exit code."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from authz.core.rfc3339 import DAY_S
from tests.helpers.key_health import decision, digest, entry, iso, write_audit, write_bundle


def setup(tmp_path: Path, *entries: dict[str, Any]) -> tuple[Path, Path]:
    """A bundle with ``entries`` and an intact audit store in which every key was used
    yesterday."""
    now = time.time()
    bundle = write_bundle(
        tmp_path / "authz.tar.gz",
        {"/gateway/api_keys/data.json": {digest(e["id"]): e for e in entries}},
    )
    db = write_audit(tmp_path / "audit.db", [decision(e["id"], now - DAY_S) for e in entries])
    return bundle, db


def nightly(
    repo_root: Path, *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AUTHZ_")}
    environ.update(env or {})
    return subprocess.run(
        [str(repo_root / "scripts/nightly-audit"), *map(str, args)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=False,
    )


def test_all_good_exits_0_with_both_summaries(repo_root: Path, tmp_path: Path) -> None:
    bundle, db = setup(tmp_path, entry("key-a"))
    result = nightly(repo_root, "--bundle", bundle, "--audit", db)
    assert (result.returncode, result.stderr) == (0, "")
    assert f"== audit trail {db}: exit 0" in result.stdout
    assert "ok: 1 entries, chain intact" in result.stdout
    assert f"== api keys {bundle}: exit 0" in result.stdout
    assert result.stdout.rstrip().endswith("no action needed")


def test_quiet_is_silent_when_all_good(repo_root: Path, tmp_path: Path) -> None:
    bundle, db = setup(tmp_path, entry("key-a"))
    result = nightly(repo_root, "--bundle", bundle, "--audit", db, "--quiet")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_expiring_key_exits_1_even_when_quiet(repo_root: Path, tmp_path: Path) -> None:
    soon = iso(time.time() + 3 * DAY_S)
    bundle, db = setup(tmp_path, entry("key-a"), entry("key-soon", expires_at=soon))
    result = nightly(repo_root, "--bundle", bundle, "--audit", db, "--quiet")
    assert result.returncode == 1
    assert "key-soon  expiring" in result.stdout
    assert "ACTION NEEDED: 1 key" in result.stdout
    # The window comes from authz's runtime setting unless given.
    env = {"AUTHZ_KEY_EXPIRY_WARNING_DAYS": "2"}
    assert nightly(repo_root, "--bundle", bundle, "--audit", db, env=env).returncode == 0
    assert (
        nightly(repo_root, "--bundle", bundle, "--audit", db, "--expiring-days", "2").returncode
        == 0
    )


def test_broken_chain_exits_1(repo_root: Path, tmp_path: Path) -> None:
    bundle, db = setup(tmp_path, entry("key-a"))
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE audit SET body = replace(body, 'allowed', 'denied') WHERE seq = 1")
    conn.close()
    result = nightly(repo_root, "--bundle", bundle, "--audit", db)
    assert result.returncode == 1
    assert f"== audit trail {db}: exit 1" in result.stdout
    assert "BROKEN at entry 1" in result.stderr
    assert f"== api keys {bundle}: exit 0" in result.stdout


def test_defaults_come_from_the_environment(repo_root: Path, tmp_path: Path) -> None:
    bundle, db = setup(tmp_path, entry("key-a"))
    env = {"AUTHZ_NIGHTLY_BUNDLE": str(bundle), "AUTHZ_AUDIT_DB": str(db)}
    result = nightly(repo_root, env=env)
    assert result.returncode == 0
    assert f"== api keys {bundle}" in result.stdout
    assert f"== audit trail {db}" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bundle", "{tmp}/missing.tar.gz"], "missing.tar.gz: no such file or directory"),
        (["--audit", "{tmp}/missing.db"], "no audit database at {tmp}/missing.db"),
        (["--frobnicate"], "unknown argument: --frobnicate"),
        (["--bundle"], "--bundle needs a value"),
        (["--unused-days", "zero"], "--unused-days"),
    ],
    ids=["missing-bundle", "missing-audit", "unknown-argument", "missing-value", "bad-days"],
)
def test_cannot_check_exits_2(
    repo_root: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    bundle, db = setup(tmp_path, entry("key-a"))
    given = [a.format(tmp=tmp_path) for a in args]
    defaults = ["--bundle", str(bundle), "--audit", str(db)]
    result = nightly(repo_root, *defaults, *given)
    assert result.returncode == 2
    assert message.format(tmp=tmp_path) in result.stderr


def test_help(repo_root: Path) -> None:
    result = nightly(repo_root, "--help")
    assert result.returncode == 0
    assert "Usage: scripts/nightly-audit" in result.stdout
    assert "source" not in result.stdout  # the comment block only
