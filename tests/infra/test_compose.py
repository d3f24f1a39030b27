"""Compose files: valid for the Compose Specification and internally consistent.

``composecheck`` (scripts/tools/composecheck: compose-go, the loader of ``docker compose
config``) validates the schema, interpolation, merging of overlays and references to
services, networks, volumes; it prints the resolved project, on which the tests below
check what a schema cannot: healthchecks and start order, what is published, read-only
secrets, and that every hostname a config names (Envoy clusters, Prometheus targets,
Grafana datasources, OPA's bundle service) is a service on a network shared with the
service that uses it.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from authz.core.errors import ConfigError
from authz.runtime.config import SECRET_FILE_KEYS, Settings, load, unknown_variables
from authz.stack.tls import DEPLOYMENT_LEAVES
from authz.tools import deploy, egress_envoy
from authz.tools.services import read_services
from tests.helpers.infra import ROOT

COMPOSE = ROOT / "infra/compose"
PRODUCTION = ("docker-compose.yaml",)
DEV = ("docker-compose.dev.yaml",)
MONITORING = "docker-compose.monitoring.yaml"
EGRESS_TRACING = "docker-compose.egress-tracing.yaml"
COMBINATIONS = {
    "production": PRODUCTION,
    "production+redis": PRODUCTION,
    "dev": DEV,
    "production+monitoring": (*PRODUCTION, MONITORING),
    "dev+monitoring": (*DEV, MONITORING),
    "production+monitoring+egress-tracing": (*PRODUCTION, MONITORING, EGRESS_TRACING),
}
# Services whose image is the one built from this repository's Dockerfile.
LOCAL_IMAGE = "authz:local"


def _env_file(tmp_path: Path, **overrides: str) -> Path:
    """infra/compose/.env.example with the required values filled in (as a user would)."""
    values = {"AUTHZ_OPA_TOKEN": "t" * 64, "GRAFANA_ADMIN_PASSWORD": "secret", **overrides}
    lines = []
    for line in (COMPOSE / ".env.example").read_text().splitlines():
        key = line.partition("=")[0]
        lines.append(f"{key}={values.pop(key)}" if key in values else line)
    lines += [f"{key}={value}" for key, value in values.items()]
    path = tmp_path / "compose.env"
    path.write_text("\n".join(lines) + "\n")
    return path


def _check(
    composecheck: str, files: tuple[str, ...], env_file: Path, profiles: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    args = [composecheck, "--env-file", str(env_file)]
    for profile in profiles:
        args += ["--profile", profile]
    for name in files:
        args += ["-f", str(COMPOSE / name) if not Path(name).is_absolute() else name]
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)


@pytest.fixture(scope="module")
def projects(composecheck_bin: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each combination, resolved by composecheck (fails the test on a load error)."""
    env_file = _env_file(tmp_path_factory.mktemp("compose"))
    resolved = {}
    for name, files in COMBINATIONS.items():
        profiles = ("redis",) if name.endswith("+redis") else ()
        result = _check(composecheck_bin, files, env_file, profiles)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        resolved[name] = json.loads(result.stdout)
    return resolved


def test_every_compose_file_is_covered() -> None:
    files = {p.name for p in COMPOSE.glob("docker-compose*.yaml")}
    assert files == {f for combo in COMBINATIONS.values() for f in combo}


def test_combinations_load(projects: dict[str, Any]) -> None:
    assert set(projects["production"]["services"]) == {
        "envoy-gateway",
        "envoy-egress",
        "authz",
        "opa",
        "bundle-server",
        "upstream-api",
        "tls-init",
        "opa-socket-init",
    }
    assert "redis" in projects["production+redis"]["services"]
    assert {"prometheus", "grafana", "loki", "alloy", "otel-collector", "tempo"} <= set(
        projects["dev+monitoring"]["services"]
    )


BROKEN = {
    "undefined network": ("networks: [edge, authz]", "networks: [edge, nowhere]"),
    "undefined dependency": ("      upstream-api:\n", "      upstream-apis:\n"),
    "unknown key": ("    healthcheck:\n      # /ready", "    healthchek:\n      # /ready"),
    "bad port": ('"127.0.0.1:9901:9901"', '"127.0.0.1:99010:9901"'),
}


@pytest.mark.parametrize("change", BROKEN.values(), ids=BROKEN.keys())
def test_broken_compose_file_is_rejected(
    composecheck_bin: str, tmp_path: Path, change: tuple[str, str]
) -> None:
    """The validator can fail: each deliberate breakage of the production file is refused."""
    old, new = change
    text = (COMPOSE / "docker-compose.yaml").read_text()
    assert old in text
    broken = COMPOSE / f".broken-{tmp_path.name}.yaml"  # beside it: relative paths resolve
    try:
        broken.write_text(text.replace(old, new, 1))
        result = _check(composecheck_bin, (str(broken),), _env_file(tmp_path))
    finally:
        broken.unlink()
    assert result.returncode == 1, result.stdout[:200]


def test_the_opa_token_is_required(composecheck_bin: str, tmp_path: Path) -> None:
    """.env.example as shipped leaves AUTHZ_OPA_TOKEN empty: Compose refuses to start and
    says what to do, instead of running OPA's API without authentication."""
    result = _check(composecheck_bin, PRODUCTION, COMPOSE / ".env.example")
    assert result.returncode == 1
    assert "set AUTHZ_OPA_TOKEN in infra/compose/.env" in result.stderr


