"""Every repository path and module the docs name exists: a claim in README.md, docs/
and infra/README.md must be checkable from the repository (a moved or renamed file
cannot leave a stale pointer behind)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", ROOT / "infra/README.md", *(ROOT / "docs").glob("*.md")])
# A repository path in backticks: a top-level folder of the repository, then path
# characters; placeholders, globs and generated output (build/, .run/) are not claims.
_PATH = re.compile(
    r"`((?:authz|bench|docs|infra|policy|proto|scripts|tests)/[A-Za-z0-9_./-]*[A-Za-z0-9_])"
    r"(?::[^`]*)?`"
)
_MODULE = re.compile(r"`(?:python -m |[.\w/]*python -m )(authz(?:\.\w+)*)")
_DOTTED = re.compile(r"`(authz\.(?:core|runtime|tools|stack)(?:\.\w+)*)`")


# OPA decision paths (authz/gateway/decision) share the package's first segment.
_DECISION_PATH = re.compile(r"authz/(?!core/|runtime/|tools/|stack/)[a-z_]+/[a-z_]+$")


def _claims(pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        found += [
            (doc.relative_to(ROOT).as_posix(), m.group(1))
            for m in pattern.finditer(text)
            if not _DECISION_PATH.fullmatch(m.group(1))
        ]
    return sorted(set(found))


@pytest.mark.parametrize(("doc", "path"), _claims(_PATH), ids=lambda v: str(v))
def test_every_path_the_docs_name_exists(doc: str, path: str) -> None:
    assert (ROOT / path).exists(), f"{doc} names {path}, which is not in the repository"


@pytest.mark.parametrize(("doc", "module"), _claims(_MODULE), ids=lambda v: str(v))
def test_every_module_the_docs_run_exists(doc: str, module: str) -> None:
    # ``python -m X``: X itself must be a module (or package) of the repository.
    assert _is_module(module), f"{doc} runs python -m {module}, which is not a module"


@pytest.mark.parametrize(("doc", "module"), _claims(_DOTTED), ids=lambda v: str(v))
def test_every_module_the_docs_name_exists(doc: str, module: str) -> None:
    # A dotted name may end in an attribute (authz.core.input.build_input): the longest
    # importable prefix must be a module of the repository.
    parts = module.split(".")
    found = any(
        importlib.util.find_spec(".".join(parts[:n])) is not None
        for n in range(len(parts), 0, -1)
        if _is_module(".".join(parts[:n]))
    )
    assert found, f"{doc} names {module}, which is not a module of authz"


def _is_module(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


# A citation of a file outside the repository (the workspace's shared/ folder) cannot be
# checked by a reader of the repository; only the plugin's build location may be named.
_OUTSIDE = re.compile(r"(?<![./\w])shared/(?!peer\b)[\w./-]+")


def _tracked_text_files() -> list[Path]:
    suffixes = {".py", ".md", ".yaml", ".yml", ".rego", ".toml", ".json"}
    roots = ["authz", "bench", "docs", "infra", "policy", "proto", "scripts", "tests"]
    files = [ROOT / "README.md"]
    for root in roots:
        files += [p for p in (ROOT / root).rglob("*") if p.suffix in suffixes and p.is_file()]
    return files


def test_no_file_cites_a_file_outside_the_repository() -> None:
    found = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in _tracked_text_files()
        if path != Path(__file__).resolve()
        for match in _OUTSIDE.finditer(path.read_text(encoding="utf-8", errors="replace"))
    ]
    assert found == []
