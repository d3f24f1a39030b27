"""The import contracts in pyproject.toml ([tool.importlinter]) hold, and can fail.

The folder listing is the architecture: ``authz.core`` (the decision pipeline) imports
nothing else of authz, ``authz.runtime`` imports the core only, ``authz.tools`` the core
and runtime, and only the local stack (``authz.stack``) may import everything. The second
test copies the package, adds one wrong import and shows that ``lint-imports`` refuses it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [LINT_IMPORTS, "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_import_contracts_are_kept() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "wrong_import"),
    [
        ("authz/core/errors.py", "import authz.runtime.config"),
        ("authz/runtime/metrics.py", "import authz.tools.cli"),
        ("authz/tools/cli.py", "import authz.stack.supervisor"),
    ],
    ids=["core-imports-runtime", "runtime-imports-tools", "tools-imports-stack"],
)
def test_a_wrong_import_breaks_the_contract(tmp_path: Path, module: str, wrong_import: str) -> None:
    shutil.copytree(
        ROOT / "authz", tmp_path / "authz", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text(encoding="utf-8") + f"\n{wrong_import}\n", encoding="utf-8")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert wrong_import.split()[-1].rsplit(".", 1)[0] in result.stdout
