"""Authorizer: fail-open covers only an OPA that failed (issue #13, findings 1 and 2)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from authz.authorizer import FAIL_OPEN_CODES, FAIL_OPEN_HEADER, Authorizer
from authz.control import Control, Mode
from authz.errors import AuthzError, OpaUnavailable, PolicyError
from authz.input import build_input
from tests.unit.fakes import (
    FakeEngine,
    ManualClock,
    check_request,
    multipart_body,
    upstream_headers,
)

PATH = "authz/gateway/decision"
EGRESS = "authz/egress/decision"
ALLOW = {"allowed": True, "reason": "allowed", "identity": {"key_id": "k1"}}
# The request of finding 1: no credential at all, to an admin route, with a body.
ADMIN_POST: dict[str, Any] = {
    "method": "POST",
    "path": "/api/v1/admin/users",
    "headers": {"content-type": "multipart/form-data; boundary=b"},
    "body": multipart_body("b", parts=200),
}


def make(engine: Any, **kwargs: Any) -> Authorizer:
    options: dict[str, Any] = {
        "default_decision_path": PATH,
        "credential_headers": ("x-api-key", "authorization"),
        "timeout_s": 0.3,
        "fail_open_paths": (PATH, EGRESS),
    }
    options.update(kwargs)
    return Authorizer(engine, **options)


def _subclasses(cls: type[AuthzError]) -> Iterator[type[AuthzError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


POLICY_ERRORS: list[type[AuthzError]] = sorted(
    {PolicyError, *_subclasses(PolicyError)}, key=lambda c: c.code
)


@pytest.fixture
def slow_parse(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    """A clock on which building the input document (parsing the body) takes 0.5 s."""
    clock = ManualClock()

    def slow_build(*args: Any, **kwargs: Any) -> Any:
        clock.now += 0.5
        return build_input(*args, **kwargs)

    monkeypatch.setattr("authz.authorizer.build_input", slow_build)
    return clock


async def test_fail_open_never_covers_a_body_that_burns_the_budget(
    slow_parse: ManualClock,
) -> None:
    # Finding 1: the parse spends the request's own 300 ms budget before OPA is asked;
    # DeadlineExceeded counted as "OPA did not answer", so the anonymous admin POST
    # reached the upstream with x-authz-fail-open: deadline_exceeded.
    engine = FakeEngine(ALLOW)
    outcome = await make(engine, clock=slow_parse).check(check_request(**ADMIN_POST))
    assert engine.calls == []
    assert outcome.record.reason == "deadline_exceeded"
    assert not outcome.record.fail_open
    assert not outcome.response.HasField("ok_response"), "authz's own deadline failed open"


async def test_fail_open_never_covers_a_budget_spent_on_arrival() -> None:
    # Queueing: the request waited so long in authz that Envoy's deadline is past.
    engine = FakeEngine(ALLOW)
    outcome = await make(engine).check(check_request(**ADMIN_POST), 0.005)
    assert outcome.record.reason == "deadline_exceeded"
    assert not outcome.response.HasField("ok_response"), "a queueing delay failed open"


@pytest.mark.parametrize("error", POLICY_ERRORS, ids=[c.code for c in POLICY_ERRORS])
async def test_fail_open_only_when_opa_is_unreachable_or_its_circuit_open(
    error: type[AuthzError],
) -> None:
    # README, Failures: fail open when OPA could not be asked (unreachable, circuit
    # open). An OPA timeout fails closed: authz's own slowness (a parse, a queue, a full
    # connection pool) spends the same budget, so a timeout does not prove OPA failed.
    outcome = await make(FakeEngine(error("boom"))).check(check_request(**ADMIN_POST))
    expected = issubclass(error, OpaUnavailable)
    assert outcome.response.HasField("ok_response") is expected
    assert outcome.record.fail_open is expected
    if expected:
        assert upstream_headers(outcome.response)[FAIL_OPEN_HEADER] == error.code


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"path": "/api/v1/items%zz"},
        {"headers": {"content-type": "application/json"}, "body": "{"},
        {"context_extensions": {"decision_path": "../x"}},
    ],
    ids=["bad-percent-encoding", "bad-json-body", "bad-decision-path"],
)
async def test_fail_open_never_covers_a_malformed_request(request_kwargs: Any) -> None:
    outcome = await make(FakeEngine(OpaUnavailable("down"))).check(check_request(**request_kwargs))
    assert not outcome.response.HasField("ok_response")
    assert not outcome.record.fail_open


def test_fail_open_codes_come_from_the_error_tree() -> None:
    eligible = {c.code for c in _subclasses(AuthzError) if c.fail_open_eligible}
    assert eligible == FAIL_OPEN_CODES
    assert {"opa_unavailable", "opa_circuit_open"} == FAIL_OPEN_CODES

    class Refused(OpaUnavailable):  # a new kind of "OPA unreachable" inherits it
        code = "opa_refused"

    assert Refused("x").fail_open_eligible


# -- finding 2: the route's decision path, before anything else ---------------------------


async def test_budget_spent_on_arrival_is_decided_on_the_routes_path() -> None:
    # The budget <= 0 check ran before the route's path was read: the record (decision
    # log, metrics, audit) and the fail-open check named the default path.
    outcome = await make(FakeEngine(ALLOW), fail_open_paths=(PATH,)).check(
        check_request(context_extensions={"decision_path": EGRESS}), 0.005
    )
    assert outcome.record.decision_path == EGRESS
    assert not outcome.response.HasField("ok_response")


async def test_bypass_records_the_routes_path() -> None:
    control = Control(Mode.BYPASS, allow_bypass=True)
    outcome = await make(FakeEngine(ALLOW), control=control).check(
        check_request(context_extensions={"decision_path": EGRESS})
    )
    assert outcome.response.HasField("ok_response")
    assert outcome.record.decision_path == EGRESS


async def test_bypass_with_an_invalid_route_path_records_the_default_path() -> None:
    # A label value must be a valid path; bypass still allows (it decides nothing).
    control = Control(Mode.BYPASS, allow_bypass=True)
    outcome = await make(FakeEngine(ALLOW), control=control).check(
        check_request(context_extensions={"decision_path": "../x"})
    )
    assert outcome.response.HasField("ok_response")
    assert outcome.record.decision_path == PATH
