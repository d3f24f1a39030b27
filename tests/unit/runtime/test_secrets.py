"""authz.runtime.secrets: the egress secrets file (read, reload, write), the credential
references it resolves, and its watcher, which survives any failure and fails closed
until a good file is back."""

from __future__ import annotations

import asyncio
import json
import logging
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
from authz.runtime.secrets import (
    SecretStore,
    collect_credentials,
    env_name,
    write_secrets_file,
)
from tests.helpers.fakes import FakeEngine, check_request

# -- the secrets file ----------------------------------------------------------------

CRED = "cred-value-1234567890"


def write(path: Path, document: Any) -> None:
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    path.chmod(0o600)


def bump(path: Path, document: Any) -> None:
    """Rewrite ``path`` so that its signature changes even within one mtime tick."""
    write(path, document)
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))


def good(**credentials: str) -> dict[str, Any]:
    return {"version": 1, "credentials": credentials}


def opened(tmp_path: Path, document: Any) -> tuple[Path, SecretStore]:
    """A secrets file ``s.json`` in ``tmp_path`` holding ``document`` (:func:`write`), and
    the store opened on it."""
    path = tmp_path / "s.json"
    write(path, document)
    return path, SecretStore.open(path)


def test_open_and_get(tmp_path: Path) -> None:
    _, store = opened(tmp_path, good(openai=CRED))
    assert store.get("openai").reveal() == CRED
    assert store.loaded
    assert store.references == {"openai"}
    with pytest.raises(CredentialError, match="'github' is absent"):
        store.get("github")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "expected a JSON object"),
        ({"credentials": {}}, "version=None"),
        ({"version": 2, "credentials": {}}, "version=2"),
        ({"version": 1}, "'credentials' must be an object"),
        ({"version": 1, "credentials": {"../x": CRED}}, "not a valid reference"),
    ],
    ids=["syntax", "array", "no-version", "version-2", "no-credentials", "bad-ref"],
)
def test_open_malformed_is_a_startup_error(tmp_path: Path, document: Any, message: str) -> None:
    path = tmp_path / "s.json"
    if isinstance(document, str):
        path.write_text(document)
    else:
        write(path, document)
    with pytest.raises(ConfigError, match=message) as failed:
        SecretStore.open(path)
    assert str(path) in str(failed.value)


def test_open_missing_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        SecretStore.open(tmp_path / "absent.json")


def test_syntax_error_message_never_quotes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text('{"version": 1, "credentials": {"openai": "' + CRED + '" "x"}}')
    with pytest.raises(ConfigError) as failed:
        SecretStore.open(path)
    assert CRED not in str(failed.value)


@pytest.mark.parametrize(
    "value", [5, "", None, ["a"], "a\nb"], ids=["number", "empty", "null", "list", "newline"]
)
def test_malformed_entry_only_breaks_its_reference(tmp_path: Path, value: Any) -> None:
    _, store = opened(tmp_path, {"version": 1, "credentials": {"openai": CRED, "slack": value}})
    assert store.get("openai").reveal() == CRED
    with pytest.raises(CredentialError, match="'slack' is malformed"):
        store.get("slack")


@pytest.mark.parametrize(
    ("mode", "warns"),
    [(0o600, False), (0o440, False), (0o640, False), (0o644, True), (0o660, True)],
    ids=["owner-only", "k8s-fsgroup", "group-read", "world-read", "group-write"],
)
def test_permissive_file_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, warns: bool
) -> None:
    path = tmp_path / "s.json"
    write(path, good(openai=CRED))
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="authz.runtime.secrets"):
        SecretStore.open(path)
    assert ("chmod 600" in caplog.text) is warns
    assert CRED not in caplog.text


def test_reload_on_change(tmp_path: Path) -> None:
    path, store = opened(tmp_path, good(openai=CRED))
    assert store.refresh() is False
    bump(path, good(openai="rotated-value", github="gh-value"))
    assert store.refresh() is True
    assert store.get("openai").reveal() == "rotated-value"
    assert store.get("github").reveal() == "gh-value"
    assert store.reloads == 1


