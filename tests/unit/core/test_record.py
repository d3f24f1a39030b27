"""DecisionRecord: the log line (never input, headers or query), and the
three answers it keeps apart (policy, decision, result)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import struct
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest

from authz.core import record as record_module
from authz.core.record import FIELD_NAMES, DecisionRecord, record_from_fields

QUERY_SECRET = "sk-query-secret-0123"
HEADER_SECRET = "COOKIESECRET0123456789"
DIGEST = "a" * 64


def document() -> dict[str, Any]:
    """An input document as authz.core.input builds it (credential headers already
    digests), with a secret in the query string and in a cookie."""
    http: dict[str, Any] = {
        "id": "envoy-id-1",
        "method": "POST",
        "path": f"/api/v1/items?api_key={QUERY_SECRET}&page=2",
        "host": "api.example",
        "headers": {
            "authorization": f"sha256:{DIGEST}",
            "cookie": f"session={HEADER_SECRET}",
            "x-request-id": "req-123",
        },
    }
    return {
        "attributes": {"request": {"http": http}},
        "parsed_query": {"api_key": [QUERY_SECRET], "page": ["2"]},
        "credentials": {"authorization": DIGEST},
    }


def record(**overrides: Any) -> DecisionRecord:
    doc = overrides.pop("document", document())
    fields: dict[str, Any] = {
        "decision_id": "d-1",
        "timestamp": 0.0,
        "decision_path": "authz/gateway/decision",
        "allowed": True,
        "reason": "allowed",
        "http_status": 200,
        "decision_allowed": True,
        "policy_allowed": True,
        "policy_reason": "allowed",
        "revision": "r7",
        "identity": {"key_id": "key-admin", "role": "admin"},
        # As the authorizer fills them from the CheckRequest: no query string.
        "request_id": "req-123",
        "method": "POST",
        "path": "/api/v1/items",
        "duration_s": 0.0123456,
        "opa_duration_s": 0.0025,
        "document": doc,
    }
    fields.update(overrides)
    return DecisionRecord(**fields)


def test_log_fields_values() -> None:
    assert record().log_fields() == {
        "type": "decision",
        "decision_id": "d-1",
        "time": "1970-01-01T00:00:00.000+00:00",
        "decision_path": "authz/gateway/decision",
        "revision": "r7",
        "mode": "enforce",
        "result": "allow",
        "decision": "allow",
        "policy_result": "allow",
        "reason": "allowed",
        "http_status": 200,
        "request_id": "req-123",
        "method": "POST",
        "path": "/api/v1/items",
        "duration_ms": 12.346,
        "opa_ms": 2.5,
        "key_id": "key-admin",
        "role": "admin",
    }


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"fail_open": True}, {"fail_open": True}),
        ({"tier": "premium"}, {"tier": "premium"}),
        ({"override_id": "ovr-1"}, {"override_id": "ovr-1"}),
        ({"source": "namespace_default"}, {"source": "namespace_default"}),
        ({"error": "OPA gave no answer"}, {"error": "OPA gave no answer"}),
        ({"policy_allowed": None}, {}),
    ],
    ids=["fail-open", "tier", "override", "source", "error", "no-policy"],
)
def test_optional_fields(overrides: dict[str, Any], expected: dict[str, Any]) -> None:
    fields = record(**overrides).log_fields()
    for key, value in expected.items():
        assert fields[key] == value
    if overrides == {"policy_allowed": None}:
        assert "policy_result" not in fields
    base = set(record().log_fields())
    assert set(fields) - base == set(expected)


@pytest.mark.parametrize(
    ("allowed", "decision_allowed", "result", "decision", "suppressed"),
    [
        (True, True, "allow", "allow", False),
        (False, False, "deny", "deny", False),
        (True, False, "allow", "deny", True),
        (True, None, "allow", "allow", False),
    ],
    ids=["allow", "deny", "dry-run-suppressed", "decision-unknown"],
)
def test_result_versus_decision(
    allowed: bool, decision_allowed: bool | None, result: str, decision: str, suppressed: bool
) -> None:
    item = record(allowed=allowed, decision_allowed=decision_allowed, mode="dry-run")
    fields = item.log_fields()
    assert (fields["result"], fields["decision"], fields["mode"]) == (result, decision, "dry-run")
    assert item.suppressed is suppressed


def test_log_fields_hold_no_input_headers_or_query() -> None:
    item = record(allowed=False, reason="role_not_allowed", http_status=403)
    assert item.document is not None  # the record keeps it; the log line must not
    line = json.dumps(item.log_fields())
    for leaked in (QUERY_SECRET, HEADER_SECRET, DIGEST, "api_key", "cookie", "page=2"):
        assert leaked not in line


CORE = ("type", "decision_id", "result", "decision", "reason", "http_status", "mode", "error")


def test_identity_cannot_overwrite_core_fields_or_error() -> None:
    forged = {field: "forged" for field in CORE} | {"key_id": "key-1"}
    fields = record(
        allowed=False,
        decision_allowed=False,
        reason="missing_api_key",
        http_status=401,
        identity=forged,
    ).log_fields()
    assert fields["key_id"] == "key-1"
    assert "forged" not in fields.values()
    assert "error" not in fields


@pytest.mark.parametrize(
    ("overrides", "hidden"),
    [
        ({"opa_result": {"allowed": True, "headers": {"x-token": QUERY_SECRET}}}, QUERY_SECRET),
        ({"peer": "ipv4:10.9.8.7:5000"}, "10.9.8.7"),
        ({"revisions": {"bundle-name-zz": "r7"}}, "bundle-name-zz"),
    ],
    ids=["opa-result", "peer", "revisions"],
)
def test_log_fields_leave_out_what_only_the_opa_schema_carries(
    overrides: dict[str, Any], hidden: str
) -> None:
    # The authz line is unchanged by the fields added for OPA's schema (the OPA line,
    # authz.runtime.logs.opa_event, masks and caps them).
    item = record(**overrides)
    assert item.log_fields() == record().log_fields()
    assert hidden not in json.dumps(item.log_fields())


def test_opa_schema_fields_default_to_absent() -> None:
    item = DecisionRecord("d-1", 0.0, "authz/gateway/decision", True, "allowed", 200)
    assert (item.opa_result, dict(item.revisions), item.peer) == (None, {}, "")


# --- the log time: what datetime.isoformat writes, without its cost ---------------------


def _iso(timestamp: Any) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


_MAX = 253_402_300_799.0  # 9999-12-31T23:59:59 UTC, the last second datetime holds
_MIN = -62_135_596_800.0  # 0001-01-01T00:00:00 UTC
LOG_TIME_CORPUS: list[float] = [
    0.0,
    -0.0,
    1_700_000_000.5,
    1_700_000_000.0005,  # half a millisecond: floors to .000
    1_700_000_000.9995,  # rounds to .999499999... or .9995 microseconds: either way .999
    1_700_000_000.9999995,  # half a microsecond below the next second: carried over
    1_700_000_000.99999949,
    1_700_000_000.9999996,
    1_699_999_999.9999999,
    -1.5,
    -0.0000001,
    -0.0000005,  # half a microsecond below zero: rounds to even, 0
    -0.0000006,
    -0.9999995,
    -1e-300,
    5e-324,
    0.0000005,
    0.0000015,  # halves round to even microseconds
    0.0000025,
    1.0000005,
    951_782_400.0,  # 2000-02-29
    4_107_542_400.0,  # 2100-02-29 does not exist: 2100-03-01
    2_147_483_647.999,  # the end of 32-bit time_t
    2_147_483_648.0,
    _MAX,
    _MAX + 0.999,
    math.nextafter(_MAX + 1.0, 0.0),  # the last float before year 10000
    _MIN,
    _MIN + 0.0001,
    -86_400.0 * 365 * 100 + 0.123,
    float(2**33) + 0.5,
    math.nextafter(1_700_000_000.0, 0.0),
    math.nextafter(1_700_000_000.0, math.inf),
]


def _random_floats(count: int) -> list[float]:
    rng = random.Random(19)  # noqa: S311 (reproducible test data)
    values = [rng.uniform(_MIN, _MAX) for _ in range(count)]
    values += [rng.uniform(-1e6, 1e6) for _ in range(count)]
    values += [1_700_000_000 + rng.random() for _ in range(count)]
    # Near the millisecond and second boundaries, and any bit pattern in range.
    values += [
        rng.randrange(-(10**9), 10**10) / 1000 + rng.choice((0.0, 5e-7, -5e-7))
        for _ in range(count)
    ]
    while len(values) < 5 * count:
        (value,) = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))
        if _MIN <= value <= _MAX:
            values.append(value)
    return values


@pytest.mark.parametrize(
    "timestamps",
    [LOG_TIME_CORPUS, _random_floats(20_000)],
    ids=["corpus", "random"],
)
def test_log_time_is_datetime_isoformat_in_milliseconds(timestamps: list[float]) -> None:
    # The cached second and the arithmetic on microseconds give isoformat's text for every
    # float: in order, and again in reverse and shuffled (the cached second changes).
    rng = random.Random(7)  # noqa: S311 (reproducible test data)
    shuffled = rng.sample(timestamps, len(timestamps))
    for timestamp in [*timestamps, *reversed(timestamps), *shuffled]:
        assert record_module._log_time(timestamp) == _iso(timestamp), repr(timestamp)


@pytest.mark.parametrize(
    "timestamp",
    [0, 1_700_000_000, -1, True, 253_402_300_799],
    ids=["zero", "int", "negative-int", "bool", "last-int-second"],
)
def test_log_time_of_a_number_not_a_float_is_datetime_isoformat(timestamp: Any) -> None:
    assert record_module._log_time(timestamp) == _iso(timestamp)


@pytest.mark.parametrize(
    "timestamp",
    [
        *(math.nan, math.inf, -math.inf, _MAX + 1.0, _MIN - 1.0, 1e20, -1e20, 2.0**63),
        *("0", Decimal("1.5"), Fraction(3, 2)),
    ],
    ids=[
        *("nan", "inf", "-inf", "year-10000", "year-0", "1e20", "-1e20", "2^63"),
        *("string", "decimal", "fraction"),
    ],
)
def test_log_time_raises_what_datetime_raises(timestamp: Any) -> None:
    try:
        _iso(timestamp)
    except Exception as exc:  # whatever datetime raises, _log_time must raise too
        expected = type(exc)
    else:
        pytest.fail(f"datetime took {timestamp!r}")
    with pytest.raises(expected):
        record_module._log_time(timestamp)


def test_log_fields_time_is_the_log_time() -> None:
    fields = record(timestamp=1_700_000_000.9999995).log_fields()
    assert fields["time"] == "2023-11-14T22:13:21.000+00:00" == _iso(1_700_000_000.9999995)


# --- record_from_fields: the record built slot by slot ---------------------------------


def test_record_from_fields_equals_the_keyword_construction() -> None:
    # Every field set, each to a value unlike its default, so a slot left unset fails.
    values: dict[str, Any] = {
        "decision_id": "d-9",
        "timestamp": 1_700_000_000.25,
        "decision_path": "authz/egress/decision",
        "allowed": True,
        "reason": "would_deny",
        "http_status": 418,
        "decision_allowed": False,
        "mode": "dry-run",
        "fail_open": True,
        "policy_allowed": False,
        "policy_reason": "policy_reason",
        "tier": "gold",
        "override_id": "ovr-1",
        "source": "override",
        "cached_from": "d-8",
        "revision": "rev-1",
        "identity": {"key_id": "k"},
        "request_id": "req-9",
        "method": "PATCH",
        "path": "/x",
        "duration_s": 0.5,
        "opa_duration_s": 0.125,
        "error": "boom",
        "document": {"input": 1},
        "opa_result": {"allowed": False},
        "revisions": {"b": "rev-1"},
        "peer": "ipv4:127.0.0.1:1",
        "ignored_fields": ("extra",),
    }
    init_fields = [f.name for f in dataclasses.fields(DecisionRecord) if f.init]
    assert list(values) == list(FIELD_NAMES) == init_fields
    built = record_from_fields(tuple(values.values()))
    expected = DecisionRecord(**values)
    assert built == expected
    assert built.log_fields() == expected.log_fields()
    # And a distinct object in each slot (bools alone cannot tell four fields apart).
    sentinels = tuple(object() for _ in FIELD_NAMES)
    built = record_from_fields(sentinels)
    assert tuple(getattr(built, name) for name in FIELD_NAMES) == sentinels
    assert built == DecisionRecord(*sentinels)  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.reason = "changed"  # type: ignore[misc]


@pytest.mark.parametrize("count", [0, len(FIELD_NAMES) - 1, len(FIELD_NAMES) + 1])
def test_record_from_fields_refuses_a_value_count_not_one_per_field(count: int) -> None:
    with pytest.raises(ValueError, match="DecisionRecord fields"):
        record_from_fields(tuple(range(count)))


def test_log_fields_are_built_once_and_each_call_gets_its_own_copy() -> None:
    # The decision log and the audit row both ask for the fields: built once, equal to a
    # fresh build every time, and a caller changing its dict changes no other call's.
    rec = record(tier="gold", cached_from="d-0", identity={"key_id": "k", "role": "r"})
    first = rec.log_fields()
    assert first == rec._build_log_fields()
    first["policy"] = {"allowed": True}
    first["reason"] = "changed"
    second = rec.log_fields()
    assert second == rec._build_log_fields()
    assert "policy" not in second
    assert second is not rec.log_fields()
    # Not a value of the decision: records compare and print as before.
    assert rec == record(tier="gold", cached_from="d-0", identity={"key_id": "k", "role": "r"})
    assert "_log_fields" not in repr(rec)
    assert "_log_fields" not in FIELD_NAMES


def test_log_fields_built_before_a_copy_travel_with_it() -> None:
    # dataclasses.replace starts a new cache (its fields may differ); record_from_fields
    # starts with none.
    rec = record()
    rec.log_fields()
    changed = dataclasses.replace(rec, reason="other")
    assert changed.log_fields()["reason"] == "other"
    rebuilt = record_from_fields(tuple(getattr(rec, name) for name in FIELD_NAMES))
    assert rebuilt._log_fields is None
    assert rebuilt.log_fields() == rec.log_fields()
