"""The test session's order: a test marked ``runs_last`` runs after every other selected
test, whatever its file's name or its place on the command line (tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_no_secrets_scan_is_collected_after_every_other_e2e_test(repo_root: Path) -> None:
    # Named first on the command line, and alphabetically before test_operations.py.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/e2e/test_no_secrets.py",
            "tests/e2e/test_operations.py",
            "tests/e2e/test_attacks.py",
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    assert len(collected) > 2, result.stdout
    scans = [line for line in collected if line.startswith("tests/e2e/test_no_secrets.py::")]
    assert len(scans) >= 2, collected  # the response/log scan and the audit-row scan
    assert collected[-len(scans) :] == scans, collected
