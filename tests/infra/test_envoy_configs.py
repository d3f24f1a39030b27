"""Every Envoy config in the repository passes ``envoy --mode validate``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "infra").rglob("envoy*.yaml"))


def test_configs_exist() -> None:
    assert ROOT / "infra/envoy/envoy-gateway.yaml" in CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_envoy_validates(config: Path, envoy_bin: str) -> None:
    result = subprocess.run(
        [envoy_bin, "--mode", "validate", "-c", str(config), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_broken_config_is_rejected(envoy_bin: str, tmp_path: Path) -> None:
    """The validation above can fail: a config with an unknown field is refused."""
    broken = tmp_path / "envoy-broken.yaml"
    text = (ROOT / "infra/envoy/envoy-gateway.yaml").read_text()
    broken.write_text(text.replace("failure_mode_allow: false", "failure_mode_allowed: false"))
    result = subprocess.run(
        [envoy_bin, "--mode", "validate", "-c", str(broken), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
