"""The benchmark's generated Envoy configs validate, its peer shim passes its Rego tests
next to the policy (so a policy change that breaks the benchmark fails here), and its
null ext_authz server (bench/ceiling, built by scripts/install-tools) answers OK."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authz.stack.supervisor import STACK_LEAVES, Process, free_port
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


@pytest.fixture(scope="module")
def ceiling_bin() -> str:
    """bench/ceiling built (scripts/install-tools), at $CEILING_BIN of scripts/lib.sh."""
    path = (
        os.environ.get("BENCH_CEILING_BIN")
        or subprocess.run(
            ["bash", "-c", f'source "{ROOT}/scripts/lib.sh"; printf %s "$CEILING_BIN"'],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} missing: run ./scripts/install-deps (scripts/install-tools)")
    return path


def test_ceiling_server_answers_every_check_ok(ceiling_bin: str, tmp_path: Path) -> None:
    port = free_port()
    server = Process(
        "ceiling", [ceiling_bin, f"-addr=127.0.0.1:{port}"], tmp_path / "ceiling.log", lambda: True
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
            check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
            for headers in ({}, {"x-api-key": "ak_unknown"}, {"authorization": "Bearer x"}):
                request = external_auth_pb2.CheckRequest()
                request.attributes.request.http.method = "GET"
                request.attributes.request.http.path = "/api/v1/admin"
                request.attributes.request.http.headers.update(headers)
                answer = check(request, timeout=5)
                assert answer.status.code == grpc.StatusCode.OK.value[0]
                assert answer.WhichOneof("http_response") == "ok_response"
                assert not answer.ok_response.headers
    finally:
        server.stop()
    assert server.log_path.read_text().startswith(f"serving 127.0.0.1:{port}")
