"""The command line: key helpers, lint-data, and serve's configuration errors."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
import re
import sqlite3
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import authz
import authz.runtime.server
import authz.tools.replay
from authz.core.rfc3339 import DAY_S
from authz.runtime.audit import AuditTrail
from authz.runtime.config import Settings
from authz.tools import cli
from authz.tools.cli import main
from authz.tools.keys import KEY_PREFIX, digest
from authz.tools.replay import ReplayChange, ReplayReport
from tests.helpers.key_health import NOW, decision, entry, iso, write_audit, write_bundle
from tests.helpers.key_health import digest as key_digest
from tests.helpers.records import GATEWAY, gateway_decision

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
        (["[" * 100_000 + "]" * 100_000], 1, "cannot read JSON"),
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
        "nested-too-deeply",
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


# --- secrets generate ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"EGRESS_SECRET_OPENAI=sk-\xff\xfe\n", "cannot read the env file: not UTF-8")],
    ids=["not-utf8"],
)
def test_secrets_generate_unreadable_env_file_is_exit_2_naming_it_never_its_bytes(
    tmp_path: Path,
    repo_root: Path,
    capsys: pytest.CaptureFixture[str],
    content: bytes,
    message: str,
) -> None:
    env_file, out = tmp_path / "my.env", tmp_path / "secrets.json"
    env_file.write_bytes(content)
    services = repo_root / "policy/egress/data.json"
    args = ["secrets", "generate", "--env-file", str(env_file), "--out", str(out)]
    assert main([*args, "--services", str(services)]) == 2
    err = capsys.readouterr().err
    assert f"{env_file}: {message}" in err
    assert "0xff" not in err  # never the file's content
    assert "sk-" not in err
    assert not out.exists()


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


def test_serve_warns_once_about_unknown_variables(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], served: list[Settings]
) -> None:
    """An AUTHZ_* variable that is no setting (and resembles none) is one warning line
    naming it, never its value; the server still starts."""
    monkeypatch.setenv("AUTHZ_METRICS_SERVICE_HOST", "10.0.0.7")
    monkeypatch.setenv("AUTHZ_NIGHTLY_BUNDLE", "secret-looking-value")
    assert main(["serve"]) == 0
    assert len(served) == 1
    err = capsys.readouterr().err
    [line] = [json.loads(text) for text in err.splitlines()]
    assert line["level"] == "warning"
    assert "AUTHZ_METRICS_SERVICE_HOST, AUTHZ_NIGHTLY_BUNDLE" in line["msg"]
    assert "secret-looking-value" not in err


def test_serve_refuses_a_typo_of_a_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], served: list[Settings]
) -> None:
    monkeypatch.setenv("AUTHZ_REDIS_FAILURE", "deny")
    assert main(["serve"]) == 2
    assert served == []
    assert "did you mean AUTHZ_REDIS_FAILURE_MODE?" in capsys.readouterr().err


# --- config check ------------------------------------------------------------------------

CHECK_ADMIN_TOKEN = "adm1n-" + "t" * 40
CHECK_OPA_TOKEN = "opa-" + "q" * 40
CHECK_REDIS_PASSWORD = "hunter2-redis-pw"


@pytest.fixture
def checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, served: list[Settings]) -> Path:
    """A clean environment setting a secret of each kind (one from a file), a plain
    setting, and a settings file; returns the settings file."""
    for name in list(os.environ):  # served keeps AUTHZ_*_BIN: not needed here
        if name.startswith("AUTHZ_"):
            monkeypatch.delenv(name)
    token_file = tmp_path / "admin-token"
    token_file.write_text(CHECK_ADMIN_TOKEN + "\n", encoding="utf-8")
    monkeypatch.setenv("AUTHZ_ADMIN_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("AUTHZ_OPA_TOKEN", CHECK_OPA_TOKEN)
    monkeypatch.setenv("AUTHZ_REDIS_URL", f"redis://:{CHECK_REDIS_PASSWORD}@redis:6379/0")
    monkeypatch.setenv("AUTHZ_DECISION_TIMEOUT_MS", "250")
    settings_file = tmp_path / "authz.yaml"
    settings_file.write_text("log_level: DEBUG\ndecision_timeout_ms: 100\n", encoding="utf-8")
    return settings_file


def _no_secret(text: str) -> None:
    for secret in (CHECK_ADMIN_TOKEN, CHECK_OPA_TOKEN, CHECK_REDIS_PASSWORD):
        assert secret not in text


def test_config_check_prints_effective_settings_with_secrets_masked(
    capsys: pytest.CaptureFixture[str], checked: Path
) -> None:
    assert main(["config", "check", "--config", str(checked)]) == 0
    out, err = capsys.readouterr()
    _no_secret(out + err)
    lines = dict(line.split("=", 1) for line in out.splitlines())
    # Every setting, with where its value came from (the environment wins over the file).
    assert {f"AUTHZ_{name.upper()}" for name in Settings.__dataclass_fields__} == set(lines)
    assert lines["AUTHZ_DECISION_TIMEOUT_MS"] == "250  # environment"
    assert lines["AUTHZ_LOG_LEVEL"] == f"DEBUG  # {checked.name}"
    assert lines["AUTHZ_GRPC_ADDR"] == "127.0.0.1:9191  # default"
    assert lines["AUTHZ_ADMIN_TOKEN"] == "**********  # AUTHZ_ADMIN_TOKEN_FILE"
    assert lines["AUTHZ_OPA_TOKEN"] == "**********  # environment"
    assert lines["AUTHZ_REDIS_URL"] == "**********  # environment"


def test_config_check_json(capsys: pytest.CaptureFixture[str], checked: Path) -> None:
    assert main(["config", "check", "--config", str(checked), "--json"]) == 0
    out, err = capsys.readouterr()
    _no_secret(out + err)
    report = json.loads(out)
    assert report["valid"] is True
    assert report["settings"]["decision_timeout_ms"] == {"value": 250, "source": "environment"}
    assert report["settings"]["admin_token"]["value"] == "**********"
    assert report["settings"]["credential_headers"]["value"] == list(Settings().credential_headers)
    assert report["unknown_variables"] == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AUTHZ_DECISION_TIMEOUT_MS": "0"}, "AUTHZ_DECISION_TIMEOUT_MS='0'"),
        ({"AUTHZ_ADMIN_TOKEN": CHECK_ADMIN_TOKEN}, "are both set"),
        ({"AUTHZ_ALLOW_BYPAS": "true"}, "did you mean AUTHZ_ALLOW_BYPASS?"),
        ({"AUTHZ_MODE": "bypass"}, "AUTHZ_ALLOW_BYPASS=true"),
    ],
    ids=["bad-value", "variable-and-file", "typo", "inconsistent"],
)
def test_config_check_invalid_exits_2_naming_the_key(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    checked: Path,
    env: dict[str, str],
    message: str,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["config", "check", "--config", str(checked)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err
    _no_secret(err)


def test_config_check_bad_settings_file_exits_2(
    capsys: pytest.CaptureFixture[str], checked: Path
) -> None:
    checked.write_text("log_levle: DEBUG\n", encoding="utf-8")
    assert main(["config", "check", "--config", str(checked)]) == 2
    assert "unknown key 'log_levle'" in capsys.readouterr().err


def test_config_check_reports_unknown_variables(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], checked: Path
) -> None:
    monkeypatch.setenv("AUTHZ_METRICS_SERVICE_HOST", "10.0.0.7")
    assert main(["config", "check"]) == 0
    err = capsys.readouterr().err
    assert "AUTHZ_METRICS_SERVICE_HOST" in err
    assert "10.0.0.7" not in err


def test_digest_matches_cli_hash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `key hash` and the input document's credential digest must agree
    monkeypatch.setattr(sys, "stdin", io.StringIO("ak_example\n"))
    assert main(["key", "hash"]) == 0
    assert capsys.readouterr().out.strip() == digest("ak_example") == DIGEST


# --- usage, help and exit codes ----------------------------------------------------------


ROOT = Path(__file__).resolve().parents[3]

# Every leaf command of `authz`, as typed. A new verb must be added here (and so gets the
# checks below): test_verbs_are_the_listed_ones fails until it is.
VERBS: list[tuple[str, ...]] = [
    ("serve",),
    ("key", "new"),
    ("key", "hash"),
    ("key", "health"),
    ("sandbox", "new"),
    ("secrets", "generate"),
    ("lint-data",),
    ("audit", "tail"),
    ("audit", "verify"),
    ("audit", "replay"),
    ("generate", "deploy"),
    ("generate", "egress-envoy"),
    ("generate", "batch-rule"),
    ("config", "check"),
]
GROUPS: list[tuple[str, ...]] = [
    ("key",),
    ("sandbox",),
    ("secrets",),
    ("audit",),
    ("generate",),
    ("config",),
]
VERB_IDS = [" ".join(verb) for verb in VERBS]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """name -> (the one-line help shown in the parent's listing, the subparser); aliases
    are left out."""
    found: dict[str, tuple[str, argparse.ArgumentParser]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if name in helps:
                    found[name] = (helps[name], sub)
    return found


def _walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    """(path, listing help, parser) for every command under ``parser``, depth first."""
    for name, (summary, sub) in _subcommands(parser).items():
        yield (*path, name), summary, sub
        yield from _walk(sub, (*path, name))


def _help_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 0, err
    return out


# --- descriptions ------------------------------------------------------------------------


def test_verbs_are_the_listed_ones() -> None:
    commands = {path for path, _, sub in _walk(cli.build_parser()) if not _subcommands(sub)}
    assert commands == set(VERBS)


@pytest.mark.parametrize("path", VERBS + GROUPS, ids=VERB_IDS + [g[0] for g in GROUPS])
def test_every_command_has_a_one_line_description(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    listing = {p: (summary, sub) for p, summary, sub in _walk(cli.build_parser())}
    summary, sub = listing[path]
    assert summary, f"{' '.join(path)}: no help= in its parent's listing"
    assert sub.description, f"{' '.join(path)}: no description="
    assert "\n" not in summary
    out = _help_of([*path, "--help"], capsys)
    assert out.startswith(f"usage: authz {' '.join(path)}")
    assert " ".join(sub.description.split()) in " ".join(out.split())


def test_top_level_help_describes_authz_not_the_module(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help_of(["--help"], capsys)
    assert out.startswith("usage: authz")
    text = " ".join(out.split())
    assert cli.DESCRIPTION in text
    assert "argument parsing only" not in out  # the module docstring is for readers of cli.py
    for name, (summary, _) in _subcommands(cli.build_parser()).items():
        assert re.search(rf"^    {re.escape(name)}\b", out, re.MULTILINE), name
        assert " ".join(summary.split()) in text
    assert "exit codes:" in out


def _parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield "authz", cli.build_parser()
    for path, _, sub in _walk(cli.build_parser()):
        yield f"authz {' '.join(path)}", sub
    for module in ("authz.tools.deploy", "authz.tools.egress_envoy", "authz.stack.__main__"):
        yield module, importlib.import_module(module).build_parser()


PARSERS = dict(_parsers())


@pytest.mark.parametrize("name", list(PARSERS), ids=list(PARSERS))
def test_every_option_has_help_text(name: str) -> None:
    parser = PARSERS[name]
    missing = [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not action.help
    ]
    assert missing == [], f"{name}: options without help text"


# --- --version ---------------------------------------------------------------------------


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help_of(["--version"], capsys)
    assert out == f"authz {authz.__version__}\n"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert authz.__version__ == pyproject["project"]["version"]


# --- the generators and the local stack ----------------------------------------------------


@pytest.mark.parametrize(
    ("module", "prog"),
    [
        ("authz.tools.deploy", "python -m authz.tools.deploy"),
        ("authz.tools.egress_envoy", "python -m authz.tools.egress_envoy"),
        ("authz.stack.__main__", "python -m authz.stack"),
    ],
    ids=["deploy", "egress-envoy", "stack"],
)
def test_python_m_usage_names_the_command_to_type(
    module: str, prog: str, capsys: pytest.CaptureFixture[str]
) -> None:
    main: Callable[[list[str]], int] = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {prog} ")
    assert "exit codes:" in out


def test_generate_egress_envoy_writes_what_python_m_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from authz.tools import egress_envoy

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.json").write_bytes((ROOT / egress_envoy.DEFAULT_SERVICES).read_bytes())
    args = ["--services", "data.json", "--out", "{out}"]
    assert egress_envoy.main([a.format(out="direct.yaml") for a in args]) == 0
    verb = ["generate", "egress-envoy"]
    assert cli.main([*verb, *(a.format(out="verb.yaml") for a in args), "--check"]) == 1
    assert cli.main([*verb, *(a.format(out="verb.yaml") for a in args)]) == 0
    assert cli.main([*verb, *(a.format(out="verb.yaml") for a in args), "--check"]) == 0
    direct = (tmp_path / "direct.yaml").read_text(encoding="utf-8")
    assert direct == (tmp_path / "verb.yaml").read_text(encoding="utf-8").replace(
        "verb.yaml", "direct.yaml"
    )


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["generate", "deploy", "--root", str(ROOT), "--check"], 0),
        (["generate", "deploy", "--root", "{empty}", "--check"], 2),
        (["generate", "egress-envoy", "--services", "{empty}/none.json"], 2),
    ],
    ids=["deploy-up-to-date", "deploy-no-sources", "egress-no-services"],
)
def test_generate_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int
) -> None:
    assert cli.main([a.format(empty=tmp_path) for a in argv]) == code
    if code == 2:
        assert "error:" in capsys.readouterr().err


def test_generate_without_a_tool_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate"])
    assert exc.value.code == 2
    assert "usage: authz generate" in capsys.readouterr().err


# --- audit verify --json -----------------------------------------------------------------


@pytest.fixture
def audit_db(tmp_path: Path) -> Path:
    """An audit trail with two decisions."""
    path = tmp_path / "audit.db"
    trail = AuditTrail(path, retention_days=None)
    trail.record(gateway_decision("d-1", allowed=True, reason="allowed"))
    trail.record(gateway_decision("d-2", allowed=False, reason="missing_api_key"))
    trail.close()
    return path


def _tamper(db: Path) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE audit SET body = replace(body, 'allowed', 'ALLOWED') WHERE seq = 1")


@pytest.mark.parametrize("tampered", [False, True], ids=["intact", "tampered"])
def test_audit_verify_json(
    audit_db: Path, capsys: pytest.CaptureFixture[str], tampered: bool
) -> None:
    if tampered:
        _tamper(audit_db)
    code = cli.main(["audit", "verify", "--db", str(audit_db), "--json"])
    out, _ = capsys.readouterr()
    report = json.loads(out)
    if tampered:
        assert (code, report["ok"], report["broken_seq"]) == (1, False, 1)
        assert report["problem"]
    else:
        assert (code, report["ok"], report["entries"], report["broken_seq"]) == (0, True, 2, None)


@pytest.mark.parametrize("tampered", [False, True], ids=["intact", "tampered"])
def test_audit_verify_text_exit_codes(
    audit_db: Path, capsys: pytest.CaptureFixture[str], tampered: bool
) -> None:
    if tampered:
        _tamper(audit_db)
    assert cli.main(["audit", "verify", "--db", str(audit_db)]) == (1 if tampered else 0)
    out, err = capsys.readouterr()
    assert ("BROKEN at entry 1" in err) is tampered
    assert out.startswith("ok: 2 entries") is not tampered


# --- audit replay: exit codes and --json -------------------------------------------------


def _change(decision_id: str, before: str, after: str) -> ReplayChange:
    return ReplayChange(1, decision_id, "t", GATEWAY, {"key_id": "key-a"}, before, after)


UNCHANGED = ReplayReport(evaluated=2, unchanged=2)
CHANGED = ReplayReport(
    evaluated=2,
    unchanged=1,
    changed=[_change("d-1", "allow (allowed)", "deny (disabled_api_key)")],
)
ERRORED = ReplayReport(
    evaluated=2,
    unchanged=1,
    errors=1,
    changed=[_change("d-1", "allow (allowed)", "error (opa_bad_response)")],
)


@pytest.fixture
def fake_replay(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., Path]:
    """Replace the throwaway OPA and the replay with fakes: the CLI's exit code and output
    are under test here (tests/integration/test_replay.py runs the real thing). Returns a
    function taking the report to return (or the error OPA's start raises) and giving
    the bundle path to pass."""
    bundle = tmp_path / "other.tar.gz"
    bundle.write_bytes(b"not read by the fakes")
    monkeypatch.setenv("AUTHZ_OPA_BIN", "/bin/true")

    def arrange(result: ReplayReport | Exception) -> Path:
        @contextlib.contextmanager
        def opa_serving(*_: object, **__: object) -> Iterator[str]:
            if isinstance(result, Exception):
                raise result
            yield "http://127.0.0.1:9"

        async def replay(entries: Any, engine: Any, *_: object) -> ReplayReport:
            assert isinstance(result, ReplayReport)
            assert [e.decision_id for e in entries] == ["d-1", "d-2"]
            return result

        monkeypatch.setattr(authz.tools.replay, "opa_serving", opa_serving)
        monkeypatch.setattr(authz.tools.replay, "replay", replay)
        return bundle

    return arrange


def _no_audit_table(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE other (x)")


BAD_AUDIT_DBS: dict[str, Callable[[Path], Any]] = {
    "not-sqlite": lambda path: path.write_bytes(b"not a database, just text" * 100),
    "no-audit-table": _no_audit_table,
}


@pytest.mark.parametrize("verb", ["tail", "verify", "replay"])
@pytest.mark.parametrize("make", BAD_AUDIT_DBS.values(), ids=BAD_AUDIT_DBS.keys())
def test_audit_commands_on_a_bad_database_exit_2_naming_it(
    tmp_path: Path,
    fake_replay: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    verb: str,
    make: Callable[[Path], Any],
) -> None:
    db = tmp_path / "audit.db"
    make(db)
    extra = ["--bundle", str(fake_replay(UNCHANGED))] if verb == "replay" else []
    assert cli.main(["audit", "--db", str(db), verb, *extra]) == 2
    out, err = capsys.readouterr()
    assert (out, f"error: {db}: cannot read the audit trail" in err) == ("", True)


def test_audit_tail_on_a_row_whose_body_is_not_json_exits_2_naming_the_row(
    audit_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An edited store: verify reports the broken chain; tail must not crash on the row.
    with contextlib.closing(sqlite3.connect(audit_db)) as conn, conn:
        conn.execute("UPDATE audit SET body = 'not json {' WHERE seq = 1")
    assert cli.main(["audit", "--db", str(audit_db), "tail"]) == 2
    err = capsys.readouterr().err
    assert "error: audit entry 1: body is not JSON" in err


def test_audit_verify_reads_a_database_whose_path_has_uri_characters(
    audit_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = tmp_path / "a?b#c" / "audit.db"
    odd.parent.mkdir()
    audit_db.rename(odd)
    assert cli.main(["audit", "verify", "--db", str(odd)]) == 0
    assert capsys.readouterr().out.startswith("ok: 2 entries")


@pytest.mark.parametrize(
    ("result", "code"),
    [
        (UNCHANGED, 0),
        (CHANGED, 1),
        (ERRORED, 1),
        (RuntimeError("OPA exited: bad bundle"), 2),
    ],
    ids=["unchanged", "changed", "evaluation-error-counts-as-changed", "opa-did-not-start"],
)
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_audit_replay_exit_codes(
    audit_db: Path,
    fake_replay: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    result: ReplayReport | Exception,
    code: int,
    as_json: bool,
) -> None:
    bundle = fake_replay(result)
    argv = ["audit", "--db", str(audit_db), "replay", "--bundle", str(bundle)]
    assert cli.main([*argv, "--json"] if as_json else argv) == code
    out, err = capsys.readouterr()
    if isinstance(result, Exception):
        assert (out, "OPA exited" in err) == ("", True)
    elif as_json:
        report = json.loads(out)
        assert {k: report[k] for k in ("evaluated", "unchanged", "errors", "skipped")} == {
            "evaluated": result.evaluated,
            "unchanged": result.unchanged,
            "errors": result.errors,
            "skipped": result.skipped,
        }
        assert [(c["decision_id"], c["before"], c["after"]) for c in report["changed"]] == [
            (c.decision_id, c.before, c.after) for c in result.changed
        ]
    else:
        assert out.splitlines()[0] == result.summary()
        assert len(out.splitlines()) == 1 + len(result.changed)


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "--db", "{db}", "replay", "--bundle", "{missing}"],
        ["audit", "--db", "{missing}", "replay", "--bundle", "{bundle}"],
    ],
    ids=["no-bundle", "no-database"],
)
def test_audit_replay_that_cannot_run_exits_2(
    audit_db: Path,
    tmp_path: Path,
    fake_replay: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    bundle = fake_replay(CHANGED)
    missing = tmp_path / "missing"
    args = [a.format(db=audit_db, missing=missing, bundle=bundle) for a in argv]
    assert cli.main([*args, "--json"]) == 2
    out, err = capsys.readouterr()
    assert (out, "error:" in err) == ("", True)


# --- exit codes documented --------------------------------------------------------------


def test_readme_shows_the_exit_codes_of_help() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert cli.EXIT_CODES.strip() in readme


# verb -> the exit codes its --help documents: the checks use 1 for "found something".
CODES = {
    ("serve",): {0, 2},
    ("key", "new"): {0, 2},
    ("key", "hash"): {0, 2},
    ("key", "health"): {0, 1, 2},
    ("sandbox", "new"): {0, 2},
    ("secrets", "generate"): {0, 1, 2},
    ("lint-data",): {0, 1},
    ("audit", "tail"): {0, 2},
    ("audit", "verify"): {0, 1, 2},
    ("audit", "replay"): {0, 1, 2},
    ("generate", "deploy"): {0, 1, 2},
    ("generate", "egress-envoy"): {0, 1, 2},
    ("generate", "batch-rule"): {0, 1, 2},
    ("config", "check"): {0, 2},
}


def test_codes_table_covers_every_verb() -> None:
    assert set(CODES) == set(VERBS)


@pytest.mark.parametrize("path", VERBS, ids=VERB_IDS)
def test_every_verb_documents_its_exit_codes(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    out = _help_of([*path, "--help"], capsys)
    assert "exit codes:" in out, f"{' '.join(path)} --help has no exit codes"
    epilog = out[out.index("exit codes:") :].splitlines()[1:]
    documented = {int(line.split()[0]) for line in epilog if re.match(r"  \d  \S", line)}
    assert documented == CODES[path]


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "tail", "--limit", "0"],
        ["audit", "tail", "--limit", "-1"],
        ["audit", "tail", "--limit", "many"],
        ["audit", "replay", "--bundle", "b.tar.gz", "--limit", "0"],
        ["audit", "tail", "--limit", str(2**63)],
    ],
    ids=["tail-zero", "tail-negative", "tail-not-a-number", "replay-zero", "tail-above-sqlite"],
)
def test_limit_must_be_a_positive_count(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # SQLite reads LIMIT -1 as "no limit": a typo must not turn into the whole trail.
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "--limit" in capsys.readouterr().err


# --- keys health -------------------------------------------------------------------------


NOW_TEXT = iso(NOW)


def bundle(tmp_path: Path, *entries: dict[str, Any]) -> Path:
    keys = {key_digest(e["id"]): e for e in entries}
    return write_bundle(
        tmp_path / "authz.tar.gz",
        {"/data.json": {"gateway": {"api_keys": keys, "roles": ["user"]}}},
    )


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main(["keys", "health", "--now", NOW_TEXT, *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


HEALTHY = (entry("key-a"), entry("key-b", expires_at=iso(NOW + 90 * DAY_S)))


@pytest.mark.parametrize(
    ("entries", "seen", "extra", "code", "status"),
    [
        (HEALTHY, ("key-a", "key-b"), (), 0, None),
        ((*HEALTHY, entry("key-off", enabled=False)), ("key-a", "key-b"), (), 0, "disabled"),
        (HEALTHY, ("key-a",), (), 1, "unused"),
        (HEALTHY, ("key-a", "key-b"), ("--expiring-days", "100"), 1, "expiring"),
        (HEALTHY, ("key-a", "key-b"), ("--now", iso(NOW + 91 * DAY_S)), 1, "expired"),
        (
            (*HEALTHY, entry("key-c", expires_at="soon")),
            ("key-a", "key-b", "key-c"),
            (),
            1,
            "invalid_expiry",
        ),
    ],
    ids=["healthy", "disabled-is-not-actionable", "unused", "expiring", "expired", "invalid"],
)
def test_exit_codes(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    entries: tuple[dict[str, Any], ...],
    seen: tuple[str, ...],
    extra: tuple[str, ...],
    code: int,
    status: str | None,
) -> None:
    db = write_audit(tmp_path / "audit.db", [decision(k, NOW - DAY_S) for k in seen])
    got, out, err = run(capsys, "--bundle", bundle(tmp_path, *entries), "--audit", db, *extra)
    assert (got, err) == (code, "")
    verdict = out.rstrip().splitlines()[-1]
    assert verdict.startswith("ACTION NEEDED") if code else verdict == "no action needed"
    if status is not None:
        assert any(line.split()[1:2] == [status] for line in out.splitlines()[2:])
    for e in entries:
        assert key_digest(e["id"]) not in out  # keys are named by id only
        assert key_digest(e["id"])[:16] not in out


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = write_audit(
        tmp_path / "audit.db",
        [decision("key-a", NOW - 2 * DAY_S), decision("key-old", NOW - 60 * DAY_S)],
    )
    path = bundle(
        tmp_path,
        entry("key-a"),
        entry("key-old"),
        entry("key-soon", expires_at=iso(NOW + 3 * DAY_S)),
        entry("key-off", enabled=False),
    )
    code, out, _ = run(capsys, "--bundle", path, "--audit", db, "--json", "--unused-days", "45")
    assert code == 1
    report = json.loads(out)
    assert report["now"] == NOW_TEXT
    assert (report["expiring_days"], report["unused_days"]) == (14.0, 45.0)
    assert report["needs_action"] is True
    assert {k["id"]: k["status"] for k in report["keys"]} == {
        "key-off": "disabled",
        "key-soon": "expiring",
        "key-old": "unused",
        "key-a": "ok",
    }
    seen = {k["id"]: k["last_seen"] for k in report["keys"]}
    assert seen["key-a"] == iso(NOW - 2 * DAY_S)
    assert seen["key-soon"] is None
    assert report["counts"]["unused"] == 1
    assert key_digest("key-a") not in out


def test_json_healthy_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--bundle", bundle(tmp_path, entry("key-a")), "--json")
    assert code == 0
    report = json.loads(out)
    assert (report["needs_action"], report["unused_checked"]) == (False, False)


def test_key_is_an_alias_of_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = bundle(tmp_path, entry("key-a", expires_at=iso(NOW - DAY_S)))
    assert main(["key", "health", "--bundle", str(path), "--now", NOW_TEXT]) == 1
    assert "key-a" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing-bundle", "no such file or directory"),
        ("missing-audit", "no audit database"),
        ("not-a-bundle", "not a readable bundle"),
        ("no-api-keys", "no data.gateway.api_keys"),
        ("malformed-entry", "expected a non-empty string id"),
        ("not-an-audit-db", "cannot read the audit trail"),
    ],
)
def test_bad_input_exits_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, message: str
) -> None:
    path = bundle(tmp_path, entry("key-a"))
    db = write_audit(tmp_path / "audit.db", [decision("key-a", NOW)])
    named = path
    if setup == "missing-bundle":
        path = named = tmp_path / "nope.tar.gz"
    elif setup == "missing-audit":
        db = named = tmp_path / "nope.db"
    elif setup == "not-a-bundle":
        path.write_bytes(b"\x00" * 64)
    elif setup == "no-api-keys":
        write_bundle(path, {"/data.json": {"gateway": {"roles": []}}})
    elif setup == "malformed-entry":
        write_bundle(path, {"/gateway/api_keys/data.json": {key_digest("x"): {"enabled": True}}})
        named = Path(key_digest("x")[:8])
    elif setup == "not-an-audit-db":
        db.write_bytes(b"garbage" * 100)
        named = db
    code, out, err = run(capsys, "--bundle", path, "--audit", db)
    assert (code, out) == (2, "")
    assert err.startswith("error: ")
    assert message in err
    assert str(named) in err
    assert key_digest("x") not in err


@pytest.mark.parametrize(
    "args",
    [
        ["keys", "health"],
        ["keys", "health", "--bundle", "b", "--expiring-days", "-1"],
        ["keys", "health", "--bundle", "b", "--expiring-days", "soon"],
        ["keys", "health", "--bundle", "b", "--unused-days", "0"],
        ["keys", "health", "--bundle", "b", "--unused-days", "inf"],
        ["keys", "health", "--bundle", "b", "--now", "2026-01-01"],
    ],
    ids=["no-bundle", "negative", "word", "unused-0", "unused-inf", "now-not-rfc3339"],
)
def test_keys_health_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(args)
    assert caught.value.code == 2
    assert "usage:" in capsys.readouterr().err
