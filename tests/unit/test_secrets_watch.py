"""The secrets watcher survives any failure and fails closed until a good file is back.

Finding 9 of issue #13: a non-UTF-8 secrets file killed the watcher task for good while
``/readyz`` stayed green and the old secret kept being injected.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from authz.core.authorizer import Authorizer
from authz.core.errors import ConfigError, CredentialError
from authz.runtime import secrets as secrets_module
from authz.runtime.readiness import secrets_check
from authz.runtime.secrets import SecretStore, write_secrets_file
from tests.unit.fakes import FakeEngine, check_request

OLD = "old-cred-value-0123456789"
NEW = "new-cred-value-9876543210"


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` so that the file's signature changes even within one mtime tick."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_bytes(data)
    path.chmod(0o600)
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, max(info.st_mtime_ns, before) + 1_000_000))


def _good(secret: str) -> bytes:
    return json.dumps({"version": 1, "credentials": {"openai": secret}}).encode()


def _raise(exc: BaseException) -> Callable[..., Any]:
    def boom(*_: Any, **__: Any) -> Any:
        raise exc

    return boom


# Each way the re-read can fail: (how the file is broken, a patch applied while it is).
BREAKAGES: list[tuple[bytes, Callable[[pytest.MonkeyPatch], None]]] = [
    (b'{"version": 1, "credentials": {"openai": "\xff\xfe"}}', lambda _: None),
    (b"\xff" * 64, lambda _: None),
    (b"\x00\x00\x00", lambda _: None),
    (b"[" * 100_000 + b"]" * 100_000, lambda _: None),
    (
        _good(NEW),
        lambda mp: mp.setattr(secrets_module, "_parse", _raise(RuntimeError("a bug"))),
    ),
    (
        _good(NEW),
        lambda mp: mp.setattr(secrets_module, "_parse", _raise(MemoryError())),
    ),
]
BREAKAGE_IDS = ["invalid-utf8-value", "binary", "nul-bytes", "deep-nesting", "bug", "memory"]


@pytest.mark.parametrize(("content", "patch"), BREAKAGES, ids=BREAKAGE_IDS)
def test_refresh_fails_closed_on_any_error_and_never_raises(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    content: bytes,
    patch: Callable[[pytest.MonkeyPatch], None],
) -> None:
    path = tmp_path / "s.json"
    _write(path, _good(OLD))
    store = SecretStore.open(path)
    reported: list[bool] = []
    store.on_reload = reported.append
    _write(path, content)
    patch(monkeypatch)
    assert store.refresh() is True
    assert not store.loaded
    with pytest.raises(CredentialError):
        store.get("openai")
    assert reported == [False]
    assert store.reload_failures == 1
    monkeypatch.undo()
    _write(path, _good(NEW))
    assert store.refresh() is True
    assert store.get("openai").reveal() == NEW
    assert reported == [False, True]


async def _until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(("content", "patch"), BREAKAGES, ids=BREAKAGE_IDS)
async def test_watcher_survives_a_bad_file_with_readiness_red_and_injection_denied(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    content: bytes,
    patch: Callable[[pytest.MonkeyPatch], None],
) -> None:
    path = tmp_path / "s.json"
    _write(path, _good(OLD))
    store = SecretStore.open(path)
    ready = secrets_check(store)
    egress = {
        "allowed": True,
        "reason": "allowed",
        "credential": {"ref": "openai", "header": "authorization", "format": "Bearer {secret}"},
    }
    authorizer = Authorizer(
        FakeEngine(egress),
        default_decision_path="authz/egress/decision",
        credential_headers=("authorization",),
        timeout_s=1.0,
        credentials=store,
    )
    watcher = asyncio.create_task(store.watch(0.01))
    try:
        assert (await ready())[0] is True
        _write(path, content)
        patch(monkeypatch)
        await _until(lambda: not store.loaded)
        await asyncio.sleep(0.05)  # several more watcher passes over the bad file
        assert not watcher.done()
        ok, detail = await ready()
        assert (ok, detail) == (False, "secrets file missing or malformed")
        denied = (await authorizer.check(check_request())).response
        assert denied.denied_response.status.code == 503
        assert json.loads(denied.denied_response.body)["error"] == "credential_unavailable"
        assert OLD not in str(denied)

        monkeypatch.undo()
        _write(path, _good(NEW))
        await _until(lambda: store.loaded)
        assert (await ready())[0] is True
        allowed = (await authorizer.check(check_request())).response
        injected = [
            h.header.value for h in allowed.ok_response.headers if h.header.key == "authorization"
        ]
        assert injected == [f"Bearer {NEW}"]
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    assert watcher.cancelled()


async def test_watcher_fails_closed_when_refresh_itself_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.json"
    _write(path, _good(OLD))
    store = SecretStore.open(path)
    monkeypatch.setattr(SecretStore, "refresh", _raise(RuntimeError("a bug in refresh")))
    watcher = asyncio.create_task(store.watch(0.01))
    try:
        await _until(lambda: not store.loaded)
        await asyncio.sleep(0.05)
        assert not watcher.done()
        with pytest.raises(CredentialError):
            store.get("openai")
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"version": 1, "credentials": {"openai": "\xff' + OLD.encode() + b'"}}', "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
    ids=["invalid-utf8", "deep-nesting"],
)
def test_unreadable_file_at_startup_is_a_config_error_naming_the_file(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "s.json"
    _write(path, content)
    with pytest.raises(ConfigError, match=message) as failed:
        SecretStore.open(path)
    assert str(path) in str(failed.value)
    assert OLD not in str(failed.value)


def test_write_secrets_file_is_fsynced_renamed_and_the_directory_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.json"
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_secrets_file(path, {"openai": OLD})
    assert synced == ["file", "dir"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["s.json"]
    assert SecretStore.open(path).get("openai").reveal() == OLD


def _rewrite_in_place_keeping_signature(path: Path, data: bytes) -> None:
    """Overwrite ``path`` in place (same inode) with ``data`` of the same size and put its
    mtime back: a change the (mtime, size, inode) signature cannot see, as two writes
    within one kernel timestamp tick give."""
    info = path.stat()
    assert len(data) == info.st_size
    with path.open("r+b") as handle:
        handle.write(data)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    after = path.stat()
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (
        info.st_mtime_ns,
        info.st_size,
        info.st_ino,
    )


@pytest.mark.parametrize(
    ("replacement", "loaded"),
    [(_good(NEW), True), (_good(OLD).replace(b'"version"', b'"versi\xffn"'), False)],
    ids=["rotated", "broken"],
)
def test_a_change_the_file_signature_misses_is_still_seen(
    tmp_path: Path, replacement: bytes, loaded: bool
) -> None:
    path = tmp_path / "s.json"
    _write(path, _good(OLD))
    store = SecretStore.open(path)
    _rewrite_in_place_keeping_signature(path, replacement)
    assert store.refresh() is True
    assert store.loaded is loaded
    if loaded:
        assert store.get("openai").reveal() == NEW
    else:
        with pytest.raises(CredentialError):
            store.get("openai")


def test_a_secrets_file_over_the_size_cap_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    _write(path, _good(OLD))
    store = SecretStore.open(path)
    padding = b" " * (secrets_module.MAX_FILE_BYTES + 1)
    _write(path, _good(NEW) + padding)
    assert store.refresh() is True
    assert not store.loaded
    with pytest.raises(ConfigError, match="larger than"):
        SecretStore.open(path)
