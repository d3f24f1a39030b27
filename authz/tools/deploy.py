"""Generate the deployment configs (Docker Compose, Kubernetes) from the local ones.

The local stack's files are the sources of truth; every deployment file derived from them
is this module's output, committed, and ``python -m authz.tools.deploy --check`` (run by the
tests) fails when one drifts::

    authz generate deploy [--root .] [--check]
    python -m authz.tools.deploy [--root .] [--check]     (the same)

- ``infra/compose/envoy/envoy-gateway.yaml`` from ``infra/envoy/envoy-gateway.yaml``
  (a structured rewrite, :func:`containerize`);
- ``infra/compose/envoy/envoy-egress.yaml`` from ``policy/egress/data.json``
  (:func:`authz.tools.egress_envoy.generate`, then :func:`containerize`);
- ``infra/k8s/generated/configmap-envoy.yaml``: the two files above as ConfigMaps;
- ``infra/k8s/generated/configmap-opa.yaml``: ``infra/opa/opa-file.yaml`` and
  ``infra/opa/system/*.rego`` (tests excluded) as a ConfigMap.

What differs from the local Envoy configs, and only this:

- listeners bind ``0.0.0.0`` (a container's network), same ports;
- clusters reach the other containers by DNS name with ``STRICT_DNS`` (every address a
  name resolves to is an endpoint: one per authz replica behind a headless Service or
  ``docker compose --scale``): :data:`DNS_ADDRESSES`;
- the authz cluster health-checks each endpoint over gRPC (``grpc.health.v1``), so a
  replica that is draining (health NOT_SERVING after SIGTERM) stops getting Checks;
- the gateway and egress listeners speak TLS (:data:`authz.tools.egress_envoy.LISTENER_TLS_DIRS`:
  ``/etc/envoy-tls/envoy-gateway`` and ``/etc/envoy-tls/envoy-egress``, ``tls.crt`` and
  ``tls.key``, mounted from a Secret or Compose's generated certificates). Envoy -> authz
  is mTLS already in the local configs (``/etc/envoy-tls/envoy-client``), unchanged here;
- Envoy's admin API binds ``127.0.0.1:9900`` inside the container (its POST endpoints,
  ``/quitquitquit`` and the like, stay unreachable), and a read-only listener on the
  admin port (9901 gateway, 9902 egress) proxies ``GET`` of :data:`READ_ONLY_ADMIN_PATHS`
  to it, for probes, Prometheus (``/stats/prometheus``) and troubleshooting.

Exit codes: 0 written / up to date, 1 drift (``--check``), 2 bad sources.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import yaml

from authz.tools import egress_envoy, services
from authz.tools.generated import add_check, sync
from authz.tools.usage import command_parser

__all__ = [
    "ADMIN_PORTS",
    "DNS_ADDRESSES",
    "EXIT_CODES",
    "INTERNAL_ADMIN_PORT",
    "READ_ONLY_ADMIN_PATHS",
    "SUMMARY",
    "arguments",
    "build_parser",
    "containerize",
    "main",
    "outputs",
    "run",
]

GATEWAY_SOURCE: Final = "infra/envoy/envoy-gateway.yaml"
EGRESS_SOURCE: Final = egress_envoy.DEFAULT_SERVICES
OPA_FILE_CONFIG: Final = "infra/opa/opa-file.yaml"
OPA_SYSTEM_POLICY: Final = "infra/opa/system"
COMPOSE_GATEWAY: Final = "infra/compose/envoy/envoy-gateway.yaml"
COMPOSE_EGRESS: Final = "infra/compose/envoy/envoy-egress.yaml"
K8S_ENVOY: Final = "infra/k8s/generated/configmap-envoy.yaml"
K8S_OPA: Final = "infra/k8s/generated/configmap-opa.yaml"

# The command line (python -m authz.tools.deploy, authz generate deploy).
PROG: Final = "python -m authz.tools.deploy"
SUMMARY: Final = "generate the Compose and Kubernetes configs from the local ones"
EXIT_CODES: Final = (
    (0, "written, or with --check up to date"),
    (1, "with --check: a generated file is stale or missing"),
    (2, "could not run: a source is missing or malformed"),
)

# Cluster name -> (DNS name, port) in Compose and Kubernetes (same names in both: the
# Compose services and the Kubernetes Services are called so).
DNS_ADDRESSES: Final[Mapping[str, tuple[str, int]]] = {
    "authz": ("authz", 9191),
    "upstream_api": ("upstream-api", 8090),
}
# The read-only admin listener's port per proxy (the local stack's admin ports).
ADMIN_PORTS: Final[Mapping[str, int]] = {"gateway": 9901, "egress": 9902}
INTERNAL_ADMIN_PORT: Final = 9900
# GET only. /stats covers /stats/prometheus; /ready is the probes' endpoint.
READ_ONLY_ADMIN_PATHS: Final = ("/ready", "/stats", "/clusters", "/server_info")

_TYPE: Final = "type.googleapis.com/envoy.extensions"
_HCM: Final = f"{_TYPE}.filters.network.http_connection_manager.v3.HttpConnectionManager"
_NAMESPACE: Final = "authz"


def _read_only_admin_listener(port: int) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [
        {
            "match": {
                "prefix": path,
                "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
            },
            "route": {"cluster": "admin", "timeout": "5s"},
        }
        for path in READ_ONLY_ADMIN_PATHS
    ]
    routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 404}})
    hcm = {
        "@type": _HCM,
        "stat_prefix": "admin_read_only",
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "route_config": {
            "name": "admin_read_only",
            "virtual_hosts": [{"name": "admin", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": f"{_TYPE}.filters.http.router.v3.Router"},
            }
        ],
    }
    return {
        "name": "admin_read_only",
        "address": egress_envoy.socket_address("0.0.0.0", port),
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def containerize(config: Mapping[str, Any], *, admin_port: int) -> dict[str, Any]:
    """A copy of the Envoy bootstrap ``config`` (a local-stack config) for a container:
    see the module docstring for every change. ``admin_port`` is the read-only admin
    listener's port.

    Raises ValueError naming a cluster on 127.0.0.1 that :data:`DNS_ADDRESSES` does not
    map (a new local cluster must be given a DNS name here, never silently keep a
    loopback address), a listener without a certificate directory in
    :data:`authz.tools.egress_envoy.LISTENER_TLS_DIRS`, or a listener named
    ``admin_read_only`` already present.
    """
    result = copy.deepcopy(dict(config))
    result["admin"] = {"address": egress_envoy.socket_address("127.0.0.1", INTERNAL_ADMIN_PORT)}
    resources = result["static_resources"]
    for listener in resources["listeners"]:
        if listener["name"] == "admin_read_only":
            raise ValueError("listener 'admin_read_only' is reserved for the admin proxy")
        if "internal_listener" in listener:
            continue  # the egress interception: no socket, its own per-host TLS
        listener["address"]["socket_address"]["address"] = "0.0.0.0"
        directory = egress_envoy.LISTENER_TLS_DIRS.get(listener["name"])
        if directory is None:
            raise ValueError(
                f"listener {listener['name']!r} has no TLS certificate: give it a directory "
                "in authz.tools.egress_envoy.LISTENER_TLS_DIRS (no plaintext listener on 0.0.0.0)"
            )
        for chain in listener["filter_chains"]:
            chain["transport_socket"] = egress_envoy.downstream_transport_socket(directory)
    for cluster in resources["clusters"]:
        name = cluster["name"]
        if cluster.get("type") != "STATIC":
            # LOGICAL_DNS clusters (egress services) already name real hosts; the
            # interception's internal cluster and the tunnels' ORIGINAL_DST have no
            # static address.
            continue
        if name not in DNS_ADDRESSES:
            raise ValueError(
                f"cluster {name!r} has a local address: give it a DNS name in "
                "authz.tools.deploy.DNS_ADDRESSES"
            )
        host, port = DNS_ADDRESSES[name]
        cluster["type"] = "STRICT_DNS"
        cluster["dns_lookup_family"] = "V4_PREFERRED"
        cluster["load_assignment"] = egress_envoy.load_assignment(name, host, port)
        if name == "authz":
            cluster["health_checks"] = [
                {
                    "timeout": "0.25s",
                    "interval": "2s",
                    "unhealthy_threshold": 2,
                    "healthy_threshold": 1,
                    "grpc_health_check": {},
                }
            ]
    resources["listeners"].append(_read_only_admin_listener(admin_port))
    resources["clusters"].append(
        {
            "name": "admin",
            "type": "STATIC",
            "connect_timeout": "0.25s",
            "load_assignment": egress_envoy.load_assignment(
                "admin", "127.0.0.1", INTERNAL_ADMIN_PORT
            ),
        }
    )
    return result


def _header(source: str, what: str) -> str:
    return f"""\
