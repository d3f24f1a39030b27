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
- ``infra/compose/envoy/envoy-{gateway,egress}-traced.yaml``: the two files above plus
  Envoy's OpenTelemetry tracer exporting OTLP/HTTP to the collector (:func:`traced`), for
  the monitoring overlay and the Kubernetes tracing component;
- ``infra/opa/opa-traced.yaml``: ``infra/opa/opa.yaml`` plus OPA's ``distributed_tracing``
  to the same collector (:func:`opa_traced`);
- copies for kustomize's ``configMapGenerator``, which reads only files under its
  kustomization's directory: ``infra/k8s/base/generated/`` (the two Envoy configs,
  ``infra/opa/opa.yaml``, ``infra/opa/system/*.rego`` without tests, the bundle server's
  ``infra/compose/nginx/bundles.conf``), ``infra/k8s/components/tracing/generated/`` (the
  traced Envoy and OPA configs) and ``infra/k8s/monitoring/generated/`` (the collector's
  and Tempo's configs from ``infra/monitoring/``). Each starts with a ``# GENERATED``
  line naming its source; the rest is the source, byte for byte.

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
  to it, for probes, Prometheus (``/stats/prometheus``) and troubleshooting;
- edge limits (:func:`edge_limits`), following Envoy's "Configuring Envoy as an edge proxy"
  (https://www.envoyproxy.io/docs/envoy/latest/configuration/best_practices/edge): the
  overload manager (a heap ceiling below the container's memory limit, a global cap on
  downstream connections), 32 KiB connection buffers, HTTP/2 stream and window limits,
  header and idle timeouts, underscores in header names rejected. The local stack runs
  without them (a developer machine has no container limit to stay under).

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
    "OTEL_COLLECTOR",
    "READ_ONLY_ADMIN_PATHS",
    "SUMMARY",
    "arguments",
    "build_parser",
    "containerize",
    "edge_limits",
    "main",
    "opa_traced",
    "outputs",
    "run",
    "traced",
]

GATEWAY_SOURCE: Final = "infra/envoy/envoy-gateway.yaml"
EGRESS_SOURCE: Final = egress_envoy.DEFAULT_SERVICES
OPA_CONFIG: Final = "infra/opa/opa.yaml"
OPA_SYSTEM_POLICY: Final = "infra/opa/system"
NGINX_BUNDLES: Final = "infra/compose/nginx/bundles.conf"
OTEL_COLLECTOR_CONFIG: Final = "infra/monitoring/otel-collector/config.yaml"
TEMPO_CONFIG: Final = "infra/monitoring/tempo/tempo.yaml"
COMPOSE_GATEWAY: Final = "infra/compose/envoy/envoy-gateway.yaml"
COMPOSE_EGRESS: Final = "infra/compose/envoy/envoy-egress.yaml"
COMPOSE_GATEWAY_TRACED: Final = "infra/compose/envoy/envoy-gateway-traced.yaml"
COMPOSE_EGRESS_TRACED: Final = "infra/compose/envoy/envoy-egress-traced.yaml"
OPA_TRACED: Final = "infra/opa/opa-traced.yaml"
# kustomize's configMapGenerator inputs (copies: it reads only under its own directory).
K8S_GENERATED: Final = "infra/k8s/base/generated"
K8S_TRACING_GENERATED: Final = "infra/k8s/components/tracing/generated"
K8S_MONITORING_GENERATED: Final = "infra/k8s/monitoring/generated"

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
# The OpenTelemetry Collector's OTLP/HTTP receiver (infra/monitoring/otel-collector): the
# same DNS name in Compose (monitoring overlay) and Kubernetes (infra/k8s/monitoring).
OTEL_COLLECTOR: Final = ("otel-collector", 4318)
# Share of requests without a sampled caller trace that Envoy starts a trace for (a
# caller's sampled traceparent is always followed), and OPA's ratio for its own root spans
# (its sampler is parent-based: a query under authz's sampled span is always traced).
TRACE_SAMPLING_PERCENT: Final = 10.0
# GET only. /stats covers /stats/prometheus; /ready is the probes' endpoint.
READ_ONLY_ADMIN_PATHS: Final = ("/ready", "/stats", "/clusters", "/server_info")

_TYPE: Final = "type.googleapis.com/envoy.extensions"

# Edge limits (edge_limits). The Envoy containers' memory limit is 256 MiB in Compose and
# 512 MiB in Kubernetes (infra/compose/docker-compose.yaml, infra/k8s/{gateway,egress}.yaml):
# the heap ceiling stays below the smaller one, leaving room for what tcmalloc has not
# returned and for the binary itself.
ENVOY_MAX_HEAP_BYTES: Final = 192 * 1024 * 1024
# Downstream connections across all listeners (Envoy's global_downstream_max_connections
# resource monitor); past it Envoy refuses new connections rather than running out of memory.
ENVOY_MAX_DOWNSTREAM_CONNECTIONS: Final = 8192
# Envoy's edge best practice values: buffers of 32 KiB per connection, 100 concurrent
# HTTP/2 streams, 64 KiB stream and 1 MiB connection windows.
ENVOY_CONNECTION_BUFFER_BYTES: Final = 32 * 1024
_HTTP2_LIMITS: Final[Mapping[str, int]] = {
    "max_concurrent_streams": 100,
    "initial_stream_window_size": 65536,
    "initial_connection_window_size": 1048576,
}
_OVERLOAD_TYPE: Final = f"{_TYPE}.resource_monitors"
_HCM: Final = f"{_TYPE}.filters.network.http_connection_manager.v3.HttpConnectionManager"


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


def _overload_manager() -> dict[str, Any]:
    heap = "envoy.resource_monitors.fixed_heap"
    connections = "envoy.resource_monitors.global_downstream_max_connections"

    def action(name: str, threshold: float) -> dict[str, Any]:
        return {"name": name, "triggers": [{"name": heap, "threshold": {"value": threshold}}]}

    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {
                "name": heap,
                "typed_config": {
                    "@type": f"{_OVERLOAD_TYPE}.fixed_heap.v3.FixedHeapConfig",
                    "max_heap_size_bytes": ENVOY_MAX_HEAP_BYTES,
                },
            },
            {
                "name": connections,
                "typed_config": {
                    "@type": f"{_OVERLOAD_TYPE}.downstream_connections.v3."
                    "DownstreamConnectionsConfig",
                    "max_active_downstream_connections": ENVOY_MAX_DOWNSTREAM_CONNECTIONS,
                },
            },
        ],
        "actions": [
            action("envoy.overload_actions.shrink_heap", 0.90),
            action("envoy.overload_actions.disable_http_keepalive", 0.92),
            action("envoy.overload_actions.stop_accepting_requests", 0.98),
        ],
    }


def edge_limits(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the Envoy bootstrap ``config`` with the edge limits of Envoy's "Configuring
    Envoy as an edge proxy" (https://www.envoyproxy.io/docs/envoy/latest/configuration/best_practices/edge):

    - ``overload_manager``: the ``fixed_heap`` monitor (:data:`ENVOY_MAX_HEAP_BYTES`;
      shrink the heap at 90 %, stop keep-alive at 92 %, answer 503 to new requests at 98 %)
      and the ``global_downstream_max_connections`` monitor
      (:data:`ENVOY_MAX_DOWNSTREAM_CONNECTIONS`);
    - every listener and cluster: ``per_connection_buffer_limit_bytes``
      (:data:`ENVOY_CONNECTION_BUFFER_BYTES`);
    - every HTTP connection manager: HTTP/2 limits (100 streams, 64 KiB stream window,
      1 MiB connection window; settings the config already has, such as ``allow_connect``,
      are kept), ``request_headers_timeout`` 10 s, ``stream_idle_timeout`` 300 s, an idle
      timeout of 1 h, and header names with underscores rejected (an upstream that
      treats ``_`` and ``-`` alike cannot be handed a header Envoy did not check).

    A value ``config`` already sets is kept. Raises ValueError if ``config`` has an
    ``overload_manager`` of its own (two would be ambiguous).
    """
    result = copy.deepcopy(dict(config))
    if "overload_manager" in result:
        raise ValueError("the config has an overload_manager already: edge_limits sets it")
    result["overload_manager"] = _overload_manager()
    resources = result["static_resources"]
    for listener in resources["listeners"]:
        listener.setdefault("per_connection_buffer_limit_bytes", ENVOY_CONNECTION_BUFFER_BYTES)
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                if network_filter["name"] != "envoy.filters.network.http_connection_manager":
                    continue
                hcm = network_filter["typed_config"]
                http2 = hcm.setdefault("http2_protocol_options", {})
                for key, value in _HTTP2_LIMITS.items():
                    http2.setdefault(key, value)
                hcm.setdefault("request_headers_timeout", "10s")
                hcm.setdefault("stream_idle_timeout", "300s")
                common = hcm.setdefault("common_http_protocol_options", {})
                common.setdefault("idle_timeout", "3600s")
                common.setdefault("headers_with_underscores_action", "REJECT_REQUEST")
    for cluster in resources["clusters"]:
        cluster.setdefault("per_connection_buffer_limit_bytes", ENVOY_CONNECTION_BUFFER_BYTES)
    return result


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
    return edge_limits(result)


def traced(config: Mapping[str, Any], *, service_name: str) -> dict[str, Any]:
    """A copy of the container Envoy bootstrap ``config`` (:func:`containerize`'s output)
    with Envoy's OpenTelemetry tracer on every HTTP connection manager but the read-only
    admin listener's: spans exported as OTLP/HTTP to :data:`OTEL_COLLECTOR` through a
    ``STRICT_DNS`` cluster ``otel_collector``, service name ``service_name``, a new trace
    for :data:`TRACE_SAMPLING_PERCENT` of the requests that arrive without one. Envoy
    sends ``traceparent`` on its ext_authz call and upstream, so authz's and the
    upstream's spans join the trace. See
    https://www.envoyproxy.io/docs/envoy/latest/api-v3/config/trace/v3/opentelemetry.proto

    Raises ValueError when ``config`` already has the cluster ``otel_collector`` or a
    traced connection manager."""
    result = copy.deepcopy(dict(config))
    resources = result["static_resources"]
    if any(c["name"] == "otel_collector" for c in resources["clusters"]):
        raise ValueError("cluster 'otel_collector' already exists")
    host, port = OTEL_COLLECTOR
    tracing = {
        "random_sampling": {"value": TRACE_SAMPLING_PERCENT},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "service_name": service_name,
                "http_service": {
                    "http_uri": {
                        "uri": f"http://{host}:{port}/v1/traces",
                        "cluster": "otel_collector",
                        "timeout": "1s",
                    }
                },
            },
        },
    }
    for listener in resources["listeners"]:
        if listener["name"] == "admin_read_only":
            continue
        for chain in listener["filter_chains"]:
            for item in chain["filters"]:
                if item["name"] != "envoy.filters.network.http_connection_manager":
                    continue
                if "tracing" in item["typed_config"]:
                    raise ValueError(f"listener {listener['name']!r} is already traced")
                item["typed_config"]["tracing"] = copy.deepcopy(tracing)
    resources["clusters"].append(
        {
            "name": "otel_collector",
            "type": "STRICT_DNS",
            "dns_lookup_family": "V4_PREFERRED",
            "connect_timeout": "1s",
            "load_assignment": egress_envoy.load_assignment("otel_collector", host, port),
        }
    )
    return result


def opa_traced(opa_config: str) -> str:
    """``opa_config`` (the text of ``infra/opa/opa.yaml``) plus OPA's distributed tracing:
    OTLP/HTTP to :data:`OTEL_COLLECTOR`, service name ``opa``, parent-based sampling (a
    query carrying authz's sampled ``traceparent`` is traced) with
    :data:`TRACE_SAMPLING_PERCENT` of OPA's own root spans. See
    https://www.openpolicyagent.org/docs/configuration#distributed-tracing

    Raises ValueError when ``opa_config`` already configures ``distributed_tracing``."""
    loaded = yaml.safe_load(opa_config)
    if isinstance(loaded, dict) and "distributed_tracing" in loaded:
        raise ValueError(f"{OPA_CONFIG} already has distributed_tracing")
    host, port = OTEL_COLLECTOR
    return (
        f"# GENERATED from {OPA_CONFIG} by `python -m authz.tools.deploy`: do not edit.\n"
        "# That file plus OPA's distributed tracing, for the monitoring overlay (Compose) and\n"
        "# the Kubernetes tracing component (infra/k8s/components/tracing).\n"
        f"{opa_config.rstrip()}\n\n"
        "# Spans of OPA's API requests and policy evaluation, OTLP/HTTP to the OpenTelemetry\n"
        "# Collector. Parent-based: a query under authz's sampled span (traceparent) is traced.\n"
        "distributed_tracing:\n"
        "  type: http\n"
        f"  address: {host}:{port}\n"
        "  service_name: opa\n"
        f"  sample_percentage: {int(TRACE_SAMPLING_PERCENT)}\n"
    )


def _copy(source: str, text: str) -> str:
    """``text`` (the file ``source``) as a kustomize generator input: one header line."""
    return (
        f"# GENERATED copy of {source} by `python -m authz.tools.deploy` (kustomize reads "
        "only files under its kustomization's directory): do not edit.\n" + text
    )


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
# GET /ready, /stats (/stats/prometheus), /clusters, /server_info; edge limits (overload
# manager: heap ceiling, downstream connection cap; buffer, HTTP/2 and timeout limits).
"""


def _dump(document: Any) -> str:
    return yaml.safe_dump(document, sort_keys=False, width=100)


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
    gateway_traced = _header(
        GATEWAY_SOURCE,
        "As envoy-gateway.yaml, plus the OpenTelemetry tracer (OTLP/HTTP to otel-collector:4318).",
    ) + _dump(traced(gateway, service_name="envoy-gateway"))
    egress_traced = _header(
        f"{EGRESS_SOURCE} (.services)",
        "As envoy-egress.yaml, plus the OpenTelemetry tracer (OTLP/HTTP to otel-collector:4318).",
    ) + _dump(traced(egress, service_name="envoy-egress"))
    opa_text = (root / OPA_CONFIG).read_text(encoding="utf-8")
    opa_traced_text = opa_traced(opa_text)
    files = {
        COMPOSE_GATEWAY: gateway_text,
        COMPOSE_EGRESS: egress_text,
        COMPOSE_GATEWAY_TRACED: gateway_traced,
        COMPOSE_EGRESS_TRACED: egress_traced,
        OPA_TRACED: opa_traced_text,
        f"{K8S_GENERATED}/gateway-envoy.yaml": _copy(COMPOSE_GATEWAY, gateway_text),
        f"{K8S_GENERATED}/egress-envoy.yaml": _copy(COMPOSE_EGRESS, egress_text),
        f"{K8S_GENERATED}/opa.yaml": _copy(OPA_CONFIG, opa_text),
        f"{K8S_GENERATED}/bundles.conf": _copy(
            NGINX_BUNDLES, (root / NGINX_BUNDLES).read_text(encoding="utf-8")
        ),
        f"{K8S_TRACING_GENERATED}/gateway-envoy.yaml": _copy(
            COMPOSE_GATEWAY_TRACED, gateway_traced
        ),
        f"{K8S_TRACING_GENERATED}/egress-envoy.yaml": _copy(COMPOSE_EGRESS_TRACED, egress_traced),
        f"{K8S_TRACING_GENERATED}/opa.yaml": _copy(OPA_TRACED, opa_traced_text),
        f"{K8S_MONITORING_GENERATED}/otel-collector.yaml": _copy(
            OTEL_COLLECTOR_CONFIG, (root / OTEL_COLLECTOR_CONFIG).read_text(encoding="utf-8")
        ),
        f"{K8S_MONITORING_GENERATED}/tempo.yaml": _copy(
            TEMPO_CONFIG, (root / TEMPO_CONFIG).read_text(encoding="utf-8")
        ),
    }
    system = root / OPA_SYSTEM_POLICY
    for rego in sorted(system.glob("*.rego")):
        if not rego.name.endswith("_test.rego"):
            files[f"{K8S_GENERATED}/system.{rego.name}"] = _copy(
                f"{OPA_SYSTEM_POLICY}/{rego.name}", rego.read_text(encoding="utf-8")
            )
    return files


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
