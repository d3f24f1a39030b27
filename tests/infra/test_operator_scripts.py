"""The operator scripts as a caller meets them: ``scripts/up --help`` prints help and does
nothing else, every option it takes is documented and reaches ``python -m authz.stack``;
``scripts/generate-egress-secrets`` resolves relative paths against the caller's directory.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from authz.stack.__main__ import build_parser as stack_parser

ROOT = Path(__file__).resolve().parents[2]
# The steps scripts/up runs before the stack, each replaced by a stub that logs its call.
UP_STEPS = ("install-deps", "build-policy-bundle", "generate-egress-secrets")


def _stub(path: Path, name: str, log: Path) -> None:
    path.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{log}"\n', encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_checkout(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A copy of scripts/ whose install, bundle and secrets steps and whose venv's python
    are stubs writing one line each to a log: (root, log, environment)."""
    root = tmp_path / "checkout"
    shutil.copytree(ROOT / "scripts", root / "scripts")
    log = tmp_path / "calls.log"
    for step in UP_STEPS:
        _stub(root / "scripts" / step, step, log)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    _stub(venv / "bin/python", "python", log)
    env = {**os.environ, "AUTHZ_VENV": str(venv), "AUTHZ_CACHE": str(tmp_path / "cache")}
    return root, log, env


def _up(
    checkout: tuple[Path, Path, dict[str, str]], *args: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    root, log, env = checkout
    result = subprocess.run(
        [str(root / "scripts/up"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=60,
        check=False,
    )
    calls = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    return result, calls


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_up_help_prints_help_and_runs_nothing(
    fake_checkout: tuple[Path, Path, dict[str, str]], flag: str
) -> None:
    result, calls = _up(fake_checkout, flag)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("Usage: scripts/up")
    assert calls == []  # nothing installed, built or started
    assert not (fake_checkout[0] / ".run").exists()


def _documented_options(help_text: str) -> dict[str, str]:
    """option -> its help line, from the ``Options:`` block of ``scripts/up --help``."""
    block = help_text.split("Options:\n", 1)[1].split("\n\n", 1)[0]
    options = {}
    for line in block.splitlines():
        if line.startswith("  -"):
            names, _, text = line.strip().partition("  ")
            for name in names.split(", "):
                options[name] = text.strip()
    return options


def test_up_documents_every_option_and_each_reaches_the_stack(
    fake_checkout: tuple[Path, Path, dict[str, str]],
) -> None:
    result, _ = _up(fake_checkout, "--help")
    options = _documented_options(result.stdout)
    assert {"--redis", "--tls", "--postgres", "--help", "-h"} <= set(options)
    assert all(options.values()), f"options without help text: {options}"
    stack_options = {o for a in stack_parser()._actions for o in a.option_strings}
    assert set(options) - {"-h", "--help"} <= stack_options


@pytest.mark.parametrize(
    ("args", "code", "stack_args"),
    [
        ([], 0, ""),
        (["--redis", "--tls"], 0, " --redis --tls"),
        (["--bogus"], 2, None),
        (["--redis", "--run-dir", "x"], 2, None),
        (["--postgres"], 0, " --postgres"),
    ],
    ids=[
        "no-options",
        "redis-and-tls",
        "unknown-option",
        "unknown-option-after-a-good-one",
        "postgres",
    ],
)
def test_up_runs_the_steps_then_the_stack_with_its_options(
    fake_checkout: tuple[Path, Path, dict[str, str]],
    args: list[str],
    code: int,
    stack_args: str | None,
) -> None:
    """The stubs are reached when they should be (so the help test above can fail), and a
    bad option is refused before anything is installed."""
    root = fake_checkout[0]
    result, calls = _up(fake_checkout, *args)
    assert result.returncode == code, result.stderr
    if stack_args is None:
        assert calls == []
        assert "unknown option" in result.stderr
        return
    assert [call.split()[0] for call in calls] == [*UP_STEPS, "python"]
    secrets = root / ".run/egress-secrets.json"
    assert calls[-1] == f"python -m authz.stack --root {root} --secrets-file {secrets}" + (
        stack_args
    )


# --- generate-egress-secrets ------------------------------------------------------------


def _generate_secrets(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EGRESS_SECRET_")}
    env["AUTHZ_VENV"] = sys.prefix  # the venv running the tests: nothing to install
    return subprocess.run(
        [str(ROOT / "scripts/generate-egress-secrets"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


SERVICES = {
    "services": {
        "mail": {
            "base_url": "https://mail.example.com",
            "credential": {"header": "x-api-key", "format": "{secret}"},
        }
    }
}


@pytest.mark.parametrize(
    ("args", "written"),
    [
        (["--env-file", "my.env", "--out", "secrets.json"], {"openai": "sk-openai"}),
        (
            ["--env-file", "my.env", "--out", "out/secrets.json", "--services", "svc.json"],
            {"mail": "mail-secret"},
        ),
        (
            ["--env-file", "{cwd}/my.env", "--out", "{cwd}/secrets.json"],
            {"openai": "sk-openai"},
        ),
    ],
    ids=["relative-default-services", "relative-services-and-subdir", "absolute"],
)
def test_generate_egress_secrets_resolves_paths_against_the_callers_directory(
    tmp_path: Path, args: list[str], written: dict[str, str]
) -> None:
    cwd = tmp_path / "caller"
    cwd.mkdir()
    (cwd / "my.env").write_text(
        "EGRESS_SECRET_OPENAI=sk-openai\nEGRESS_SECRET_MAIL=mail-secret\n", encoding="utf-8"
    )
    (cwd / "svc.json").write_text(json.dumps(SERVICES), encoding="utf-8")
    result = _generate_secrets(cwd, *(a.format(cwd=cwd) for a in args))
    assert result.returncode == 0, result.stderr
    out = cwd / args[args.index("--out") + 1].format(cwd=cwd)
    document = json.loads(out.read_text(encoding="utf-8"))
    assert {k: document["credentials"][k] for k in written} == written
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert not (ROOT / "secrets.json").exists()
    assert not (ROOT / "out").exists()
    assert "sk-openai" not in result.stdout + result.stderr  # names only, never a value


def test_generate_egress_secrets_names_a_missing_relative_file(tmp_path: Path) -> None:
    result = _generate_secrets(tmp_path, "--env-file", "absent.env", "--out", "s.json")
    assert result.returncode == 2
    assert "no env file at absent.env" in result.stderr
    assert not (tmp_path / "s.json").exists()


def test_generate_egress_secrets_help_installs_nothing(
    fake_checkout: tuple[Path, Path, dict[str, str]], tmp_path: Path
) -> None:
    root, log, env = fake_checkout
    script = root / "scripts/generate-egress-secrets"
    shutil.copy2(ROOT / "scripts/generate-egress-secrets", script)
    env = {**env, "AUTHZ_VENV": str(tmp_path / "no-venv-yet")}
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert "Usage: scripts/generate-egress-secrets" in result.stdout
    assert not log.exists()  # install-deps was not run
