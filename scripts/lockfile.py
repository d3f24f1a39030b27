"""The Python lock files under ``requirements/``: what each locks, and checks on them.

Three locks, each a universal, hash-pinned requirements file written by ``uv pip compile
--universal --generate-hashes`` (https://docs.astral.sh/uv/pip/compile/) through
``scripts/lock``, and installed with ``pip install --require-hashes``
(https://pip.pypa.io/en/stable/topics/secure-installs/):

- ``runtime``: ``[project].dependencies``, what the image's venv holds (Dockerfile);
- ``dev``: those plus the ``dev`` extra and ``[build-system].requires``, the venv of
  ``scripts/install-deps`` (the project itself then installed with ``--no-deps
  --no-build-isolation``);
- ``build``: ``[build-system].requires`` and the SBOM generator (the ``dev`` extra's
  ``cyclonedx-bom`` pin), the image's build-stage tools.

Each lock begins with one ``# input: <requirement>`` line per requirement it was compiled
from, so a lock that no longer matches ``pyproject.toml`` is found without a resolver.

Command line (stdlib + ``packaging``)::

    python scripts/lockfile.py inputs KIND          # the requirements KIND locks
    python scripts/lockfile.py stamp KIND LOCKFILE  # prepend the "# input:" lines
    python scripts/lockfile.py check                # every lock matches pyproject.toml
    python scripts/lockfile.py installed PYTHON LOCKFILE
        # PYTHON's environment holds exactly the lock's packages for that interpreter

Exit status 0 when fine, 1 with one line per difference.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT: Final = Path(__file__).resolve().parents[1]
KINDS: Final = ("dev", "runtime", "build")
LOCK_DIR: Final = ROOT / "requirements"
INPUT_PREFIX: Final = "# input: "
# The build stage's SBOM generator, pinned once in the dev extra.
SBOM_TOOL: Final = "cyclonedx-bom"
# Not part of an environment's locked set: the project itself, and the installer that
# `python -m venv` puts in every venv (pip; setuptools too before Python 3.12) unless the
# lock pins it.
UNLOCKED: Final = frozenset({"authz", "pip", "setuptools"})

__all__ = [
    "KINDS",
    "Locked",
    "environment_of",
    "inputs",
    "installed_differences",
    "installed_of",
    "lock_differences",
    "lock_path",
    "parse_lock",
]


@dataclass(frozen=True, slots=True)
class Locked:
    """One pinned requirement of a lock file: canonical ``name``, exact ``version``, the
    environment ``marker`` it applies under (None: always) and its ``sha256`` hashes."""

    name: str
    version: Version
    marker: Marker | None
    hashes: tuple[str, ...]

    def applies(self, environment: dict[str, str]) -> bool:
        """Whether this pin is installed in ``environment`` (PEP 508 marker values)."""
        return self.marker is None or self.marker.evaluate(environment)


def lock_path(kind: str) -> Path:
    """``requirements/<kind>.txt``."""
    return LOCK_DIR / f"{kind}.txt"


def inputs(kind: str, pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The requirement strings lock ``kind`` is compiled from, in pyproject's order.
    Raises KeyError for an unknown kind, ValueError when the dev extra lacks the SBOM
    tool (the ``build`` lock takes its pin from there)."""
    data: dict[str, Any] = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    runtime = list(data["project"]["dependencies"])
    dev = list(data["project"]["optional-dependencies"]["dev"])
    build = list(data["build-system"]["requires"])
    if kind == "runtime":
        return runtime
    if kind == "dev":
        return runtime + dev + build
    if kind == "build":
        tool = [r for r in dev if canonicalize_name(Requirement(r).name) == SBOM_TOOL]
        if not tool:
            raise ValueError(f"pyproject.toml: the dev extra has no {SBOM_TOOL}")
        return build + tool
    raise KeyError(kind)


def parse_lock(text: str) -> tuple[list[str], list[Locked]]:
    """(the ``# input:`` lines, the pins) of a requirements file in pip's format with
    ``--hash`` options on continuation lines. Raises ValueError naming the line for a pin
    that is not ``name==version``."""
    recorded = [
        line.removeprefix(INPUT_PREFIX).strip()
        for line in text.splitlines()
        if line.startswith(INPUT_PREFIX)
    ]
    logical = re.sub(r"\\\n", " ", text)
    pins = []
    for number, line in enumerate(logical.splitlines(), 1):
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        hashes = tuple(re.findall(r"--hash=sha256:([0-9a-f]{64})", line))
        requirement = Requirement(re.sub(r"\s*--hash=\S+", "", line).strip())
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==":
            raise ValueError(f"line {number}: not pinned with ==: {line[:80]}")
        version = Version(specifiers[0].version)
        pins.append(
            Locked(canonicalize_name(requirement.name), version, requirement.marker, hashes)
        )
    return recorded, pins


