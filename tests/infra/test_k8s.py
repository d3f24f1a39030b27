"""Kubernetes manifests: valid against the Kubernetes schemas, and consistent.

Schemas: the ``kubernetes-validate`` package (PyPI) bundles the Kubernetes JSON schemas
per version, so validation needs no network (kubeconform's default schema download
would). Strict: an unknown field fails. Every manifest is validated against the oldest
and newest Kubernetes version the manifests claim (:data:`VERSIONS`).

Beyond the schema: Services, NetworkPolicies, PDBs and HPAs select or target workloads
that exist; every ConfigMap/Secret a pod mounts is defined (here, or in the template of
the ones created from files); containers have probes and resource limits; the Envoy
configs' DNS names are Services.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from authz.core.errors import ConfigError
from authz.runtime.config import is_loopback_host, load
from authz.tools import deploy
from tests.helpers.infra import ROOT

K8S = ROOT / "infra/k8s"
VERSIONS = ("1.29", "1.37")
TEMPLATE = "secrets.example.yaml"
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _validate(document: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except SchemaNotFoundError as exc:  # an unknown kind/apiVersion is a failure too
        raise AssertionError(exc.message) from None


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=[str(p.relative_to(K8S)) for p in MANIFESTS])
def test_manifest_validates(path: Path, version: str) -> None:
    documents = _documents(path)
    assert documents
    for document in documents:
        try:
            _validate(document, version)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{document['kind']}/{document['metadata']['name']}: {where}: {exc}")


def _authz_deployment() -> dict[str, Any]:
    return next(d for d in _documents(K8S / "authz.yaml") if d["kind"] == "Deployment")


def _broken(change: str) -> dict[str, Any]:
    deployment = _authz_deployment()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    if change == "unknown field":
        container["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    elif change == "wrong type":
        deployment["spec"]["replicas"] = "two"
    elif change == "missing required":
        del container["name"]
    elif change == "misspelt nested field":
        rolling = deployment["spec"]["strategy"]["rollingUpdate"]
        rolling["maxUnavailble"] = rolling.pop("maxUnavailable")
    return deployment


@pytest.mark.parametrize(
    "change", ["unknown field", "wrong type", "missing required", "misspelt nested field"]
)
def test_broken_manifest_is_rejected(change: str) -> None:
    """The validation can fail: strict mode refuses each of these breakages."""
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(_broken(change), VERSIONS[-1])


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(AssertionError, match="Couldn't find schema"):
        _validate({"apiVersion": "authz.io/v1", "kind": "Gadget", "metadata": {}}, "1.37")


@pytest.fixture(scope="module")
def resources() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> document, for the manifests kustomization.yaml applies plus the
    template of the objects created from files."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    found = {}
    for relative in [*kustomization["resources"], TEMPLATE]:
        for document in _documents(K8S / relative):
            found[(document["kind"], document["metadata"]["name"])] = document
    return found


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {str(p.relative_to(K8S)) for p in MANIFESTS}
    assert listed == on_disk - {TEMPLATE}
    assert kustomization["namespace"] == "authz"


def _workloads(resources: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: doc for (kind, name), doc in resources.items() if kind == "Deployment"}


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_match_workloads(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    pods = {
        name: doc["spec"]["template"]["metadata"]["labels"]
        for name, doc in _workloads(resources).items()
    }
    for (kind, name), doc in resources.items():
        selector: dict[str, str] | None = None
        if kind == "Service" and doc["spec"].get("type") != "ExternalName":
            selector = doc["spec"]["selector"]
        elif kind in ("PodDisruptionBudget",):
            selector = doc["spec"]["selector"]["matchLabels"]
        elif kind == "NetworkPolicy" and doc["spec"]["podSelector"]:
            selector = doc["spec"]["podSelector"]["matchLabels"]
        elif kind == "HorizontalPodAutoscaler":
            assert doc["spec"]["scaleTargetRef"]["name"] in pods, name
        if selector is not None:
            assert any(_selects(selector, labels) for labels in pods.values()), f"{kind}/{name}"
    for name, doc in _workloads(resources).items():
        assert _selects(doc["spec"]["selector"]["matchLabels"], pods[name]), name


def test_service_ports_exist(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    workloads = _workloads(resources)
    for (kind, name), doc in resources.items():
        if kind != "Service" or doc["spec"].get("type") == "ExternalName":
            continue
        ports = {
            port.get("name"): port["containerPort"]
            for workload in workloads.values()
            if _selects(doc["spec"]["selector"], workload["spec"]["template"]["metadata"]["labels"])
            for container in workload["spec"]["template"]["spec"]["containers"]
            for port in container.get("ports", [])
        }
        for port in doc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports or target in ports.values(), f"Service/{name}: {target}"


def test_mounted_config_exists(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Every ConfigMap/Secret a pod mounts or reads is defined, with the keys it names."""
    for name, doc in _workloads(resources).items():
        spec = doc["spec"]["template"]["spec"]
        for volume in spec.get("volumes", []):
            for kind, key in (("ConfigMap", "configMap"), ("Secret", "secret")):
                if key not in volume:
                    continue
                ref = volume[key].get("name") or volume[key].get("secretName")
                source = resources.get((kind, ref))
                assert source is not None, f"{name}: {kind}/{ref}"
                keys = set(source.get("data", {})) | set(source.get("stringData", {}))
                keys |= set(source.get("binaryData", {}))
                for item in volume[key].get("items", []):
                    assert item["key"] in keys, f"{name}: {kind}/{ref} has no {item['key']}"
        for container in spec["containers"]:
            for env in container.get("env", []):
                secret = env.get("valueFrom", {}).get("secretKeyRef")
                if secret:
                    source = resources[("Secret", secret["name"])]
                    assert secret["key"] in source["stringData"], f"{name}: {secret}"