def _services(projects: dict[str, Any], *names: str) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (combo, name, service)
        for combo in names
        for name, service in projects[combo]["services"].items()
    ]


# Run once and exit (the certificates, the socket volume's owner), never restarted.
ONE_SHOT = {"tls-init", "opa-socket-init"}
# Monitoring images without an HTTP client for a healthcheck command (Alloy's, the
# Collector's and Tempo's); nothing waits for them to be healthy.
NO_HTTP_CLIENT = {"alloy", "otel-collector", "tempo"}


def test_healthchecks_and_start_order(projects: dict[str, Any]) -> None:
    """Every long-running service has a healthcheck, and every dependency waits for the
    dependency to be healthy (upstream-api on authz: started, as it only shares the image;
    a one-shot service: completed successfully)."""
    for combo, name, service in _services(projects, *COMBINATIONS):
        if name in ONE_SHOT:
            assert service["restart"] == "no", f"{combo}/{name}"
            continue
        if name not in NO_HTTP_CLIENT:
            assert service.get("healthcheck", {}).get("test"), f"{combo}/{name}"
        for dependency, spec in (service.get("depends_on") or {}).items():
            shares_image = (name, dependency) == ("upstream-api", "authz")
            expected = "service_started" if shares_image else "service_healthy"
            if dependency in ONE_SHOT:
                expected = "service_completed_successfully"
            assert spec["condition"] == expected, f"{combo}/{name} -> {dependency}"


def test_opa_is_not_published_in_production(projects: dict[str, Any]) -> None:
    for combo in ("production", "production+monitoring", "production+redis"):
        services = projects[combo]["services"]
        assert not services["opa"].get("ports"), combo
        assert "8181" in services["opa"]["expose"]
        # The policy network has no route out, and only what needs OPA (or what OPA sends
        # to: the bundle server, the trace collector) is on it.
        assert projects[combo]["networks"]["policy"].get("internal") is True
        on_policy = {n for n, s in services.items() if "policy" in (s.get("networks") or {})}
        allowed = {"authz", "opa", "bundle-server", "redis", "prometheus", "otel-collector"}
        assert on_policy <= allowed


def test_published_ports(projects: dict[str, Any]) -> None:
    """Only the gateway listens beyond loopback by default; admin ports never do."""
    services = projects["production+monitoring"]["services"]
    for name, service in services.items():
        for port in service.get("ports") or []:
            if (name, port["target"]) == ("envoy-gateway", 8080):
                assert port["host_ip"] == "0.0.0.0"
            else:
                assert port["host_ip"] == "127.0.0.1", f"{name}:{port['target']}"


def test_secrets_are_mounted_read_only(projects: dict[str, Any]) -> None:
    for combo, name, service in _services(projects, *COMBINATIONS):
        for volume in service.get("volumes") or []:
            if volume["type"] == "bind" and "docker.sock" not in volume["source"]:
                assert volume.get("read_only") is True, f"{combo}/{name}: {volume['target']}"
    authz = projects["production"]["services"]["authz"]
    secrets_dir = Path(authz["environment"]["AUTHZ_SECRETS_FILE"]).parent
    assert any(Path(v["target"]) == secrets_dir for v in authz["volumes"])
    assert authz["read_only"] is True
    # ... so its writable state (the image's AUTHZ_AUDIT_DB / AUTHZ_OVERRIDES_FILE) needs
    # a writable volume there.
    (data,) = [v for v in authz["volumes"] if v["target"] == "/var/lib/authz"]
    assert data["type"] == "volume"
    assert not data.get("read_only")
    assert authz["environment"]["AUTHZ_OPA_TOKEN"] == "t" * 64


def test_images_are_pinned(projects: dict[str, Any]) -> None:
    for combo, name, service in _services(projects, *COMBINATIONS):
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository, f"{combo}/{name}: {image}"
        assert tag not in ("", "latest"), f"{combo}/{name}: {image}"
        if image == LOCAL_IMAGE and "build" not in service:
            assert "authz" in projects[combo]["services"], f"{combo}/{name}: nothing builds it"


def test_bind_mounted_repository_files_exist(projects: dict[str, Any]) -> None:
    """Every file the stack mounts from this repository exists (a renamed config would
    otherwise be created by Docker as an empty directory)."""
    generated = {"build/bundles", "infra/compose/secrets", "infra/compose/keys"}
    for combo, name, service in _services(projects, *COMBINATIONS):
        for volume in service.get("volumes") or []:
            if volume["type"] != "bind" or not volume["source"].startswith(str(ROOT)):
                continue
            relative = Path(volume["source"]).relative_to(ROOT)
            if any(str(relative).startswith(prefix) for prefix in generated):
                continue
            assert (ROOT / relative).exists(), f"{combo}/{name}: {relative}"


def _reachable(project: dict[str, Any], client: str, host: str) -> bool:
    services = project["services"]
    if host not in services:
        return False
    client_networks = set(services[client].get("networks") or {"default": None})
    return bool(client_networks & set(services[host].get("networks") or {"default": None}))


def _envoy_hosts(config: Path) -> set[tuple[str, int]]:
    clusters = yaml.safe_load(config.read_text())["static_resources"]["clusters"]
    return {
        (socket["address"], socket["port_value"])
        for cluster in clusters
        # (the egress interception's internal cluster has no type: no address either)
        if cluster.get("type") == "STRICT_DNS"
        for group in cluster["load_assignment"]["endpoints"]
        for endpoint in group["lb_endpoints"]
        for socket in [endpoint["endpoint"]["address"]["socket_address"]]
    }


