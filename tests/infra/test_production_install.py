"""A production install runs every command: the package's wheel, installed without extras
into a fresh venv, answers every ``authz`` verb's ``--help`` and runs ``authz audit replay``
against a real bundle (built with ``opa build`` from ``policy/``) and an audit database.

The installed code runs isolated from the checkout (cwd outside it, no ``PYTHONPATH``,
``python -I`` for the import checks), so a module that needs the ``dev`` extra, the tests
or the source tree fails here. ``pip`` installs the runtime dependencies from its cache
or the index (about 15 s with a warm cache).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from authz.core.decision import parse_decision
from authz.core.input import build_input
from authz.runtime.audit import AuditTrail
from authz.runtime.config import DEFAULT_CREDENTIAL_HEADERS
from authz.tools.cli import build_parser
from tests.helpers.fakes import check_request
from tests.helpers.records import GATEWAY, gateway_decision

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# pip builds in the source directory (build/, *.egg-info): copy only what the build needs.
SOURCES = ("pyproject.toml", "README.md", "authz")


@dataclass(frozen=True)
class Install:
    """The built wheel and the venv it is installed in."""

    wheel: Path
    venv: Path
    workdir: Path

    def run(self, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a venv command (``authz``, ``python``) from a directory outside the checkout
        with an environment that cannot point back at it."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
        }
        return subprocess.run(
            [str(self.venv / "bin" / argv[0]), *argv[1:]],
            capture_output=True,
            text=True,
            input=stdin,
            env=env,
            cwd=self.workdir,
            timeout=120,
            check=False,
        )


def _pip(*args: str, python: Path) -> None:
    result = subprocess.run(
        [str(python), "-m", "pip", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Install:
    base = tmp_path_factory.mktemp("production")
    source = base / "src"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / name, source / name)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin/python"
    wheels = base / "wheels"
    _pip("wheel", "--no-deps", "--wheel-dir", str(wheels), str(source), python=python)
    [wheel] = wheels.glob("authz-*.whl")
    _pip("install", str(wheel), python=python)  # no extras: the runtime dependencies only
    workdir = base / "work"
    workdir.mkdir()
    return Install(wheel, venv, workdir)


# --- the wheel ---------------------------------------------------------------------------


def _requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group()).lower()


def test_wheel_holds_the_package_only(install: Install) -> None:
    with zipfile.ZipFile(install.wheel) as wheel:
        names = wheel.namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"authz", f"authz-{PYPROJECT['project']['version']}.dist-info"}


def test_runtime_requirements_are_not_dev_only(install: Install) -> None:
    """The wheel's unconditional requirements are the project's dependencies, and none of
    them is there only for development (the ``dev`` extra)."""
    with zipfile.ZipFile(install.wheel) as wheel:
        [metadata] = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        text = wheel.read(metadata).decode()
    requires = [
        line.removeprefix("Requires-Dist: ")
        for line in text.splitlines()
        if line.startswith("Requires-Dist: ")
    ]
    runtime = {_requirement_name(r) for r in requires if "extra ==" not in r}
    assert runtime == {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    dev = {_requirement_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]}
    assert runtime & dev == set()


def test_every_shipped_module_imports_with_the_runtime_dependencies(install: Install) -> None:
    script = (
        "import importlib, json, pkgutil, authz\n"
        "failed = {}\n"
        "for m in pkgutil.walk_packages(authz.__path__, 'authz.'):\n"
        "    try:\n"
        "        importlib.import_module(m.name)\n"
        "    except Exception as exc:\n"
        "        failed[m.name] = repr(exc)\n"
        "print(json.dumps({'file': authz.__file__, 'failed': failed}))\n"
    )
    result = install.run("python", "-I", "-c", script)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["file"].startswith(str(install.venv))  # the installed copy, not the checkout
    assert report["failed"] == {}


# --- every verb --------------------------------------------------------------------------


def _verbs(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[list[str]]:
    """Every command path under ``parser`` (groups and leaves), aliases left out."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {choice.dest for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if name in listed:
                    yield [*path, name]
                    yield from _verbs(sub, (*path, name))


