"""SIGHUP on a running ``python -m authz serve``: a changed settings file applies what can
change at runtime and names what needs a restart (log line and audit entry); a bad file
is refused whole. The per-setting matrix is tests/unit/runtime/test_server.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authz.runtime.audit import connect, read_entries
from authz.stack.supervisor import free_port


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
            return int(resp.status) == 200
    except OSError:
        return False


def _lines(log: Path) -> Iterator[dict[str, Any]]:
    for line in log.read_text(encoding="utf-8").splitlines():
        if line.startswith("{"):
            yield json.loads(line)


def _await_line(log: Path, msg: str, count: int) -> dict[str, Any]:
    """The ``count``-th log line with message ``msg``, waiting up to 10 s for it."""
    deadline = time.monotonic() + 10
    while True:
        found = [line for line in _lines(log) if line.get("msg") == msg]
        if len(found) >= count:
            return found[count - 1]
        assert time.monotonic() < deadline, f"no {msg!r} line {count} in {log.read_text()}"
        time.sleep(0.05)


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    config = tmp_path / "authz.yaml"
    config.write_text("decision_timeout_ms: 300\n", encoding="utf-8")
    admin_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AUTHZ_")},
        "AUTHZ_GRPC_ADDR": f"127.0.0.1:{free_port()}",
        "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{admin_port}",
        "AUTHZ_OPA_URL": f"http://127.0.0.1:{free_port()}",  # nothing there: never needed
        "AUTHZ_AUDIT_DB": str(tmp_path / "audit.db"),
        "AUTHZ_OVERRIDES_FILE": str(tmp_path / "overrides.json"),
        "AUTHZ_SHUTDOWN_GRACE_S": "1",
    }
    log = tmp_path / "authz.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "authz", "serve", "--config", str(config)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while not _healthy(admin_port):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield proc, config, log
    finally:
        proc.terminate()
        proc.wait(10)


def test_sighup_applies_runtime_settings_names_restart_ones_and_refuses_a_bad_file(
    serving: tuple[subprocess.Popen[bytes], Path, Path], tmp_path: Path
) -> None:
    proc, config, log = serving
    config.write_text("decision_timeout_ms: 1000\nopa_pool_size: 7\n", encoding="utf-8")
    proc.send_signal(signal.SIGHUP)
    line = _await_line(log, "settings reloaded", 1)
    assert line["applied"] == ["decision_timeout_ms"]
    assert line["restart_required"] == ["opa_pool_size"]

    config.write_text("decision_timeout_ms: 2000\nlog_level: loud\n", encoding="utf-8")
    proc.send_signal(signal.SIGHUP)
    refused = _await_line(log, "reload refused; keeping the running settings", 1)
    assert "log_level" in refused["error"]

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    conn = connect(tmp_path / "audit.db")
    try:
        reloads = [
            e.body for e in read_entries(conn, kind="admin") if e.body.get("action") == "reload"
        ]
    finally:
        conn.close()
    assert [(r["actor"], r["settings"]) for r in reloads] == [
        ("sighup", "reloaded"),
        ("sighup", "refused"),
    ]
    assert reloads[0]["applied"] == ["decision_timeout_ms"]
    assert reloads[0]["restart_required"] == ["opa_pool_size"]
    assert reloads[1]["applied"] == []
