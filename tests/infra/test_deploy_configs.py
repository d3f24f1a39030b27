"""The Compose/Kubernetes Envoy configs are generated from the local ones and never drift.

``authz.tools.deploy`` rewrites the local stack's configs for containers; these tests pin what
may differ (addresses, cluster discovery, the admin listener) and that nothing else does,
and run the generated configs in a real Envoy.
"""

from __future__ import annotations

import copy
import http.client
import shutil
import ssl
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
        "infra/compose/nginx",
        "infra/monitoring/otel-collector",
        "infra/monitoring/tempo",
        deploy.K8S_GENERATED,
        deploy.K8S_TRACING_GENERATED,
        deploy.K8S_MONITORING_GENERATED,
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
    assert f"{deploy.K8S_GENERATED}/gateway-envoy.yaml" in result.stderr
    assert deploy.COMPOSE_GATEWAY_TRACED in result.stderr


_HCM_NAME = "envoy.filters.network.http_connection_manager"


def _undo_edge_limits(config: dict[str, Any], local: dict[str, Any]) -> None:
    """Take :func:`deploy.edge_limits`' additions out of ``config`` (in place), checking
    each has the documented value; a value ``local`` set itself stays."""
    overload = config.pop("overload_manager")
    assert [m["name"] for m in overload["resource_monitors"]] == [
        "envoy.resource_monitors.fixed_heap",
        "envoy.resource_monitors.global_downstream_max_connections",
    ]
    local_listeners = {item["name"]: item for item in local["static_resources"]["listeners"]}
    for listener in config["static_resources"]["listeners"]:
        if "per_connection_buffer_limit_bytes" not in local_listeners.get(listener["name"], {}):
            assert listener.pop("per_connection_buffer_limit_bytes") == 32768
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                if network_filter["name"] != _HCM_NAME:
                    continue
                hcm = network_filter["typed_config"]
                http2 = hcm["http2_protocol_options"]
                for key, value in (
                    ("max_concurrent_streams", 100),
                    ("initial_stream_window_size", 65536),
                    ("initial_connection_window_size", 1048576),
                ):
                    assert http2.pop(key) == value
                if not http2:
                    del hcm["http2_protocol_options"]
                assert hcm.pop("request_headers_timeout") == "10s"
                assert hcm.pop("stream_idle_timeout") == "300s"
                common = hcm["common_http_protocol_options"]
                assert common.pop("idle_timeout") == "3600s"
                assert common.pop("headers_with_underscores_action") == "REJECT_REQUEST"
                if not common:  # the local config sets none (egress: max_connection_duration)
                    del hcm["common_http_protocol_options"]
    for cluster in config["static_resources"]["clusters"]:
        assert cluster.pop("per_connection_buffer_limit_bytes") == 32768


def _undo_containerize(config: dict[str, Any], local: dict[str, Any]) -> dict[str, Any]:
    """``config`` with every documented difference put back to ``local``'s values."""
    result = copy.deepcopy(config)
    _undo_edge_limits(result, local)
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


