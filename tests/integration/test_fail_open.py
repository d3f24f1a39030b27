"""Fail-open against a real OPA: a policy bug OPA reports as an error stays closed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from authz.authorizer import Authorizer
from authz.policy import OpaClient
from tests.integration.opa_server import running_opa
from tests.unit.fakes import check_request

# A policy bug of the most ordinary kind: two rules for one complete value that both
# hold for some client-chosen input (here: a request carrying both headers).
POLICY = """\
package authz.review

default decision := {"allowed": false, "reason": "denied", "http_status": 403}

decision := {"allowed": false, "reason": "blocked_team", "http_status": 403} if {
\tinput.attributes.request.http.headers["x-team"] == "blocked"
}

decision := {"allowed": false, "reason": "blocked_client", "http_status": 403} if {
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
