"""The Python lock files (``requirements/*.txt``, written by ``scripts/lock``, checked by
``scripts/lockfile.py``): each matches ``pyproject.toml`` and fails to as soon as a
dependency changes without a relock; every pin is exact and hashed; a package has one
version across the locks; ``scripts/lock`` regenerates exactly the committed files; and
the image's build stage, run here command for command, installs exactly the runtime lock
and writes an SBOM of that set.

The last two reach the package index (uv's resolution, pip's downloads; pip's cache makes
a rerun quicker), as ``test_production_install`` does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.helpers.infra import ROOT


def _load_lockfile() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lockfile", ROOT / "scripts/lockfile.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lockfile"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


lockfile = _load_lockfile()
# The image's build stage downloads the runtime wheels (about a minute on a cold pip cache);
# pytest-timeout counts the module fixture's setup in the first test that uses it.
SLOW = pytest.mark.timeout(900)
KINDS: tuple[str, ...] = lockfile.KINDS
VENV_BIN = Path(sys.executable).parent


def _pins(kind: str) -> list[Any]:
    _, pins = lockfile.parse_lock(lockfile.lock_path(kind).read_text(encoding="utf-8"))
    return list(pins)


# -- the locks against pyproject.toml --------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_lock_matches_pyproject(kind: str) -> None:
    """Every requirement pyproject.toml gives this lock is recorded and pinned inside its
    range, nothing else is recorded, and every pin has a sha256 hash."""
    assert lockfile.lock_differences(kind) == []


def _edit(data: dict[str, Any], table: str, change: Callable[[list[str]], list[str]]) -> None:
    if table == "runtime":
        data["project"]["dependencies"] = change(data["project"]["dependencies"])
    elif table == "dev":
        extras = data["project"]["optional-dependencies"]
        extras["dev"] = change(extras["dev"])
    else:
        data["build-system"]["requires"] = change(data["build-system"]["requires"])


def _toml(data: dict[str, Any]) -> str:
    # Only the tables lockfile.inputs reads, as TOML (string arrays need nothing more).
    def array(items: list[str]) -> str:
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"

    return (
        f"[build-system]\nrequires = {array(data['build-system']['requires'])}\n"
        f"[project]\ndependencies = {array(data['project']['dependencies'])}\n"
        f"[project.optional-dependencies]\n"
        f"dev = {array(data['project']['optional-dependencies']['dev'])}\n"
    )


CHANGES: dict[str, tuple[str, Callable[[list[str]], list[str]], set[str]]] = {
    "runtime-added": ("runtime", lambda r: [*r, "leftpad>=1"], {"runtime", "dev"}),
    "runtime-removed": (
        "runtime",
        lambda r: [x for x in r if not x.startswith("pyyaml")],
        {"runtime", "dev"},
    ),
    "runtime-narrowed": (
        "runtime",
        lambda r: ["orjson>=3.10,<3.11" if x.startswith("orjson") else x for x in r],
        {"runtime", "dev"},
    ),
    "dev-added": ("dev", lambda r: [*r, "leftpad>=1"], {"dev"}),
    "sbom-tool-moved": (
        "dev",
        lambda r: ["cyclonedx-bom==7.4.0" if x.startswith("cyclonedx-bom") else x for x in r],
        {"dev", "build"},
    ),
    "build-backend-added": ("build", lambda r: [*r, "hatchling"], {"dev", "build"}),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_a_pyproject_change_without_relock_is_found(
    tmp_path: Path, change: tuple[str, Callable[[list[str]], list[str]], set[str]]
) -> None:
    table, edit, stale = change
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    _edit(data, table, edit)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(_toml(data), encoding="utf-8")
    found = {kind for kind in KINDS if lockfile.lock_differences(kind, pyproject)}
    assert found == stale


@pytest.mark.parametrize(
    "line",
    ["leftpad>=1 --hash=sha256:" + "0" * 64, "leftpad --hash=sha256:" + "0" * 64],
    ids=["range", "bare"],
)
def test_a_pin_that_is_not_exact_is_refused(line: str) -> None:
    with pytest.raises(ValueError, match="not pinned"):
        lockfile.parse_lock(line + "\n")


def test_an_unhashed_pin_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = lockfile.lock_path("runtime").read_text(encoding="utf-8")
    unhashed = re.sub(r"(?m)^(orjson==[^ ]+) \\\n(?:\s+--hash=\S+(?: \\)?\n)+", r"\1\n", text)
    assert unhashed != text
    (tmp_path / "runtime.txt").write_text(unhashed, encoding="utf-8")
    monkeypatch.setattr(lockfile, "LOCK_DIR", tmp_path)
    assert [p for p in lockfile.lock_differences("runtime") if "no sha256" in p] == [
        f"runtime.txt: orjson=={next(p.version for p in _pins('runtime') if p.name == 'orjson')}"
        " has no sha256 hash"
    ]


@pytest.mark.parametrize("kind", ["runtime", "build"])
def test_a_package_has_one_version_across_the_locks(kind: str) -> None:
    """runtime and build are resolved under the dev lock's versions (scripts/lock), so
    the image and the developers' venv run the same code."""
    dev = {(p.name, p.version) for p in _pins("dev")}
    assert {(p.name, p.version) for p in _pins(kind)} - dev == set()


def test_every_supported_python_gets_a_complete_runtime_set() -> None:
    """The universal lock has, for each Python the project supports (3.11 up to the
    newest tested), exactly one pin of each package that applies."""
    for minor in (11, 12, 13):
        environment = {
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
            "python_full_version": f"3.{minor}.0",
            "python_version": f"3.{minor}",
            "sys_platform": "linux",
        }
        applying = [p.name for p in _pins("dev") if p.applies(environment)]
        assert len(applying) == len(set(applying)), minor
        assert {"grpcio", "xds-protos", "opentelemetry-proto", "numpy"} <= set(applying)


