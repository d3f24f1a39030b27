"""Render an Envoy config from the repo with other addresses (structured, not templated).

The files in ``infra/envoy/`` are complete, valid Envoy configs with the local-stack
ports. :func:`render` rewrites the admin port, listener ports (by listener name) and
cluster endpoints (by cluster name) so tests can run the same file on free ports, and
moves the TLS files from where deployments mount them (:data:`ENVOY_TLS_DIR`) to a local
directory (:func:`relocate_tls`); :func:`secure_listeners` puts the deployments' listener
TLS on named listeners (the local stack's ``--tls``); :func:`add_body_routes` adds routes
that send authz the request body (:class:`BodyRoute`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from authz.core.input import MAX_BODY_BYTES
from authz.tools.egress_envoy import ENVOY_TLS_DIR, LISTENER_TLS_DIRS, downstream_transport_socket

__all__ = [
    "ENVOY_TLS_DIR",
    "BodyRoute",
    "add_body_routes",
    "relocate_tls",
    "render",
    "secure_listeners",
]

_HCM: Final = "envoy.filters.network.http_connection_manager"
_EXT_AUTHZ: Final = "envoy.filters.http.ext_authz"


@dataclass(frozen=True, slots=True)
class BodyRoute:
    """A gateway route whose policy reads ``input.parsed_body`` (README "Request
    bodies"): requests whose path starts with ``prefix`` go where the catch-all route
    sends them, with its ext_authz settings plus ``parse_body: "true"`` and
    ``with_request_body`` (Envoy's ext_authz ``BufferSettings``: buffer at most
    ``max_request_bytes`` bytes of the body; ``allow_partial_message``: a longer body is
    sent cut, not refused with 413). The default limit is what authz parses at most."""

    prefix: str
    max_request_bytes: int = MAX_BODY_BYTES
    allow_partial_message: bool = True


def add_body_routes(
    config: dict[str, Any], routes: Sequence[BodyRoute], listener: str = "gateway"
) -> dict[str, Any]:
    """``config`` with one route per :class:`BodyRoute` in front of every route of the
    named listener's first virtual host, in the order given, each a copy of its last
    route (the catch-all, ``prefix: "/"``) with the body settings; changed in place and
    returned. Raises KeyError naming a listener the config does not define, ValueError
    when its last route is not a catch-all with ext_authz check settings."""
    if not routes:
        return config
    by_listener = {item["name"]: item for item in config["static_resources"]["listeners"]}
    (hcm,) = [f for f in by_listener[listener]["filter_chains"][0]["filters"] if f["name"] == _HCM]
    existing: list[dict[str, Any]] = hcm["typed_config"]["route_config"]["virtual_hosts"][0][
        "routes"
    ]
    catch_all = existing[-1]
    settings = catch_all.get("typed_per_filter_config", {}).get(_EXT_AUTHZ, {})
    if catch_all.get("match") != {"prefix": "/"} or "check_settings" not in settings:
        raise ValueError(
            f"listener {listener}: the last route is not a catch-all (prefix /) with ext_authz "
            f"check_settings to copy: {catch_all.get('match')}"
        )
    added = []
    for body in routes:
        route = copy.deepcopy(catch_all)
        route["match"] = {"prefix": body.prefix}
        check = route["typed_per_filter_config"][_EXT_AUTHZ]["check_settings"]
        check.setdefault("context_extensions", {})["parse_body"] = "true"
        check["with_request_body"] = {
            "max_request_bytes": body.max_request_bytes,
            "allow_partial_message": body.allow_partial_message,
        }
        added.append(route)
    existing[:0] = added
    return config


def relocate_tls(config: Any, directory: Path) -> Any:
    """``config`` (an Envoy bootstrap as plain dicts/lists) with every ``filename`` under
    :data:`ENVOY_TLS_DIR` moved to the same relative path under ``directory``; changed in
    place and returned. Other file names (the system CA bundle) are left alone."""
    prefix = ENVOY_TLS_DIR + "/"
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "filename" and isinstance(value, str) and value.startswith(prefix):
                config[key] = str(directory / value.removeprefix(prefix))
            else:
                relocate_tls(value, directory)
    elif isinstance(config, list):
        for item in config:
            relocate_tls(item, directory)
    return config


def secure_listeners(config: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """``config`` with TLS (:func:`authz.tools.egress_envoy.downstream_transport_socket`, the
    certificate in ``LISTENER_TLS_DIRS[name]``) on every filter chain of each named
    listener; changed in place and returned. Raises KeyError naming a listener that has
    no certificate directory or that the config does not define."""
    names = list(names)
    if not names:
        return config
    by_listener = {item["name"]: item for item in config["static_resources"]["listeners"]}
    for name in names:
        socket = downstream_transport_socket(LISTENER_TLS_DIRS[name])
        for chain in by_listener[name]["filter_chains"]:
            chain["transport_socket"] = socket
    return config


def render(
    source: Path,
    *,
    admin_port: int,
    listeners: Mapping[str, int],
    clusters: Mapping[str, tuple[str, int]],
    tls_dir: Path | None = None,
    tls_listeners: Iterable[str] = (),
    body_routes: Sequence[BodyRoute] = (),
) -> str:
    """``source`` with its admin port, the named listeners' ports and the named clusters'
    (address, port) replaced; ``tls_listeners`` get TLS (:func:`secure_listeners`) and,
    with ``tls_dir``, the TLS files move there (:func:`relocate_tls`); ``body_routes`` are
    added to the ``gateway`` listener (:func:`add_body_routes`). Raises KeyError naming a
    listener or cluster that the file does not define (so a renamed one cannot silently
    keep its old port), ValueError from :func:`add_body_routes`."""
    config: dict[str, Any] = yaml.safe_load(source.read_text(encoding="utf-8"))
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    resources = config["static_resources"]
    by_listener = {item["name"]: item for item in resources.get("listeners", [])}
    for name, port in listeners.items():
        by_listener[name]["address"]["socket_address"]["port_value"] = port
    by_cluster = {item["name"]: item for item in resources.get("clusters", [])}
    for name, (address, port) in clusters.items():
        for group in by_cluster[name]["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                socket = endpoint["endpoint"]["address"]["socket_address"]
                socket["address"], socket["port_value"] = address, port
    secure_listeners(config, tls_listeners)
    add_body_routes(config, body_routes)
    if tls_dir is not None:
        relocate_tls(config, tls_dir)
    return yaml.safe_dump(config, sort_keys=False)
