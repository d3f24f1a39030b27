"""``scripts/test`` (the README's test command, run by CI) stops at the first failing
check: each step is its own command under ``set -e``, so a lint failure can never be
followed by a green run. Every tool is replaced by a stub that logs its call; one stub
fails, and nothing after it may run."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# In the order scripts/test runs them; "opa" covers fmt, check and test.
STEPS = ("ruff check", "ruff format", "mypy", "lint-imports", "opa fmt", "regal", "pytest")


def _stub(path: Path, name: str, log: Path, fail_on: str | None) -> None:
    # Fails when its call line ("<name> <args>") starts with fail_on.
    fail = f'[[ "{name} $*" == "{fail_on}"* ]] && exit 1\n' if fail_on else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'#!/usr/bin/env bash\necho "{name} $*" >> "{log}"\n{fail}exit 0\n', encoding="utf-8"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run(tmp_path: Path, fail_on: str | None) -> tuple[int, list[str]]:
    root = tmp_path / "checkout"
    shutil.copytree(ROOT / "scripts", root / "scripts")
    log = tmp_path / "calls.log"
    cache, venv = tmp_path / "cache", tmp_path / "venv"
    _stub(root / "scripts/install-deps", "install-deps", log, None)
    for tool in ("ruff", "mypy", "lint-imports", "pytest"):
        _stub(venv / "bin" / tool, tool, log, fail_on)
    version = "v0"
    _stub(cache / f"opa-{version}" / "opa", "opa", log, fail_on)
    _stub(cache / "regal" / "regal", "regal", log, fail_on)
    env = {
        **os.environ,
        "AUTHZ_VENV": str(venv),
        "AUTHZ_CACHE": str(cache),
        "OPA_VERSION": version,
        "REGAL_BIN": str(cache / "regal" / "regal"),
    }
    result = subprocess.run(
        [str(root / "scripts/test")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    calls = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    return result.returncode, calls


def _steps_run(calls: list[str]) -> list[str]:
    return [step for step in STEPS if any(call.startswith(step) for call in calls)]


def test_every_check_runs_when_all_pass(tmp_path: Path) -> None:
    code, calls = _run(tmp_path, fail_on=None)
    assert code == 0, calls
    assert _steps_run(calls) == list(STEPS)


@pytest.mark.parametrize("failing", STEPS[:-1])
def test_a_failing_check_fails_the_script_and_stops_it(tmp_path: Path, failing: str) -> None:
    code, calls = _run(tmp_path, fail_on=failing)
    assert code != 0
    assert _steps_run(calls)[-1] == failing, calls  # nothing after the failing step ran