def test_envoy_upstreams_are_services(projects: dict[str, Any]) -> None:
    """The DNS names in the generated Envoy configs are services the proxy can reach
    (in dev, upstream-api is the host, through extra_hosts)."""
    for combo in ("production", "dev"):
        project = projects[combo]
        for proxy in ("gateway", "egress"):
            service = f"envoy-{proxy}"
            if service not in project["services"]:
                continue
            for host, _port in _envoy_hosts(ROOT / f"infra/compose/envoy/envoy-{proxy}.yaml"):
                extra = project["services"][service].get("extra_hosts") or []
                names = {entry.replace(":", "=").partition("=")[0] for entry in extra}
                assert _reachable(project, service, host) or host in names, (combo, host)
    assert set(deploy.DNS_ADDRESSES.values()) == _envoy_hosts(
        ROOT / "infra/compose/envoy/envoy-gateway.yaml"
    )


def _target_hosts(prometheus: dict[str, Any]) -> set[tuple[str, int]]:
    hosts = set()
    for job in prometheus["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                hosts.add((host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            hosts.update((name, int(dns["port"])) for name in dns["names"])
    return hosts


def test_monitoring_targets_are_services(projects: dict[str, Any]) -> None:
    """Prometheus scrapes, Grafana's datasources and OPA's bundle service name services
    on a network shared with their client, on a port the service listens on."""
    prometheus = yaml.safe_load((ROOT / "infra/monitoring/prometheus/prometheus.yml").read_text())
    listens = {
        ("envoy-gateway", deploy.ADMIN_PORTS["gateway"]),
        ("envoy-egress", deploy.ADMIN_PORTS["egress"]),
        ("authz", 9192),
        ("opa", 8282),
        ("prometheus", 9090),
        ("loki", 3100),
        ("tempo", 3200),
        ("tempo", 4317),
        ("otel-collector", 4318),
        ("bundle-server", 8080),
    }
    project = projects["production+monitoring"]
    for host, port in _target_hosts(prometheus):
        assert _reachable(project, "prometheus", host), host
        assert (host, port) in listens
    datasources = yaml.safe_load(
        (ROOT / "infra/monitoring/grafana/provisioning/datasources/datasources.yaml").read_text()
    )
    for source in datasources["datasources"]:
        url = urlsplit(source["url"])
        assert _reachable(project, "grafana", url.hostname or ""), source["url"]
        assert (url.hostname, url.port) in listens
    opa_config = yaml.safe_load((ROOT / "infra/opa/opa.yaml").read_text())
    bundles = urlsplit(opa_config["services"]["bundles"]["url"])
    assert _reachable(project, "opa", bundles.hostname or "")
    assert (bundles.hostname, bundles.port) in listens
    alloy = (ROOT / "infra/monitoring/alloy/config.alloy").read_text()
    (push,) = re.findall(r'url\s*=\s*"([^"]+)"', alloy)
    loki = urlsplit(push)
    assert _reachable(project, "alloy", loki.hostname or "")
    assert (loki.hostname, loki.port) in listens
    # Traces: authz -> the collector (OTLP/HTTP) -> Tempo (OTLP/gRPC).
    for combo in ("production+monitoring", "dev+monitoring"):
        authz = projects[combo]["services"]["authz"]["environment"]
        endpoint = urlsplit(authz["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert _reachable(projects[combo], "authz", endpoint.hostname or ""), combo
        assert (endpoint.hostname, endpoint.port) in listens
    collector = yaml.safe_load((ROOT / "infra/monitoring/otel-collector/config.yaml").read_text())
    for exporter in collector["exporters"].values():
        host, _, port = exporter["endpoint"].rpartition(":")
        assert _reachable(project, "otel-collector", host), host
        assert (host, int(port)) in listens


def _mounted(service: dict[str, Any], target: str) -> Path | None:
    """The repository file bind-mounted at ``target`` in ``service``, if any."""
    for volume in service.get("volumes") or []:
        if volume["type"] == "bind" and volume["target"] == target:
            return Path(volume["source"])
    return None


def _tracing_problems(project: dict[str, Any], traced: tuple[str, ...]) -> list[str]:
    """Why the services in ``traced`` would not send their spans to the collector: each
    Envoy's mounted config has the OpenTelemetry tracer on every listener but the admin
    one, exporting to a host:port the collector listens on over a shared network; OPA's
    mounted config has distributed_tracing to the same; authz's OTLP endpoint likewise."""
    problems = []
    collector = yaml.safe_load((ROOT / "infra/monitoring/otel-collector/config.yaml").read_text())
    protocols = collector["receivers"]["otlp"]["protocols"]
    listens = {int(p["endpoint"].rpartition(":")[2]) for p in protocols.values()}

    def check(client: str, host: str, port: int) -> None:
        if host != "otel-collector" or port not in listens:
            problems.append(f"{client}: {host}:{port} is not the collector")
        elif not _reachable(project, client, host):
            problems.append(f"{client}: the collector is on no network it shares")

    services = project["services"]
    for name in traced:
        if name.startswith("envoy-"):
            source = _mounted(services[name], "/etc/envoy/envoy.yaml")
            config = yaml.safe_load(source.read_text()) if source else {}
            resources = config["static_resources"]
            clusters = {c["name"]: c for c in resources["clusters"]}
            for listener in resources["listeners"]:
                if listener["name"] == "admin_read_only":
                    continue
                for chain in listener["filter_chains"]:
                    provider = chain["filters"][0]["typed_config"].get("tracing", {})
                    if provider.get("provider", {}).get("name") != "envoy.tracers.opentelemetry":
                        problems.append(f"{name}/{listener['name']}: not traced")
                        continue
                    uri = provider["provider"]["typed_config"]["http_service"]["http_uri"]
                    for host, port in _envoy_hosts_of(clusters[uri["cluster"]]):
                        check(name, host, port)
        elif name == "opa":
            source = _mounted(services["opa"], "/config/opa.yaml")
            tracing = (
                yaml.safe_load(source.read_text()).get("distributed_tracing") if source else None
            )
            if not tracing:
                problems.append("opa: no distributed_tracing")
            else:
                host, _, port = tracing["address"].rpartition(":")
                check("opa", host, int(port))
        else:
            endpoint = urlsplit(services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
            check(name, endpoint.hostname or "", endpoint.port or 0)
    return problems


def _envoy_hosts_of(cluster: dict[str, Any]) -> set[tuple[str, int]]:
    return {
        (socket["address"], socket["port_value"])
        for group in cluster["load_assignment"]["endpoints"]
        for endpoint in group["lb_endpoints"]
        for socket in [endpoint["endpoint"]["address"]["socket_address"]]
    }


TRACED = {
    "production+monitoring": ("envoy-gateway", "authz", "opa"),
    "production+monitoring+egress-tracing": ("envoy-gateway", "envoy-egress", "authz", "opa"),
    # The dev stack's OPA reads its own config (unsigned bundles) and is not traced.
    "dev+monitoring": ("envoy-gateway", "authz"),
}


@pytest.mark.parametrize("combo", TRACED)
def test_the_monitoring_overlay_traces_envoy_authz_and_opa(
    projects: dict[str, Any], combo: str
) -> None:
    """One gateway request is one trace: Envoy, authz and OPA all export to the collector
    (which test_monitoring_targets_are_services sends on to Tempo)."""
    assert _tracing_problems(projects[combo], TRACED[combo]) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("untraced envoy", "envoy-gateway/gateway: not traced"),
        ("untraced opa", "opa: no distributed_tracing"),
        ("collector off the policy network", "opa: the collector is on no network it shares"),
        ("egress without its overlay", "envoy-egress/egress: not traced"),
    ],
)
def test_tracing_check_can_fail(projects: dict[str, Any], change: str, problem: str) -> None:
    project = copy.deepcopy(projects["production+monitoring"])
    services = project["services"]
    traced = TRACED["production+monitoring"]
    if change == "untraced envoy":
        services["envoy-gateway"] = projects["production"]["services"]["envoy-gateway"]
    elif change == "untraced opa":
        services["opa"] = projects["production"]["services"]["opa"]
    elif change == "collector off the policy network":
        del services["otel-collector"]["networks"]["policy"]
    else:
        traced = (*traced, "envoy-egress")
    assert problem in _tracing_problems(project, traced)


def test_grafana_provisioning_paths_match_the_mounts(projects: dict[str, Any]) -> None:
    grafana = projects["production+monitoring"]["services"]["grafana"]
    mounts = {v["target"]: Path(v["source"]) for v in grafana["volumes"] if v["type"] == "bind"}
    provider = yaml.safe_load(
        (ROOT / "infra/monitoring/grafana/provisioning/dashboards/dashboards.yaml").read_text()
    )["providers"][0]
    dashboards = mounts[provider["options"]["path"]]
    assert sorted(p.name for p in dashboards.glob("*.json")) == ["authz.json"]
    assert (mounts["/etc/grafana/provisioning"] / "datasources").is_dir()
    prometheus = projects["production+monitoring"]["services"]["prometheus"]
    mounted = {v["target"] for v in prometheus["volumes"]}
    config = yaml.safe_load((ROOT / "infra/monitoring/prometheus/prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in mounted


def _tls_leaf_paths(project: dict[str, Any], name: str, value: str) -> tuple[str, str]:
    """(leaf, file) of ``value``, a path inside the volume "tls" as ``name`` mounts it."""
    (mount,) = [v for v in project["services"][name]["volumes"] if v.get("source") == "tls"]
    assert mount["read_only"] is True, name
    relative = Path(value).relative_to(mount["target"])
    leaf, file = relative.parts
    return leaf, file


def test_tls_init_issues_every_certificate_the_services_use(projects: dict[str, Any]) -> None:
    """tls-init writes the volume "tls" (python -m authz.stack.tls); each private key is
    owned by the uid of the service that reads it (keys are 0600)."""
    for combo in COMBINATIONS:
        project = projects[combo]
        init = project["services"]["tls-init"]
        assert init["entrypoint"][:3] == ["python", "-m", "authz.stack.tls"]
        owners = dict(
            arg.removeprefix("--owner=").split("=")
            for arg in init["entrypoint"]
            if "--owner" in arg
        )
        assert set(owners) == set(DEPLOYMENT_LEAVES), combo
        assert owners["authz"].startswith("10001:"), combo  # the image's user (Dockerfile)
        assert owners["opa"] == project["services"]["opa"]["user"], combo
        for proxy in ("envoy-client", "envoy-gateway", "envoy-egress"):
            assert owners[proxy].startswith("101:"), combo  # the Envoy image's user
        assert [v["target"] for v in init["volumes"] if v.get("source") == "tls"] == ["/tls"]
        # Egress interception: a certificate for every host the egress Envoy intercepts.
        assert _intercepted(init) == set(_intercept_hosts()), combo


def _intercepted(init: dict[str, Any]) -> set[str]:
    """The hosts tls-init issues interception certificates for (``--intercept=HOST``)."""
    return {a.removeprefix("--intercept=") for a in init["entrypoint"] if "--intercept" in a}


def _intercept_hosts() -> list[str]:
    """The hosts the shipped egress config intercepts (from policy/egress/data.json)."""
    services = read_services(ROOT / egress_envoy.DEFAULT_SERVICES)
    return list(egress_envoy.intercepted_hosts(list(services.values())))


def _settings_file(service: dict[str, Any]) -> Path | None:
    """The repository file mounted where authz's ``--config`` points, if any."""
    command = service.get("command") or []
    if "--config" not in command:
        return None
    target = command[command.index("--config") + 1]
    (volume,) = [v for v in service["volumes"] if v["target"] == target]
    assert volume["type"] == "bind"
    assert volume.get("read_only") is True
    return Path(volume["source"])


def _authz_settings(project: dict[str, Any], secrets_dir: Path | None = None) -> Settings:
    """authz's settings in the project: the image's ENV (Dockerfile: AUTHZ_GRPC_ADDR on
    every interface) overlaid with the service's environment and its mounted settings
    file, through authz's own rules. A ``*_FILE`` naming a Compose secret
    (``/run/secrets/<target>``) must be one the service mounts; it is read from
    ``secrets_dir/<target>`` when given, else left out (no such file here)."""
    service = project["services"]["authz"]
    environment = {"AUTHZ_GRPC_ADDR": "0.0.0.0:9191", **service["environment"]}
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "AUTHZ_GRPC_ADDR=0.0.0.0:9191" in dockerfile
    mounted = {f"/run/secrets/{s['target']}" for s in service.get("secrets") or []}
    for key, value in list(environment.items()):
        if key.endswith("_FILE") and value.startswith("/run/secrets/"):
            assert value in mounted, f"{key}={value}: no such secret mounted"
            if secrets_dir is None:
                del environment[key]
            else:
                environment[key] = str(secrets_dir / Path(value).name)
    return load(environment, _settings_file(service))


@pytest.mark.parametrize("combo", list(COMBINATIONS))
def test_authz_requires_envoys_client_certificate(projects: dict[str, Any], combo: str) -> None:
    """authz's gRPC port is mTLS in every Compose stack (authz always requires the client
    certificate when AUTHZ_GRPC_TLS_* are set), with files tls-init issues."""
    project = projects[combo]
    environment = project["services"]["authz"]["environment"]
    assert "AUTHZ_GRPC_ALLOW_PLAINTEXT" not in environment
    settings = _authz_settings(project)
    assert settings.grpc_tls
    for key, expected in (
        ("AUTHZ_GRPC_TLS_CERT", ("authz", "tls.crt")),
        ("AUTHZ_GRPC_TLS_KEY", ("authz", "tls.key")),
        ("AUTHZ_GRPC_TLS_CLIENT_CA", ("authz", "ca.crt")),
    ):
        assert _tls_leaf_paths(project, "authz", environment[key]) == expected, key


@pytest.mark.parametrize("combo", list(COMBINATIONS))
def test_opas_network_listener_is_tls_only(projects: dict[str, Any], combo: str) -> None:
    """OPA's REST API on the network (for tools; authz uses the socket, below) is https
    only, its certificate from tls-init's CA (SAN "opa"), which authz's SSL_CERT_FILE
    trusts; the only other listener is the unix socket."""
    project = projects[combo]
    environment = project["services"]["authz"]["environment"]
    assert "AUTHZ_OPA_ALLOW_PLAINTEXT" not in environment
    assert _tls_leaf_paths(project, "authz", environment["SSL_CERT_FILE"]) == ("opa", "ca.crt")
    command = project["services"]["opa"]["command"]
    assert "--addr=https://0.0.0.0:8181" in command
    assert not [
        arg
        for arg in command
        if arg.startswith("--addr=") and not arg.startswith(("--addr=https://", "--addr=unix://"))
    ]
    for flag, expected in (
        ("--tls-cert-file=", ("opa", "tls.crt")),
        ("--tls-private-key-file=", ("opa", "tls.key")),
    ):
        (value,) = [arg.removeprefix(flag) for arg in command if arg.startswith(flag)]
        assert _tls_leaf_paths(project, "opa", value) == expected


def _user(service: dict[str, Any]) -> tuple[int, int]:
    uid, _, gid = str(service["user"]).partition(":")
    return int(uid), int(gid)


def _socket_problems(project: dict[str, Any]) -> list[str]:
    """Why authz could not reach OPA over its unix socket, or someone else could: OPA
    listens on one ``unix://<path>`` (``--addr``) with ``--unix-socket-perm`` granting the
    group read and write and others nothing; authz's AUTHZ_OPA_URL is that file as authz
    sees it, both mounting one named volume (only they and its init mount it, OPA
    writable); the one-shot ``opa-socket-init`` (``python -c ... <dir> <uid> <gid>
    <mode>``) hands the volume (root-owned when created) to OPA's user with a mode
    without access for others, before OPA starts; and authz is in OPA's group (the
    socket's and the directory's)."""
    services = project["services"]
    opa, authz = services["opa"], services["authz"]
    addrs = [a.partition("=")[2] for a in opa["command"] if a.startswith("--addr=unix://")]
    if len(addrs) != 1:
        return [f"OPA listens on no single unix socket: {opa['command']}"]
    socket = addrs[0].removeprefix("unix://")
    problems = []
    perms = [a.partition("=")[2] for a in opa["command"] if a.startswith("--unix-socket-perm=")]
    if len(perms) != 1 or len(perms[0]) != 3 or perms[0][1] not in "67" or perms[0][2] != "0":
        problems.append(f"socket permissions {perms}: not group read-write, others none")

    def mount(service: dict[str, Any], path: str) -> dict[str, Any] | None:
        return next(
            (
                v
                for v in service.get("volumes") or []
                if path.startswith(v["target"].rstrip("/") + "/")
            ),
            None,
        )

    url = authz["environment"].get("AUTHZ_OPA_URL", "")
    opa_mount = mount(opa, socket)
    authz_mount = mount(authz, url.removeprefix("unix://")) if url.startswith("unix://") else None
    if opa_mount is None or opa_mount["type"] != "volume":
        return [*problems, f"OPA's {socket} is not on a named volume"]
    if opa_mount.get("read_only"):
        problems.append("OPA's socket volume is read-only")
    volume = opa_mount["source"]
    if not url.startswith("unix:///"):
        problems.append(f"AUTHZ_OPA_URL={url!r} is not a unix socket")
    elif authz_mount is None or authz_mount.get("source") != volume:
        problems.append(f"authz's {url} and OPA's {socket} are not on one shared volume")
    elif url.removeprefix("unix://").removeprefix(authz_mount["target"].rstrip("/")) != (
        socket.removeprefix(opa_mount["target"].rstrip("/"))
    ):
        problems.append(f"authz's {url} is not the file OPA's {socket} creates")
    others = sorted(
        name
        for name, service in services.items()
        if name not in {"opa", "authz", "opa-socket-init"}
        and any(v.get("source") == volume for v in service.get("volumes") or [])
    )
    if others:
        problems.append(f"the socket volume is mounted by {others} too")
    init = services.get("opa-socket-init")
    if init is None:
        return [*problems, "no opa-socket-init"]
    directory, uid, gid, mode = init["entrypoint"][-4:]
    init_mounts = [v["target"] for v in init.get("volumes") or [] if v.get("source") == volume]
    if init_mounts != [directory]:
        problems.append(f"opa-socket-init prepares {directory}, not the volume {volume}")
    if (int(uid), int(gid)) != _user(opa):
        problems.append(f"opa-socket-init gives the volume to {uid}:{gid}, not OPA's user")
    if int(mode, 8) & 0o007 or int(mode, 8) & 0o050 != 0o050:
        problems.append(f"opa-socket-init's mode {mode}: others have access or the group not")
    condition = (opa.get("depends_on") or {}).get("opa-socket-init", {}).get("condition")
    if condition != "service_completed_successfully":
        problems.append("OPA does not wait for opa-socket-init")
    if str(_user(opa)[1]) not in [str(g) for g in authz.get("group_add") or []]:
        problems.append(f"authz is not in OPA's group {_user(opa)[1]}")
    return problems


@pytest.mark.parametrize("combo", list(COMBINATIONS))
def test_authz_reaches_opa_over_its_unix_socket(projects: dict[str, Any], combo: str) -> None:
    """Every decision input goes to OPA over the unix socket on the shared volume
    "opa-socket" (no network hop); authz's own rules accept the URL without
    AUTHZ_OPA_ALLOW_PLAINTEXT (a unix socket is local)."""
    project = projects[combo]
    assert _socket_problems(project) == []
    settings = _authz_settings(project)
    assert settings.opa_url == "unix:///run/opa/opa.sock"
    assert not settings.opa_allow_plaintext


def _break_socket(project: dict[str, Any], change: str) -> dict[str, Any]:
    broken = copy.deepcopy(project)
    services = broken["services"]
    opa, authz, init = services["opa"], services["authz"], services["opa-socket-init"]
    if change == "tcp url":
        authz["environment"]["AUTHZ_OPA_URL"] = "https://opa:8181"
    elif change == "other path":
        authz["environment"]["AUTHZ_OPA_URL"] = "unix:///run/opa/other.sock"
    elif change == "authz does not mount it":
        authz["volumes"] = [v for v in authz["volumes"] if v["target"] != "/run/opa"]
    elif change == "bind mount":
        mount = next(v for v in opa["volumes"] if v["target"] == "/run/opa")
        mount.update(type="bind", source="/tmp/opa")
    elif change == "no unix listener":
        opa["command"] = [a for a in opa["command"] if not a.startswith("--addr=unix://")]
    elif change == "world-open socket":
        opa["command"] = [
            "--unix-socket-perm=777" if a.startswith("--unix-socket-perm=") else a
            for a in opa["command"]
        ]
    elif change == "default socket permissions":
        opa["command"] = [a for a in opa["command"] if not a.startswith("--unix-socket-perm=")]
    elif change == "no group_add":
        authz.pop("group_add")
    elif change == "init gives it to root":
        init["entrypoint"][-3:-1] = ["0", "0"]
    elif change == "init leaves it open":
        init["entrypoint"][-1] = "777"
    elif change == "no init":
        del services["opa-socket-init"]
    elif change == "opa does not wait":
        del opa["depends_on"]["opa-socket-init"]
    elif change == "another service mounts it":
        mount = next(v for v in opa["volumes"] if v["target"] == "/run/opa")
        services["bundle-server"]["volumes"].append(dict(mount, target="/s"))
    return broken


BROKEN_SOCKET = {
    "tcp url": "is not a unix socket",
    "other path": "is not the file OPA's",
    "authz does not mount it": "are not on one shared volume",
    "bind mount": "is not on a named volume",
    "no unix listener": "no single unix socket",
    "world-open socket": "not group read-write, others none",
    "default socket permissions": "not group read-write, others none",
    "no group_add": "authz is not in OPA's group",
    "init gives it to root": "not OPA's user",
    "init leaves it open": "others have access",
    "no init": "no opa-socket-init",
    "opa does not wait": "does not wait for opa-socket-init",
    "another service mounts it": "mounted by ['bundle-server'] too",
}


@pytest.mark.parametrize("combo", ["production", "dev"])
def test_opa_socket_init_hands_the_directory_over(
    projects: dict[str, Any], combo: str, tmp_path: Path
) -> None:
    """opa-socket-init's own script, run for real on a directory (to this test's uid and
    gid: no root here), sets the owner and mode its arguments give, twice in a row (a
    restarted stack runs it on a volume it already prepared)."""
    entrypoint = projects[combo]["services"]["opa-socket-init"]["entrypoint"]
    assert entrypoint[:2] == ["python", "-c"]
    directory = tmp_path / "run"
    directory.mkdir(mode=0o755)
    args = [str(directory), str(os.getuid()), str(os.getgid()), entrypoint[-1]]
    for _ in range(2):
        subprocess.run([sys.executable, "-c", entrypoint[2], *args], check=True, timeout=30)
        info = directory.stat()
        assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid())
        assert stat.S_IMODE(info.st_mode) == int(entrypoint[-1], 8) == 0o770


@pytest.mark.parametrize("change", BROKEN_SOCKET)
def test_socket_check_can_fail(projects: dict[str, Any], change: str) -> None:
    problems = _socket_problems(_break_socket(projects["production"], change))
    assert any(BROKEN_SOCKET[change] in problem for problem in problems), problems


def test_plaintext_opa_would_be_refused(projects: dict[str, Any]) -> None:
    """The check above can fail: authz's own rules refuse the old http://opa:8181."""
    environment = {
        key: value
        for key, value in projects["production"]["services"]["authz"]["environment"].items()
        if not value.startswith("/run/secrets/")  # Compose secrets: no such files here
    }
    environment["AUTHZ_OPA_URL"] = "http://opa:8181"
    with pytest.raises(ConfigError, match="AUTHZ_OPA_URL"):
        load(environment)


@pytest.mark.parametrize("combo", list(COMBINATIONS))
def test_envoys_mount_their_certificates(projects: dict[str, Any], combo: str) -> None:
    """The proxies' configs read /etc/envoy-tls/<leaf>/...: the volume "tls" is mounted
    there, and every leaf they name is one tls-init issues."""
    project = projects[combo]
    for proxy in ("gateway", "egress"):
        name = f"envoy-{proxy}"
        if name not in project["services"]:
            continue
        text = (ROOT / f"infra/compose/envoy/envoy-{proxy}.yaml").read_text()
        intercepted = set(
            re.findall(r"/etc/envoy-tls/egress-intercept/([a-z0-9.-]+)/tls\.(?:crt|key)", text)
        )
        text = re.sub(r"/etc/envoy-tls/egress-intercept/[a-z0-9.-]+/tls\.(?:crt|key)", "", text)
        files = set(re.findall(r"/etc/envoy-tls/[a-z-]+/[a-z.]+", text))
        assert files, name
        for path in files:
            leaf, file = _tls_leaf_paths(project, name, path)
            assert leaf in DEPLOYMENT_LEAVES
            assert file in ("tls.crt", "tls.key", "ca.crt")
        # The interception's certificates: tls-init issues one per intercepted host.
        assert intercepted == (set(_intercept_hosts()) if proxy == "egress" else set())
        assert intercepted <= _intercepted(project["services"]["tls-init"])


def _name(spec: str) -> str:
    """The normalized distribution name of a requirement (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ (]", spec, maxsplit=1)[0]).lower()


def _with_requirements(names: set[str]) -> set[str]:
    """``names`` and everything they require (installed here), extras excluded."""
    closure, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [_name(spec) for spec in requires if "extra ==" not in spec]
    return closure


def test_tls_init_needs_only_runtime_dependencies() -> None:
    """The image holds pyproject's runtime dependencies only (the Dockerfile installs
    ``.``, no extras): every distribution ``python -m authz.stack.tls`` imports is one of
    them or what they require."""
    probe = (
        "import json, sys, importlib.metadata as m; import authz.stack.tls; "
        "top = {n.split('.')[0] for n in sys.modules if not n.startswith('_')}; "
        "dists = m.packages_distributions(); "
        "print(json.dumps(sorted({d for t in top for d in dists.get(t, [])})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    imported = {_name(name) for name in json.loads(result.stdout)}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _with_requirements({_name(spec) for spec in project["dependencies"]})
    assert "cryptography" in imported  # the probe sees third-party imports
    assert imported - {"authz"} <= runtime


# --- operators' settings, limits ----------------------------------------------------------


@pytest.mark.parametrize("combo", list(COMBINATIONS))
def test_every_service_has_log_and_resource_limits(projects: dict[str, Any], combo: str) -> None:
    """No service can fill the disk with logs or take the host's memory and CPUs."""
    for name, service in projects[combo]["services"].items():
        logging_ = service.get("logging") or {}
        assert logging_.get("driver") == "json-file", f"{combo}/{name}"
        options = logging_.get("options") or {}
        assert re.fullmatch(r"\d+[km]", options.get("max-size", "")), f"{combo}/{name}"
        assert int(options.get("max-file", "0")) >= 1, f"{combo}/{name}"
        limits = ((service.get("deploy") or {}).get("resources") or {}).get("limits") or {}
        assert float(limits.get("cpus", 0)) > 0, f"{combo}/{name}: no cpus limit"
        assert int(limits.get("memory", 0)) > 0, f"{combo}/{name}: no memory limit"


def _setting_variables() -> set[str]:
    names = {f"AUTHZ_{name.upper()}" for name in Settings.__dataclass_fields__}
    return names | {f"AUTHZ_{name.upper()}_FILE" for name in SECRET_FILE_KEYS}


def _env_file_assignments(path: Path) -> dict[str, bool]:
    """Variable -> whether it is set (True) or only listed commented out (False)."""
    found: dict[str, bool] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"(#\s?)?([A-Z][A-Z0-9_]*)=", line)
        if match:
            found[match.group(2)] = match.group(1) is None
    return found


@pytest.mark.parametrize("combo", ["production", "dev"])
def test_every_setting_is_reachable_in_compose(projects: dict[str, Any], combo: str) -> None:
    """Each AUTHZ_* setting is either set by the Compose file or listed in the env file
    authz reads (authz.env; none set there that `environment:` would silently override),
    and the settings file is mounted where --config points."""
    service = projects[combo]["services"]["authz"]
    (env_file,) = service["env_file"]
    path = Path(env_file["path"])
    assert path == COMPOSE / "authz.env"
    listed = _env_file_assignments(path)
    # What the Compose file itself sets (the resolved project merges authz.env in).
    (compose_file,) = COMBINATIONS[combo]
    raw = yaml.safe_load((COMPOSE / compose_file).read_text())
    fixed = set(raw["services"]["authz"]["environment"])
    assert set(listed) <= _setting_variables(), "authz.env names no setting"
    assert not {name for name, is_set in listed.items() if is_set} & fixed
    missing = _setting_variables() - set(listed) - fixed
    for name in SECRET_FILE_KEYS:  # a secret is reachable as AUTHZ_X or AUTHZ_X_FILE
        variants = {f"AUTHZ_{name.upper()}", f"AUTHZ_{name.upper()}_FILE"}
        if variants - missing:
            missing -= variants
    if combo == "production":
        assert not missing, f"neither in authz.env nor set by Compose: {sorted(missing)}"
    settings_file = _settings_file(service)
    assert settings_file == COMPOSE / "authz.yaml"
    assert unknown_variables(dict.fromkeys(listed, "")) == []


def test_the_admin_api_is_on_behind_a_token_from_a_compose_secret(
    projects: dict[str, Any], tmp_path: Path
) -> None:
    """Production: AUTHZ_ADMIN_TOKEN_FILE names the mounted secret (a file under the
    ignored secrets directory), never an environment variable with the token."""
    project = projects["production"]
    service = project["services"]["authz"]
    assert "AUTHZ_ADMIN_TOKEN" not in service["environment"]
    target = service["environment"]["AUTHZ_ADMIN_TOKEN_FILE"]
    (secret,) = [s for s in service["secrets"] if f"/run/secrets/{s['target']}" == target]
    source = Path(project["secrets"][secret["source"]]["file"])
    assert source.parent == COMPOSE / "secrets"  # .gitignore: never committed
    (tmp_path / Path(target).name).write_text("a" * 43 + "\n")
    settings = _authz_settings(project, secrets_dir=tmp_path)
    assert settings.admin_token is not None
    assert settings.admin_token.reveal() == "a" * 43
    # The admin port is published on loopback only (test_published_ports).
    assert [p["published"] for p in service["ports"] if p["target"] == 9192] == ["9192"]


def _redis_durability_problems(service: dict[str, Any]) -> list[str]:
    """Why Redis would lose overrides on a restart or evict them under memory pressure:
    the append-only file must be on, on a named volume at its working directory /data,
    and the eviction policy noeviction."""
    command = service["command"]
    options = dict(zip(command[1::2], command[2::2], strict=False))
    problems = []
    if options.get("--appendonly") != "yes":
        problems.append("no append-only file")
    if options.get("--maxmemory-policy") != "noeviction":
        problems.append("keys may be evicted")
    volumes = {v["target"]: v for v in service.get("volumes") or []}
    if volumes.get("/data", {}).get("type") != "volume":
        problems.append("/data is not a named volume")
    return problems


def test_redis_keeps_overrides_across_restarts(projects: dict[str, Any]) -> None:
    assert _redis_durability_problems(projects["production+redis"]["services"]["redis"]) == []


@pytest.mark.parametrize(
    ("command", "volumes", "problem"),
    [
        (["redis-server", "--save", "", "--appendonly", "no"], None, "no append-only file"),
        (None, [], "/data is not a named volume"),
        (
            ["redis-server", "--appendonly", "yes", "--maxmemory-policy", "allkeys-lru"],
            None,
            "keys may be evicted",
        ),
    ],
    ids=["no-aof", "no-volume", "evicting"],
)
def test_redis_durability_check_can_fail(
    projects: dict[str, Any], command: list[str] | None, volumes: list[Any] | None, problem: str
) -> None:
    service = copy.deepcopy(projects["production+redis"]["services"]["redis"])
    if command is not None:
        service["command"] = command
    if volumes is not None:
        service["volumes"] = volumes
    assert problem in _redis_durability_problems(service)
