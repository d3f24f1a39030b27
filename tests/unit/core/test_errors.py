"""authz.core.errors: every class carries its code, HTTP status and flags, and every table
of codes (statuses, fail-open, OPA errors for the metrics) is read off the class tree."""

from __future__ import annotations

import asyncio
import gc
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from authz.core import errors
from authz.core.errors import (
    FAIL_OPEN_CODES,
    AddressNotAllowed,
    AdminRequestError,
    AuthzError,
    BatchRequestError,
    BatchRevisionError,
    BatchTooLarge,
    CircuitOpen,
    ConfigError,
    CredentialError,
    DataFileError,
    DeadlineExceeded,
    DecisionPathError,
    DestinationUnresolved,
    InvalidDecision,
    Meaning,
    OpaResponseError,
    OpaTimeout,
    OpaUnavailable,
    OverridesUnavailable,
    PolicyError,
    RateLimitUnavailable,
    RequestError,
    StartupError,
    TooManyOverrides,
    UndefinedDecision,
    UnsafeHeaderMutation,
    error_classes,
    fail_open_codes,
    meanings,
    opa_error_codes,
)
from authz.core.record import DecisionRecord
from authz.core.response import error_response, status_for
from authz.runtime.audit import AuditEntry
from authz.runtime.metrics import Metrics, MetricsSink
from authz.tools.key_health import load_api_keys, read_last_seen
from authz.tools.keys import lint_file
from authz.tools.replay import replay
from tests.helpers.fakes import FakeEngine

# What each class means, written out: (class, code, HTTP status, fail-open eligible,
# counted as an OPA error). The codes are an API (deny bodies, logs, metric labels).
TREE: list[tuple[type[AuthzError], str, int, bool, bool]] = [
    (AuthzError, "internal_error", 500, False, False),
    (ConfigError, "config_error", 500, False, False),
    (StartupError, "config_error", 500, False, False),
    (DataFileError, "invalid_data_file", 500, False, False),
    (RequestError, "invalid_request", 400, False, False),
    (AdminRequestError, "invalid_request", 400, False, False),
    (TooManyOverrides, "too_many_overrides", 409, False, False),
    (BatchRequestError, "invalid_batch", 400, False, False),
    (BatchTooLarge, "batch_too_large", 413, False, False),
    (BatchRevisionError, "batch_revision_changed", 503, False, False),
    (DecisionPathError, "invalid_decision_path", 500, False, False),
    (DeadlineExceeded, "deadline_exceeded", 503, False, False),
    (CredentialError, "credential_unavailable", 503, False, False),
    (RateLimitUnavailable, "rate_limit_unavailable", 503, False, False),
    (AddressNotAllowed, "address_not_allowed", 403, False, False),
    (DestinationUnresolved, "destination_unresolved", 502, False, False),
    (OverridesUnavailable, "overrides_unavailable", 503, False, False),
    (PolicyError, "policy_error", 500, False, False),
    (OpaUnavailable, "opa_unavailable", 503, True, True),
    (CircuitOpen, "opa_circuit_open", 503, True, True),
    (OpaTimeout, "opa_timeout", 503, False, True),
    (OpaResponseError, "opa_error", 500, False, True),
    (UndefinedDecision, "undefined_decision", 403, False, True),
    (InvalidDecision, "invalid_decision", 500, False, True),
    (UnsafeHeaderMutation, "unsafe_header_mutation", 500, False, True),
]
GATEWAY = "authz/gateway/decision"


def authz_classes() -> list[type[AuthzError]]:
    """The tree as authz defines it (classes a test defines are left out)."""
    return [cls for cls in error_classes() if cls.__module__.startswith("authz.")]


def opa_errors_counted(code: str) -> float:
    """``authz_opa_errors_total{code}`` after MetricsSink records one deny with ``code``."""
    metrics = Metrics()
    MetricsSink(metrics).record(
        DecisionRecord(
            decision_id="d-1",
            timestamp=0.0,
            decision_path=GATEWAY,
            allowed=False,
            reason=code,
            http_status=status_for(code),
        )
    )
    value = metrics.registry.get_sample_value("authz_opa_errors_total", {"code": code})
    return value or 0.0


def denied_status(error: AuthzError) -> int:
    response = error_response(error, "d-1")
    assert json.loads(response.denied_response.body)["error"] == error.code
    status: int = response.denied_response.status.code
    return status


@pytest.mark.parametrize(
    ("cls", "code", "status", "fail_open", "opa_error"),
    TREE,
    ids=[row[0].__name__ for row in TREE],
)
def test_each_error_class_declares_its_code_status_and_flags(
    cls: type[AuthzError], code: str, status: int, fail_open: bool, opa_error: bool
) -> None:
    assert (cls.code, cls.http_status, cls.fail_open_eligible, cls.opa_error) == (
        code,
        status,
        fail_open,
        opa_error,
    )


def test_every_error_class_lives_in_the_errors_module_and_in_the_table() -> None:
    # Adding a failure touches one place: a class in authz/core/errors.py (and its row above).
    assert {cls.__module__ for cls in authz_classes()} == {errors.__name__}
    assert set(authz_classes()) == {row[0] for row in TREE}


def test_a_code_is_declared_once_and_is_snake_case() -> None:
    declared = [cls.__dict__["code"] for cls in authz_classes() if "code" in cls.__dict__]
    assert len(declared) == len(set(declared))
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", code) for code in declared)


