"""Render an Envoy config from the repo with other addresses (structured, not templated).

The files in ``infra/envoy/`` are complete, valid Envoy configs with the local-stack
ports. :func:`render` rewrites the admin port, listener ports (by listener name) and
cluster endpoints (by cluster name) so tests can run the same file on free ports.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = ["render"]


def render(
    source: Path,
    *,
    admin_port: int,
    listeners: Mapping[str, int],
    clusters: Mapping[str, tuple[str, int]],
) -> str:
    """``source`` with its admin port, the named listeners' ports and the named clusters'
    (address, port) replaced. Raises KeyError naming a listener or cluster that the file
    does not define (so a renamed one cannot silently keep its old port)."""
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
    return yaml.safe_dump(config, sort_keys=False)