def lock_differences(kind: str, pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """What is wrong with lock ``kind`` against ``pyproject``: its recorded inputs differ
    from pyproject's (relock with ``scripts/lock``), an input has no pin or a pin outside
    its range, or a pin has no hash. Empty when it matches."""
    path = lock_path(kind)
    if not path.is_file():
        return [f"{path.name}: missing (run scripts/lock)"]
    recorded, pins = parse_lock(path.read_text(encoding="utf-8"))
    wanted = inputs(kind, pyproject)
    problems = [
        f"{path.name}: pyproject requires {r!r}, not locked" for r in wanted if r not in recorded
    ]
    problems += [
        f"{path.name}: locked {r!r}, no longer in pyproject" for r in recorded if r not in wanted
    ]
    by_name: dict[str, list[Locked]] = {}
    for pin in pins:
        by_name.setdefault(pin.name, []).append(pin)
    for text in wanted:
        requirement = Requirement(text)
        found = by_name.get(canonicalize_name(requirement.name), [])
        if not found:
            problems.append(f"{path.name}: no pin for {text!r}")
        for pin in found:
            if not requirement.specifier.contains(pin.version, prereleases=True):
                problems.append(f"{path.name}: {pin.name}=={pin.version} outside {text!r}")
    problems += [
        f"{path.name}: {p.name}=={p.version} has no sha256 hash" for p in pins if not p.hashes
    ]
    return problems


_PROBE: Final = """
import importlib.metadata as m, json, os, platform, sys
impl = sys.implementation
version = "{0.major}.{0.minor}.{0.micro}".format(impl.version)
if impl.version.releaselevel != "final":
    version += impl.version.releaselevel[0] + str(impl.version.serial)
environment = {
    "implementation_name": impl.name,
    "implementation_version": version,
    "os_name": os.name,
    "platform_machine": platform.machine(),
    "platform_release": platform.release(),
    "platform_system": platform.system(),
    "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]),
    "sys_platform": sys.platform,
}
installed = {d.metadata["Name"]: d.version for d in m.distributions()}
print(json.dumps({"environment": environment, "installed": installed}))
"""


def _probe(python: Path) -> dict[str, Any]:
    result = subprocess.run(
        [str(python), "-I", "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    probed: dict[str, Any] = json.loads(result.stdout)
    return probed


def environment_of(python: Path) -> dict[str, str]:
    """PEP 508 marker values of the interpreter ``python`` (packaging's
    ``default_environment``, computed by that interpreter with the stdlib only)."""
    environment: dict[str, str] = _probe(python)["environment"]
    return environment


def installed_of(python: Path) -> dict[str, str]:
    """Canonical name -> version of every distribution ``python`` can import."""
    return {canonicalize_name(k): v for k, v in _probe(python)["installed"].items()}


def installed_differences(python: Path, lock: Path) -> list[str]:
    """How ``python``'s environment differs from the pins of ``lock`` that apply to it
    (pip and the project itself aside). Empty when it holds exactly the locked set."""
    probed = _probe(python)
    environment: dict[str, str] = probed["environment"]
    installed: dict[str, Version] = {
        canonicalize_name(k): Version(v) for k, v in probed["installed"].items()
    }
    _, pins = parse_lock(lock.read_text(encoding="utf-8"))
    expected: dict[str, Version] = {p.name: p.version for p in pins if p.applies(environment)}
    problems = [
        f"{name}: locked {version}, installed {installed.get(name) or 'nothing'}"
        for name, version in sorted(expected.items())
        if installed.get(name) != version
    ]
    problems += [
        f"{name}=={version}: installed, not in {lock.name}"
        for name, version in sorted(installed.items())
        if name not in expected and name not in UNLOCKED
    ]
    return problems


def _stamp(kind: str, path: Path) -> None:
    header = [
        f"# authz {kind} lock: regenerate with scripts/lock; checked by tests/infra/test_lock.py.",
        *(f"{INPUT_PREFIX}{r}" for r in inputs(kind)),
    ]
    body = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if not line.startswith(INPUT_PREFIX)
    ]
    body = [line for line in body if not line.startswith(f"# authz {kind} lock:")]
    path.write_text("\n".join(header + body) + "\n", encoding="utf-8")


def main(argv: list[str]) -> int:
    """The command line (module docstring); returns the exit status."""
    match argv:
        case ["inputs", kind]:
            print("\n".join(inputs(kind)))
            return 0
        case ["stamp", kind, path]:
            _stamp(kind, Path(path))
            return 0
        case ["check"]:
            problems = [p for kind in KINDS for p in lock_differences(kind)]
        case ["installed", python, lock]:
            problems = installed_differences(Path(python), Path(lock))
        case _:
            print(__doc__, file=sys.stderr)
            return 2
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
