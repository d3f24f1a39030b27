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

import copy
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from authz.core.errors import ConfigError
from authz.runtime import audit, config
from authz.runtime.config import load, unknown_variables
from authz.tools import deploy
from tests.helpers.infra import ROOT

K8S = ROOT / "infra/k8s"
BASE = K8S / "base"
VERSIONS = ("1.29", "1.37")
TEMPLATE = K8S / "secrets.example.yaml"
# Every kustomization and what `kubectl apply -k` of it deploys (rendered by kustomize).
KUSTOMIZATIONS = ("base", "overlays/dev", "overlays/production", "components/tracing", "monitoring")
OVERLAYS = ("overlays/dev", "overlays/production")
# Kinds of CRDs (the Prometheus Operator's): no schema here, test_monitoring.py checks them.
CRD_GROUPS = ("monitoring.coreos.com/",)


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _kustomization(directory: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((K8S / directory / "kustomization.yaml").read_text())
    return loaded


def _listed_manifests() -> list[Path]:
    """The manifests the kustomizations list as resources (files, not other
    kustomizations), and the template: what is validated file by file."""
    found = [TEMPLATE]
    for directory in KUSTOMIZATIONS:
        for resource in _kustomization(directory).get("resources", []):
            path = (K8S / directory / resource).resolve()
            if path.is_file() and path.suffix == ".yaml":
                found.append(path)
    return sorted(set(found))


MANIFESTS = _listed_manifests()


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


def _kustomize(kustomize_bin: str, directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kustomize_bin, "build", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(kustomize_bin: str) -> dict[str, list[dict[str, Any]]]:
    """What `kubectl apply -k` deploys, per overlay (and infra/k8s/monitoring)."""
    return {name: _kustomize(kustomize_bin, K8S / name) for name in (*OVERLAYS, "monitoring")}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", [*OVERLAYS, "monitoring"])
def test_rendered_overlay_validates(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, version: str
) -> None:
    """What kustomize renders (patches applied, generated ConfigMaps, components) is valid
    too: a patch can break a valid base."""
    for document in rendered[overlay]:
        if document["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            _validate(document, version)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{document['kind']}/{document['metadata']['name']}: {where}: {exc}")


def _authz_deployment() -> dict[str, Any]:
    return next(d for d in _documents(BASE / "authz.yaml") if d["kind"] == "Deployment")


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


@pytest.mark.parametrize(
    ("old", "new"),
    [("  replicas: 1\n", "  replics: 1\n"), ("claimName: authz-data", "claimName: 42")],
    ids=["misspelt-field", "wrong-type"],
)
def test_a_broken_overlay_patch_is_refused(
    kustomize_bin: str, tmp_path: Path, old: str, new: str
) -> None:
    """The render is validated, not only the files: a patch that breaks a valid base
    (here overlays/dev/authz.yaml) fails the schema check of what kustomize renders."""
    shutil.copytree(K8S, tmp_path / "k8s")
    patch = tmp_path / "k8s/overlays/dev/authz.yaml"
    text = patch.read_text()
    assert old in text
    patch.write_text(text.replace(old, new, 1))
    (deployment,) = [
        d
        for d in _kustomize(kustomize_bin, tmp_path / "k8s/overlays/dev")
        if (d["kind"], d["metadata"]["name"]) == ("Deployment", "authz")
    ]
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment, VERSIONS[-1])


def _by_name(documents: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in documents}


@pytest.fixture(scope="module", params=[*OVERLAYS, "overlays/production+monitoring"])
def resources(
    request: pytest.FixtureRequest, rendered: dict[str, list[dict[str, Any]]]
) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> document, for what an overlay deploys (production also with
    infra/k8s/monitoring) plus the template of the objects created from files."""
    documents = [
        document
        for name in request.param.split("+")
        for document in rendered["monitoring" if name == "monitoring" else name]
    ]
    return _by_name([*documents, *_documents(TEMPLATE)])


def test_kustomizations_list_every_manifest() -> None:
    """Every YAML file beside a kustomization is one of its resources or patches (a new
    manifest cannot be forgotten), and every kustomization deploys to the namespace authz."""
    for directory in KUSTOMIZATIONS:
        kustomization = _kustomization(directory)
        used = set(kustomization.get("resources", []))
        used |= {patch["path"] for patch in kustomization.get("patches", []) if "path" in patch}
        on_disk = {p.name for p in (K8S / directory).glob("*.y*ml")} - {"kustomization.yaml"}
        assert on_disk <= used, directory
        if "namespace" in kustomization:
            assert kustomization["namespace"] == "authz"
    assert [p.name for p in K8S.glob("*.y*ml")] == [TEMPLATE.name]  # nothing unlisted on top


WORKLOADS = ("Deployment", "StatefulSet")


def _workloads(resources: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: doc for (kind, name), doc in resources.items() if kind in WORKLOADS}


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _label_selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels, matchExpressions In/NotIn/Exists) matches ``labels``."""
    if not _selects(selector.get("matchLabels", {}), labels):
        return False
    for expression in selector.get("matchExpressions", []):
        value = labels.get(expression["key"])
        operator = expression["operator"]
        if operator == "Exists":
            matched = value is not None
        else:
            matched = value in expression["values"]
            matched = matched if operator == "In" else not matched
        if not matched:
            return False
    return True


def test_selectors_match_workloads(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    pods = {
        name: doc["spec"]["template"]["metadata"]["labels"]
        for name, doc in _workloads(resources).items()
    }
    for (kind, name), doc in resources.items():
        selector: dict[str, Any] | None = None
        if kind == "Service" and doc["spec"].get("type") != "ExternalName":
            selector = {"matchLabels": doc["spec"]["selector"]}
        elif kind in ("PodDisruptionBudget",):
            selector = doc["spec"]["selector"]
        elif kind == "NetworkPolicy" and doc["spec"]["podSelector"]:
            selector = doc["spec"]["podSelector"]
        elif kind == "HorizontalPodAutoscaler":
            assert doc["spec"]["scaleTargetRef"]["name"] in pods, name
        if selector is not None:
            found = any(_label_selects(selector, labels) for labels in pods.values())
            assert found, f"{kind}/{name}"
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
    assert env["AUTHZ_OPA_URL"] == "unix:///run/opa/opa.sock"


def _socket_problems(resources: Resources) -> list[str]:
    """Why authz could not reach OPA over the shared unix socket: OPA must listen on
    ``unix://<path>`` (``--addr``) with ``--unix-socket-perm`` granting the group read and
    write and others nothing; authz's ``AUTHZ_OPA_URL`` must be ``unix://`` the same file
    as authz sees it (both containers mount one in-memory emptyDir, which no other
    container mounts, OPA writable); and authz's gid must be the pod's fsGroup, the group
    the socket gets (kubelet sets the volume's group to fsGroup with the setgid bit)."""
    spec = _pod(resources, "authz")
    opa = _container(resources, "authz", "opa")
    authz = _container(resources, "authz", "authz")
    addrs = [a.partition("=")[2] for a in opa["args"] if a.startswith("--addr=unix://")]
    if len(addrs) != 1:
        return [f"OPA listens on no single unix socket: {opa['args']}"]
    socket = addrs[0].removeprefix("unix://")
    problems = []
    perms = [a.partition("=")[2] for a in opa["args"] if a.startswith("--unix-socket-perm=")]
    if len(perms) != 1 or len(perms[0]) != 3 or perms[0][1] not in "67" or perms[0][2] != "0":
        problems.append(f"socket permissions {perms}: not group read-write, others none")

    def mount(container: dict[str, Any], path: str) -> dict[str, Any] | None:
        return next(
            (
                m
                for m in container.get("volumeMounts", [])
                if path.startswith(m["mountPath"].rstrip("/") + "/")
            ),
            None,
        )

    opa_mount = mount(opa, socket)
    url = _env(authz).get("AUTHZ_OPA_URL", "")
    authz_mount = mount(authz, url.removeprefix("unix://")) if url.startswith("unix://") else None
    if not url.startswith("unix:///"):
        problems.append(f"AUTHZ_OPA_URL={url!r} is not a unix socket")
    elif opa_mount is None or authz_mount is None or opa_mount["name"] != authz_mount["name"]:
        problems.append(f"authz's {url} and OPA's {socket} are not on one shared volume")
    elif url.removeprefix("unix://").removeprefix(authz_mount["mountPath"].rstrip("/")) != (
        socket.removeprefix(opa_mount["mountPath"].rstrip("/"))
    ):
        problems.append(f"authz's {url} is not the file OPA's {socket} creates")
    if opa_mount is not None:
        if opa_mount.get("readOnly"):
            problems.append("OPA's socket volume is read-only")
        volume = next(v for v in spec["volumes"] if v["name"] == opa_mount["name"])
        if volume.get("emptyDir", {}).get("medium") != "Memory":
            problems.append(f"the socket volume {volume['name']} is not an in-memory emptyDir")
        others = [
            c["name"]
            for c in [*spec["containers"], *spec.get("initContainers", [])]
            if c["name"] not in {"authz", "opa"}
            and any(m["name"] == volume["name"] for m in c.get("volumeMounts", []))
        ]
        if others:
            problems.append(f"the socket volume is mounted by {others} too")
    pod_security = spec.get("securityContext", {})
    gid = authz.get("securityContext", {}).get("runAsGroup", pod_security.get("runAsGroup"))
    if pod_security.get("fsGroup") is None or gid != pod_security["fsGroup"]:
        problems.append(f"authz's gid {gid} is not the fsGroup the socket gets")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_authz_reaches_opa_over_the_shared_socket_volume(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    assert _socket_problems(_overlay(rendered, overlay)) == []


def _break_socket(resources: Resources, change: str) -> Resources:
    broken = copy.deepcopy(resources)
    spec = _pod(broken, "authz")
    opa = _container(broken, "authz", "opa")
    authz = _container(broken, "authz", "authz")
    url = next(e for e in authz["env"] if e["name"] == "AUTHZ_OPA_URL")
    if change == "tcp url":
        url["value"] = "http://127.0.0.1:8181"
    elif change == "other path":
        url["value"] = "unix:///run/opa/other.sock"
    elif change == "authz does not mount it":
        authz["volumeMounts"] = [m for m in authz["volumeMounts"] if m["mountPath"] != "/run/opa"]
    elif change == "opa on its own volume":
        spec["volumes"].append({"name": "opa-own", "emptyDir": {"medium": "Memory"}})
        next(m for m in opa["volumeMounts"] if m["mountPath"] == "/run/opa")["name"] = "opa-own"
    elif change == "no unix listener":
        opa["args"] = [a for a in opa["args"] if not a.startswith("--addr=unix://")]
    elif change == "world-open socket":
        opa["args"] = [
            "--unix-socket-perm=777" if a.startswith("--unix-socket-perm=") else a
            for a in opa["args"]
        ]
    elif change == "default socket permissions":
        opa["args"] = [a for a in opa["args"] if not a.startswith("--unix-socket-perm=")]
    elif change == "on disk":
        next(v for v in spec["volumes"] if v["name"] == "opa-socket")["emptyDir"] = {}
    elif change == "read-only for OPA":
        next(m for m in opa["volumeMounts"] if m["mountPath"] == "/run/opa")["readOnly"] = True
    elif change == "authz in another group":
        authz["securityContext"]["runAsGroup"] = 2000
    elif change == "another container mounts it":
        spec["containers"].append(
            {"name": "debug", "volumeMounts": [{"name": "opa-socket", "mountPath": "/s"}]}
        )
    return broken


BROKEN_SOCKET = {
    "tcp url": "is not a unix socket",
    "other path": "is not the file OPA's",
    "authz does not mount it": "are not on one shared volume",
    "opa on its own volume": "are not on one shared volume",
    "no unix listener": "no single unix socket",
    "world-open socket": "not group read-write, others none",
    "default socket permissions": "not group read-write, others none",
    "on disk": "is not an in-memory emptyDir",
    "read-only for OPA": "OPA's socket volume is read-only",
    "authz in another group": "is not the fsGroup the socket gets",
    "another container mounts it": "mounted by ['debug'] too",
}


@pytest.mark.parametrize("change", BROKEN_SOCKET)
def test_socket_check_can_fail(rendered: dict[str, list[dict[str, Any]]], change: str) -> None:
    problems = _socket_problems(_break_socket(_overlay(rendered, "overlays/production"), change))
    assert any(BROKEN_SOCKET[change] in problem for problem in problems), problems


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
    """Each Envoy mounts its generated ConfigMap (a name with kustomize's content hash),
    which holds the Compose config (production: its traced variant)."""
    traced = ("NetworkPolicy", "tracing-egress") in resources  # components/tracing
    for proxy in ("gateway", "egress"):
        spec = resources[("Deployment", f"envoy-{proxy}")]["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if "configMap" in v]
        name = volume["configMap"]["name"]
        assert re.fullmatch(rf"envoy-{proxy}-[a-z0-9]{{10}}", name), name
        sources = {
            (False, "gateway"): deploy.COMPOSE_GATEWAY,
            (False, "egress"): deploy.COMPOSE_EGRESS,
            (True, "gateway"): deploy.COMPOSE_GATEWAY_TRACED,
            (True, "egress"): deploy.COMPOSE_EGRESS_TRACED,
        }
        source = sources[(traced, proxy)]
        assert resources[("ConfigMap", name)]["data"]["envoy.yaml"].split("\n", 1)[1] == (
            (ROOT / source).read_text(encoding="utf-8")
        )
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
    # The OPA sidecar's unix socket: local, so neither TLS nor AUTHZ_OPA_ALLOW_PLAINTEXT.
    assert settings.opa_url == "unix:///run/opa/opa.sock"
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
        (volume,) = [v for v in spec["volumes"] if "configMap" in v]
        config = resources[("ConfigMap", volume["configMap"]["name"])]["data"]["envoy.yaml"]
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


# -- the fleet: bundles polled, config changes roll pods, state off emptyDir ---------------

Resources = dict[tuple[str, str], dict[str, Any]]


def _overlay(rendered: dict[str, list[dict[str, Any]]], name: str) -> Resources:
    return _by_name([*rendered[name], *_documents(TEMPLATE)])


def _pod(resources: Resources, name: str) -> dict[str, Any]:
    specs: list[dict[str, Any]] = [
        doc["spec"]["template"]["spec"]
        for (kind, workload), doc in resources.items()
        if kind in WORKLOADS and workload == name
    ]
    (spec,) = specs
    return spec


def _container(resources: Resources, workload: str, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        c for c in _pod(resources, workload)["containers"] if c["name"] == name
    ]
    (container,) = found
    return container


def _cpus(quantity: str) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _concurrency_problems(resources: Resources) -> list[str]:
    """Envoy containers whose ``--concurrency`` (worker threads) is not their CPU limit
    rounded up: without it Envoy starts one worker per CPU of the node, which the limit
    then throttles."""
    problems = []
    for (kind, name), doc in resources.items():
        if kind not in WORKLOADS:
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            if not str(container.get("image", "")).startswith("envoyproxy/envoy:"):
                continue
            args = container.get("args", [])
            limit = math.ceil(_cpus(container["resources"]["limits"]["cpu"]))
            if "--concurrency" not in args:
                problems.append(f"{name}: no --concurrency")
            elif args[args.index("--concurrency") + 1] != str(limit):
                problems.append(f"{name}: --concurrency is not the CPU limit {limit}")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_concurrency_is_the_cpu_limit(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    resources = _overlay(rendered, overlay)
    assert _concurrency_problems(resources) == []
    assert {n for (k, n) in resources if k == "Deployment"} >= {"envoy-gateway", "envoy-egress"}


@pytest.mark.parametrize(
    ("args", "cpu"),
    [(["--concurrency", "2"], "1"), ([], "1"), (["--concurrency", "1"], "1500m")],
    ids=["more-workers-than-cpus", "no-flag", "limit-raised-alone"],
)
def test_concurrency_check_can_fail(
    rendered: dict[str, list[dict[str, Any]]], args: list[str], cpu: str
) -> None:
    resources = copy.deepcopy(_overlay(rendered, "overlays/production"))
    envoy = _container(resources, "envoy-gateway", "envoy")
    envoy["args"] = ["-c", "/etc/envoy/envoy.yaml", *args]
    envoy["resources"]["limits"]["cpu"] = cpu
    assert _concurrency_problems(resources) == [
        "envoy-gateway: "
        + (
            "no --concurrency"
            if not args
            else f"--concurrency is not the CPU limit {math.ceil(_cpus(cpu))}"
        )
    ]


_HASHED = re.compile(r"(?P<name>[a-z0-9-]+)-[a-z0-9]{10}")


def _unrolled_config(resources: Resources) -> list[str]:
    """ConfigMaps pods mount that do not roll them when they change: every ConfigMap
    shipped in a kustomization must be generated (configMapGenerator: a content hash in
    its name, so a change is a new pod template); only the template's objects (created by
    the operator) keep a fixed name."""
    template = {d["metadata"]["name"] for d in _documents(TEMPLATE) if d["kind"] == "ConfigMap"}
    problems = []
    for (kind, name), doc in resources.items():
        if kind not in WORKLOADS:
            continue
        for volume in doc["spec"]["template"]["spec"].get("volumes", []):
            ref = volume.get("configMap", {}).get("name")
            if ref is None or ref in template:
                continue
            match = _HASHED.fullmatch(ref)
            if match is None or ("ConfigMap", ref) not in resources:
                problems.append(f"{name}: ConfigMap {ref} is not generated")
    return problems


@pytest.mark.parametrize("overlay", [*OVERLAYS, "monitoring"])
def test_config_maps_are_generated_so_changes_roll_pods(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    assert _unrolled_config(_overlay(rendered, overlay)) == []


def test_a_config_change_rolls_exactly_the_pods_that_mount_it(
    kustomize_bin: str, tmp_path: Path
) -> None:
    """Edit OPA's config (a copy of infra/k8s): authz's pod template changes (a rollout),
    the Envoys' do not; without the content hash (disableNameSuffixHash) the check
    above catches the ConfigMaps that would no longer roll anything."""
    shutil.copytree(K8S, tmp_path / "k8s")
    before = _by_name(_kustomize(kustomize_bin, tmp_path / "k8s/overlays/dev"))
    opa = tmp_path / "k8s/base/generated/opa.yaml"
    opa.write_text(opa.read_text() + "\n# changed\n")
    after = _by_name(_kustomize(kustomize_bin, tmp_path / "k8s/overlays/dev"))
    for name, rolled in (("authz", True), ("envoy-gateway", False), ("envoy-egress", False)):
        changed = before[("Deployment", name)] != after[("Deployment", name)]
        assert changed is rolled, name
    base = tmp_path / "k8s/base/kustomization.yaml"
    text = base.read_text()
    assert "generatorOptions:\n" in text
    base.write_text(
        text.replace("generatorOptions:\n", "generatorOptions:\n  disableNameSuffixHash: true\n")
    )
    unhashed = _by_name(
        [*_kustomize(kustomize_bin, tmp_path / "k8s/overlays/dev"), *_documents(TEMPLATE)]
    )
    assert sorted(_unrolled_config(unhashed)) == [
        "authz: ConfigMap opa-config is not generated",
        "authz: ConfigMap opa-config is not generated",
        "bundle-server: ConfigMap bundle-server-nginx is not generated",
        "envoy-egress: ConfigMap envoy-egress is not generated",
        "envoy-gateway: ConfigMap envoy-gateway is not generated",
    ]


def _opa_config(resources: Resources) -> dict[str, Any]:
    spec = _pod(resources, "authz")
    opa = _container(resources, "authz", "opa")
    config_arg = next(a for a in opa["args"] if a.startswith("--config-file="))
    path = config_arg.partition("=")[2]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in opa["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    config_map = volumes[mount["name"]]["configMap"]
    (item,) = [i for i in config_map["items"] if i["path"] == path.rpartition("/")[2]]
    loaded: dict[str, Any] = yaml.safe_load(
        resources[("ConfigMap", config_map["name"])]["data"][item["key"]]
    )
    return loaded


def _bundle_problems(resources: Resources) -> list[str]:
    """Why OPA in the authz pods would not poll signed bundles from the bundle server:
    the bundle must come from a service (not a file or a ConfigMap), the service's host a
    Service of the deployment on the port it names, serving from a volume (no
    ConfigMap's size ceiling), polled at least every 20 s, signature verified against
    the key in the ConfigMap authz-bundle-verification-key, which holds nothing else."""
    problems = []
    opa_config = _opa_config(resources)
    bundle = opa_config["bundles"]["authz"]
    if "service" not in bundle or "://" in bundle.get("resource", ""):
        return [f"the bundle is not polled from a service: {bundle}"]
    url = urlsplit(opa_config["services"][bundle["service"]]["url"])
    service = resources.get(("Service", url.hostname or ""))
    if service is None or url.port not in {p["port"] for p in service["spec"]["ports"]}:
        problems.append(f"{url.geturl()}: no such Service and port")
    else:
        selector = {"matchLabels": service["spec"]["selector"]}
        (server,) = [
            doc
            for (kind, _), doc in resources.items()
            if kind in WORKLOADS
            and _label_selects(selector, doc["spec"]["template"]["metadata"]["labels"])
        ]
        claims = {t["metadata"]["name"] for t in server["spec"].get("volumeClaimTemplates", [])}
        nginx = server["spec"]["template"]["spec"]["containers"][0]
        (mount,) = [
            m for m in nginx["volumeMounts"] if m["mountPath"] == "/usr/share/nginx/bundles"
        ]
        if mount["name"] not in claims:
            problems.append("the bundle server does not serve from a PersistentVolumeClaim")
    if bundle.get("polling", {}).get("max_delay_seconds", 0) > 20:
        problems.append("polled less often than every 20 s")
    if bundle.get("signing", {}).get("keyid") not in opa_config.get("keys", {}):
        problems.append("no signature verification")
    opa = _container(resources, "authz", "opa")
    key_files = [a.rpartition("=")[2] for a in opa["args"] if a.startswith("--set-file=keys.")]
    spec = _pod(resources, "authz")
    volumes = {v["name"]: v for v in spec["volumes"]}
    for path in key_files:
        (mount,) = [m for m in opa["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
        source = volumes[mount["name"]].get("configMap", {}).get("name")
        if source != "authz-bundle-verification-key":
            problems.append(f"{path} is not from the ConfigMap authz-bundle-verification-key")
    key_map = resources[("ConfigMap", "authz-bundle-verification-key")]
    if set(key_map.get("data", {})) | set(key_map.get("binaryData", {})) != {
        "bundle-signing.pub.pem"
    }:
        problems.append("authz-bundle-verification-key holds more than the public key")
    for (kind, name), doc in resources.items():
        if kind == "ConfigMap" and any(k.endswith(".tar.gz") for k in doc.get("binaryData", {})):
            problems.append(f"ConfigMap {name} holds a bundle")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_opa_polls_signed_bundles_from_the_bundle_server(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    resources = _overlay(rendered, overlay)
    assert _bundle_problems(resources) == []
    # The server's config is the Compose bundle server's (run in a real nginx by
    # test_bundle_server.py).
    (volume,) = [v for v in _pod(resources, "bundle-server")["volumes"] if "configMap" in v]
    served = resources[("ConfigMap", volume["configMap"]["name"])]["data"]["default.conf"]
    assert served.split("\n", 1)[1] == (ROOT / deploy.NGINX_BUNDLES).read_text()


def _break_bundle(resources: Resources, change: str) -> Resources:
    broken = copy.deepcopy(resources)
    spec = _pod(broken, "authz")
    opa = _container(broken, "authz", "opa")
    (volume,) = [v for v in spec["volumes"] if v["name"] == "opa-config"]
    data = broken[("ConfigMap", volume["configMap"]["name"])]["data"]
    config = yaml.safe_load(data["opa.yaml"])
    if change == "bundle file":
        config["bundles"]["authz"] = {"resource": "file:///bundles/authz.tar.gz"}
    elif change == "unknown host":
        config["services"]["bundles"]["url"] = "http://bundles.example:8080/bundles"
    elif change == "slow polling":
        config["bundles"]["authz"]["polling"]["max_delay_seconds"] = 300
    elif change == "unsigned":
        del config["bundles"]["authz"]["signing"]
    elif change == "key in the config":
        (mount,) = [m for m in opa["volumeMounts"] if m["mountPath"] == "/keys"]
        next(v for v in spec["volumes"] if v["name"] == mount["name"])["configMap"]["name"] = (
            volume["configMap"]["name"]
        )
    elif change == "bundle in a ConfigMap":
        broken[("ConfigMap", "authz-bundle-verification-key")]["binaryData"] = {
            "authz.tar.gz": "H4sI"
        }
    data["opa.yaml"] = yaml.safe_dump(config)
    return broken


BROKEN_BUNDLE = {
    "bundle file": "not polled from a service",
    "unknown host": "no such Service and port",
    "slow polling": "polled less often",
    "unsigned": "no signature verification",
    "key in the config": "is not from the ConfigMap authz-bundle-verification-key",
    "bundle in a ConfigMap": "holds a bundle",
}


@pytest.mark.parametrize("change", BROKEN_BUNDLE)
def test_bundle_check_can_fail(rendered: dict[str, list[dict[str, Any]]], change: str) -> None:
    resources = _overlay(rendered, "overlays/production")
    problems = _bundle_problems(_break_bundle(resources, change))
    assert any(BROKEN_BUNDLE[change] in problem for problem in problems), problems


def _role_problems(resources: Resources) -> list[str]:
    """The verification key is its own object under its own permission: the key admin
    Role updates that ConfigMap only, the publisher Role execs into the bundle server's
    fixed pod only, and no Role of the namespace grants updates to ConfigMaps in general
    or exec into any pod."""
    problems = []
    for (kind, name), doc in resources.items():
        if kind != "Role":
            continue
        for rule in doc["rules"]:
            writes = set(rule["verbs"]) & {"update", "patch", "create", "*"}
            for resource in rule["resources"]:
                if resource in ("configmaps", "pods/exec", "*") and writes:
                    names = rule.get("resourceNames", [])
                    if not names:
                        problems.append(f"Role/{name}: {resource} without resourceNames")
    roles = {name: doc for (kind, name), doc in resources.items() if kind == "Role"}
    key_admin = roles.get("authz-bundle-key-admin", {"rules": []})["rules"]
    if [r.get("resourceNames") for r in key_admin] != [["authz-bundle-verification-key"]]:
        problems.append("authz-bundle-key-admin does not name the verification key only")
    publisher = roles.get("authz-bundle-publisher", {"rules": []})["rules"]
    if {n for r in publisher for n in r.get("resourceNames", [])} != {"bundle-server-0"}:
        problems.append("authz-bundle-publisher is not limited to bundle-server-0")
    if ("StatefulSet", "bundle-server") not in resources:
        problems.append("the bundle server's pod name is not fixed (a StatefulSet)")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_verification_key_and_publishing_have_their_own_roles(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    assert _role_problems(_overlay(rendered, overlay)) == []


@pytest.mark.parametrize("change", ["any configmap", "any pod"])
def test_role_check_can_fail(rendered: dict[str, list[dict[str, Any]]], change: str) -> None:
    resources = copy.deepcopy(_overlay(rendered, "overlays/production"))
    role = "authz-bundle-key-admin" if change == "any configmap" else "authz-bundle-publisher"
    for rule in resources[("Role", role)]["rules"]:
        rule.pop("resourceNames", None)
    assert _role_problems(resources)


def _state_problems(resources: Resources, overlay: str) -> list[str]:
    """Where overrides and the audit trail live. dev: /var/lib/authz (the overrides file,
    the SQLite audit trail) on a PersistentVolumeClaim at least as large as the audit
    store's bound, one replica, Recreate (the claim is ReadWriteOnce), no autoscaler.
    production: Redis (rate limits, overrides) and PostgreSQL (audit) through URL files,
    each replica's id its pod name, an autoscaler of at least 2 replicas, and the
    stores themselves on PersistentVolumeClaims."""
    problems = []
    deployment = resources[("Deployment", "authz")]
    spec = deployment["spec"]["template"]["spec"]
    authz = next(c for c in spec["containers"] if c["name"] == "authz")
    env = {e["name"]: e for e in authz.get("env", [])}
    hpa = resources.get(("HorizontalPodAutoscaler", "authz"))
    if overlay == "overlays/dev":
        (mount,) = [m for m in authz["volumeMounts"] if m["mountPath"] == "/var/lib/authz"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        claim = volume.get("persistentVolumeClaim", {}).get("claimName")
        if ("PersistentVolumeClaim", claim) not in resources:
            return ["dev: /var/lib/authz is not on a PersistentVolumeClaim"]
        size = resources[("PersistentVolumeClaim", claim)]["spec"]["resources"]["requests"]
        if _bytes(size["storage"]) < audit.volume_bytes(config.DEFAULT_AUDIT_MAX_BYTES):
            problems.append("dev: the claim is smaller than the audit store's bound")
        if deployment["spec"].get("replicas") != 1 or hpa is not None:
            problems.append("dev: more than one replica on a ReadWriteOnce claim")
        if deployment["spec"].get("strategy", {}).get("type") != "Recreate":
            problems.append("dev: a rolling update would need the claim twice")
        return problems
    wanted = {
        "AUTHZ_RATE_LIMIT_BACKEND": "redis",
        "AUTHZ_REDIS_URL_FILE": None,
        "AUTHZ_AUDIT_URL_FILE": None,
    }
    for key, value in wanted.items():
        if key not in env or (value is not None and env[key].get("value") != value):
            problems.append(f"production: {key} is not set")
    replica = env.get("AUTHZ_REPLICA_ID", {}).get("valueFrom", {}).get("fieldRef", {})
    if replica.get("fieldPath") != "metadata.name":
        problems.append("production: AUTHZ_REPLICA_ID is not the pod name")
    for key in ("AUTHZ_REDIS_URL_FILE", "AUTHZ_AUDIT_URL_FILE"):
        if key in env and "value" in env[key]:
            secret, _ = _secret_file(spec, authz, env[key]["value"])
            if secret != "authz-stores":
                problems.append(f"production: {key} is not from the Secret authz-stores")
    if hpa is None or hpa["spec"]["minReplicas"] < 2:
        problems.append("production: no autoscaler of at least 2 replicas")
    for store in ("redis", "postgresql"):
        workload = resources.get(("StatefulSet", store))
        if workload is None or not workload["spec"].get("volumeClaimTemplates"):
            problems.append(f"production: {store} is not a StatefulSet on a claim")
    return problems


def _bytes(quantity: str) -> int:
    match = re.fullmatch(r"([0-9]+)(Ki|Mi|Gi|Ti|)", quantity)
    assert match, quantity
    return (
        int(match.group(1))
        * {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "": 1}[match.group(2)]
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overrides_and_audit_are_not_on_empty_dir(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    assert _state_problems(_overlay(rendered, overlay), overlay) == []


def _break_state(resources: Resources, change: str) -> Resources:
    broken = copy.deepcopy(resources)
    deployment = broken[("Deployment", "authz")]
    spec = deployment["spec"]["template"]["spec"]
    authz = next(c for c in spec["containers"] if c["name"] == "authz")
    if change == "dev emptyDir":
        volume = next(v for v in spec["volumes"] if v["name"] == "data")
        volume.pop("persistentVolumeClaim")
        volume["emptyDir"] = {}
    elif change == "dev two replicas":
        deployment["spec"]["replicas"] = 2
    elif change == "dev small claim":
        broken[("PersistentVolumeClaim", "authz-data")]["spec"]["resources"]["requests"] = {
            "storage": "100Mi"
        }
    elif change == "production no audit url":
        authz["env"] = [e for e in authz["env"] if e["name"] != "AUTHZ_AUDIT_URL_FILE"]
    elif change == "production fixed replica id":
        for entry in authz["env"]:
            if entry["name"] == "AUTHZ_REPLICA_ID":
                entry.pop("valueFrom")
                entry["value"] = "authz"
    elif change == "production redis on emptyDir":
        del broken[("StatefulSet", "redis")]["spec"]["volumeClaimTemplates"]
    return broken


BROKEN_STATE = {
    "dev emptyDir": "not on a PersistentVolumeClaim",
    "dev two replicas": "more than one replica",
    "dev small claim": "smaller than the audit store's bound",
    "production no audit url": "AUTHZ_AUDIT_URL_FILE is not set",
    "production fixed replica id": "AUTHZ_REPLICA_ID is not the pod name",
    "production redis on emptyDir": "redis is not a StatefulSet on a claim",
}


@pytest.mark.parametrize("change", BROKEN_STATE)
def test_state_check_can_fail(rendered: dict[str, list[dict[str, Any]]], change: str) -> None:
    overlay = "overlays/" + change.split()[0]
    problems = _state_problems(_break_state(_overlay(rendered, overlay), change), overlay)
    assert any(BROKEN_STATE[change] in problem for problem in problems), problems


def _tracing_problems(resources: Resources) -> list[str]:
    """Production traces end to end: both Envoys' configs have the OpenTelemetry tracer on
    their listeners, exporting to a Service and port of the deployment (with
    infra/k8s/monitoring), OPA's distributed_tracing and authz's OTLP endpoint name the
    same collector, and a NetworkPolicy lets those pods reach it."""
    problems = []
    services = {n: d for (k, n), d in resources.items() if k == "Service"}

    def reachable(host: str, port: int, what: str) -> None:
        service = services.get(host)
        if service is None or port not in {p["port"] for p in service["spec"]["ports"]}:
            problems.append(f"{what}: {host}:{port} is no Service port")

    for proxy in ("gateway", "egress"):
        spec = _pod(resources, f"envoy-{proxy}")
        (volume,) = [v for v in spec["volumes"] if "configMap" in v]
        envoy = yaml.safe_load(
            resources[("ConfigMap", volume["configMap"]["name"])]["data"]["envoy.yaml"]
        )
        clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
        for listener in envoy["static_resources"]["listeners"]:
            if listener["name"] == "admin_read_only":
                continue
            for chain in listener["filter_chains"]:
                hcm = chain["filters"][0]["typed_config"]
                tracing = hcm.get("tracing", {}).get("provider", {})
                if tracing.get("name") != "envoy.tracers.opentelemetry":
                    problems.append(f"envoy-{proxy}/{listener['name']}: not traced")
                    continue
                uri = tracing["typed_config"]["http_service"]["http_uri"]
                cluster = clusters[uri["cluster"]]
                endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
                socket = endpoint["endpoint"]["address"]["socket_address"]
                reachable(socket["address"], socket["port_value"], f"envoy-{proxy}")
    tracing = _opa_config(resources).get("distributed_tracing")
    if tracing is None:
        problems.append("OPA: no distributed_tracing")
    else:
        host, _, port = tracing["address"].rpartition(":")
        reachable(host, int(port), "OPA")
    authz = _container(resources, "authz", "authz")
    endpoint = urlsplit(_env(authz).get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://missing:0"))
    reachable(endpoint.hostname or "", endpoint.port or 0, "authz")
    collector = {"app.kubernetes.io/name": "otel-collector"}
    for name in ("authz", "envoy-gateway", "envoy-egress"):
        labels = resources[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
        allowed = any(
            _label_selects(doc["spec"]["podSelector"], labels)
            and any(
                _label_selects(peer.get("podSelector", {"matchLabels": {"x": "y"}}), collector)
                and 4318 in {p["port"] for p in rule.get("ports", [])}
                for rule in doc["spec"].get("egress", [])
                for peer in rule.get("to", [])
            )
            for (kind, _), doc in resources.items()
            if kind == "NetworkPolicy"
        )
        if not allowed:
            problems.append(f"{name}: no NetworkPolicy lets it reach the collector")
    return problems


def test_production_traces_through_the_collector(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    resources = _by_name([*rendered["overlays/production"], *rendered["monitoring"]])
    assert _tracing_problems(resources) == []
    # The collector's config in Kubernetes is the Compose one (deploy --check keeps it).
    (volume,) = _pod(resources, "otel-collector")["volumes"]
    config = resources[("ConfigMap", volume["configMap"]["name"])]["data"]["config.yaml"]
    assert config.split("\n", 1)[1] == (ROOT / deploy.OTEL_COLLECTOR_CONFIG).read_text()
    # ... and it reaches Tempo: each exporter's endpoint is a Service port of Tempo's, which
    # the collector's NetworkPolicy lets it reach.
    collector = yaml.safe_load(config)
    policy = resources[("NetworkPolicy", "otel-collector")]["spec"]
    for exporter in collector["exporters"].values():
        host, _, port = exporter["endpoint"].rpartition(":")
        service = resources[("Service", host)]
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}, exporter
        assert any(
            _label_selects(peer["podSelector"], {"app.kubernetes.io/name": host})
            and int(port) in {p["port"] for p in rule["ports"]}
            for rule in policy["egress"]
            for peer in rule.get("to", [])
            if "podSelector" in peer
        ), exporter


@pytest.mark.parametrize("change", ["no collector", "dev overlay", "no egress rule"])
def test_tracing_check_can_fail(rendered: dict[str, list[dict[str, Any]]], change: str) -> None:
    if change == "no collector":
        resources = _by_name(rendered["overlays/production"])
    elif change == "dev overlay":
        resources = _by_name([*rendered["overlays/dev"], *rendered["monitoring"]])
    else:
        resources = _by_name([*rendered["overlays/production"], *rendered["monitoring"]])
        del resources[("NetworkPolicy", "tracing-egress")]
    assert _tracing_problems(resources)


def _pod_environment(resources: Resources, tmp_path: Path) -> dict[str, str]:
    """authz's environment in the production pod: literal values, the pod name for a
    fieldRef, a token for Secret references, and each file under a mounted Secret written
    (from the template's values) to ``tmp_path``, its variable pointing there."""
    spec = _pod(resources, "authz")
    authz = _container(resources, "authz", "authz")
    environ = {}
    for entry in authz["env"]:
        source = entry.get("valueFrom", {})
        if "value" in entry:
            value = entry["value"]
            if entry["name"].endswith("_FILE"):
                secret, key = _secret_file(spec, authz, value)
                path = tmp_path / f"{secret}-{key}"
                path.write_text(resources[("Secret", secret)]["stringData"][key])
                value = str(path)
            environ[entry["name"]] = value
        elif "fieldRef" in source:
            environ[entry["name"]] = "authz-5d8f7c9b6-x2k4q"
        elif "secretKeyRef" in source:
            environ[entry["name"]] = "t" * 64
    return environ


def test_production_authz_settings_load(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """authz accepts the production pod's settings: Redis for rate limits and
    PostgreSQL for the audit trail from the Secret authz-stores' URL files, the pod name as
    replica id, TLS as in the base; no variable is unknown."""
    environ = _pod_environment(_overlay(rendered, "overlays/production"), tmp_path)
    assert not unknown_variables(environ)
    settings = load(environ)
    assert settings.audit_url is not None
    assert settings.audit_url.reveal().startswith("postgresql://authz:")
    assert settings.replica_id == "authz-5d8f7c9b6-x2k4q"
    assert settings.rate_limit_backend == "redis"
    assert settings.redis_url is not None
    assert settings.redis_url.reveal() == "redis://redis:6379/0"
    assert settings.grpc_tls
    assert settings.opa_url == "unix:///run/opa/opa.sock"
    assert not settings.opa_allow_plaintext
