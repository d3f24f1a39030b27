"""The running stack's secrets watcher: a secrets file that is not UTF-8 makes authz fail
closed (egress 503 ``credential_unavailable``, ``/readyz`` red) and a good file brings it
back, without a restart; the old secret is never injected meanwhile."""

from __future__ import annotations

import json
import os
import time

import httpx

from tests.helpers.e2e import Env, poll_status


def test_non_utf8_secrets_file_fails_closed_until_a_good_file_is_back(e2e: Env) -> None:
    headers = e2e.sandbox_headers("sb-admin", "openai")
    readyz = f"http://127.0.0.1:{e2e.stack.ports.authz_admin}/readyz"
    assert e2e.egress.get("/v1/models", headers=headers).json()["credential_ok"] is True
    try:
        e2e.secrets_file.write_bytes(b'{"version": 1, "credentials": {"openai": "\xff\xfe"}}')
        os.utime(e2e.secrets_file)
        resp = poll_status(lambda: e2e.egress.get("/v1/models", headers=headers), 503)
        assert json.loads(resp.text)["error"] == "credential_unavailable"
        ready = poll_status(lambda: httpx.get(readyz), 503)
        assert ready.json()["checks"]["secrets"]["ok"] is False
        # Still red a few watcher passes later: the watcher is alive, the file still bad.
        time.sleep(2.5)
        assert httpx.get(readyz).json()["checks"]["secrets"]["ok"] is False
    finally:
        e2e.write_secrets()
    resp = poll_status(lambda: e2e.egress.get("/v1/models", headers=headers), 200)
    assert resp.json()["credential_ok"] is True
    assert poll_status(lambda: httpx.get(readyz), 200).json()["checks"]["secrets"]["ok"] is True
