"""A data file an offline tool reads (bundle data, an audit database, a recorded decision)
that cannot be used is a DataFileError naming the file or the entry (the tool exits 2),
never a ConfigError (settings) and never a bare KeyError or TypeError."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from authz.core.errors import ConfigError, DataFileError
from authz.runtime.audit import AuditEntry
from authz.tools.key_health import load_api_keys, read_last_seen
from authz.tools.keys import lint_file
from authz.tools.replay import replay
from tests.helpers.fakes import FakeEngine

GATEWAY = "authz/gateway/decision"
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