VERBS = [[], *_verbs(build_parser())]


@pytest.mark.parametrize("verb", VERBS, ids=[" ".join(v) or "authz" for v in VERBS])
def test_every_verb_answers_help(install: Install, verb: list[str]) -> None:
    result = install.run("authz", *verb, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {' '.join(['authz', *verb])}")


def test_version(install: Install) -> None:
    result = install.run("authz", "--version")
    assert (result.returncode, result.stdout) == (0, f"authz {PYPROJECT['project']['version']}\n")


def test_key_hash_and_new(install: Install) -> None:
    hashed = install.run("authz", "key", "hash", stdin="ak_example\n")
    assert hashed.returncode == 0, hashed.stderr
    new = install.run("authz", "key", "new", "--id", "key-a", "--role", "user")
    assert new.returncode == 0, new.stderr
    assert next(iter(json.loads(new.stdout).values()))["id"] == "key-a"


# --- audit replay against a real bundle --------------------------------------------------


@pytest.fixture(scope="module")
def bundle(opa_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's policy (tests left out, no API keys) built by ``opa build``."""
    out = tmp_path_factory.mktemp("bundle") / "authz.tar.gz"
    result = subprocess.run(
        [opa_bin, "build", "-b", str(ROOT / "policy"), "--ignore", "*_test.rego", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return out


def _document() -> dict[str, Any]:
    request = check_request(method="GET", path="/api/v1/status")
    return build_input(request, DEFAULT_CREDENTIAL_HEADERS)


@pytest.fixture(scope="module")
def decided(opa_bin: str, bundle: Path) -> tuple[bool, str]:
    """What the bundle decides for :func:`_document` (``opa eval``): (allowed, reason)."""
    query = "data." + GATEWAY.replace("/", ".")
    result = subprocess.run(
        [opa_bin, "eval", "--format", "json", "--stdin-input", "-b", str(bundle), query],
        input=json.dumps(_document()),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    value = json.loads(result.stdout)["result"][0]["expressions"][0]["value"]
    decision = parse_decision(value)
    return decision.allowed, decision.reason_code


def _audit_db(path: Path, allowed: bool, reason: str) -> Path:
    trail = AuditTrail(path, retention_days=None)
    trail.record(gateway_decision("d-1", allowed=allowed, reason=reason, document=_document()))
    trail.close()
    return path


@pytest.mark.parametrize(
    ("recorded", "code"),
    [("as-decided", 0), ("flipped", 1)],
    ids=["no-decision-changes-exit-0", "a-decision-changes-exit-1"],
)
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_audit_replay_against_a_real_bundle(
    install: Install,
    bundle: Path,
    decided: tuple[bool, str],
    opa_bin: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    recorded: str,
    code: int,
    as_json: bool,
) -> None:
    allowed, reason = decided
    if recorded == "flipped":
        allowed, reason = not allowed, "allowed" if not allowed else "denied"
    db = _audit_db(tmp_path / "audit.db", allowed, reason)
    monkeypatch.setenv("AUTHZ_OPA_BIN", opa_bin)
    argv = ["authz", "audit", "replay", "--db", str(db), "--bundle", str(bundle)]
    result = install.run(*argv, *(["--json"] if as_json else []))
    assert result.returncode == code, result.stderr
    if as_json:
        report = json.loads(result.stdout)
        assert (report["evaluated"], len(report["changed"]), report["errors"]) == (1, code, 0)
    else:
        assert result.stdout.startswith("evaluated 1: ")
        assert len(result.stdout.splitlines()) == 1 + code


def test_audit_verify_and_tail(install: Install, tmp_path: Path) -> None:
    db = _audit_db(tmp_path / "audit.db", True, "allowed")
    verified = install.run("authz", "audit", "verify", "--db", str(db), "--json")
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["ok"] is True
    tail = install.run("authz", "audit", "tail", "--db", str(db))
    assert tail.returncode == 0, tail.stderr
    assert [json.loads(line)["decision_id"] for line in tail.stdout.splitlines()] == ["d-1"]
