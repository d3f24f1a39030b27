"""The Compose/Kubernetes Envoy configs are generated from the local ones and never drift.

``authz.tools.deploy`` rewrites the local stack's configs for containers; these tests pin what
may differ (addresses, cluster discovery, the admin listener) and that nothing else does,
and run the generated configs in a real Envoy.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.stack.supervisor import free_port
from authz.tools import deploy, egress_envoy
from tests.helpers.infra import ROOT, DeployEnvoy, http_get

LOCAL_GATEWAY = ROOT / "infra/envoy/envoy-gateway.yaml"
LOCAL_EGRESS = ROOT / "infra/envoy/envoy-egress.yaml"


def _load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded


def _run_deploy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authz.tools.deploy", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_generated_files_are_up_to_date() -> None:
    result = _run_deploy("--root", str(ROOT), "--check")
    assert result.returncode == 0, result.stderr


def test_check_catches_a_hand_edit(tmp_path: Path) -> None:
    """The drift check can fail: an edited generated file (or a stale one) is reported."""
    for relative in (
        "infra/envoy",
        "policy/egress",
        "infra/opa",
        "infra/compose/envoy",
        "infra/k8s/generated",
    ):
        shutil.copytree(ROOT / relative, tmp_path / relative)
    assert _run_deploy("--root", str(tmp_path), "--check").returncode == 0
    edited = tmp_path / deploy.COMPOSE_GATEWAY
    edited.write_text(edited.read_text().replace("timeout: 0.5s", "timeout: 5s"))
    result = _run_deploy("--root", str(tmp_path), "--check")
    assert result.returncode == 1
    assert deploy.COMPOSE_GATEWAY in result.stderr
    # A change to a source (the local gateway) makes the generated files stale too.
    _run_deploy("--root", str(tmp_path))
    source = tmp_path / deploy.GATEWAY_SOURCE
    source.write_text(source.read_text().replace("timeout: 30s", "timeout: 31s"))
    result = _run_deploy("--root", str(tmp_path), "--check")
    assert result.returncode == 1
    assert deploy.K8S_ENVOY in result.stderr


def _undo_containerize(config: dict[str, Any], local: dict[str, Any]) -> dict[str, Any]:
    """``config`` with every documented difference put back to ``local``'s values."""
    result = copy.deepcopy(config)
    result["admin"] = local["admin"]
    resources = result["static_resources"]
    resources["listeners"] = [
        item for item in resources["listeners"] if item["name"] != "admin_read_only"
    ]
    resources["clusters"] = [item for item in resources["clusters"] if item["name"] != "admin"]
    local_listeners = {item["name"]: item for item in local["static_resources"]["listeners"]}
    for listener in resources["listeners"]:
        if "internal_listener" in listener:
            continue  # the egress interception: no address, its own TLS, unchanged
        assert listener["address"]["socket_address"]["address"] == "0.0.0.0"
        listener["address"] = local_listeners[listener["name"]]["address"]
        tls = egress_envoy.downstream_transport_socket(
            egress_envoy.LISTENER_TLS_DIRS[listener["name"]]
        )
        for chain in listener["filter_chains"]:
            assert chain.pop("transport_socket") == tls
    local_clusters = {item["name"]: item for item in local["static_resources"]["clusters"]}
    for cluster in resources["clusters"]:
        name = cluster["name"]
        if name in deploy.DNS_ADDRESSES:
            assert cluster.pop("type") == "STRICT_DNS"
            assert cluster.pop("dns_lookup_family") == "V4_PREFERRED"
            socket = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            host, port = deploy.DNS_ADDRESSES[name]
            assert socket["address"]["socket_address"] == {"address": host, "port_value": port}
            cluster["load_assignment"] = local_clusters[name]["load_assignment"]
            cluster["type"] = local_clusters[name]["type"]
            if name == "authz":
                assert cluster.pop("health_checks")[0]["grpc_health_check"] == {}
    return result


@pytest.mark.parametrize(
    ("generated", "local"),
    [
        (deploy.COMPOSE_GATEWAY, LOCAL_GATEWAY),
        (deploy.COMPOSE_EGRESS, LOCAL_EGRESS),
    ],
    ids=["gateway", "egress"],
)
def test_deploy_config_differs_only_where_documented(generated: str, local: Path) -> None:
    """Filters, routes, timeouts, TLS, access logs: identical to the local config (which
    the e2e tests exercise); only addresses, discovery and the admin listener differ."""
    local_config = _load(local)
    assert _undo_containerize(_load(ROOT / generated), local_config) == local_config


def test_k8s_configmaps_embed_the_compose_configs() -> None:
    maps = list(yaml.safe_load_all((ROOT / deploy.K8S_ENVOY).read_text(encoding="utf-8")))
    by_name = {item["metadata"]["name"]: item["data"]["envoy.yaml"] for item in maps}
    assert by_name == {
        "envoy-gateway": (ROOT / deploy.COMPOSE_GATEWAY).read_text(encoding="utf-8"),
        "envoy-egress": (ROOT / deploy.COMPOSE_EGRESS).read_text(encoding="utf-8"),
    }
    opa = yaml.safe_load((ROOT / deploy.K8S_OPA).read_text(encoding="utf-8"))
    assert opa["data"]["opa.yaml"] == (ROOT / "infra/opa/opa-file.yaml").read_text()
    assert sorted(opa["data"]) == ["opa.yaml", "system.authz.rego", "system.log.rego"]


