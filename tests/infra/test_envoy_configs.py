"""Every Envoy config in the repository passes ``envoy --mode validate`` (with its TLS
files issued for the test: Envoy reads them while validating), and every one reaches authz
over mTLS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.stack.envoy import relocate_tls
from tests.helpers.envoy import envoy_validate
from tests.helpers.infra import deployment_tls

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "infra").rglob("envoy*.yaml"))


def test_configs_exist() -> None:
    assert ROOT / "infra/envoy/envoy-gateway.yaml" in CONFIGS


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return deployment_tls(tmp_path_factory.mktemp("tls"))


def _with_test_tls(config: Path, tls_dir: Path, out: Path) -> Path:
    out.write_text(
        yaml.safe_dump(relocate_tls(yaml.safe_load(config.read_text()), tls_dir)),
        encoding="utf-8",
    )
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_envoy_validates(config: Path, envoy_bin: str, tls_dir: Path, tmp_path: Path) -> None:
    rendered = _with_test_tls(config, tls_dir, tmp_path / config.name)
    result = envoy_validate(envoy_bin, rendered)
    assert result.returncode == 0, result.stdout + result.stderr


def _ext_authz_clusters(config: Any) -> set[str]:
    """The cluster names of every ext_authz filter in the config."""
    found: set[str] = set()
    if isinstance(config, dict):
        if config.get("name") == "envoy.filters.http.ext_authz" and "typed_config" in config:
            found.add(config["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"])
        for value in config.values():
            found |= _ext_authz_clusters(value)
    elif isinstance(config, list):
        for item in config:
            found |= _ext_authz_clusters(item)
    return found


def _assert_mtls_to_authz(loaded: dict[str, Any]) -> None:
    clusters = {c["name"]: c for c in loaded["static_resources"]["clusters"]}
    names = _ext_authz_clusters(loaded)
    assert names == {"authz"}
    for name in names:
        socket = clusters[name].get("transport_socket")
        assert socket is not None, f"cluster {name!r} is plaintext"
        assert socket["name"] == "envoy.transport_sockets.tls"
        context = socket["typed_config"]
        assert context["@type"].endswith("tls.v3.UpstreamTlsContext")
        assert context["sni"] == "authz"
        common = context["common_tls_context"]
        (certificate,) = common["tls_certificates"]
        assert certificate["certificate_chain"]["filename"].endswith("/tls.crt")
        assert certificate["private_key"]["filename"].endswith("/tls.key")
        validation = common["validation_context"]
        assert validation["trusted_ca"]["filename"].endswith("/ca.crt")
        assert validation["match_typed_subject_alt_names"] == [
            {"san_type": "DNS", "matcher": {"exact": "authz"}}
        ]


@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_every_envoy_config_reaches_authz_over_mtls(config: Path) -> None:
    """Every raw API key and sandbox token goes to authz, every injected credential comes
    back: each ext_authz cluster is TLS, presents Envoy's client certificate, and accepts
    authz only with a certificate from the mounted CA carrying the SAN "authz"."""
    _assert_mtls_to_authz(yaml.safe_load(config.read_text(encoding="utf-8")))


@pytest.mark.parametrize(
    "change",
    ["transport_socket", "tls_certificates", "match_typed_subject_alt_names"],
)
def test_the_mtls_check_can_fail(change: str) -> None:
    """A gateway config without the TLS, the client certificate or the SAN check fails."""
    config = yaml.safe_load((ROOT / "infra/envoy/envoy-gateway.yaml").read_text())
    (authz,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "authz"]
    common = authz["transport_socket"]["typed_config"]["common_tls_context"]
    {
        "transport_socket": authz,
        "tls_certificates": common,
        "match_typed_subject_alt_names": common["validation_context"],
    }[change].pop(change)
    with pytest.raises((AssertionError, KeyError, ValueError)):
        _assert_mtls_to_authz(config)


def test_broken_config_is_rejected(envoy_bin: str, tls_dir: Path, tmp_path: Path) -> None:
    """The validation above can fail: a config with an unknown field is refused."""
    broken = tmp_path / "envoy-broken.yaml"
    text = (ROOT / "infra/envoy/envoy-gateway.yaml").read_text()
    broken.write_text(text.replace("failure_mode_allow: false", "failure_mode_allowed: false"))
    _with_test_tls(broken, tls_dir, broken)
    result = envoy_validate(envoy_bin, broken)
    assert result.returncode != 0
