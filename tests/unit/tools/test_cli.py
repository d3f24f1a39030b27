"""The command line: key helpers, lint-data, and serve's configuration errors."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import authz.runtime.server
from authz.runtime.config import Settings
from authz.tools.cli import main
from authz.tools.keys import KEY_PREFIX, digest

DIGEST = hashlib.sha256(b"ak_example").hexdigest()
PLAINTEXT_KEY = "ak_plaintextDoNotPrintMe0123456789"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- key hash --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stdin", "key"),
    [
        ("ak_example\n", "ak_example"),
        ("ak_example", "ak_example"),
        ("  ak_example \r\n", "ak_example"),
        ("ak_first\nak_second\n", "ak_first"),
    ],
    ids=["line", "no-newline", "surrounding-space", "first-line-only"],
)
def test_key_hash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stdin: str, key: str
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(["key", "hash"]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == (sha256(key) + "\n", "")


@pytest.mark.parametrize("stdin", ["", "\n", "   \n"], ids=["empty", "newline", "blank"])
def test_key_hash_empty_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stdin: str
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(["key", "hash"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "no key on stdin" in err


# --- key new ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "entry"),
    [
        (
            ["--id", "key-a", "--role", "user"],
            {"id": "key-a", "enabled": True, "role": "user", "rate_limit_tier": "default"},
        ),
        (
            [
                "--id",
                "key-b",
                "--role",
                "admin",
                "--tier",
                "premium",
                "--expires-at",
                "2027-01-01T00:00:00Z",
            ],
            {
                "id": "key-b",
                "enabled": True,
                "role": "admin",
                "rate_limit_tier": "premium",
                "expires_at": "2027-01-01T00:00:00Z",
            },
        ),
    ],
    ids=["defaults", "tier-and-expiry"],
)
def test_key_new(
    capsys: pytest.CaptureFixture[str], args: list[str], entry: dict[str, Any]
) -> None:
    assert main(["key", "new", *args]) == 0
    out, err = capsys.readouterr()
    [key] = [word for word in err.split() if word.startswith(KEY_PREFIX)]
    assert json.loads(out) == {sha256(key): entry}
    assert key not in out  # the data entry holds the digest only


def test_key_new_keys_differ(capsys: pytest.CaptureFixture[str]) -> None:
    digests = set()
    for _ in range(2):
        assert main(["key", "new", "--id", "k", "--role", "user"]) == 0
        digests |= set(json.loads(capsys.readouterr().out))
    assert len(digests) == 2


@pytest.mark.parametrize(
    "args",
    [["key"], ["key", "new", "--role", "user"], ["key", "new", "--id", "k"], ["lint-data"]],
    ids=["key-without-command", "new-without-id", "new-without-role", "lint-without-files"],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


# --- lint-data -------------------------------------------------------------------------


CLEAN = {"api_keys": {DIGEST: {"id": "key-a", "enabled": True, "role": "user"}}}


@pytest.mark.parametrize(
    ("contents", "code", "message"),
    [
        ([json.dumps(CLEAN)], 0, None),
        ([json.dumps(CLEAN), json.dumps({"roles": {"user": ["GET"]}})], 0, None),
        ([json.dumps({"api_keys": {PLAINTEXT_KEY: {"id": "key-a"}}})], 1, "not a SHA-256"),
        ([json.dumps({"upstream": {"token": PLAINTEXT_KEY}})], 1, "credential field"),
        ([json.dumps({"notes": [PLAINTEXT_KEY]})], 1, "plaintext credential"),
        ([json.dumps(CLEAN), json.dumps({"notes": [PLAINTEXT_KEY]})], 1, "plaintext credential"),
        (["{not json"], 1, "cannot read JSON"),
        ([b"\xff\xfe".decode("latin-1")], 1, "cannot read JSON"),
    ],
    ids=[
        "clean",
        "two-clean",
        "plaintext-api-key",
        "plaintext-token-field",
        "credential-prefix",
        "one-of-two-bad",
        "invalid-json",
        "not-utf8",
    ],
)
def test_lint_data(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    contents: list[str],
    code: int,
    message: str | None,
) -> None:
    files = []
    for index, text in enumerate(contents):
        path = tmp_path / f"data{index}.json"
        path.write_bytes(text.encode("latin-1"))
        files.append(str(path))
    assert main(["lint-data", *files]) == code
    out, err = capsys.readouterr()
    assert PLAINTEXT_KEY not in out + err
    if message is None:
        assert err == ""
    else:
        assert message in err
        assert any(name in err for name in files)  # the problem names the file


def test_lint_data_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.json"
    assert main(["lint-data", str(missing)]) == 1
    assert f"{missing}: cannot read JSON" in capsys.readouterr().err


# --- serve -----------------------------------------------------------------------------


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Settings]]:
    """A clean AUTHZ_* environment, a restored root logger, and a fake server.serve that
    records the settings it was given instead of serving."""
    for name in list(os.environ):
        if name.startswith("AUTHZ_") and not name.endswith("_BIN"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AUTHZ_UVLOOP", "false")
    calls: list[Settings] = []

    async def fake_serve(settings: Settings, reload: object = None) -> None:
        calls.append(settings)

    monkeypatch.setattr(authz.runtime.server, "serve", fake_serve)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield calls
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("AUTHZ_DECISION_TIMEOUT_MS", "abc"),
        ("AUTHZ_DECISION_TIMEOUT_MS", "0"),
        ("AUTHZ_OPA_URL", "ftp://opa"),
        ("AUTHZ_LOG_LEVEL", "loud"),
        ("AUTHZ_GRPC_ADDR", "nowhere"),
    ],
    ids=["timeout-not-int", "timeout-out-of-range", "opa-url-scheme", "log-level", "grpc-addr"],
)
def test_serve_bad_env_exits_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    served: list[Settings],
    key: str,
    value: str,
) -> None:
    monkeypatch.setenv(key, value)
    assert main(["serve"]) == 2
    assert served == []
    [line] = [json.loads(text) for text in capsys.readouterr().err.splitlines()]
    assert (line["level"], line["code"]) == ("error", "config_error")
    assert f"{key}={value!r}" in line["msg"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("unknown_key: 1\n", "unknown key 'unknown_key'"),
        ("decision_timeout_ms: abc\n", "decision_timeout_ms"),
        ("- a list\n", "mapping"),
        (None, "config file"),
    ],
    ids=["unknown-key", "bad-value", "not-a-mapping", "missing-file"],
)
def test_serve_bad_config_file_exits_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    served: list[Settings],
    text: str | None,
    message: str,
) -> None:
    path = tmp_path / "authz.yaml"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    assert main(["serve", "--config", str(path)]) == 2
    assert served == []
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("uvloop", ["false", "true"], ids=["asyncio", "uvloop"])
def test_serve_passes_settings(
    monkeypatch: pytest.MonkeyPatch, served: list[Settings], uvloop: str
) -> None:
    monkeypatch.setenv("AUTHZ_UVLOOP", uvloop)
    monkeypatch.setenv("AUTHZ_DECISION_TIMEOUT_MS", "250")
    assert main(["serve"]) == 0
    [settings] = served
    assert (settings.decision_timeout_ms, settings.uvloop) == (250, uvloop == "true")


@pytest.mark.parametrize(
    ("argv", "sys_argv", "env"),
    [
        ([], ["authz"], {"AUTHZ_DECISION_TIMEOUT_MS": "250"}),
        ([], ["pytest", "--not-an-authz-flag"], {"AUTHZ_DECISION_TIMEOUT_MS": "250"}),
        (["--config", "{config}"], ["authz"], {}),
    ],
    ids=["no-args", "empty-argv-ignores-sys-argv", "config-without-command"],
)
def test_serve_is_default_command(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    served: list[Settings],
    argv: list[str],
    sys_argv: list[str],
    env: dict[str, str],
) -> None:
    config = tmp_path / "authz.yaml"
    config.write_text("decision_timeout_ms: 250\n", encoding="utf-8")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", sys_argv)
    assert main([arg.format(config=config) for arg in argv]) == 0
    [settings] = served
    assert settings.decision_timeout_ms == 250


def test_digest_matches_cli_hash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `key hash` and the input document's credential digest must agree
    monkeypatch.setattr(sys, "stdin", io.StringIO("ak_example\n"))
    assert main(["key", "hash"]) == 0
    assert capsys.readouterr().out.strip() == digest("ak_example") == DIGEST
