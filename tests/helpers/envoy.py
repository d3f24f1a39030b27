"""Envoy's own check of a config: ``envoy --mode validate`` (Envoy's operations docs,
"Command line options": validate the config and exit without serving)."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["envoy_validate"]


def envoy_validate(envoy_bin: str, config: Path) -> subprocess.CompletedProcess[str]:
    """Run ``envoy --mode validate -c config`` (errors only in its log, 60 s at most) and
    return the finished process: ``returncode`` 0 when Envoy accepts the config, its
    reasons in ``stdout``/``stderr`` otherwise. Raises ``subprocess.TimeoutExpired``."""
    return subprocess.run(
        [envoy_bin, "--mode", "validate", "-c", str(config), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