def test_containers_have_probes_limits_and_security(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    for name, doc in _workloads(resources).items():
        spec = doc["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec.get("automountServiceAccountToken") is False, name
        for container in spec["containers"]:
            where = f"{name}/{container['name']}"
            assert container.get("readinessProbe"), where
            assert container.get("livenessProbe"), where
            assert set(container["resources"]["requests"]) == {"cpu", "memory"}, where
            assert set(container["resources"]["limits"]) == {"cpu", "memory"}, where
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
    spec = _authz_deployment()["spec"]["template"]["spec"]
    authz = next(c for c in spec["containers"] if c["name"] == "authz")
    assert authz["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert authz["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Read-only root filesystem: the image's data directory (audit database, overrides)
    # must be a writable volume.
    (data,) = [m for m in authz["volumeMounts"] if m["mountPath"] == "/var/lib/authz"]
    assert not data.get("readOnly")
    (volume,) = [v for v in spec["volumes"] if v["name"] == data["name"]]
    assert "emptyDir" in volume or "persistentVolumeClaim" in volume


def test_opa_is_reachable_from_its_pod_only() -> None:
    """OPA's REST API binds loopback in the authz pod; only the read-only diagnostic port
    is a container port (probes and Prometheus)."""
    containers = _authz_deployment()["spec"]["template"]["spec"]["containers"]
    opa = next(c for c in containers if c["name"] == "opa")
    assert "--addr=127.0.0.1:8181" in opa["args"]
    assert {p["containerPort"] for p in opa["ports"]} == {8282}
    authz = next(c for c in containers if c["name"] == "authz")
    env = {e["name"]: e.get("value") for e in authz["env"]}
    assert env["AUTHZ_OPA_URL"] == "http://127.0.0.1:8181"


def test_network_policy_lets_only_envoy_reach_authz(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    policy = resources[("NetworkPolicy", "authz")]["spec"]
    grpc_rules = [r for r in policy["ingress"] if {p["port"] for p in r["ports"]} == {9191}]
    assert len(grpc_rules) == 1
    sources = {
        s["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for s in grpc_rules[0]["from"]
    }
    assert sources == {"envoy-gateway", "envoy-egress"}
    assert resources[("NetworkPolicy", "default-deny-ingress")]["spec"]["podSelector"] == {}


def test_envoy_dns_names_are_services(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    services = {name: doc for (kind, name), doc in resources.items() if kind == "Service"}
    for host, port in deploy.DNS_ADDRESSES.values():
        assert host in services, host
        assert port in {p["port"] for p in services[host]["spec"]["ports"]}, host
    # Envoy balances over authz pods only if the Service is headless (STRICT_DNS).
    assert services["authz"]["spec"]["clusterIP"] == "None"


def test_envoy_pods_mount_the_generated_configs(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    for proxy in ("gateway", "egress"):
        spec = resources[("Deployment", f"envoy-{proxy}")]["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if "configMap" in v]
        assert volume["configMap"]["name"] == f"envoy-{proxy}"
        args = spec["containers"][0]["args"]
        assert args[:2] == ["-c", "/etc/envoy/envoy.yaml"]
        port = deploy.ADMIN_PORTS[proxy]
        assert {p["containerPort"] for p in spec["containers"][0]["ports"]} >= {port}


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _secret_file(spec: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) of the file ``path`` as the container sees it."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in container["volumeMounts"]:
        directory = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(directory) and "secret" in volumes[mount["name"]]:
            assert mount.get("readOnly") is True, mount
            secret = volumes[mount["name"]]["secret"]
            relative = path.removeprefix(directory)
            (item,) = [i for i in secret["items"] if i["path"] == relative]
            return secret["secretName"], item["key"]
    raise AssertionError(f"{container['name']}: nothing mounts {path}")


def test_authz_requires_envoys_client_certificate() -> None:
    """authz's gRPC port is mTLS (AUTHZ_GRPC_TLS_*: authz then always requires the client
    certificate), from the Secret authz-grpc-tls; authz's own rules accept the settings."""
    spec = _authz_deployment()["spec"]["template"]["spec"]
    authz = next(c for c in spec["containers"] if c["name"] == "authz")
    env = _env(authz)
    assert "AUTHZ_GRPC_ALLOW_PLAINTEXT" not in env
    assert "AUTHZ_OPA_ALLOW_PLAINTEXT" not in env
    settings = load(env)
    assert settings.grpc_addr == "0.0.0.0:9191"
    assert settings.grpc_tls
    assert is_loopback_host(urlsplit(settings.opa_url).hostname or "")  # the OPA sidecar
    for key, secret_key in (
        ("AUTHZ_GRPC_TLS_CERT", "tls.crt"),
        ("AUTHZ_GRPC_TLS_KEY", "tls.key"),
        ("AUTHZ_GRPC_TLS_CLIENT_CA", "ca.crt"),
    ):
        assert _secret_file(spec, authz, env[key]) == ("authz-grpc-tls", secret_key), key


def test_plaintext_authz_would_be_refused() -> None:
    """The check above can fail: without the TLS settings authz refuses 0.0.0.0."""
    spec = _authz_deployment()["spec"]["template"]["spec"]
    authz = next(c for c in spec["containers"] if c["name"] == "authz")
    env = {k: v for k, v in _env(authz).items() if not k.startswith("AUTHZ_GRPC_TLS_")}
    with pytest.raises(ConfigError, match=re.escape("AUTHZ_GRPC_ADDR='0.0.0.0:9191'")):
        load(env)


def test_envoy_pods_mount_their_tls_secrets(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """Every TLS file the proxies' configs name (/etc/envoy-tls/...) is a key of a Secret
    mounted there: the client certificate for authz and the listener's certificate."""
    expected = {
        "envoy-client": "authz-envoy-client-tls",
        "envoy-gateway": "envoy-gateway-tls",
        "envoy-egress": "envoy-egress-tls",
    }
    for proxy in ("gateway", "egress"):
        spec = resources[("Deployment", f"envoy-{proxy}")]["spec"]["template"]["spec"]
        assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsUser"]
        config = (ROOT / f"infra/compose/envoy/envoy-{proxy}.yaml").read_text()
        # Egress interception: one Secret, a <host>.crt/.key pair per intercepted host.
        pattern = r"/etc/envoy-tls/egress-intercept/([a-z0-9.-]+)/tls\.(crt|key)"
        intercepted = set(re.findall(pattern, config))
        assert bool(intercepted) is (proxy == "egress")
        for host, kind in intercepted:
            path = f"/etc/envoy-tls/egress-intercept/{host}/tls.{kind}"
            secret, key = _secret_file(spec, spec["containers"][0], path)
            assert (secret, key) == ("envoy-egress-intercept-tls", f"{host}.{kind}")
            assert key in resources[("Secret", secret)]["stringData"]
        config = re.sub(pattern, "", config)
        files = set(re.findall(r"/etc/envoy-tls/[a-z-]+/[a-z.]+", config))
        leaves = {path.split("/")[3] for path in files}
        assert leaves == {"envoy-client", f"envoy-{proxy}"}
        for path in files:
            secret, key = _secret_file(spec, spec["containers"][0], path)
            assert secret == expected[path.split("/")[3]]
            assert key == path.rsplit("/", 1)[1]
            assert resources[("Secret", secret)]["type"] == "kubernetes.io/tls"