@pytest.mark.parametrize("generated", [deploy.COMPOSE_GATEWAY, deploy.COMPOSE_EGRESS])
def test_deploy_configs_carry_the_edge_limits(generated: str) -> None:
    """Envoy's edge best practices in every deployment config: the overload manager with a
    heap ceiling below the containers' memory limit (256 MiB in Compose) and a downstream
    connection cap, buffer limits on every listener and cluster, and on every HTTP
    connection manager HTTP/2 limits, header/idle timeouts and underscores rejected."""
    config = _load(ROOT / generated)
    monitors = {
        m["name"]: m["typed_config"] for m in config["overload_manager"]["resource_monitors"]
    }
    heap = monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"]
    assert 0 < heap < 256 * 1024 * 1024
    connections = monitors["envoy.resource_monitors.global_downstream_max_connections"]
    assert connections["max_active_downstream_connections"] > 0
    actions = {a["name"] for a in config["overload_manager"]["actions"]}
    assert "envoy.overload_actions.stop_accepting_requests" in actions
    resources = config["static_resources"]
    for item in resources["listeners"] + resources["clusters"]:
        assert item["per_connection_buffer_limit_bytes"] == 32768, item["name"]
    managers = [
        f["typed_config"]
        for listener in resources["listeners"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
        if f["name"] == _HCM_NAME
    ]
    assert len(managers) >= 2
    for hcm in managers:
        assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == (
            "REJECT_REQUEST"
        )
        assert hcm["http2_protocol_options"]["max_concurrent_streams"] == 100
        assert hcm["request_headers_timeout"] == "10s"


def test_edge_limits_keep_what_a_config_sets_and_refuse_a_second_overload_manager() -> None:
    config = _load(LOCAL_GATEWAY)
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http2_protocol_options"] = {"allow_connect": True, "max_concurrent_streams": 7}
    limited = deploy.edge_limits(config)
    http2 = limited["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["http2_protocol_options"]
    assert http2["allow_connect"] is True
    assert http2["max_concurrent_streams"] == 7
    assert http2["initial_stream_window_size"] == 65536
    with pytest.raises(ValueError, match="overload_manager"):
        deploy.edge_limits(limited)


def test_deployed_envoy_runs_the_overload_manager_and_rejects_underscored_headers(
    deploy_envoys: dict[str, DeployEnvoy],
) -> None:
    """In a real Envoy: the overload manager's monitors report (their stats exist), and a
    request with an underscore in a header name is refused by the listener (400) before
    ext_authz or any upstream sees it."""
    for proxy in deploy_envoys.values():
        status, body = http_get(f"http://127.0.0.1:{proxy.admin}/stats?filter=overload")
        assert status == 200
        assert b"overload.envoy.resource_monitors.fixed_heap.pressure" in body
        assert b"overload.envoy.overload_actions.stop_accepting_requests.active" in body
    gateway = deploy_envoys["gateway"]
    context = ssl.create_default_context(cafile=str(gateway.ca))
    for headers, expected in (({"x_api_key": "k"}, 400), ({"x-api-key": "k"}, 503)):
        connection = http.client.HTTPSConnection(
            "localhost", gateway.listener, context=context, timeout=10
        )
        try:
            connection.request("GET", "/api/v1/status", headers=headers)
            assert connection.getresponse().status == expected, headers
        finally:
            connection.close()


def test_k8s_generator_inputs_are_the_compose_configs() -> None:
    """What kustomize's configMapGenerator reads (copies under each kustomization) is the
    Compose file it names in its first line, byte for byte after that line."""
    copies = {
        f"{deploy.K8S_GENERATED}/gateway-envoy.yaml": deploy.COMPOSE_GATEWAY,
        f"{deploy.K8S_GENERATED}/egress-envoy.yaml": deploy.COMPOSE_EGRESS,
        f"{deploy.K8S_GENERATED}/opa.yaml": deploy.OPA_CONFIG,
        f"{deploy.K8S_GENERATED}/bundles.conf": deploy.NGINX_BUNDLES,
        f"{deploy.K8S_GENERATED}/system.authz.rego": "infra/opa/system/authz.rego",
        f"{deploy.K8S_GENERATED}/system.log.rego": "infra/opa/system/log.rego",
        f"{deploy.K8S_TRACING_GENERATED}/gateway-envoy.yaml": deploy.COMPOSE_GATEWAY_TRACED,
        f"{deploy.K8S_TRACING_GENERATED}/egress-envoy.yaml": deploy.COMPOSE_EGRESS_TRACED,
        f"{deploy.K8S_TRACING_GENERATED}/opa.yaml": deploy.OPA_TRACED,
        f"{deploy.K8S_MONITORING_GENERATED}/otel-collector.yaml": deploy.OTEL_COLLECTOR_CONFIG,
        f"{deploy.K8S_MONITORING_GENERATED}/tempo.yaml": deploy.TEMPO_CONFIG,
    }
    for copy_path, source in copies.items():
        first, rest = (ROOT / copy_path).read_text(encoding="utf-8").split("\n", 1)
        assert first.startswith(f"# GENERATED copy of {source} "), copy_path
        assert rest == (ROOT / source).read_text(encoding="utf-8"), copy_path
    generated = {
        str(p.relative_to(ROOT))
        for directory in (
            deploy.K8S_GENERATED,
            deploy.K8S_TRACING_GENERATED,
            deploy.K8S_MONITORING_GENERATED,
        )
        for p in (ROOT / directory).iterdir()
    }
    assert generated == set(copies)


@pytest.mark.parametrize(
    ("generated", "untraced", "service"),
    [
        (deploy.COMPOSE_GATEWAY_TRACED, deploy.COMPOSE_GATEWAY, "envoy-gateway"),
        (deploy.COMPOSE_EGRESS_TRACED, deploy.COMPOSE_EGRESS, "envoy-egress"),
    ],
    ids=["gateway", "egress"],
)
def test_traced_envoy_config_differs_only_by_the_tracer(
    generated: str, untraced: str, service: str
) -> None:
    """The traced variant is the deployment config plus the OpenTelemetry tracer on every
    listener but the read-only admin one, exporting OTLP/HTTP to the collector."""
    config = _load(ROOT / generated)
    resources = config["static_resources"]
    (cluster,) = [c for c in resources["clusters"] if c["name"] == "otel_collector"]
    resources["clusters"].remove(cluster)
    socket = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert socket["address"]["socket_address"] == {
        "address": deploy.OTEL_COLLECTOR[0],
        "port_value": deploy.OTEL_COLLECTOR[1],
    }
    traced = 0
    for listener in resources["listeners"]:
        for chain in listener["filter_chains"]:
            hcm = chain["filters"][0]["typed_config"]
            if listener["name"] == "admin_read_only":
                assert "tracing" not in hcm
                continue
            tracing = hcm.pop("tracing")
            provider = tracing["provider"]
            assert provider["name"] == "envoy.tracers.opentelemetry"
            assert provider["typed_config"]["service_name"] == service
            uri = provider["typed_config"]["http_service"]["http_uri"]
            assert uri["cluster"] == "otel_collector"
            assert uri["uri"] == "http://otel-collector:4318/v1/traces"
            traced += 1
    assert traced >= 1
    assert config == _load(ROOT / untraced)


def test_traced_opa_config_adds_distributed_tracing_only() -> None:
    traced = yaml.safe_load((ROOT / deploy.OPA_TRACED).read_text(encoding="utf-8"))
    tracing = traced.pop("distributed_tracing")
    assert tracing["type"] == "http"  # OTLP/HTTP, the collector's :4318
    assert tracing["address"] == "otel-collector:4318"
    assert traced == yaml.safe_load((ROOT / deploy.OPA_CONFIG).read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match="already has distributed_tracing"):
        deploy.opa_traced((ROOT / deploy.OPA_TRACED).read_text(encoding="utf-8"))
    gateway = _load(ROOT / deploy.COMPOSE_GATEWAY_TRACED)
    with pytest.raises(ValueError, match="otel_collector"):
        deploy.traced(gateway, service_name="envoy-gateway")


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
