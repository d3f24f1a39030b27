"""The egress Envoy generator's output is accepted by a real Envoy (``envoy --mode
validate``) in every variant the generator can produce."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from authz.stack.envoy import relocate_tls
from authz.stack.tls import DEPLOYMENT_LEAVES, ensure_pki
from authz.tools import egress_envoy
from authz.tools.egress_envoy import generate
from tests.helpers.egress import intercept_certificates, real_services, svc
from tests.helpers.envoy import envoy_validate


def test_generated_variants_pass_envoy_validation(envoy_bin: str, tmp_path: Path) -> None:
    """Overrides (STATIC), http, path prefixes and a custom CA are valid Envoy configs too
    (tests/infra validates only the committed file)."""
    ca = tmp_path / "ca.pem"
    shutil.copy(egress_envoy.DEFAULT_CA_FILE, ca)
    services = {
        **real_services(),
        "plain": svc("http://internal.example:8080/api", credential=False),
        "prefixed": svc("https://prefixed.example/v2"),
    }
    config = generate(
        services,
        listen_port=18443,
        admin_port=19902,
        ca_file=str(ca),
        overrides={"api.openai.com": ("127.0.0.1", 9443), "internal.example": ("127.0.0.1", 1)},
    )
    # The mTLS files to authz must exist: issue them and point the config at them.
    ensure_pki(tmp_path / "tls", DEPLOYMENT_LEAVES)
    intercept_certificates(tmp_path / "tls", services)
    relocate_tls(config, tmp_path / "tls")
    # The tunnel-end gRPC access log (to authz) is part of what Envoy validates.
    [egress] = [
        listener
        for listener in config["static_resources"]["listeners"]
        if listener["name"] == "egress"
    ]
    hcm = egress["filter_chains"][0]["filters"][0]["typed_config"]
    assert "envoy.access_loggers.http_grpc" in [log["name"] for log in hcm["access_log"]]
    path = tmp_path / "envoy-variant.yaml"
    path.write_text(yaml.safe_dump(config))
    result = envoy_validate(envoy_bin, path)
    assert result.returncode == 0, result.stdout + result.stderr
