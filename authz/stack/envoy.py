"""Render an Envoy config from the repo with other addresses (structured, not templated).

The files in ``infra/envoy/`` are complete, valid Envoy configs with the local-stack
ports. :func:`render` rewrites the admin port, listener ports (by listener name) and
cluster endpoints (by cluster name) so tests can run the same file on free ports, and
moves the TLS files from where deployments mount them (:data:`ENVOY_TLS_DIR`) to a local
directory (:func:`relocate_tls`); :func:`secure_listeners` puts the deployments' listener
TLS on named listeners (the local stack's ``--tls``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from authz.tools.egress_envoy import ENVOY_TLS_DIR, LISTENER_TLS_DIRS, downstream_transport_socket

__all__ = ["ENVOY_TLS_DIR", "relocate_tls", "render", "secure_listeners"]


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
) -> str:
    """``source`` with its admin port, the named listeners' ports and the named clusters'
    (address, port) replaced; ``tls_listeners`` get TLS (:func:`secure_listeners`) and,
    with ``tls_dir``, the TLS files move there (:func:`relocate_tls`). Raises KeyError
    naming a listener or cluster that the file does not define (so a renamed one cannot
    silently keep its old port)."""
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
    if tls_dir is not None:
        relocate_tls(config, tls_dir)
    return yaml.safe_dump(config, sort_keys=False)