@pytest.mark.parametrize("cls", authz_classes(), ids=lambda cls: cls.__name__)
def test_derived_tables_agree_with_the_class(cls: type[AuthzError]) -> None:
    assert meanings()[cls.code] == Meaning(cls.http_status, cls.fail_open_eligible, cls.opa_error)
    assert status_for(cls.code) == cls.http_status
    assert denied_status(cls("detail")) == cls.http_status
    assert (cls.code in FAIL_OPEN_CODES) is cls.fail_open_eligible
    assert (cls.code in fail_open_codes()) is cls.fail_open_eligible
    assert (cls.code in opa_error_codes()) is cls.opa_error
    assert opa_errors_counted(cls.code) == (1.0 if cls.opa_error else 0.0)


def test_a_code_no_class_declares_is_500_and_not_an_opa_error() -> None:
    assert status_for("rate_limited") == 500  # a decision's reason, not a failure
    assert "rate_limited" not in meanings()
    assert opa_errors_counted("rate_limited") == 0.0


def test_a_new_error_class_shows_up_in_every_derived_table() -> None:
    class OpaRefusedTls(OpaUnavailable):
        code = "opa_tls_refused"
        http_status = 502

    assert meanings()["opa_tls_refused"] == Meaning(502, True, True)
    assert status_for("opa_tls_refused") == 502
    assert denied_status(OpaRefusedTls("tls handshake refused")) == 502
    assert "opa_tls_refused" in fail_open_codes()
    assert "opa_tls_refused" in opa_error_codes()
    assert opa_errors_counted("opa_tls_refused") == 1.0
    # ... and leaves them when it is gone.
    del OpaRefusedTls
    gc.collect()
    assert "opa_tls_refused" not in meanings()
    assert status_for("opa_tls_refused") == 500


def test_two_meanings_for_one_code_are_refused() -> None:
    class Unprocessable(RequestError):  # keeps invalid_request but says 422
        http_status = 422

    with pytest.raises(TypeError, match=r"'invalid_request'.*Unprocessable"):
        meanings()
    del Unprocessable
    gc.collect()
    assert meanings()["invalid_request"].http_status == 400


@pytest.mark.parametrize(
    ("cls", "kind"),
    [
        (ConfigError, "a setting"),
        (AdminRequestError, "an admin API body"),
        (DataFileError, "a tool's data file"),
    ],
    ids=["settings", "admin-body", "data-file"],
)
def test_each_kind_of_bad_input_has_its_own_class(cls: type[AuthzError], kind: str) -> None:
    others = {ConfigError, AdminRequestError, DataFileError} - {cls}
    assert not any(issubclass(cls, other) for other in others), kind


# --- data files --------------------------------------------------------------------------


DOCUMENT: dict[str, Any] = {"attributes": {"request": {"http": {"method": "GET"}}}}


def entry(seq: int = 7, **body: Any) -> AuditEntry:
    """A recorded decision as the audit trail stores it; ``body`` overrides fields."""
    fields: dict[str, Any] = {
        "decision_path": GATEWAY,
        "input": DOCUMENT,
        "policy": {"allowed": True, "reason": "allowed"},
    }
    fields.update(body)
    return AuditEntry(seq, "decision", 0.0, f"d-{seq}", fields, "", "")


def replay_one(recorded: AuditEntry) -> Callable[[Path], Any]:
    def run(_: Path) -> Any:
        engine = FakeEngine({"allowed": True, "reason": "allowed"})
        return asyncio.run(replay([recorded], engine))

    return run


def write(name: str, content: bytes) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        path = tmp_path / name
        path.write_bytes(content)
        return path

    return make


# (id, how to make the input, the reader, what the message names besides the place)
CASES: list[tuple[str, Callable[[Path], Any], Callable[[Any], Any], str]] = [
    ("key-data-missing", lambda p: p / "nope.json", load_api_keys, "no such file"),
    ("key-data-not-json", write("data.json", b"{not json"), load_api_keys, "invalid JSON"),
    ("key-data-no-keys", write("data.json", b"{}"), load_api_keys, "data.gateway.api_keys"),
    ("key-data-bundle-not-gzip", write("b.tar.gz", b"nope"), load_api_keys, "not a readable"),
    ("audit-db-missing", lambda p: p / "audit.db", read_last_seen, "no audit database"),
    ("audit-db-not-sqlite", write("audit.db", b"x" * 200), read_last_seen, "audit trail"),
    ("lint-not-json", write("data.json", b"{not json"), lint_file, "cannot read JSON"),
    ("lint-missing", lambda p: p / "nope.json", lint_file, "cannot read JSON"),
]


@pytest.mark.parametrize(
    ("make", "read", "message"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_an_unusable_data_file_is_a_data_file_error_naming_it(
    tmp_path: Path, make: Callable[[Path], Any], read: Callable[[Any], Any], message: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(DataFileError) as caught:
        read(path)
    assert not isinstance(caught.value, ConfigError)
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"decision_path": None}, "decision_path"),
        ({"decision_path": 3}, "decision_path"),
        ({"policy": "allow"}, "policy"),
        ({"policy": {"reason": "allowed"}}, "policy"),
        ({"policy": {"allowed": True, "reason": 5}}, "policy"),
    ],
    ids=[
        "no-decision-path",
        "decision-path-number",
        "policy-string",
        "policy-no-allowed",
        "policy-reason-number",
    ],
)
def test_a_malformed_recorded_decision_is_a_data_file_error_naming_the_entry(
    body: Mapping[str, Any], message: str
) -> None:
    with pytest.raises(DataFileError) as caught:
        replay_one(entry(seq=41, **body))(Path())
    assert "audit entry 41" in str(caught.value)
    assert message in str(caught.value)


def test_a_well_formed_recorded_decision_replays() -> None:
    report = replay_one(entry())(Path())
    assert (report.evaluated, report.unchanged, report.changed) == (1, 1, [])
