"""Egress service specs for the egress Envoy generator tests."""

from __future__ import annotations

import json
from typing import Any

from tests.helpers import ROOT

__all__ = ["SERVICES_FILE", "real_services", "svc"]

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
