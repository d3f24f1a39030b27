"""Egress service specs for the egress Envoy generator tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from authz.stack.tls import Leaf, ensure_pki
from authz.tools.egress_envoy import ENVOY_TLS_DIR, INTERCEPT_TLS_DIR, intercepted_hosts
from authz.tools.services import parse_service
from tests.helpers import ROOT

__all__ = ["SERVICES_FILE", "intercept_certificates", "real_services", "svc"]

SERVICES_FILE = ROOT / "policy/egress/data.json"


def real_services() -> dict[str, Any]:
    """The services of the shipped egress data (policy/egress/data.json)."""
    services: dict[str, Any] = json.loads(SERVICES_FILE.read_text(encoding="utf-8"))["services"]
    return services


def svc(base_url: object, *, credential: bool = True) -> dict[str, Any]:
    """A service spec; an http one has no credential (the generator refuses that)."""
    spec: dict[str, Any] = {"base_url": base_url}
    if credential:
        spec["credential"] = {"header": "authorization", "format": "{secret}"}
    return spec


def intercept_certificates(tls_dir: Path, services: dict[str, Any]) -> Path:
    """Issue the interception certificates a generated egress config names, under
    ``tls_dir`` (the directory ``relocate_tls`` moves the config's TLS files to): one
    leaf per intercepted host, signed by a new egress CA. Returns that CA's certificate."""
    parsed = [parse_service(name, spec) for name, spec in services.items()]
    directory = tls_dir / Path(INTERCEPT_TLS_DIR).relative_to(ENVOY_TLS_DIR)
    hosts = intercepted_hosts(parsed)
    ensure_pki(directory, {host: Leaf("server", (host,)) for host in hosts})
    return directory / "ca.crt"