def test_runtime_failure_denies_everything_until_fixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, store = opened(tmp_path, good(openai=CRED))
    bump(path, "{broken")
    with caplog.at_level(logging.ERROR, logger="authz.runtime.secrets"):
        assert store.refresh() is True
    assert not store.loaded
    with pytest.raises(CredentialError, match="missing or malformed"):
        store.get("openai")
    assert store.reload_failures == 1
    # The same broken file is not re-read (and re-logged) every interval.
    assert store.refresh() is False
    bump(path, good(openai="fixed"))
    assert store.refresh() is True
    assert store.get("openai").reveal() == "fixed"
    assert CRED not in caplog.text


def test_file_removed_at_runtime(tmp_path: Path) -> None:
    path, store = opened(tmp_path, good(openai=CRED))
    path.unlink()
    assert store.refresh() is True
    with pytest.raises(CredentialError):
        store.get("openai")
    assert store.refresh() is False
    write(path, good(openai="back"))
    assert store.refresh() is True
    assert store.get("openai").reveal() == "back"


def test_write_secrets_file_mode_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "s.json"
    write_secrets_file(path, {"openai": CRED, "github": "gh"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store = SecretStore.open(path)
    assert store.get("openai").reveal() == CRED
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]


@pytest.mark.parametrize(
    ("credentials", "message"),
    [({"../x": "v"}, "not a valid secret reference"), ({"openai": ""}, "'openai' is empty")],
    ids=["bad-ref", "empty"],
)
def test_write_secrets_file_rejects(
    tmp_path: Path, credentials: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        write_secrets_file(tmp_path / "s.json", credentials)
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize(
    ("ref", "name"),
    [("openai", "EGRESS_SECRET_OPENAI"), ("my-api.v2", "EGRESS_SECRET_MY_API_V2")],
    ids=["plain", "punctuation"],
)
def test_env_name(ref: str, name: str) -> None:
    assert env_name(ref) == name


def test_collect_credentials() -> None:
    environ = {"EGRESS_SECRET_OPENAI": " v1 ", "EGRESS_SECRET_SLACK": "", "OTHER": "x"}
    found, missing = collect_credentials(["openai", "slack", "github"], environ)
    assert found == {"openai": "v1"}
    assert missing == ["slack", "github"]


# ----------------------------------------------------------------------------------------
# The secrets watcher survives any failure (a non-UTF-8 file, a bug in the parser) and
# fails closed until a good file is back: /readyz red, no old secret injected.


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


def _opened(tmp_path: Path) -> tuple[Path, SecretStore]:
    """A secrets file ``s.json`` in ``tmp_path`` holding :data:`OLD` as ``openai``
    (:func:`_write`), and the store opened on it."""
    path = tmp_path / "s.json"
    _write(path, _good(OLD))
    return path, SecretStore.open(path)


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


@pytest.fixture(params=BREAKAGES, ids=BREAKAGE_IDS)
def break_file(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Path], None]:
    """Each of :data:`BREAKAGES` as a call that breaks the secrets file at its path (the
    test's ``monkeypatch.undo()`` lifts the patch)."""
    content, patch = request.param

    def apply(path: Path) -> None:
        _write(path, content)
        patch(monkeypatch)

    return apply


def test_refresh_fails_closed_on_any_error_and_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, break_file: Callable[[Path], None]
) -> None:
    path, store = _opened(tmp_path)
    reported: list[bool] = []
    store.on_reload = reported.append
    break_file(path)
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


async def test_watcher_survives_a_bad_file_with_readiness_red_and_injection_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, break_file: Callable[[Path], None]
) -> None:
    path, store = _opened(tmp_path)
    ready = secrets_check(store)
    egress = {
        "allowed": True,
        "authz": {
            "reason": "allowed",
            "credential": {"ref": "openai", "header": "authorization", "format": "Bearer {secret}"},
        },
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
        break_file(path)
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
    _, store = _opened(tmp_path)
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
    path, store = _opened(tmp_path)
    _rewrite_in_place_keeping_signature(path, replacement)
    assert store.refresh() is True
    assert store.loaded is loaded
    if loaded:
        assert store.get("openai").reveal() == NEW
    else:
        with pytest.raises(CredentialError):
            store.get("openai")


def test_a_secrets_file_over_the_size_cap_fails_closed(tmp_path: Path) -> None:
    path, store = _opened(tmp_path)
    padding = b" " * (secrets_module.MAX_FILE_BYTES + 1)
    _write(path, _good(NEW) + padding)
    assert store.refresh() is True
    assert not store.loaded
    with pytest.raises(ConfigError, match="larger than"):
        SecretStore.open(path)
