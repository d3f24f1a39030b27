"""No secret value ever came back in a response or reached a log line during the whole
end-to-end run (egress credentials, API keys, sandbox tokens, the admin token).

Marked ``runs_last``: tests/conftest.py runs it after every other selected test, whatever
the file names, so it scans everything the session's stack logged and answered."""

from __future__ import annotations

import base64
import contextlib
import sqlite3

import pytest

from tests.helpers.e2e import Env

pytestmark = [pytest.mark.e2e, pytest.mark.runs_last]


def test_no_secret_in_any_response_or_log_line(e2e: Env) -> None:
    # Make sure there is something to search: one allowed call per proxy.
    e2e.gateway.get("/api/v1/status", headers={"x-api-key": e2e.keys["admin"]})
    e2e.egress.get("/v1/models", headers=e2e.sandbox_headers("sb-admin", "openai"))
    assert len(e2e.seen) > 100, "the e2e session should have recorded its responses"
    responses = "\n".join(e2e.seen)
    logs = {
        path.name: path.read_text(errors="replace")
        for path in (e2e.stack.run_dir / "logs").glob("*.log")
    }
    assert {"authz.log", "envoy-gateway.log", "envoy-egress.log", "opa.log"} <= set(logs)
    secrets = {
        **{f"egress secret {k}": v for k, v in e2e.secrets.items()},
        **{f"api key {k}": v for k, v in e2e.keys.items()},
        **{f"sandbox token {k}": v for k, v in e2e.tokens.items()},
        "admin token": e2e.admin_token,
    }
    for what, value in secrets.items():
        assert value not in responses, f"{what} came back in a response"
        for name, text in logs.items():
            assert value not in text, f"{what} is in {name}"


def test_no_secret_in_any_audit_row_or_proxy_credential_form(e2e: Env) -> None:
    """egress (issue 18): sandboxes send their token base64-encoded in
    Proxy-Authorization (id:token): neither that form nor any secret is in a response, a
    log line (Envoy's access logs included) or a row of the audit trail."""
    audit = e2e.stack.run_dir / "audit.db"
    with contextlib.closing(sqlite3.connect(f"file:{audit}?mode=ro", uri=True)) as db:
        rows = "\n".join(db.iterdump())
    assert "INSERT INTO" in rows, "the audit trail should hold the session's decisions"
    assert "CONNECT" in rows, "the session's CONNECT decisions should be audited"
    logs = "\n".join(
        path.read_text(errors="replace") for path in (e2e.stack.run_dir / "logs").glob("*.log")
    )
    assert '"method":"CONNECT"' in logs, "Envoy's access log should hold the tunnels"
    responses = "\n".join(e2e.seen)
    values = {
        **{f"egress secret {k}": v for k, v in e2e.secrets.items()},
        **{f"sandbox token {k}": v for k, v in e2e.tokens.items()},
        **{
            f"proxy credentials of {k}": base64.b64encode(f"{k}:{v}".encode()).decode()
            for k, v in e2e.tokens.items()
        },
    }
    for what, value in values.items():
        hexed = value.encode().hex().upper()
        assert value not in rows, f"{what} is in the audit trail"
        assert hexed not in rows, f"{what} is in the audit trail (as a blob)"
        assert value not in logs, f"{what} is in a log"
        assert value not in responses, f"{what} came back in a response"
