"""Regal (the Rego linter, pinned in scripts/lib.sh) passes on the shipped Rego, and fails
on a finding it is configured to report (so the lint step in scripts/test can fail)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINTED = ("policy", "bench/peer", "infra/opa/system")


def _regal() -> str:
    path = os.environ.get("REGAL_BIN") or shutil.which("regal")
    if not path:
        pytest.fail(
            "regal not found: scripts/lib.sh exports REGAL_BIN (built by scripts/install-tools)"
        )
    return path


def _lint(root: Path, *paths: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_regal(), "lint", "--config-file", str(ROOT / ".regal/config.yaml"), *paths],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_shipped_rego_passes_regal() -> None:
    result = _lint(ROOT, *LINTED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_regal_rejects_a_fallback_else(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "policy", tmp_path / "policy")
    rego = tmp_path / "policy/lib/meta.rego"
    rego.write_text(
        rego.read_text(encoding="utf-8") + '\nfallback := "x" if {\n\tinput.never\n} else := "y"\n',
        encoding="utf-8",
    )
    result = _lint(tmp_path, "policy")
    assert result.returncode != 0
    assert "prefer-default-assignment" in result.stdout or "default" in result.stdout
