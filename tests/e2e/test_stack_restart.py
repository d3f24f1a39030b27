"""The local stack survives a crash: OPA killed in the running stack is restarted by the
supervisor while the gateway fails closed, then the gateway allows again."""

from __future__ import annotations

import os
import signal
import time
import uuid

import httpx
import pytest

from tests.helpers.e2e import Env

pytestmark = pytest.mark.e2e

# Bound on the whole outage: the restart delay (0.5 s), OPA's start and its first bundle
# download, with room for a loaded machine.
RECOVERY_S = 30.0
# How authz denies while OPA is away: 503 (unreachable, or the circuit open) or 500, and
# 403 undefined_decision while the new OPA runs without its bundle yet.
DENY_STATUSES = {500, 503}
NO_BUNDLE_YET = (403, "undefined_decision")


def _error_code(resp: httpx.Response) -> str:
    """authz's error code of a deny ("" for an allow); Envoy's own 503 (authz did not
    answer in time, ``status_on_error``) has no body: "envoy"."""
    if resp.status_code == 200:
        return ""
    try:
        return str(resp.json()["error"])
    except (ValueError, KeyError):
        return "envoy" if not resp.content else ""


def test_killed_opa_is_restarted_while_the_gateway_fails_closed_then_recovers(
    e2e: Env, caplog: pytest.LogCaptureFixture
) -> None:
    stack = e2e.stack
    killed = stack["opa"].pid
    if killed is None:
        pytest.skip("OPA runs as a container (AUTHZ_E2E_CONTAINERS=1): no local process")
    others = {name: p.pid for name, p in stack.processes.items() if name != "opa"}
    headers = {"x-api-key": e2e.keys["viewer"]}
    assert e2e.gateway.get("/api/v1/status", headers=headers).status_code == 200
    seen_before = len(stack.restarts)

    os.kill(killed, signal.SIGKILL)
    # A fresh path each time: the decision cache cannot answer, OPA must (a fresh query
    # string would not do: the gateway's declared cache key leaves it out).
    answers: list[tuple[float, int, str]] = []
    deadline = time.monotonic() + RECOVERY_S
    while not answers or answers[-1][1] != 200:
        assert time.monotonic() < deadline, f"no recovery within {RECOVERY_S:.0f} s: {answers}"
        sent = time.monotonic()
        resp = e2e.gateway.get(f"/api/v1/items/{uuid.uuid4()}", headers=headers)
        answers.append((sent, resp.status_code, _error_code(resp)))
        time.sleep(0.1)

    (restart,) = stack.restarts[seen_before:]
    assert (restart.name, restart.exit_code, restart.attempt) == ("opa", -signal.SIGKILL, 1)
    assert restart.line() in caplog.text
    assert stack["opa"].pid != killed
    assert stack["opa"].running
    # Fail closed: the first answer after the kill is a deny, every deny is a 500/503
    # with an error code (or the new OPA's missing bundle), and nothing sent before the
    # new OPA could exist was allowed.
    assert answers[0][1] in DENY_STATUSES, answers
    denies = [(status, code) for _, status, code in answers if status != 200]
    assert all(
        (status in DENY_STATUSES and code) or (status, code) == NO_BUNDLE_YET
        for status, code in denies
    ), answers
    restarted_at = restart.at + restart.delay_s
    assert all(status != 200 for sent, status, _ in answers if sent < restarted_at), answers
    # The others kept running, untouched.
    assert {name: p.pid for name, p in stack.processes.items() if name != "opa"} == others
    assert all(stack[name].running for name in others)
