"""Generate the egress Envoy's bootstrap from the egress services data.

Sandboxes call the egress Envoy (``127.0.0.1:8443``) by service name (``Host: openai``).
Envoy asks authz (ext_authz, ``decision_path: authz/egress/decision``, ``service:
<name>``), which decides and injects the service's credential, then forwards the request
to the service's ``base_url`` over TLS with SNI and certificate validation. The services
(``policy/egress/data.json`` -> ``.services``) are the single source of truth: the
committed ``infra/envoy/envoy-egress.yaml`` is this module's output, and
``python -m authz.tools.egress_envoy --check`` (run by the tests) fails when it drifts::

    authz generate egress-envoy [--services policy/egress/data.json]
                                [--out infra/envoy/envoy-egress.yaml] [--check]
    python -m authz.tools.egress_envoy ...      (the same)

Exit codes: 0 written / up to date, 1 drift (``--check``), 2 bad services data.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import yaml

from authz.core.headers import (
    CREDENTIAL_HEADERS,
    FORWARDING_HEADERS,
    IDENTITY_HEADERS,
)
from authz.tools.generated import add_check, sync
from authz.tools.services import (
    DEFAULT_SERVICES,
    Service,
    Upstream,
    is_ip,
    parse_base_url,
    parse_service,
    read_services,
    specs,
)
from authz.tools.usage import command_parser

__all__ = [
    "AUTHZ_CLIENT_TLS_DIR",
    "AUTHZ_TLS_NAME",
    "DECISION_PATH",
    "DEFAULT_CA_FILE",
    "DEFAULT_OUT",
    "DEFAULT_SERVICES",
    "ENVOY_TLS_DIR",
    "EXIT_CODES",
    "INTERCEPT_LISTENER",
    "INTERCEPT_TLS_DIR",
    "LISTENER_TLS_DIRS",
    "ROUTE_TIMEOUT",
    "SANDBOX_FILTER_STATE",
    "SANDBOX_ID_HEADER",
    "SUMMARY",
    "TUNNEL_ADDRESS_HEADER",
    "TUNNEL_MAX_DURATION_S",
    "Upstream",
    "arguments",
    "authz_transport_socket",
    "build_parser",
    "downstream_transport_socket",
    "generate",
    "intercepted_hosts",
    "load_assignment",
    "main",
    "parse_base_url",
    "render",
    "run",
    "socket_address",
]

DECISION_PATH: Final = "authz/egress/decision"
DEFAULT_CA_FILE: Final = "/etc/ssl/certs/ca-certificates.crt"
DEFAULT_OUT: Final = "infra/envoy/envoy-egress.yaml"
# Whole-response budget per request: LLM completions are slow. Envoy's route timeout spans
# end of request -> end of response, so a streamed answer longer than this is cut.
ROUTE_TIMEOUT: Final = "120s"
# ext_authz budget: above authz's own decision budget (300 ms) so authz, not Envoy,
# answers when OPA is slow (same as the gateway).
EXT_AUTHZ_TIMEOUT: Final = "0.5s"
UPSTREAM_CONNECT_TIMEOUT: Final = "5s"
# Envoy's own TLS files as deployments mount them: one directory per kubernetes.io/tls
# Secret (tls.crt, tls.key, ca.crt; cert-manager's layout). The local stack relocates the
# directory to its run directory (authz.stack.envoy.relocate_tls).
ENVOY_TLS_DIR: Final = "/etc/envoy-tls"
# The client certificate Envoy presents to authz, and the CA authz's certificate must
# chain to.
AUTHZ_CLIENT_TLS_DIR: Final = f"{ENVOY_TLS_DIR}/envoy-client"
# SNI sent to authz and the DNS SAN its certificate must carry: the Compose service and
# Kubernetes Service name.
AUTHZ_TLS_NAME: Final = "authz"
# Listener name -> its server certificate's directory (TLS on the listeners: Compose,
# Kubernetes, and the local stack with --tls).
LISTENER_TLS_DIRS: Final[Mapping[str, str]] = MappingProxyType(
    {"gateway": f"{ENVOY_TLS_DIR}/envoy-gateway", "egress": f"{ENVOY_TLS_DIR}/envoy-egress"}
)

# -- issue 18: HTTPS interception and policy-checked tunnels ---------------------------
# The internal listener that terminates intercepted CONNECT tunnels (TLS with a
# certificate for the service's real host, signed by the egress CA).
INTERCEPT_LISTENER: Final = "egress_intercept"
# Per intercepted host, its certificate directory (tls.crt, tls.key: a kubernetes.io/tls
# Secret); ca.crt beside them is the egress CA the sandboxes trust.
INTERCEPT_TLS_DIR: Final = f"{ENVOY_TLS_DIR}/egress-intercept"
# The filter state object that carries the identity the CONNECT proved into the tunnel.
SANDBOX_FILTER_STATE: Final = "authz.sandbox_id"
# The header the inner listener sets from that filter state (client-sent values removed
# first) so the inner ext_authz check can read it.
SANDBOX_ID_HEADER: Final = IDENTITY_HEADERS[0]
# The request header authz sets on a tunnel's allow: the checked "ip:port" Envoy connects
# to (ORIGINAL_DST cluster, use_http_header). Any client-sent value is removed first.
TUNNEL_ADDRESS_HEADER: Final = "x-authz-tunnel-address"
# The longest a CONNECT tunnel (intercepted or not) or a connection inside one lives: the
# bound on how long access outlives a revocation (README, "Use it from an agent").
TUNNEL_MAX_DURATION_S: Final = 300
# The gRPC access log that reports each ended tunnel (an answered CONNECT, plain or
# intercepted) to authz's AccessLogService, which audits it (authz.runtime.als).
TUNNEL_LOG_NAME: Final = "authz_tunnels"

_NO_OVERRIDES: Final[Mapping[str, tuple[str, int]]] = MappingProxyType({})
_EXT_AUTHZ: Final = "envoy.filters.http.ext_authz"
_TYPE: Final = "type.googleapis.com/envoy.extensions"


def generate(
    services: Mapping[str, Any],
    *,
    listen_port: int = 8443,
    admin_port: int = 9902,
    authz_address: tuple[str, int] = ("127.0.0.1", 9191),
    ca_file: str = DEFAULT_CA_FILE,
    overrides: Mapping[str, tuple[str, int]] = _NO_OVERRIDES,
    listen_address: str = "127.0.0.1",
    tunnel_max_duration_s: int = TUNNEL_MAX_DURATION_S,
) -> dict[str, Any]:
    """The egress Envoy's complete v3 bootstrap as a plain (YAML/JSON-dumpable) dict.

    ``services``: service name -> spec (checked by
    :func:`authz.tools.services.parse_service`); only ``spec["base_url"]`` and
    ``spec["credential"]["header"]`` shape the config (the rest is the policy's). Per service:
    a virtual host with domains ``[name, name:*]`` that removes every credential and
    identity header (``authz.core.headers``) but the credential header, and whose
    one route (prefix ``/``) goes to cluster ``service_<name>`` with ``Host`` rewritten to
    the base_url's authority, the base_url's path prefixed, a 120 s timeout, and
    ext_authz ``context_extensions`` ``{decision_path, service: name}``. A catch-all
    virtual host answers 404 directly, after ext_authz has been asked with ``service:
    ""`` (so the policy names the reason). https clusters validate the upstream
    certificate against ``ca_file`` (a PEM bundle path) with SNI and a DNS SAN equal to
    the host; http clusters (only for services without a credential: one with a
    credential and an http base_url is refused) are plaintext.

    ``overrides``: base_url host -> (IP address, port), for tests and the local stack's
    stand-in; an overridden cluster is STATIC on that address (SNI and SAN stay the real
    host), others are LOGICAL_DNS on the base_url's host and port. ``listen_port`` /
    ``listen_address``: the listener; ``admin_port``: admin on 127.0.0.1 (never exposed
    beside the listener); ``authz_address``: authz's gRPC (IP, port), an HTTP/2 cluster.

    Raises ValueError naming the service and field for a bad service
    (:func:`authz.tools.services.parse_service`: name, spec, ``base_url``, an ``http``
    base_url for a service with a ``credential``, the credential's fields), or an
    override address that is not an IP address.

    Envoy v3 API references (https://www.envoyproxy.io/docs/envoy/latest/):
    ``api-v3/extensions/filters/http/ext_authz/v3/ext_authz.proto`` (ExtAuthz,
    ExtAuthzPerRoute.check_settings.context_extensions);
    ``api-v3/config/route/v3/route_components.proto`` (RouteAction.host_rewrite_literal,
    prefix_rewrite, timeout; DirectResponseAction);
    ``api-v3/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto``
    (normalize_path, merge_slashes, path_with_escaped_slashes_action, use_remote_address,
    xff_num_trusted_hops, skip_xff_append); ``api-v3/config/route/v3/route.proto``
    (RouteConfiguration.request_headers_to_remove);
    ``api-v3/extensions/transport_sockets/tls/v3/tls.proto`` (UpstreamTlsContext.sni) and
    ``.../tls/v3/common.proto`` (CertificateValidationContext.trusted_ca,
    match_typed_subject_alt_names); ``intro/arch_overview/upstream/service_discovery``
    (STATIC, LOGICAL_DNS); ``configuration/observability/access_log/usage`` (command
    operators ``%PATH(NQ:ORIG_OR_PATH)%``, ``%DYNAMIC_METADATA(...)%``);
    ``api-v3/extensions/access_loggers/grpc/v3/als.proto`` (HttpGrpcAccessLogConfig: the
    tunnel ends to authz) and ``api-v3/config/accesslog/v3/accesslog.proto``
    (AccessLogFilter: header_filter, status_code_filter).
    """
    if tunnel_max_duration_s < 1:
        raise ValueError(f"tunnel_max_duration_s must be at least 1, got {tunnel_max_duration_s}")
    virtual_hosts: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = [_authz_cluster(authz_address)]
    parsed = [parse_service(name, services[name]) for name in sorted(services)]
    intercepted = intercepted_hosts(parsed)
    chains: list[dict[str, Any]] = []
    tunnel = f"{tunnel_max_duration_s}s"
    for service in parsed:
        name, upstream = service.name, service.upstream
        header = service.credential.header if service.credential is not None else None
        virtual_hosts.append(_service_virtual_host(name, upstream, header))
        clusters.append(_service_cluster(name, upstream, ca_file, overrides.get(upstream.host)))
    for service in intercepted.values():
        header = service.credential.header if service.credential is not None else None
        virtual_hosts.append(
            _intercept_virtual_host(service.name, service.upstream, header, tunnel)
        )
        chains.append(_intercept_chain(service.name, service.upstream, header, tunnel))
    virtual_hosts.append(_catch_all_virtual_host(tunnel))
    listeners = [_listener(listen_address, listen_port, virtual_hosts)]
    if chains:
        listeners.append(_intercept_listener(chains))
        clusters.append(_intercept_cluster())
    clusters.append(_tunnel_cluster())
    return {
        # Internal listeners (the interception) need this bootstrap extension.
        "bootstrap_extensions": [
            {
                "name": "envoy.bootstrap.internal_listener",
                "typed_config": {
                    "@type": f"{_TYPE}.bootstrap.internal_listener.v3.InternalListener"
                },
            }
        ],
        "admin": {"address": socket_address("127.0.0.1", admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def intercepted_hosts(services: Sequence[Service]) -> dict[str, Service]:
    """Host -> service, for the services a CONNECT to ``host:443`` reaches intercepted:
    an https ``base_url`` on port 443 without a path prefix (a client calling the real
    host uses the real paths; a prefix could not be mapped). In ``services``' order.
    Raises ValueError naming both services when two share a host (one CONNECT target
    cannot be two services)."""
    hosts: dict[str, Service] = {}
    for service in services:
        upstream = service.upstream
        if not upstream.tls or upstream.port != 443 or upstream.path:
            continue
        if upstream.host in hosts:
            raise ValueError(
                f"egress services {hosts[upstream.host].name!r} and {service.name!r} share "
                f"the host {upstream.host!r}: a CONNECT to it can be intercepted as one only"
            )
        hosts[upstream.host] = service
    return hosts


def render(
    services: Mapping[str, Any], *, source: str = DEFAULT_SERVICES, out: str = DEFAULT_OUT
) -> str:
    """``generate(services)`` (default ports, system CA bundle) as YAML text, under a
    header saying it is generated from ``source`` (the services file) into ``out`` and
    by which command. Deterministic: the same arguments give the same text."""
    command = f"python -m authz.tools.egress_envoy --services {source} --out {out}"
    header = f"""\
# GENERATED from {source} (.services): do not edit. Regenerate with
#   {command}
# The same command with --check (run by the tests) fails when this file drifts.
#
# Egress Envoy: sandboxes call 127.0.0.1:8443 with `Host: <service>`. ext_authz (authz, gRPC
# over mTLS 127.0.0.1:9191: Envoy's client certificate from /etc/envoy-tls/envoy-client,
# authz's certificate checked for the SAN "authz"; context_extensions decision_path
# authz/egress/decision and service) decides
# and injects the service's credential; the request then goes to the service's base_url over
# TLS (SNI; certificate checked against the system CA bundle and the host's DNS SAN).
# Unknown services get a 404 after authz has denied them. Admin on 127.0.0.1:9902.
# - failure_mode_allow: false, status_on_error 503: if authz is unreachable, deny.
# - path normalization as on the gateway: the policy and the router see the same path.
# - no with_request_body: egress bodies are large prompts; the policy decides on headers.
# - client-sent forwarding and method-override headers (authz.core.headers) are removed, and so
#   is every credential and identity header but the one authz injects the credential into.
"""
    return header + yaml.safe_dump(generate(services), sort_keys=False, width=100)


# -- pieces of the bootstrap ------------------------------------------------------------


def socket_address(address: str, port: int) -> dict[str, Any]:
    """An Envoy v3 ``config.core.v3.Address`` (socket address) as a dict."""
    return {"socket_address": {"address": address, "port_value": port}}


def load_assignment(cluster: str, address: str, port: int) -> dict[str, Any]:
    """An Envoy v3 ``ClusterLoadAssignment`` with one endpoint, as a dict."""
    endpoint = {"endpoint": {"address": socket_address(address, port)}}
    return {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [endpoint]}]}


def _check_settings(service: str, **extra: str) -> dict[str, Any]:
    # extra: hop ("outer": the sandbox's own connection; "inner": inside an intercepted
    # tunnel, where Envoy vouches for x-sandbox-id), proxy, tunnel. Set per route by this
    # config, never by a client (the policy trusts them).
    return {
        _EXT_AUTHZ: {
            "@type": f"{_TYPE}.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            "check_settings": {
                "context_extensions": {
                    "decision_path": DECISION_PATH,
                    "service": service,
                    **extra,
                }
            },
        }
    }


def _service_route(name: str, upstream: Upstream, **extra: str) -> dict[str, Any]:
    action: dict[str, Any] = {
        "cluster": f"service_{name}",
        "host_rewrite_literal": upstream.authority,
        "timeout": ROUTE_TIMEOUT,
    }
    if upstream.path:
        action["prefix_rewrite"] = f"{upstream.path}/"
    return {
        "match": {"prefix": "/"},
        "route": action,
        "typed_per_filter_config": _check_settings(name, **extra),
    }


def _removed_headers(credential_header: str | None) -> list[str]:
    # Whatever authz decided (an allow no policy decided included), the service gets no
    # credential or identity header from the sandbox; only the one authz injects (set by
    # ext_authz before the router applies these removals).
    return [h for h in (*CREDENTIAL_HEADERS, *IDENTITY_HEADERS) if h != credential_header]


def _service_virtual_host(
    name: str, upstream: Upstream, credential_header: str | None
) -> dict[str, Any]:
    return {
        "name": f"service_{name}",
        "domains": [name, f"{name}:*"],
        "request_headers_to_remove": _removed_headers(credential_header),
        "routes": [_service_route(name, upstream, hop="outer")],
    }


def _connect_route(cluster: str, tunnel: str, check: dict[str, Any]) -> dict[str, Any]:
    # Envoy terminates the CONNECT (connect_config) and carries the tunnel's bytes as TCP
    # to the cluster. No route timeout (the request never ends); max_stream_duration ends
    # the tunnel whatever it carries (the revocation bound).
    return {
        "match": {"connect_matcher": {}},
        "route": {
            "cluster": cluster,
            "timeout": "0s",
            "max_stream_duration": {"max_stream_duration": tunnel},
            "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
        },
        "typed_per_filter_config": check,
    }


def _intercept_virtual_host(
    name: str, upstream: Upstream, credential_header: str | None, tunnel: str
) -> dict[str, Any]:
    # The service's real host on the outer listener: a CONNECT to host:443 goes to the
    # internal listener (interception); an absolute-form request (HTTP_PROXY, http://host/)
    # is checked and forwarded as the service's own vhost does.
    return {
        "name": f"intercept_{name}",
        "domains": [upstream.host, f"{upstream.host}:80", f"{upstream.host}:443"],
        "request_headers_to_remove": _removed_headers(credential_header),
        "routes": [
            _connect_route(INTERCEPT_LISTENER, tunnel, _check_settings(name, hop="outer")),
            _service_route(name, upstream, hop="outer", proxy="true"),
        ],
    }


def _not_found_route(hop: str) -> dict[str, Any]:
    # Reached only when authz allowed an unknown service (a policy bug): still a 404.
    return {
        "match": {"prefix": "/"},
        "direct_response": {
            "status": 404,
            "body": {"inline_string": '{"error": "unknown_service"}'},
        },
        "response_headers_to_add": [
            {
                "header": {"key": "content-type", "value": "application/json"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
        "typed_per_filter_config": _check_settings("", hop=hop),
    }


def _catch_all_virtual_host(tunnel: str) -> dict[str, Any]:
    # Every request is decided (a request matching no route would skip ext_authz:
    # https://github.com/envoyproxy/envoy/issues/32118): any other CONNECT is a
    # policy-checked tunnel to the ORIGINAL_DST cluster at the address authz checked.
    return {
        "name": "unknown_service",
        "domains": ["*"],
        "routes": [
            _connect_route("tunnel", tunnel, _check_settings("", hop="outer", tunnel="true")),
            _not_found_route("outer"),
        ],
    }


def _access_log(proxy: str = "egress") -> dict[str, Any]:
    metadata = "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:{})%"
    return {
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": f"{_TYPE}.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {
                "json_format": {
                    "time": "%START_TIME%",
                    "proxy": proxy,
                    "service": metadata.format("service"),
                    "sandbox_id": metadata.format("sandbox_id"),
                    # A CONNECT's target (host:port) and, for a tunnel, the checked one;
                    # its line is written when the tunnel ends: bytes and duration are the
                    # tunnel's.
                    "authority": "%REQ(:AUTHORITY)%",
                    "destination": metadata.format("destination"),
                    # Inside an intercepted tunnel: the sandbox the CONNECT proved.
                    "tunnel_sandbox_id": f"%FILTER_STATE({SANDBOX_FILTER_STATE}:PLAIN)%",
                    "decision_id": metadata.format("decision_id"),
                    "method": "%REQ(:METHOD)%",
                    # No query string: it may carry credentials.
                    "path": "%PATH(NQ:ORIG_OR_PATH)%",
                    "status": "%RESPONSE_CODE%",
                    "flags": "%RESPONSE_FLAGS%",
                    "duration_ms": "%DURATION%",
                    "bytes_received": "%BYTES_RECEIVED%",
                    "bytes_sent": "%BYTES_SENT%",
                    "upstream": "%UPSTREAM_HOST%",
                    "request_id": "%REQ(X-REQUEST-ID)%",
                }
            },
        },
    }


def _tunnel_access_log() -> dict[str, Any]:
    # When a CONNECT that Envoy answered 200 ends (the HCM writes a CONNECT stream's log
    # at its end, its body bytes being the tunnel's), one HTTPAccessLogEntry to authz's
    # AccessLogService over the authz cluster's mTLS. The entry's
    # common_properties.metadata is the stream's dynamic metadata, so it carries the
    # ext_authz decision_id and sandbox_id; no request header is added to it
    # (additional_request_headers_to_log stays empty: Proxy-Authorization never leaves).
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {
            "and_filter": {
                "filters": [
                    {
                        "header_filter": {
                            "header": {"name": ":method", "string_match": {"exact": "CONNECT"}}
                        }
                    },
                    {
                        "status_code_filter": {
                            "comparison": {
                                "op": "EQ",
                                "value": {"default_value": 200, "runtime_key": "authz.tunnel_log"},
                            }
                        }
                    },
                ]
            }
        },
        "typed_config": {
            "@type": f"{_TYPE}.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": TUNNEL_LOG_NAME,
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}},
                # Envoy's defaults, stated: entries leave within a second, 16 KiB batches
                # (authz refuses a message past 256 KiB).
                "buffer_flush_interval": "1s",
                "buffer_size_bytes": 16384,
            },
        },
    }


def _ext_authz_filter() -> dict[str, Any]:
    # As the gateway's, without with_request_body (egress bodies are large prompts).
    return {
        "name": _EXT_AUTHZ,
        "typed_config": {
            "@type": f"{_TYPE}.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "status_on_error": {"code": "ServiceUnavailable"},
            "include_peer_certificate": True,
            "grpc_service": {
                "envoy_grpc": {"cluster_name": "authz"},
                "timeout": EXT_AUTHZ_TIMEOUT,
            },
        },
    }


def _router() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": f"{_TYPE}.filters.http.router.v3.Router",
            # No x-envoy-* request headers to third parties.
            "suppress_envoy_headers": True,
        },
    }


def _header_mutation(*mutations: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": f"{_TYPE}.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": list(mutations)},
        },
    }


def _set_sandbox_filter_state() -> dict[str, Any]:
    # After ext_authz: the sandbox its allow named (dynamic metadata), as a filter state
    # object shared with the upstream connection once, i.e. with the internal listener's
    # connection of an intercepted tunnel. envoy.hashable_string, not envoy.string: a
    # shared object that is not hashable lets tunnels of different sandboxes share one
    # upstream connection pool, and a new connection then carries the first stream's
    # identity (envoy/stream_info/filter_state.h, StreamSharing: "objects must implement
    # hashing to force distinct upstream connections").
    metadata = "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:sandbox_id)%"
    return {
        "name": "envoy.filters.http.set_filter_state",
        "typed_config": {
            "@type": f"{_TYPE}.filters.http.set_filter_state.v3.Config",
            "on_request_headers": [
                {
                    "object_key": SANDBOX_FILTER_STATE,
                    "factory_key": "envoy.hashable_string",
                    "format_string": {"text_format_source": {"inline_string": metadata}},
                    "shared_with_upstream": "ONCE",
                }
            ],
        },
    }


# What the egress listener's and each intercepted host's HTTP connection manager share:
# paths normalized (a rule cannot be dodged by spelling), forwarding headers neither
# trusted nor sent on.
_HCM_HARDENING: Final = {
    "normalize_path": True,
    "merge_slashes": True,
    "path_with_escaped_slashes_action": "REJECT_REQUEST",
    "use_remote_address": True,
    # No proxy in front is trusted: a client's forwarding headers say nothing.
    "xff_num_trusted_hops": 0,
    "request_timeout": ROUTE_TIMEOUT,
    # Third-party APIs need not learn the sandboxes' addresses.
    "skip_xff_append": True,
}


def _listener(address: str, port: int, virtual_hosts: list[dict[str, Any]]) -> dict[str, Any]:
    hcm = {
        "@type": f"{_TYPE}.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "egress",
        # HTTP CONNECT (RFC 9110 section 9.3.6): HTTPS_PROXY clients open tunnels.
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        **_HCM_HARDENING,
        "access_log": [_access_log(), _tunnel_access_log()],
        "route_config": {
            "name": "egress",
            "virtual_hosts": virtual_hosts,
            # x-envoy-external-address: added by Envoy for external clients
            # (use_remote_address), the sandbox's address. The sandbox's own forwarding and
            # method-override headers (authz.core.headers) go too, whatever authz decided: a
            # third party learns neither its address nor a method other than the checked one.
            "request_headers_to_remove": [
                "x-envoy-external-address",
                "x-forwarded-proto",  # not a FORWARDING_HEADER (the gateway keeps Envoy's)
                *FORWARDING_HEADERS,
            ],
        },
        "http_filters": [
            # Only authz sets the tunnel's address (on a tunnel's allow).
            _header_mutation({"remove": TUNNEL_ADDRESS_HEADER}),
            _ext_authz_filter(),
            _set_sandbox_filter_state(),
            _router(),
        ],
    }
    return {
        "name": "egress",
        "address": socket_address(address, port),
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def _intercept_chain(
    name: str, upstream: Upstream, credential_header: str | None, tunnel: str
) -> dict[str, Any]:
    """One filter chain of the internal listener: TLS for the service's real host (SNI),
    then each request inside the tunnel checked by authz (hop inner) like any egress
    request and forwarded to the service's cluster (verified TLS)."""
    directory = f"{INTERCEPT_TLS_DIR}/{upstream.host}"
    hcm = {
        "@type": f"{_TYPE}.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": f"intercept_{name}",
        **_HCM_HARDENING,
        # The connection inside the tunnel ends with it at the latest.
        "common_http_protocol_options": {"max_connection_duration": tunnel},
        "access_log": [_access_log("egress-intercept")],
        "route_config": {
            "name": f"intercept_{name}",
            "virtual_hosts": [
                {
                    "name": f"service_{name}",
                    "domains": [upstream.host, f"{upstream.host}:443"],
                    "request_headers_to_remove": _removed_headers(credential_header),
                    "routes": [_service_route(name, upstream, hop="inner")],
                },
                # Another Host inside the tunnel (domain fronting): decided, then 404.
                {
                    "name": "unknown_service",
                    "domains": ["*"],
                    "routes": [_not_found_route("inner")],
                },
            ],
            "request_headers_to_remove": [
                "x-envoy-external-address",
                "x-forwarded-proto",
                *FORWARDING_HEADERS,
            ],
        },
        "http_filters": [
            # The identity the CONNECT proved, never one the client sends inside the tunnel.
            _header_mutation(
                {"remove": SANDBOX_ID_HEADER},
                {
                    "append": {
                        "header": {
                            "key": SANDBOX_ID_HEADER,
                            "value": f"%FILTER_STATE({SANDBOX_FILTER_STATE}:PLAIN)%",
                        },
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                },
            ),
            _ext_authz_filter(),
            _router(),
        ],
    }
    return {
        "filter_chain_match": {"server_names": [upstream.host]},
        "transport_socket": downstream_transport_socket(directory),
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
    }


def _intercept_listener(chains: list[dict[str, Any]]) -> dict[str, Any]:
    # A connection whose SNI names no intercepted host matches no chain and is closed.
    return {
        "name": INTERCEPT_LISTENER,
        "internal_listener": {},
        "listener_filters": [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {
                    "@type": f"{_TYPE}.filters.listener.tls_inspector.v3.TlsInspector"
                },
            }
        ],
        "filter_chains": chains,
    }


def _intercept_cluster() -> dict[str, Any]:
    # One upstream connection per tunnel (defense in depth beside the hashable filter
    # state): no two tunnels ever share a connection to the internal listener.
    return {
        "name": INTERCEPT_LISTENER,
        "connect_timeout": "1s",
        "connection_pool_per_downstream_connection": True,
        "load_assignment": {
            "cluster_name": INTERCEPT_LISTENER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "envoy_internal_address": {
                                        "server_listener_name": INTERCEPT_LISTENER
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.internal_upstream",
            "typed_config": {
                "@type": (
                    f"{_TYPE}.transport_sockets.internal_upstream.v3.InternalUpstreamTransport"
                ),
                "transport_socket": {
                    "name": "envoy.transport_sockets.raw_buffer",
                    "typed_config": {"@type": f"{_TYPE}.transport_sockets.raw_buffer.v3.RawBuffer"},
                },
            },
        },
    }


def _tunnel_cluster() -> dict[str, Any]:
    # A tunnel connects to the address authz resolved and checked (TUNNEL_ADDRESS_HEADER,
    # set on the allow), never to what Envoy would resolve itself: DNS rebinding between
    # the check and the connection cannot move it. Without the header (no allow of a
    # tunnel set it) the listener's address was not restored, so there is no host: 503.
    return {
        "name": "tunnel",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": UPSTREAM_CONNECT_TIMEOUT,
        "original_dst_lb_config": {
            "use_http_header": True,
            "http_header_name": TUNNEL_ADDRESS_HEADER,
        },
    }


def authz_transport_socket() -> dict[str, Any]:
    """The ext_authz cluster's mTLS, as a v3 ``TransportSocket`` dict: Envoy presents the
    client certificate in :data:`AUTHZ_CLIENT_TLS_DIR` and accepts authz only with a
    certificate from that directory's ``ca.crt`` carrying the DNS SAN
    :data:`AUTHZ_TLS_NAME` (also the SNI); ALPN h2 (gRPC). Identical in the gateway's
    committed config (tests/unit/tools/test_egress_envoy.py). Envoy reference:
    ``api-v3/extensions/transport_sockets/tls/v3/tls.proto`` (UpstreamTlsContext) and
    ``.../tls/v3/common.proto`` (CommonTlsContext.tls_certificates, validation_context)."""
    directory = AUTHZ_CLIENT_TLS_DIR
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{_TYPE}.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": AUTHZ_TLS_NAME,
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": f"{directory}/tls.crt"},
                        "private_key": {"filename": f"{directory}/tls.key"},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": f"{directory}/ca.crt"},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": AUTHZ_TLS_NAME}}
                    ],
                },
            },
        },
    }