# GENERATED from {source} by `python -m authz.tools.deploy`: do not edit. Regenerate with
#   python -m authz.tools.deploy
# The same command with --check (run by the tests) fails when this file drifts.
#
# {what}
# Differences from the local stack's config (authz/tools/deploy.py): listeners on 0.0.0.0 with
# TLS (certificate in /etc/envoy-tls/envoy-<proxy>/tls.crt, tls.key);
# clusters by DNS name (STRICT_DNS): authz:9191 (gRPC health-checked), upstream-api:8090;
# Envoy -> authz is mTLS as locally (/etc/envoy-tls/envoy-client: tls.crt, tls.key, ca.crt);
# admin API on 127.0.0.1:9900 only, and a read-only listener on the admin port for
# GET /ready, /stats (/stats/prometheus), /clusters, /server_info.
"""


def _dump(document: Any) -> str:
    return yaml.safe_dump(document, sort_keys=False, width=100)


def _configmap(name: str, data: Mapping[str, str], source: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": _NAMESPACE,
            "labels": {"app.kubernetes.io/part-of": "authz"},
            "annotations": {"authz/generated-from": source},
        },
        "data": dict(data),
    }


def _load_mapping(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path``. Raises OSError when it cannot be read, ValueError
    naming the file when it is not YAML or not a mapping at the top."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:  # not a ValueError: run would not catch it
        raise ValueError(f"{path}: not YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: must be a mapping, not {type(loaded).__name__}")
    return loaded


def _egress_services(root: Path) -> dict[str, Mapping[str, Any]]:
    return services.specs(services.read_services(root / EGRESS_SOURCE))


def outputs(root: Path) -> dict[str, str]:
    """Every generated file: repository-relative path -> its complete text.
    Deterministic. Raises OSError for a missing source, ValueError for a bad one."""
    gateway_local = _load_mapping(root / GATEWAY_SOURCE)
    gateway = containerize(gateway_local, admin_port=ADMIN_PORTS["gateway"])
    egress_local = egress_envoy.generate(
        _egress_services(root),
        authz_address=("127.0.0.1", 9191),  # placeholder: containerize names it
    )
    egress = containerize(egress_local, admin_port=ADMIN_PORTS["egress"])
    gateway_text = _header(
        GATEWAY_SOURCE,
        "Envoy API gateway for containers (Compose, Kubernetes): https :8080 -> authz -> "
        "upstream-api.",
    ) + _dump(gateway)
    egress_text = _header(
        f"{EGRESS_SOURCE} (.services)",
        "Envoy egress proxy for containers: https :8443, Host: <service> -> authz -> the service.",
    ) + _dump(egress)
    envoy_maps = [
        _configmap("envoy-gateway", {"envoy.yaml": gateway_text}, COMPOSE_GATEWAY),
        _configmap("envoy-egress", {"envoy.yaml": egress_text}, COMPOSE_EGRESS),
    ]
    system = root / OPA_SYSTEM_POLICY
    opa_data = {"opa.yaml": (root / OPA_FILE_CONFIG).read_text(encoding="utf-8")}
    for rego in sorted(system.glob("*.rego")):
        if not rego.name.endswith("_test.rego"):
            opa_data[f"system.{rego.name}"] = rego.read_text(encoding="utf-8")
    opa_map = _configmap("opa-config", opa_data, f"{OPA_FILE_CONFIG}, {OPA_SYSTEM_POLICY}/")
    k8s_header = (
        "# GENERATED by `python -m authz.tools.deploy` from {}: do not edit.\n"
        "# The same command with --check (run by the tests) fails when this file drifts.\n"
    )
    return {
        COMPOSE_GATEWAY: gateway_text,
        COMPOSE_EGRESS: egress_text,
        K8S_ENVOY: k8s_header.format(f"{COMPOSE_GATEWAY}, {COMPOSE_EGRESS}")
        + "---\n".join(_dump(m) for m in envoy_maps),
        K8S_OPA: k8s_header.format(f"{OPA_FILE_CONFIG}, {OPA_SYSTEM_POLICY}/*.rego")
        + _dump(opa_map),
    }


def arguments() -> argparse.ArgumentParser:
    """The options (``--root``, ``--check``) as a parent parser (no ``--help``), shared by
    :func:`main` and ``authz generate deploy``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("."),
        help="repository root holding the sources (default: the current directory)",
    )
    add_check(parser, "write nothing; exit 1 if a file is stale")
    return parser


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line of :func:`main`: :data:`SUMMARY`, :func:`arguments` and
    :data:`EXIT_CODES` under ``prog``."""
    return command_parser(prog, SUMMARY, EXIT_CODES, parents=[arguments()])


def run(args: argparse.Namespace, *, out: Callable[[str], None] | None = None) -> int:
    """Write (or with ``args.check`` compare) every generated file under ``args.root``;
    returns the exit code (:data:`EXIT_CODES`). ``out`` receives the messages (default:
    stderr)."""
    say = out or (lambda text: print(text, file=sys.stderr))
    try:
        generated = outputs(args.root)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        say(f"error: {exc}")
        return 2
    stale = sync(args.root, generated, check=args.check, say=say)
    if stale:
        say(f"out of date (run authz generate deploy): {', '.join(stale)}")
        return 1
    return 0


def main(argv: Sequence[str] | None = None, *, out: Callable[[str], None] | None = None) -> int:
    """``python -m authz.tools.deploy``: parse ``argv`` (default: ``sys.argv[1:]``) and
    :func:`run`; see the module docstring for usage and exit codes."""
    return run(build_parser().parse_args(argv), out=out)


if __name__ == "__main__":
    sys.exit(main())
