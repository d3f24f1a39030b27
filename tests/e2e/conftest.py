"""End-to-end fixtures: real OPA + authz + Envoy (gateway and egress) + upstream + the
HTTPS egress stand-in, as processes on free ports.

Keys, sandbox tokens and egress secrets are generated at test time (never committed): a
bundle is built with the key and sandbox digests by ``scripts/build-policy-bundle --data
<tmp overlay>`` into a temporary bundle directory that the stack's bundle server serves
to OPA; the secrets file is written with ``authz.secrets.write_secrets_file``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from authz.keys import SANDBOX_TOKEN_PREFIX, digest, generate_key
from authz.secrets import write_secrets_file
from authz.stack.supervisor import Ports, Stack

pytestmark = pytest.mark.e2e

# name -> (key id, role, tier, enabled, expires_at)
# Keys used by many tests sit on generous tiers; "limited" and "limited-2" exist for the
# rate-limit tests.
KEY_SPECS = {
    "admin": ("key-admin", "admin", "premium", True, None),
    "user": ("key-user", "user", "unlimited", True, None),
    "viewer": ("key-viewer", "viewer", "unlimited", True, None),
    "disabled": ("key-disabled", "user", "default", False, None),
    "expired": ("key-expired", "user", "default", True, "2024-01-01T00:00:00Z"),
    "revocable": ("key-revocable", "user", "premium", True, None),
    "limited": ("key-limited", "viewer", "default", True, None),
    "limited-2": ("key-limited-2", "viewer", "default", True, None),
}
# The stack runs with a full minute of burst, so a tier of L per minute admits exactly L
# requests at once (the default, 10 s worth, is smoother but harder to count).
BURST_S = "60"
# sandbox id -> (tier, enabled)
SANDBOX_SPECS = {
    "sb-default": ("default", True),
    "sb-restricted": ("restricted", True),
    "sb-standard": ("standard", True),
    "sb-premium": ("premium", True),
    "sb-admin": ("admin", True),
    "sb-disabled": ("admin", False),
    "sb-limited": ("standard", True),
}
SERVICES = ("httpbin", "openai", "anthropic", "github", "slack")


@dataclass
class Env:
    """A running stack with its keys, sandbox tokens, egress secrets and clients."""

    stack: Stack
    keys: dict[str, str]
    tokens: dict[str, str]
    secrets: dict[str, str]
    secrets_file: Path
    overlay: Path
    bundle_dir: Path
    gateway: httpx.Client
    egress: httpx.Client

    def write_secrets(self, secrets: dict[str, str] | None = None) -> None:
        """(Re)write the egress secrets file; bumps mtime so authz sees the change."""
        write_secrets_file(self.secrets_file, self.secrets if secrets is None else secrets)

    def sandbox_headers(self, sandbox: str, service: str) -> dict[str, str]:
        """Headers a sandbox sends to call ``service`` through the egress proxy."""
        return {"host": service, "x-sandbox-id": sandbox, "x-sandbox-token": self.tokens[sandbox]}

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
        sandboxes = {
            sandbox: {
                "tier": tier,
                "enabled": enabled,
                "token_sha256": digest(self.tokens[sandbox]),
            }
            for sandbox, (tier, enabled) in SANDBOX_SPECS.items()
        }
        target = self.overlay / "egress/sandboxes/data.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(sandboxes), encoding="utf-8")

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
    ports = Ports.free()
    secrets_file = base / "secrets/egress.json"
    stack = Stack(
        repo_root,
        base / "run",
        base / "bundles",
        ports,
        secrets_file=secrets_file,
        authz_env={"AUTHZ_RATE_LIMIT_BURST_S": BURST_S},
    )
    env = Env(
        stack,
        keys={name: generate_key() for name in KEY_SPECS},
        tokens={sandbox: generate_key(SANDBOX_TOKEN_PREFIX) for sandbox in SANDBOX_SPECS},
        secrets={service: f"{service}-{generate_key('secret_')}" for service in SERVICES},
        secrets_file=secrets_file,
        overlay=base / "overlay",
        bundle_dir=base / "bundles",
        gateway=httpx.Client(base_url=f"http://127.0.0.1:{ports.gateway}", timeout=5.0),
        egress=httpx.Client(base_url=f"http://127.0.0.1:{ports.egress}", timeout=5.0),
    )
    env.write_keys()
    env.write_secrets()
    env.build_bundle(repo_root)
    with stack:
        yield env
    env.gateway.close()
    env.egress.close()
