"""Day-2 operations end to end: dry-run rollout, TTL overrides, metrics, the audit trail
(verify, tamper, replay), fail-open paths, the circuit breaker, SIGHUP, bypass guard."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from authz.stack.supervisor import free_port, http_ok
from tests.helpers.e2e import Env, authz_processes, check_all
from tests.helpers.serve import serve_until_exit

pytestmark = pytest.mark.e2e


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _decision_line(e2e: Env, decision_id: str, timeout_s: float = 5.0) -> dict[str, object]:
    path = e2e.stack.run_dir / "logs/authz.log"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if decision_id in line and '"type":"decision"' in line:
                return dict(json.loads(line))
        time.sleep(0.05)
    raise AssertionError(f"no decision line for {decision_id}")


def test_metrics_expose_decisions_and_bundle_revision(e2e: Env) -> None:
    for _ in range(2):  # the second one is served by the decision cache
        e2e.gateway.get("/api/v1/status", headers={"x-api-key": e2e.keys["viewer"]})
    e2e.gateway.get("/api/v1/status")
    text = httpx.get(f"http://127.0.0.1:{e2e.stack.ports.authz_admin}/metrics").text
    path = "authz/gateway/decision"
    assert _metric(text, "authz_decisions_total", path=path, result="allow", mode="enforce") > 0
    assert _metric(text, "authz_decisions_total", path=path, reason="missing_api_key") > 0
    assert _metric(text, "authz_decision_duration_seconds_count", path=path) > 0
    assert _metric(text, "authz_opa_circuit_state", state="closed") == 1
    assert _metric(text, "authz_mode", mode="enforce") == 1
    assert 'authz_bundle_info{revision="' in text
    assert _metric(text, "authz_secrets_loaded") == 1
    assert _metric(text, "authz_decision_cache_lookups_total", result="hit") > 0
    assert "_created" not in text


def test_admin_api_needs_the_token(e2e: Env) -> None:
    url = f"http://127.0.0.1:{e2e.stack.ports.authz_admin}/v1/mode"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"authorization": "Bearer wrong"}).status_code == 401
    assert e2e.admin.get("/v1/mode").json() == {"mode": "enforce"}


def test_dry_run_rollout_logs_what_it_would_block(e2e: Env) -> None:
    viewer = {"x-api-key": e2e.keys["viewer"]}
    assert e2e.gateway.post("/api/v1/items", headers=viewer).status_code == 403
    switched = e2e.admin.post("/v1/mode", json={"mode": "dry-run", "reason": "e2e rollout"})
    assert switched.json() == {"mode": "dry-run", "previous": "enforce"}
    try:
        resp = e2e.gateway.post("/api/v1/items", headers=viewer)
        assert resp.status_code == 200
        assert resp.headers["x-authz-dry-run"] == "would-deny; reason=role_not_allowed; status=403"
        assert "x-api-key" not in resp.json()["headers"]  # a credential is for authz only
        line = _decision_line(e2e, resp.json()["headers"]["x-authz-decision-id"])
        assert (line["mode"], line["result"], line["decision"], line["reason"]) == (
            "dry-run",
            "allow",
            "deny",
            "role_not_allowed",
        )
        assert line["key_id"] == "key-viewer"  # a deny still names the key
        text = httpx.get(f"http://127.0.0.1:{e2e.stack.ports.authz_admin}/metrics").text
        assert _metric(text, "authz_dry_run_suppressed_total", reason="role_not_allowed") >= 1
        # Allowed requests are untouched.
        ok = e2e.gateway.get("/api/v1/status", headers=viewer)
        assert "x-authz-dry-run" not in ok.headers
    finally:
        e2e.admin.post("/v1/mode", json={"mode": "enforce", "reason": "e2e done"})
    assert e2e.gateway.post("/api/v1/items", headers=viewer).status_code == 403


def test_bypass_is_refused_at_runtime_without_the_startup_flag(e2e: Env) -> None:
    resp = e2e.admin.post("/v1/mode", json={"mode": "bypass", "reason": "debug"})
    assert resp.status_code == 400
    assert "AUTHZ_ALLOW_BYPASS" in resp.json()["message"]
    assert e2e.admin.get("/v1/mode").json() == {"mode": "enforce"}


def test_ttl_override_grants_then_expires(e2e: Env) -> None:
    user = {"x-api-key": e2e.keys["user"]}
    assert e2e.gateway.get("/api/v1/admin/reports", headers=user).status_code == 403
    created = e2e.add_override(
        "allow",
        {"key_id": "key-user", "path": "/api/v1/admin/reports", "methods": ["GET"]},
        reason="INC-42 on-call needs the report",
        ttl_seconds=3,
    )
    assert created.status_code == 201, created.text
    override = created.json()
    assert override["pushed"] is True
    resp = e2e.gateway.get("/api/v1/admin/reports", headers=user)
    assert resp.status_code == 200
    line = _decision_line(e2e, resp.json()["headers"]["x-authz-decision-id"])
    assert (line["reason"], line["override_id"]) == ("allowed_by_override", override["id"])
    # Scoped: another admin path stays forbidden.
    assert e2e.gateway.get("/api/v1/admin/users", headers=user).status_code == 403
    listed = e2e.admin.get("/v1/overrides").json()["overrides"]
    assert [o["id"] for o in listed] == [override["id"]]
    deadline = time.monotonic() + 10
    while e2e.gateway.get("/api/v1/admin/reports", headers=user).status_code == 200:
        assert time.monotonic() < deadline, "override did not expire"
        time.sleep(0.2)
    assert e2e.admin.get("/v1/overrides").json()["overrides"] == []


def test_block_override_and_delete(e2e: Env) -> None:
    viewer = {"x-api-key": e2e.keys["viewer"]}
    created = e2e.add_override(
        "deny", {"key_id": "key-viewer"}, reason="key leaked in a ticket"
    ).json()
    try:
        resp = e2e.gateway.get("/api/v1/status", headers=viewer)
        assert resp.status_code == 403
        assert resp.json()["error"] == "blocked_by_override"
    finally:
        assert e2e.admin.delete(f"/v1/overrides/{created['id']}").status_code == 200
    assert e2e.gateway.get("/api/v1/status", headers=viewer).status_code == 200


def _snapshot(e2e: Env, target: Path) -> Path:
    """A consistent copy of the live audit database (SQLite backup API)."""
    time.sleep(0.5)  # the writer flushes every 0.2 s
    source = sqlite3.connect(e2e.stack.run_dir / "audit.db")
    dest = sqlite3.connect(target)
    with source, dest:
        source.backup(dest)
    source.close()
    dest.close()
    return target


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authz", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_audit_trail_verifies_detects_tampering_and_tails(e2e: Env, tmp_path: Path) -> None:
    resp = e2e.gateway.get("/api/v1/status", headers={"x-api-key": e2e.keys["viewer"]})
    decision_id = resp.json()["headers"]["x-authz-decision-id"]
    db = _snapshot(e2e, tmp_path / "audit.db")
    verified = _cli("audit", "--db", str(db), "verify")
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("ok: ")
    tail = _cli("audit", "--db", str(db), "tail", "--limit", "500")
    ids = [json.loads(line).get("decision_id") for line in tail.stdout.splitlines()]
    assert decision_id in ids
    for key in e2e.keys.values():
        assert key not in tail.stdout
    # Edit one recorded decision: verify names it.
    conn = sqlite3.connect(db)
    with conn:
        seq = conn.execute(
            "SELECT seq FROM audit WHERE decision_id = ?", (decision_id,)
        ).fetchone()[0]
        conn.execute(
            'UPDATE audit SET body = replace(body, \'"result":"allow"\', \'"result":"deny"\') '
            "WHERE seq = ?",
            (seq,),
        )
    conn.close()
    broken = _cli("audit", "--db", str(db), "verify")
    assert broken.returncode == 1
    assert f"entry {seq}" in broken.stderr
    assert decision_id in broken.stderr


def test_audit_replay_against_a_bundle_with_a_revoked_key(
    e2e: Env, tmp_path: Path, repo_root: Path
) -> None:
    headers = {"x-api-key": e2e.keys["revocable"]}
    resp = e2e.gateway.get("/api/v1/items", headers=headers)
    assert resp.status_code == 200
    decision_id = resp.json()["headers"]["x-authz-decision-id"]
    db = _snapshot(e2e, tmp_path / "audit.db")
    # Build the "other" bundle: same policy, the revocable key disabled.
    e2e.write_keys(disabled=frozenset({"revocable"}))
    other = tmp_path / "other"
    result = subprocess.run(
        [
            str(repo_root / "scripts/build-policy-bundle"),
            "--data",
            str(e2e.overlay),
            "--out",
            str(other),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    e2e.write_keys()
    assert result.returncode == 0, result.stderr
    replayed = _cli("audit", "--db", str(db), "replay", "--bundle", str(other / "authz.tar.gz"))
    assert replayed.returncode == 1, replayed.stderr  # a decision changes
    lines = replayed.stdout.splitlines()
    assert lines[0].startswith("evaluated ")
    changed = [line for line in lines[1:] if decision_id in line]
    assert changed, replayed.stdout
    assert "allow (allowed) -> deny (disabled_api_key)" in changed[0]
    assert "key_id=key-revocable" in changed[0]


def test_fail_open_path_and_circuit_breaker(e2e: Env, tmp_path: Path) -> None:
    dead_opa = f"http://127.0.0.1:{free_port()}"
    env = {
        "AUTHZ_OPA_URL": dead_opa,
        "AUTHZ_FAIL_OPEN_PATHS": "authz/egress/decision",
        "AUTHZ_CIRCUIT_FAILURE_THRESHOLD": "3",
        "AUTHZ_CIRCUIT_RESET_TIMEOUT_S": "60",
    }
    with authz_processes(e2e, tmp_path, 1, env, wait_ready=False) as [(grpc_port, admin_port)]:
        # The gateway path fails closed; the egress path fails open.
        assert check_all([grpc_port], "k", 3) == [503] * 3
        assert check_all([grpc_port], "k", 2, decision_path="authz/egress/decision") == [200] * 2
        metrics = httpx.get(f"http://127.0.0.1:{admin_port}/metrics").text
        assert _metric(metrics, "authz_opa_circuit_state", state="open") == 1
        assert _metric(metrics, "authz_fail_open_total", path="authz/egress/decision") == 2
        assert _metric(metrics, "authz_opa_errors_total", code="opa_circuit_open") >= 1
        ready = httpx.get(f"http://127.0.0.1:{admin_port}/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["opa"]["detail"] == "circuit open"


def test_sighup_reloads_the_mode(e2e: Env, tmp_path: Path) -> None:
    config = tmp_path / "authz.yaml"
    config.write_text("mode: enforce\n")
    grpc_port, admin_port = free_port(), free_port()
    env = {
        **os.environ,
        "AUTHZ_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
        "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{admin_port}",
        "AUTHZ_OPA_URL": f"http://127.0.0.1:{e2e.stack.ports.opa}",
        "AUTHZ_AUDIT_DB": str(tmp_path / "audit.db"),
        "AUTHZ_OVERRIDES_FILE": str(tmp_path / "overrides.json"),
    }
    log = (tmp_path / "authz.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "authz", "serve", "--config", str(config)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not http_ok(f"http://127.0.0.1:{admin_port}/readyz"):
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert check_all([grpc_port], "nope", 1) == [401]
        config.write_text("mode: dry-run\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while check_all([grpc_port], "nope", 1) != [200]:
            assert time.monotonic() < deadline, "SIGHUP did not switch the mode"
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    assert '"mode":"dry-run"' in (tmp_path / "authz.log").read_text()


def test_bypass_refused_at_startup(tmp_path: Path) -> None:
    result = serve_until_exit({**os.environ, "AUTHZ_MODE": "bypass", "AUTHZ_AUDIT_DB": ""})
    assert result.returncode == 2
    assert "AUTHZ_ALLOW_BYPASS" in result.stderr


def test_bypass_when_confirmed_allows_everything_and_nags(e2e: Env, tmp_path: Path) -> None:
    env = {"AUTHZ_MODE": "bypass", "AUTHZ_ALLOW_BYPASS": "true"}
    with authz_processes(e2e, tmp_path, 1, env) as [(grpc_port, admin_port)]:
        assert check_all([grpc_port], "nope", 2) == [200, 200]
        httpx.get(f"http://127.0.0.1:{admin_port}/metrics")
    text = (tmp_path / "authz-0.log").read_text()
    assert text.count("BYPASS MODE") >= 2  # at startup and on the scrape


def test_override_survives_an_authz_restart(e2e: Env) -> None:
    user = {"x-api-key": e2e.keys["user"]}
    created = e2e.add_override(
        "allow",
        {"key_id": "key-user", "path": "/api/v1/admin/audit", "methods": ["GET"]},
        reason="survives restarts",
    ).json()
    try:
        assert e2e.gateway.get("/api/v1/admin/audit", headers=user).status_code == 200
        with e2e.stack.stopped("authz"):
            pass  # stopped, then started again from its overrides file
        listed = e2e.admin.get("/v1/overrides").json()["overrides"]
        assert created["id"] in [o["id"] for o in listed]
        # Not from any cache: authz restarted with an empty one.
        fresh = f"/api/v1/admin/audit?n={time.monotonic_ns()}"
        assert e2e.gateway.get(fresh, headers=user).status_code == 200
    finally:
        e2e.admin.delete(f"/v1/overrides/{created['id']}")


def test_preview_says_what_would_be_decided_and_from_what(e2e: Env) -> None:
    def preview(**body: object) -> dict[str, object]:
        resp = e2e.admin.post("/v1/preview", json=body)
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    denied = preview(key_id="key-user", path="/api/v1/admin/reports")
    assert (denied["allowed"], denied["reason"], denied["source"]) == (
        False,
        "role_not_allowed",
        "deny",
    )
    assert denied["http_status"] == 403
    assert denied["revision"]
    allowed = preview(key_id="key-user", method="POST", path="/api/v1/items")
    assert (allowed["allowed"], allowed["source"], allowed["identity"]) == (
        True,
        "policy_rule",
        {"key_id": "key-user", "role": "user", "tier": "unlimited"},
    )
    assert preview(key_id="key-nobody", path="/api/v1/status")["reason"] == "invalid_api_key"
    sandbox = preview(sandbox_id="sb-standard", service="openai", path="/v1/models")
    assert (sandbox["allowed"], sandbox["source"]) == (True, "policy_rule")
    assert sandbox["rate_limit"] == {
        "tier": "standard",
        "key": "sandbox:sb-standard:openai",
        "requests_per_minute": 60,
    }
    slack = preview(sandbox_id="sb-standard", service="slack", path="/api/chat.postMessage")
    assert (slack["allowed"], slack["reason"]) == (False, "service_not_allowed")
    # An override is the source while it lasts.
    created = e2e.add_override(
        "allow", {"key_id": "key-user", "path": "/api/v1/admin/reports"}, reason="preview test"
    ).json()
    try:
        granted = preview(key_id="key-user", path="/api/v1/admin/reports")
        assert (granted["allowed"], granted["source"], granted["override_id"]) == (
            True,
            "override",
            created["id"],
        )
    finally:
        e2e.admin.delete(f"/v1/overrides/{created['id']}")
    bad = e2e.admin.post("/v1/preview", json={"key_id": "key-user"})
    assert (bad.status_code, bad.json()["error"]) == (400, "invalid_request")
    assert "preview.path" in bad.json()["message"]


def test_reload_endpoint_reports_the_bundle_and_secrets(e2e: Env) -> None:
    resp = e2e.admin.post("/v1/reload", headers={"x-authz-actor": "e2e"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["mode"] == "enforce"
    assert body["secrets"] in {"reloaded", "unchanged"}
    assert body["revision"]
    assert body["bundle_changed"] is False
    # Nothing in the settings changed: nothing applied, nothing waiting for a restart.
    assert (body["applied"], body["restart_required"]) == ([], [])
    assert (
        httpx.post(f"http://127.0.0.1:{e2e.stack.ports.authz_admin}/v1/reload").status_code == 401
    )
