"""End-to-end fixtures: real OPA + authz + Envoy + upstream processes on free ports.

Keys are generated at test time (never committed): a bundle is built with them by
``scripts/build-policy-bundle --data <tmp overlay>`` into a temporary bundle directory
that the stack's bundle server serves to OPA.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from authz.keys import digest, generate_key
from authz.stack.supervisor import Ports, Stack

pytestmark = pytest.mark.e2e

# name -> (key id, role, tier, enabled, expires_at)
KEY_SPECS = {
    "admin": ("key-admin", "admin", "premium", True, None),
    "user": ("key-user", "user", "standard", True, None),
    "viewer": ("key-viewer", "viewer", "default", True, None),
    "disabled": ("key-disabled", "user", "default", False, None),
    "expired": ("key-expired", "user", "default", True, "2024-01-01T00:00:00Z"),
    "revocable": ("key-revocable", "user", "default", True, None),
}


@dataclass
class Env:
    """A running stack with its keys and a client for the gateway."""

    stack: Stack
    keys: dict[str, str]
    overlay: Path
    bundle_dir: Path
    gateway: httpx.Client

    def write_keys(self, disabled: frozenset[str] = frozenset()) -> None:
        """Write the API-key data overlay (names in ``disabled`` get enabled=false)."""
        entries = {}
        for name, (key_id, role, tier, enabled, expires_at) in KEY_SPECS.items():
            entry = {
                "id": key_id,
                "enabled": enabled and name not in disabled,
                "role": role,
                "rate_limit_tier": tier,
            }
            if expires_at:
                entry["expires_at"] = expires_at
            entries[digest(self.keys[name])] = entry
        target = self.overlay / "gateway/api_keys/data.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(entries), encoding="utf-8")

    def build_bundle(self, root: Path) -> str:
        """Run scripts/build-policy-bundle with the overlay; returns the revision."""
        result = subprocess.run(
            [
                str(root / "scripts/build-policy-bundle"),
                "--data",
                str(self.overlay),
                "--out",
                str(self.bundle_dir),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def e2e(
    repo_root: Path, tmp_path_factory: pytest.TempPathFactory, opa_bin: str, envoy_bin: str
) -> Iterator[Env]:
    """The whole gateway stack, started once for the session."""
    base = tmp_path_factory.mktemp("e2e")
    keys = {name: generate_key() for name in KEY_SPECS}
    ports = Ports.free()
    stack = Stack(repo_root, base / "run", base / "bundles", ports)
    env = Env(
        stack,
        keys,
        base / "overlay",
        base / "bundles",
        httpx.Client(base_url=f"http://127.0.0.1:{ports.gateway}", timeout=5.0),
    )
    env.write_keys()
    env.build_bundle(repo_root)
    with stack:
        yield env
    env.gateway.close()
