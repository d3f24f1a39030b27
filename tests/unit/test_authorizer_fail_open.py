"""Authorizer: fail-open covers only an OPA that failed (issue #13, findings 1 and 2)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authz.core.authorizer import FAIL_OPEN_CODES, FAIL_OPEN_HEADER, Authorizer
from authz.core.errors import AuthzError, ConfigError, OpaUnavailable, PolicyError
from authz.core.input import build_input
from authz.core.mode import Control, Mode
from authz.runtime.audit import AuditTrail, connect, read_entries
from authz.runtime.config import DEFAULT_FAIL_OPEN_MAX_PER_S, Settings, load
from authz.runtime.metrics import Metrics, MetricsSink
from authz.runtime.server import build_authorizer
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

    monkeypatch.setattr("authz.core.authorizer.build_input", slow_build)
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
    # The route asks for its body (parse_body), so a malformed one is refused before OPA.
    engine = FakeEngine(OpaUnavailable("down"))
    outcome = await make(engine, parse_body=True).check(check_request(**request_kwargs))
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


# -- every fail-open allow is capped and loud ---------------------------------------------


def _capped(clock: ManualClock, max_per_s: int = 3, **kwargs: Any) -> Authorizer:
    return make(
        FakeEngine(OpaUnavailable("refused")), clock=clock, fail_open_max_per_s=max_per_s, **kwargs
    )


async def _allowed(authorizer: Authorizer, n: int, path: str = PATH) -> list[bool]:
    request = check_request(context_extensions={"decision_path": path})
    return [(await authorizer.check(request)).record.fail_open for _ in range(n)]


async def test_fail_open_allows_are_capped_per_path_per_second() -> None:
    # OPA down and a fail-open path: without a cap, every request an attacker sends
    # while OPA is down is allowed unchecked.
    clock = ManualClock(100.0)
    authorizer = _capped(clock)
    assert await _allowed(authorizer, 5) == [True, True, True, False, False]
    assert await _allowed(authorizer, 2, EGRESS) == [True, True]  # its own budget
    clock.now = 100.9
    assert await _allowed(authorizer, 1) == [False]
    clock.now = 101.0
    assert await _allowed(authorizer, 4) == [True, True, True, False]


async def test_fail_open_over_the_cap_fails_closed_with_the_original_error() -> None:
    clock = ManualClock(100.0)
    authorizer = _capped(clock, max_per_s=1)
    await authorizer.check(check_request())
    outcome = await authorizer.check(check_request())
    assert not outcome.response.HasField("ok_response")
    assert outcome.response.denied_response.status.code == 503
    assert (outcome.record.reason, outcome.record.fail_open) == ("opa_unavailable", False)
    assert outcome.record.error is not None
    assert "fail-open cap" in outcome.record.error


async def test_every_fail_open_allow_is_counted_and_audited(tmp_path: Path) -> None:
    metrics = Metrics()
    trail = AuditTrail(tmp_path / "audit.db")
    authorizer = _capped(ManualClock(100.0), sinks=[MetricsSink(metrics), trail])
    try:
        await _allowed(authorizer, 5, EGRESS)
    finally:
        trail.close()
    counted = metrics.registry.get_sample_value(
        "authz_fail_open_total", {"path": EGRESS, "code": "opa_unavailable"}
    )
    assert counted == 3
    conn = connect(tmp_path / "audit.db")
    try:
        audited = [e.body.get("fail_open", False) for e in read_entries(conn, kind="decision")]
    finally:
        conn.close()
    assert audited == [True, True, True, False, False]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and "fail-open" in r.msg]


def _extra(record: logging.LogRecord, *names: str) -> tuple[Any, ...]:
    """The ``extra`` fields ``names`` of a log record."""
    return tuple(getattr(record, name) for name in names)


async def test_fail_open_warnings_are_rate_limited_per_path_and_count_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock(100.0)
    authorizer = _capped(clock, max_per_s=50)
    with caplog.at_level(logging.WARNING, logger="authz.core.authorizer"):
        await _allowed(authorizer, 5)
        await _allowed(authorizer, 2, EGRESS)
        first = _warnings(caplog)
        clock.now = 101.5
        await _allowed(authorizer, 1)
    assert [_extra(r, "decision_path", "suppressed") for r in first] == [(PATH, 0), (EGRESS, 0)]
    last = _warnings(caplog)[-1]
    assert _extra(last, "decision_path", "suppressed", "code") == (PATH, 4, "opa_unavailable")


async def test_fail_open_cap_reached_is_logged_once_per_path_per_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock(100.0)
    authorizer = _capped(clock, max_per_s=1)
    with caplog.at_level(logging.WARNING, logger="authz.core.authorizer"):
        await _allowed(authorizer, 10)
    capped = [r for r in _warnings(caplog) if "cap" in r.msg]
    assert len(capped) == 1
    assert _extra(capped[0], "decision_path", "refused") == (PATH, 1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, DEFAULT_FAIL_OPEN_MAX_PER_S), ("7", 7), ("0", ConfigError), ("x", ConfigError)],
    ids=["default", "seven", "zero", "not-a-number"],
)
def test_fail_open_max_per_s_setting(value: str | None, expected: int | type[ConfigError]) -> None:
    environ = {} if value is None else {"AUTHZ_FAIL_OPEN_MAX_PER_S": value}
    if isinstance(expected, int):
        assert load(environ).fail_open_max_per_s == expected
    else:
        with pytest.raises(ConfigError, match="AUTHZ_FAIL_OPEN_MAX_PER_S"):
            load(environ)


async def test_build_authorizer_applies_the_fail_open_cap() -> None:
    settings = Settings(fail_open_paths=(PATH,), fail_open_max_per_s=1)
    authorizer = build_authorizer(settings, FakeEngine(OpaUnavailable("refused")), [])
    assert await _allowed(authorizer, 2) == [True, False]
