"""No secret value ever came back in a response or reached a log line during the whole
end-to-end run (egress credentials, API keys, sandbox tokens, the admin token).

Marked ``runs_last``: tests/conftest.py runs it after every other selected test, whatever
the file names, so it scans everything the session's stack logged and answered."""

from __future__ import annotations

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