def downstream_transport_socket(directory: str) -> dict[str, Any]:
    """A listener's TLS, as a v3 ``TransportSocket`` dict: the server certificate
    ``directory/tls.crt`` and key ``directory/tls.key``, ALPN h2 and http/1.1, TLS 1.2 at
    least. Envoy reference: ``api-v3/extensions/transport_sockets/tls/v3/tls.proto``
    (DownstreamTlsContext)."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{_TYPE}.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": f"{directory}/tls.crt"},
                        "private_key": {"filename": f"{directory}/tls.key"},
                    }
                ],
            },
        },
    }


def _authz_cluster(address: tuple[str, int]) -> dict[str, Any]:
    return {
        "name": "authz",
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": f"{_TYPE}.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": load_assignment("authz", *address),
        # Every raw API key and sandbox token goes to authz, every injected secret comes
        # back: mTLS both ways (authz refuses callers without this client certificate).
        "transport_socket": authz_transport_socket(),
    }


def _service_cluster(
    name: str, upstream: Upstream, ca_file: str, override: tuple[str, int] | None
) -> dict[str, Any]:
    cluster_name = f"service_{name}"
    cluster: dict[str, Any] = {"name": cluster_name}
    if override is not None:
        address, port = override
        if not is_ip(address):
            raise ValueError(
                f"egress service {name!r}: override for {upstream.host!r} must be an IP "
                f"address (STATIC cluster), got {address!r}"
            )
        cluster["type"] = "STATIC"
    else:
        address, port = upstream.host, upstream.port
        cluster["type"] = "LOGICAL_DNS"
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    cluster["connect_timeout"] = UPSTREAM_CONNECT_TIMEOUT
    cluster["load_assignment"] = load_assignment(cluster_name, address, port)
    if upstream.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": f"{_TYPE}.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": upstream.host,
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"filename": ca_file},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": upstream.host}}
                        ],
                    }
                },
            },
        }
    return cluster


# -- command line -----------------------------------------------------------------------


PROG: Final = "python -m authz.tools.egress_envoy"
SUMMARY: Final = "generate the egress Envoy config from the egress services data"
EXIT_CODES: Final = (
    (0, "written, or with --check up to date"),
    (1, "with --check: --out differs from the generated config or is missing"),
    (2, "could not run: the services data is missing or malformed"),
)


def arguments() -> argparse.ArgumentParser:
    """The options (``--services``, ``--out``, ``--check``) as a parent parser (no
    ``--help``), shared by :func:`main` and ``authz generate egress-envoy``. Relative paths
    are relative to the current directory."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--services",
        default=DEFAULT_SERVICES,
        help="egress services data, a data.json with .services (default: %(default)s)",
    )
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help="Envoy config to write (default: %(default)s)"
    )
    add_check(parser, "write nothing; exit 1 if --out differs from the generated config")
    return parser


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line of :func:`main`: :data:`SUMMARY`, :func:`arguments` and
    :data:`EXIT_CODES` under ``prog``."""
    return command_parser(prog, SUMMARY, EXIT_CODES, parents=[arguments()])


def run(args: argparse.Namespace) -> int:
    """Write (or with ``args.check`` compare) the egress Envoy config ``args.out`` from
    ``args.services``; returns the exit code (:data:`EXIT_CODES`)."""
    try:
        text = render(specs(read_services(args.services)), source=args.services, out=args.out)
    except ValueError as exc:  # ServicesError, or a generator refusal
        _stderr(f"error: {exc}")
        return 2
    out = Path(args.out)
    if sync(Path(), {str(out): text}, check=args.check, say=_stderr):
        _stderr(
            f"{out} is out of date with {args.services}: run "
            f"authz generate egress-envoy --services {args.services} --out {out}"
        )
        return 1
    return 0


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m authz.tools.egress_envoy``: parse ``argv`` (default: ``sys.argv[1:]``)
    and :func:`run`; see the module docstring for usage and exit codes."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