@pytest.mark.parametrize("generated", [deploy.COMPOSE_GATEWAY, deploy.COMPOSE_EGRESS])
def test_deploy_listeners_speak_tls(generated: str) -> None:
    """Clients' API keys and sandboxes' tokens arrive on these listeners: TLS on every
    one but the read-only admin listener (which carries no credential)."""
    listeners = _load(ROOT / generated)["static_resources"]["listeners"]
    secured = set()
    for listener in listeners:
        for chain in listener["filter_chains"]:
            socket = chain.get("transport_socket", {}).get("typed_config", {})
            if listener["name"] == "admin_read_only":
                assert not socket
                continue
            assert socket["@type"].endswith("tls.v3.DownstreamTlsContext")
            (certificate,) = socket["common_tls_context"]["tls_certificates"]
            if listener["name"] == egress_envoy.INTERCEPT_LISTENER:
                # The interception: the certificate of the host the chain's SNI names.
                [host] = chain["filter_chain_match"]["server_names"]
                directory = f"{egress_envoy.INTERCEPT_TLS_DIR}/{host}"
                assert certificate["private_key"] == {"filename": f"{directory}/tls.key"}
                continue
            directory = egress_envoy.LISTENER_TLS_DIRS[listener["name"]]
            assert certificate["private_key"] == {"filename": f"{directory}/tls.key"}
            secured.add(listener["name"])
    assert secured & {"gateway", "egress"}


def test_a_listener_without_a_certificate_is_refused() -> None:
    """A new local listener cannot reach the deployments as plaintext on 0.0.0.0."""
    config = _load(LOCAL_GATEWAY)
    extra = copy.deepcopy(config["static_resources"]["listeners"][0])
    extra["name"] = "new_listener"
    config["static_resources"]["listeners"].append(extra)
    with pytest.raises(ValueError, match="new_listener"):
        deploy.containerize(config, admin_port=9901)


def test_an_unmapped_local_cluster_is_refused() -> None:
    """A new local cluster on 127.0.0.1 cannot silently reach the deployments."""
    config = _load(LOCAL_GATEWAY)
    extra = copy.deepcopy(config["static_resources"]["clusters"][1])
    extra["name"] = "new_backend"
    config["static_resources"]["clusters"].append(extra)
    with pytest.raises(ValueError, match="new_backend"):
        deploy.containerize(config, admin_port=9901)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (b"static_resources: [1, 2\n", "not YAML"),
        (b"- a\n- b\n", "must be a mapping"),
        (b"", "must be a mapping"),
    ],
    ids=["unparseable", "a-list", "empty"],
)
def test_a_malformed_gateway_source_exits_2_naming_it(
    tmp_path: Path, source: bytes, message: str
) -> None:
    for relative in ("infra/envoy", "policy/egress", "infra/opa"):
        shutil.copytree(ROOT / relative, tmp_path / relative)
    (tmp_path / deploy.GATEWAY_SOURCE).write_bytes(source)
    said: list[str] = []
    assert deploy.main(["--root", str(tmp_path), "--check"], out=said.append) == 2
    assert len(said) == 1
    assert said[0].startswith(f"error: {tmp_path / deploy.GATEWAY_SOURCE}: {message}")


def test_egress_services_all_reach_the_deploy_config() -> None:
    services = _load(ROOT / "infra/compose/envoy/envoy-egress.yaml")["static_resources"]
    names = {c["name"] for c in services["clusters"]}
    data = egress_envoy.generate(
        yaml.safe_load((ROOT / "policy/egress/data.json").read_text())["services"]
    )
    assert {c["name"] for c in data["static_resources"]["clusters"]} | {"admin"} == names


def test_read_only_admin_listener(deploy_envoys: dict[str, DeployEnvoy]) -> None:
    """GETs of the listed admin paths pass; everything else (POST /quitquitquit,
    /config_dump, /runtime_modify) is a 404 from the listener, never the admin API."""
    for proxy in deploy_envoys.values():
        base = f"http://127.0.0.1:{proxy.admin}"
        assert http_get(f"{base}/ready") == (200, b"LIVE\n")
        status, body = http_get(f"{base}/stats/prometheus")
        assert status == 200
        assert b"envoy_http_downstream_rq_total" in body
        assert http_get(f"{base}/clusters")[0] == 200
        for path in ("/config_dump", "/runtime_modify", "/quitquitquit", "/"):
            assert http_get(f"{base}{path}")[0] == 404, path
        assert http_get(f"{base}/quitquitquit", method="POST", body=b"")[0] == 404
        assert http_get(f"{base}/ready")[0] == 200  # still running


def test_compose_envoy_healthcheck_command(deploy_envoys: dict[str, DeployEnvoy]) -> None:
    """The exact healthcheck command of docker-compose.yaml (bash /dev/tcp; the image has
    no curl), pointed at the running Envoy's port: passes when ready, fails when nothing
    listens."""
    compose = _load(ROOT / "infra/compose/docker-compose.yaml")
    for name, proxy in deploy_envoys.items():
        test = compose["services"][f"envoy-{name}"]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "bash", "-c"]
        port = deploy.ADMIN_PORTS[name]
        script = test[3].replace(f"/127.0.0.1/{port}", f"/127.0.0.1/{proxy.admin}")
        assert script != test[3]
        assert subprocess.run(["bash", "-c", script], check=False, timeout=10).returncode == 0
        closed = script.replace(f"/127.0.0.1/{proxy.admin}", f"/127.0.0.1/{free_port()}")
        assert subprocess.run(["bash", "-c", closed], check=False, timeout=10).returncode != 0
