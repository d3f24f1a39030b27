"""The overrides file: written atomically and durably (temporary file in the same
directory, fsync, rename, fsync of the directory; mode 0600), and a corrupt file at
startup is one clear config error naming the file, never a traceback.

Finding 9 of issue #13: the file was neither written atomically nor fsynced, so a torn
write stopped authz from starting.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from authz.core.errors import ConfigError
from authz.runtime.overrides import Override, OverrideStore, parse_override_request
from authz.stack.supervisor import free_port

T0 = 1_700_000_000.0


async def _push(document: dict[str, Any]) -> None:
    return None


def _override(override_id: str, effect: str = "deny") -> Override:
    body = {
        "effect": effect,
        "decision_path": "authz/gateway/decision",
        "match": {"key_id": "key-a", "path": "/api/v1/**"},
        "ttl_seconds": 3600,
        "reason": "INC-1",
    }
    return parse_override_request(body, actor="alice", now=T0, new_id=lambda: override_id)


def _entry(**changes: Any) -> dict[str, Any]:
    """A persisted entry (as the store writes it) with ``changes`` applied."""
    return {**asdict(_override("ovr-1")), **changes}


def _store(path: Path) -> OverrideStore:
    return OverrideStore(_push, path=path, clock=lambda: T0)


async def test_write_is_fsynced_then_renamed_then_the_directory_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "overrides.json"
    store = _store(path)
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(info.st_mode) else "file", str(info.st_ino)))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        same_dir = Path(src).parent == Path(dst).parent == tmp_path
        events.append(("replace", str(os.stat(src).st_ino), str(same_dir)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    await store.add(_override("ovr-1"))
    written = str(path.stat().st_ino)
    assert events == [
        ("fsync", "file", written),
        ("replace", written, "True"),
        ("fsync", "dir", str(os.stat(tmp_path).st_ino)),
    ]
    assert [o.id for o in _store(path).active()] == ["ovr-1"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
async def test_a_failed_write_leaves_the_previous_file_intact_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "overrides.json"
    store = _store(path)
    await store.add(_override("ovr-1"))
    before = path.read_bytes()

    def fail(*_: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, failing, fail)
    await store.add(_override("ovr-2"))  # kept in memory and pushed; persisting failed
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["overrides.json"]
    assert [o.id for o in _store(path).active()] == ["ovr-1"]


async def test_file_is_0600_even_over_a_stale_world_readable_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "overrides.json"
    for stale in (f".{path.name}.{os.getpid()}.tmp", f".{path.name}.tmp"):
        (tmp_path / stale).write_text("stale")
        (tmp_path / stale).chmod(0o644)
    store = _store(path)
    await store.add(_override("ovr-1"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


CORRUPT = [
    pytest.param(b"", id="empty"),
    pytest.param(json.dumps({"overrides": [_entry()]}).encode()[:60], id="torn"),
    pytest.param(b'{"overrides": [\xff]}', id="not-utf8"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deeply-nested"),
    pytest.param(b'{"overrides": "abc"}', id="overrides-not-a-list"),
    pytest.param(json.dumps({"overrides": [_entry(match="key_id")]}).encode(), id="match-str"),
    pytest.param(json.dumps({"overrides": [_entry(match={})]}).encode(), id="match-empty"),
    pytest.param(
        json.dumps({"overrides": [_entry(expires_at="tomorrow")]}).encode(), id="expiry-str"
    ),
    pytest.param(json.dumps({"overrides": [_entry(created_at=None)]}).encode(), id="created-null"),
    pytest.param(json.dumps({"overrides": [_entry(effect="maybe")]}).encode(), id="effect"),
    pytest.param(json.dumps({"overrides": [_entry(id=["x"])]}).encode(), id="id-not-str"),
    pytest.param(
        json.dumps({"overrides": [_entry(decision_path="/x.y")]}).encode(), id="decision-path"
    ),
    pytest.param(json.dumps({"overrides": [_entry(reason=5)]}).encode(), id="reason-number"),
    pytest.param(json.dumps({"overrides": [_entry(extra=[])]}).encode(), id="extra-list"),
    pytest.param(json.dumps({"overrides": [_entry(expires_at=1e20)]}).encode(), id="year-3e12"),
    pytest.param(json.dumps({"overrides": [_entry(match={"key_id": 5})]}).encode(), id="key-int"),
    pytest.param(json.dumps({"overrides": [_entry(unknown=1)]}).encode(), id="unknown-field"),
]


@pytest.mark.parametrize("content", CORRUPT)
def test_corrupt_file_at_startup_is_one_line_config_error_naming_the_file(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "overrides.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        _store(path)
    message = str(caught.value)
    assert message.startswith(f"overrides file {str(path)!r}: ")
    assert "\n" not in message
    assert len(message) < 400


def test_serve_with_a_corrupt_overrides_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "overrides.json"
    path.write_bytes(b"[" * 100_000)
    env = {
        **os.environ,
        "AUTHZ_GRPC_ADDR": f"127.0.0.1:{free_port()}",
        "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
        "AUTHZ_OPA_URL": f"http://127.0.0.1:{free_port()}",
        "AUTHZ_AUDIT_DB": str(tmp_path / "audit.db"),
        "AUTHZ_OVERRIDES_FILE": str(path),
    }
    done = subprocess.run(
        [sys.executable, "-m", "authz", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, output
    assert "Traceback" not in output
    lines = [json.loads(line) for line in output.splitlines()]  # JSON log lines only
    errors = [line["msg"] for line in lines if line["level"] == "error"]
    assert len(errors) == 1, output
    assert errors[0].startswith(f"invalid configuration: overrides file {str(path)!r}: ")


async def test_a_good_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "overrides.json"
    store = _store(path)
    await store.add(_override("ovr-1"))
    await store.add(_override("ovr-2", effect="allow"))
    assert _store(path).document() == store.document()
