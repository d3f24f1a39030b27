"""``authz serve`` as a child process that is expected to stop on its own: the startup
refusals (a bad setting, a port in use, a corrupt file) end in exit 2 and one log line."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping

__all__ = ["serve_until_exit"]


def serve_until_exit(
    env: Mapping[str, str], *, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m authz serve`` with exactly ``env`` (the caller merges
    ``os.environ`` if it wants it) and wait for it to exit; returns the finished process
    with its stdout and stderr as text. Raises ``subprocess.TimeoutExpired`` after
    ``timeout_s`` seconds (the process kept serving)."""
    return subprocess.run(
        [sys.executable, "-m", "authz", "serve"],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