# -- scripts/lock regenerates the committed files -------------------------------------


@SLOW
def test_scripts_lock_regenerates_the_committed_locks(tmp_path: Path) -> None:
    """Run in a copy of the checkout: its output is byte for byte the committed locks
    (no hand edits, and the resolution is stable with the locked versions preferred)."""
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    shutil.copytree(ROOT / "requirements", copy / "requirements")
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    env = {**os.environ, "AUTHZ_VENV": str(VENV_BIN.parent)}
    result = subprocess.run(
        [str(copy / "scripts/lock")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for kind in KINDS:
        regenerated = (copy / f"requirements/{kind}.txt").read_text(encoding="utf-8")
        assert regenerated == lockfile.lock_path(kind).read_text(encoding="utf-8"), kind


# -- the image's build stage, run here -------------------------------------------------


def _build_stage() -> list[str]:
    """The Dockerfile's build-stage instructions, continuations joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text(encoding="utf-8"))
    stage: list[str] = []
    inside = False
    for line in (raw.strip() for raw in text.splitlines()):
        if line.startswith("FROM "):
            if inside:
                break
            inside = line.endswith(" AS build")
            continue
        if inside and line and not line.startswith("#"):
            stage.append(line)
    return stage


@dataclass(frozen=True)
class Image:
    """What the build stage left: the image's venv and its SBOM."""

    venv: Path
    sbom: dict[str, Any]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """The build stage's ENV, WORKDIR, COPY and RUN, with /opt, /src and /tmp/wheels moved
    under a temporary directory and ``python`` the interpreter running the tests (the
    image's is 3.11 too). The pip cache stays on (PIP_NO_CACHE_DIR only slims layers)."""
    base = tmp_path_factory.mktemp("image")
    moved = {"/opt/": f"{base}/opt/", "/src": f"{base}/src", "/tmp/wheels": f"{base}/wheels"}
    python = str(Path(sys.base_prefix) / "bin" / "python3")

    def move(text: str) -> str:
        for old, new in moved.items():
            text = text.replace(old, new)
        return text

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_NO_CACHE_DIR")
    }
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    workdir = base
    for instruction in _build_stage():
        keyword, _, rest = instruction.partition(" ")
        if keyword == "ENV":
            for name, value in (pair.split("=", 1) for pair in shlex.split(rest)):
                if name != "PIP_NO_CACHE_DIR":
                    env[name] = value
        elif keyword == "WORKDIR":
            workdir = Path(move(rest))
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, dest = rest.split()
            target = workdir / dest
            for source in sources:
                path = ROOT / source
                if path.is_dir():
                    shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, target / path.name)
        elif keyword == "RUN":
            command = move(rest).replace("python -m venv", f"{python} -m venv")
            result = subprocess.run(
                ["sh", "-c", command],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
            assert result.returncode == 0, f"{instruction}\n{result.stdout}\n{result.stderr}"
        else:
            pytest.fail(f"the build stage gained an instruction this test cannot run: {keyword}")
    venv = base / "opt/authz"
    return Image(venv, json.loads((venv / "sbom.cdx.json").read_text(encoding="utf-8")))


@SLOW
def test_the_image_holds_exactly_the_runtime_lock(image: Image) -> None:
    """A fresh build from the lock reproduces the locked set: every pin that applies, at
    its version, and nothing else but authz (pip and setuptools are uninstalled)."""
    python = image.venv / "bin/python"
    assert lockfile.installed_differences(python, lockfile.lock_path("runtime")) == []
    installed = lockfile.installed_of(python)
    assert installed["authz"] == "0.1.0"
    assert "pip" not in installed
    assert "setuptools" not in installed
    # opentelemetry-proto's own files won over xds-protos' older copy.
    subprocess.run(
        [
            str(python),
            "-I",
            "-c",
            "from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope",
        ],
        check=True,
        timeout=60,
    )


@SLOW
def test_the_images_sbom_lists_exactly_what_it_holds(image: Image) -> None:
    sbom = image.sbom
    assert (sbom["bomFormat"], sbom["specVersion"]) == ("CycloneDX", "1.6")
    assert sbom["metadata"]["component"]["name"] == "authz"
    assert "serialNumber" not in sbom  # reproducible
    listed = {lockfile.canonicalize_name(c["name"]): c["version"] for c in sbom["components"]}
    installed = lockfile.installed_of(image.venv / "bin/python")
    installed.pop("authz")
    assert listed == installed
    for component in sbom["components"]:
        # https://github.com/package-url/purl-spec (pypi: lowercase, "_" as "-")
        name = component["name"].lower().replace("_", "-")
        assert component["purl"] == f"pkg:pypi/{name}@{component['version']}"


@SLOW
def test_scripts_sbom_writes_the_images_sbom(image: Image, tmp_path: Path) -> None:
    """scripts/sbom runs the build stage's command: the same bytes for the same venv."""
    out = tmp_path / "sbom.cdx.json"
    env = {**os.environ, "AUTHZ_VENV": str(VENV_BIN.parent)}
    subprocess.run(
        [str(ROOT / "scripts/sbom"), str(image.venv / "bin/python"), str(out)],
        env=env,
        capture_output=True,
        check=True,
        timeout=300,
    )
    assert json.loads(out.read_text(encoding="utf-8")) == image.sbom
