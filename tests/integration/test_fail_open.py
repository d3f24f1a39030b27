"""Fail-open against a real OPA: only an OPA that cannot be reached fails open; a policy
bug OPA reports as an error, and authz's own deadline, stay closed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from authz.core.authorizer import FAIL_OPEN_HEADER, Authorizer
from authz.core.input import build_input
from authz.core.opa import OpaClient
from authz.stack.supervisor import free_port
from tests.helpers.fakes import check_request, multipart_body, upstream_headers
from tests.helpers.opa_server import running_opa

# A policy bug of the most ordinary kind: two rules for one complete value that both
# hold for some client-chosen input (here: a request carrying both headers).
POLICY = """\
package authz.review

default decision := {"allowed": false, "authz": {"reason": "denied"}, "http_status": 403}

decision := {"allowed": false, "authz": {"reason": "blocked_team"}, "http_status": 403} if {
\tinput.attributes.request.http.headers["x-team"] == "blocked"
}

decision := {"allowed": false, "authz": {"reason": "blocked_client"}, "http_status": 403} if {
\tinput.attributes.request.http.headers["x-client"] == "blocked"
}
"""
PATH = "authz/review/decision"


@pytest.fixture(scope="module")
def opa_url(opa_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("opa-review")
    (base / "policy.rego").write_text(POLICY, encoding="utf-8")
    with running_opa(opa_bin, str(base / "policy.rego"), log_path=base / "opa.log") as url:
        yield url


async def test_policy_conflict_error_never_fails_open(opa_url: str) -> None:
    # README, Failures: "An undefined or malformed decision (a policy bug) never fails
    # open". A conflict between complete rules is a policy bug as well, but OPA answers
    # it with HTTP 500 (eval_conflict_error), authz maps that to opa_error, which is in
    # FAIL_OPEN_CODES: on a fail-open path a request that every rule denies, sent with
    # the input that triggers the conflict, is allowed.
    client = OpaClient(opa_url)
    try:
        authorizer = Authorizer(
            client,
            default_decision_path=PATH,
            credential_headers=(),
            timeout_s=2.0,
            fail_open_paths=[PATH],
        )
        denied = await authorizer.check(check_request(headers={"x-team": "blocked"}))
        assert not denied.response.HasField("ok_response")
        both = await authorizer.check(
            check_request(headers={"x-team": "blocked", "x-client": "blocked"})
        )
    finally:
        await client.close()
    assert both.record.reason == "opa_error"
    assert not both.response.HasField("ok_response"), "a policy conflict error failed open"


# No credential, an admin route, a multipart body: what fail-open must never let by.
ADMIN_POST: dict[str, Any] = {
    "method": "POST",
    "path": "/api/v1/admin/users",
    "headers": {"content-type": "multipart/form-data; boundary=b"},
    "body": multipart_body("b", parts=1000),
}


class _SlowParseClock:
    """perf_counter, plus 0.5 s for every input document built (a body bomb's parse)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offset = 0.0

        def slow_build(*args: Any, **kwargs: Any) -> Any:
            self.offset += 0.5
            return build_input(*args, **kwargs)

        monkeypatch.setattr("authz.core.authorizer.build_input", slow_build)

    def __call__(self) -> float:
        return time.perf_counter() + self.offset


@pytest.mark.parametrize(
    ("slow_parse", "timeout_s", "remaining_s"),
    [(True, 0.3, None), (False, 0.3, 0.005), (False, 1e-4, None)],
    ids=["parse-burns-budget", "spent-on-arrival", "opa-timeout-from-a-tiny-budget"],
)
async def test_fail_open_never_covers_authz_deadline(
    opa_url: str,
    monkeypatch: pytest.MonkeyPatch,
    slow_parse: bool,
    timeout_s: float,
    remaining_s: float | None,
) -> None:
    # With AUTHZ_FAIL_OPEN_PATHS=<the route's path>, an unauthenticated POST
    # /api/v1/admin/users whose body burns the budget is denied, never passed with
    # x-authz-fail-open: deadline_exceeded. OPA here is up and would deny.
    options: dict[str, Any] = {}
    if slow_parse:
        options["clock"] = _SlowParseClock(monkeypatch)
    client = OpaClient(opa_url)
    try:
        authorizer = Authorizer(
            client,
            default_decision_path=PATH,
            credential_headers=("x-api-key",),
            timeout_s=timeout_s,
            fail_open_paths=[PATH],
            **options,
        )
        outcome = await authorizer.check(check_request(**ADMIN_POST), remaining_s)
    finally:
        await client.close()
    assert outcome.record.reason in {"deadline_exceeded", "opa_timeout"}
    assert not outcome.record.fail_open
    assert not outcome.response.HasField("ok_response"), (
        f"an unauthenticated admin POST failed open on {outcome.record.reason}"
    )


async def test_unreachable_opa_still_fails_open() -> None:
    # The one case fail-open is for: nothing listens where OPA should be.
    client = OpaClient(f"http://127.0.0.1:{free_port()}")
    try:
        authorizer = Authorizer(
            client,
            default_decision_path=PATH,
            credential_headers=("x-api-key",),
            timeout_s=2.0,
            fail_open_paths=[PATH],
        )
        outcome = await authorizer.check(check_request(**ADMIN_POST))
    finally:
        await client.close()
    assert outcome.record.fail_open
    assert upstream_headers(outcome.response)[FAIL_OPEN_HEADER] == "opa_unavailable"
