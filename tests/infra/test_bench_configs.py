"""The benchmark's generated Envoy configs validate, and its peer shim passes its Rego
tests next to the policy (so a policy change that breaks the benchmark fails here)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.stack.supervisor import STACK_LEAVES
from authz.stack.tls import ensure_pki
from bench.rig import gateway_config, upstream_config
from tests.helpers.envoy import envoy_validate

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = ROOT / "infra/envoy/envoy-gateway.yaml"

CONFIGS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "limit": lambda _: gateway_config(
        GATEWAY, port=1, admin_port=2, upstream_port=3, authz_port=None
    ),
    "ext_authz-mtls": lambda tmp: gateway_config(
        GATEWAY, port=1, admin_port=2, upstream_port=3, authz_port=4, tls_dir=tmp / "mtls"
    ),
    "ext_authz-plaintext-peer": lambda _: gateway_config(
        GATEWAY, port=1, admin_port=2, upstream_port=3, authz_port=4
    ),
    "upstream": lambda _: upstream_config(1, 2),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bench_envoy_config_validates(name: str, envoy_bin: str, tmp_path: Path) -> None:
    ensure_pki(tmp_path / "mtls", STACK_LEAVES)
    config: dict[str, Any] = CONFIGS[name](tmp_path)
    clusters = {c["name"]: c for c in config["static_resources"].get("clusters", [])}
    if "authz" in clusters:  # mTLS to authz exactly when the setup is authz's
        assert ("transport_socket" in clusters["authz"]) == name.endswith("-mtls")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    result = envoy_validate(envoy_bin, path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_peer_shim_passes_its_tests(opa_bin: str) -> None:
    for argv in (
        [opa_bin, "check", "--strict", "policy", "bench/peer"],
        [opa_bin, "test", "policy", "bench/peer"],
    ):
        result = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
    fmt = subprocess.run(
        [opa_bin, "fmt", "--list", "bench/peer"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert fmt.stdout.strip() == "", f"Rego not formatted (opa fmt -w bench/peer): {fmt.stdout}"
