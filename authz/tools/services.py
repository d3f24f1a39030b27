"""The egress services file (``policy/egress/data.json``), read once for every tool.

The file is the policy's data document for ``data.egress``; its ``services`` object maps a
service name (what sandboxes send as ``Host``) to a spec::

    {"base_url": "https://api.example.com[/prefix]",
     "credential": {"header": "<lowercase header name>", "format": "... {secret} ..."},
     ...}                                   # the rest is the policy's (paths, methods)

``credential`` is absent or null for a service without one. The egress Envoy generator
(:mod:`authz.tools.egress_envoy`), the deployment generator (:mod:`authz.tools.deploy`),
``authz secrets generate`` and the local stack read it through :func:`read_services`.
The runtime never reads it (OPA gets it inside the bundle).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeGuard
from urllib.parse import urlsplit

from authz.core.headers import is_header_name

__all__ = [
    "DEFAULT_SERVICES",
    "Credential",
    "Service",
    "ServicesError",
    "Upstream",
    "is_ip",
    "is_service_name",
    "parse_base_url",
    "parse_service",
    "read_services",
    "specs",
]

DEFAULT_SERVICES: Final = "policy/egress/data.json"
# A service name is what sandboxes send as Host: one lowercase DNS label.
_SERVICE_NAME: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# A DNS name (underscores tolerated: they exist in real DNS, if not in host names).
_HOST_NAME: Final = re.compile(r"[a-z0-9_]([a-z0-9_.-]{0,251}[a-z0-9_])?")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


class ServicesError(ValueError):
    """The services file is unreadable or not the shape above; the message names the file
    and the field (``services.<name>.credential.header``)."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """A service's ``base_url``, parsed: ``scheme`` ("http"/"https"), ``host`` (lowercase,
    no brackets), ``port`` and ``path`` ("" or "/prefix", no trailing slash)."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def tls(self) -> bool:
        """True for https."""
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        """The Host header to send: the host (bracketed if IPv6), plus ``:port`` when the
        port is not the scheme's default (RFC 9110 section 7.2)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Credential:
    """Where a service's credential goes: ``header`` (lowercase name) set to ``format``
    with ``{secret}`` replaced by the secret."""

    header: str
    format: str


@dataclass(frozen=True, slots=True)
class Service:
    """One service of the file: its ``name``, parsed ``upstream``, ``credential`` (None
    when it has none) and ``spec``, the object as written (the policy reads the rest)."""

    name: str
    upstream: Upstream
    credential: Credential | None
    spec: Mapping[str, Any]


def is_ip(host: str) -> bool:
    """True when ``host`` is an IPv4 or IPv6 address (no brackets)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_service_name(name: object) -> TypeGuard[str]:
    """True when ``name`` is a string and one lowercase DNS label (RFC 1035: a-z, 0-9,
    '-', at most 63 characters, no leading or trailing '-')."""
    return isinstance(name, str) and _SERVICE_NAME.fullmatch(name) is not None


def parse_base_url(service: str, base_url: object) -> Upstream:
    """Parse ``base_url`` of ``service`` (RFC 3986 URL, ``http`` or ``https``).

    Raises ValueError naming the service and the ``base_url`` field when it is not a
    string, its scheme is not http/https, it has no or an invalid host, a bad port, user info
    (credentials never go in URLs), a query or a fragment, or when an https URL names an
    IP address (SNI and the certificate check need a DNS name).
    """
    where = f"egress service {service!r}: base_url"
    if not isinstance(base_url, str) or not base_url:
        raise ValueError(f"{where} must be a non-empty string, got {base_url!r}")
    try:
        parts = urlsplit(base_url)
    except ValueError as exc:  # e.g. an unbalanced IPv6 bracket
        raise ValueError(f"{where} is not a URL ({exc}): {base_url!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"{where} must be an http or https URL, got {base_url!r}")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"{where} has no host: {base_url!r}")
    if not (is_ip(host) or _HOST_NAME.fullmatch(host)):
        raise ValueError(f"{where} has an invalid host {host!r}: {base_url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{where} must not carry user info: {base_url!r}")
    if parts.query or parts.fragment or base_url.endswith(("?", "#")):
        raise ValueError(f"{where} must not have a query or fragment: {base_url!r}")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise ValueError(f"{where} has an invalid port: {base_url!r}") from None
    if scheme == "https" and is_ip(host):
        raise ValueError(f"{where} must name a DNS host for TLS (SNI, SAN): {base_url!r}")
    return Upstream(scheme, host, port, parts.path.rstrip("/"))


def parse_service(name: object, spec: object) -> Service:
    """One entry of ``services``, typed. Raises ValueError naming the service and the
    field: a name that is not one lowercase DNS label, a spec that is not an object, a bad
    ``base_url`` (:func:`parse_base_url`), a ``credential`` (of any shape) with a plain
    ``http`` base_url (the secret would travel in clear), a ``credential`` that is not
    an object, whose ``header`` is not a lowercase header name (RFC 9110 token) or whose
    ``format`` is not a string containing ``{secret}``."""
    if not is_service_name(name):
        raise ValueError(
            f"egress service {name!r}: the name must be one lowercase DNS label "
            "(a-z, 0-9, '-'); sandboxes send it as Host"
        )
    if not isinstance(spec, Mapping):
        raise ValueError(f"egress service {name!r}: must be an object, got {spec!r}")
    upstream = parse_base_url(name, spec.get("base_url"))
    raw = spec.get("credential")
    credential = None
    if raw is not None and not upstream.tls:
        # authz injects the credential into the request Envoy forwards: over plain http it
        # would cross the network in clear. Checked first: any credential at all counts.
        raise ValueError(
            f"egress service {name!r}: base_url {spec['base_url']!r} is plain http but the "
            "service has a credential, which must never cross a hop in clear: use an https "
            "base_url"
        )
    if raw is not None:
        if not isinstance(raw, Mapping):
            raise ValueError(f"egress service {name!r}: credential must be an object")
        header, template = raw.get("header"), raw.get("format")
        if not isinstance(header, str) or not is_header_name(header):
            raise ValueError(
                f"egress service {name!r}: credential.header must be a lowercase header "
                f"name, got {header!r}"
            )
        if not isinstance(template, str) or "{secret}" not in template:
            raise ValueError(
                f"egress service {name!r}: credential.format must be a string containing "
                "'{secret}'"
            )
        credential = Credential(header, template)
    return Service(name, upstream, credential, spec)


def read_services(path: Path | str) -> dict[str, Service]:
    """Read ``path`` (JSON object with a ``services`` object) into service name ->
    :class:`Service`, in the file's order. Raises :class:`ServicesError` naming the file
    (and, for a bad entry, the service and field) when the file cannot be read, is not
    JSON, has no ``services`` object, or an entry is bad (:func:`parse_service`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise ServicesError(f"{path}: cannot read the egress services: {exc}") from exc
    except RecursionError:  # json's recursive parser on deeply nested arrays or objects
        raise ServicesError(f"{path}: cannot read the egress services: nested too deeply") from None
    services = data.get("services") if isinstance(data, dict) else None
    if not isinstance(services, dict):
        raise ServicesError(f"{path}: .services must be an object")
    try:
        return {name: parse_service(name, spec) for name, spec in services.items()}
    except ValueError as exc:
        raise ServicesError(f"{path}: {exc}") from exc


def specs(services: Mapping[str, Service]) -> dict[str, Mapping[str, Any]]:
    """Service name -> the spec as written, for generators that take the raw objects."""
    return {name: service.spec for name, service in services.items()}
