"""Echo API for the local stack: the gateway's demo upstream and the egress stand-in.

Answers every request with JSON describing what it received, so a user (or a test) sees
exactly which headers survived the proxy: ``{"service", "method", "host", "path",
"query", "headers", "body_bytes"}``. ``GET /healthz`` answers ``{"status": "ok"}``.
The echo never contains a secret: the values of ``authorization``,
``proxy-authorization``, ``x-api-key``, ``cookie``, ``x-sandbox-token`` and of every
service's credential header are replaced by ``**********`` (names stay, so a test still
sees that a header arrived).

Egress stand-in mode (``--services`` + ``--credentials``), playing every external API at
once: the request's ``Host`` (the real host the egress Envoy rewrites to, e.g.
``api.openai.com``; a ``:port`` is ignored) picks the service whose ``base_url`` has that
host (421 ``{"error": "unknown_host"}`` if none). The service's ``credential.header``
must then hold exactly ``credential.format`` with ``{secret}`` replaced by the service's
secret from the credentials file (authz's egress secrets file, ``{"version": 1,
"credentials": {"<service>": "<secret>"}}``), else 401 ``{"error":
"invalid_credential"}`` as a real API would. The echo then says ``"service": <name>`` and
``"credential_ok": true``.

Run: ``python -m authz.stack.upstream --port 8090`` (demo upstream), or
``python -m authz.stack.upstream --port 9443 --tls-cert server.pem --tls-key
server-key.pem --services policy/egress/data.json --credentials secrets.json``.
"""

from __future__ import annotations

import argparse
import hmac
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from aiohttp import web

from authz.core.headers import CREDENTIAL_HEADERS
from authz.tools.services import read_services, specs

__all__ = [
    "MASK",
    "MASKED_HEADERS",
    "ServiceCredential",
    "create_app",
    "load_credentials",
    "load_services",
    "main",
]

MASK: Final = "**********"
# Masked in every echo, whatever the services say.
MASKED_HEADERS: Final = frozenset(CREDENTIAL_HEADERS)
CREDENTIALS_FILE_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class ServiceCredential:
    """What the stand-in expects from one service's callers: ``header`` (lowercase name)
    equal to ``value`` (the formatted credential; ``None`` when the credentials file has
    no secret for the service, so every call is refused). A service without a credential
    (``header`` None, like a public API) expects none: a call carrying any credential
    header is refused, since one can only come from a leak."""

    service: str
    header: str | None
    value: str | None

    def __repr__(self) -> str:
        # Never print the expected credential.
        return f"ServiceCredential({self.service!r}, {self.header!r}, {MASK!r})"


_SERVICES: Final = web.AppKey[Mapping[str, ServiceCredential]]("services")
_NAME: Final = web.AppKey("name", str)
_MASKED: Final = web.AppKey[frozenset[str]]("masked")


def load_services(
    services: Mapping[str, Any], credentials: Mapping[str, str]
) -> dict[str, ServiceCredential]:
    """Map each service's ``base_url`` host (lowercase) to what its callers must send.

    ``services``: the egress services (``policy/egress/data.json`` -> ``.services``:
    name -> ``{"base_url", "credential": {"header", "format"}}``); ``credentials``:
    service name -> secret. Raises ValueError naming the service and field when
    ``base_url`` has no host, ``credential.header``/``format`` is not a non-empty string,
    or ``format`` lacks ``{secret}``.
    """
    by_host: dict[str, ServiceCredential] = {}
    for name, spec in services.items():
        if not isinstance(spec, Mapping):
            raise ValueError(f"service {name!r}: must be an object")
        host = urlsplit(str(spec.get("base_url", ""))).hostname
        if not host:
            raise ValueError(f"service {name!r}: base_url has no host")
        credential = spec.get("credential")
        if credential is None:
            by_host[host.lower()] = ServiceCredential(name, None, None)
            continue
        header = credential.get("header") if isinstance(credential, Mapping) else None
        template = credential.get("format") if isinstance(credential, Mapping) else None
        if not isinstance(header, str) or not header:
            raise ValueError(f"service {name!r}: credential.header must be a non-empty string")
        if not isinstance(template, str) or "{secret}" not in template:
            raise ValueError(f"service {name!r}: credential.format must contain '{{secret}}'")
        secret = credentials.get(name)
        value = template.replace("{secret}", secret) if secret else None
        by_host[host.lower()] = ServiceCredential(name, header.lower(), value)
    return by_host


def load_credentials(path: Path) -> dict[str, str]:
    """Read authz's egress secrets file ``{"version": 1, "credentials": {name: secret}}``.
    Raises ValueError (naming the file, never a secret) when it is not that shape, OSError
    when it cannot be read."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:  # its message quotes the file's bytes: secrets
        raise ValueError(f"{path}: not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno}") from None
    except RecursionError:  # json's recursive parser on deeply nested arrays or objects
        raise ValueError(f"{path}: nested too deeply") from None
    if not isinstance(data, dict) or data.get("version") != CREDENTIALS_FILE_VERSION:
        raise ValueError(f"{path}: expected an object with version {CREDENTIALS_FILE_VERSION}")
    credentials = data.get("credentials")
    if not isinstance(credentials, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in credentials.items()
    ):
        raise ValueError(f"{path}: credentials must map service names to strings")
    return credentials


def _masked_headers(request: web.Request) -> dict[str, str]:
    masked = request.app[_MASKED]
    return {
        name.lower(): MASK if name.lower() in masked else value
        for name, value in request.headers.items()
    }


def _hostname(authority: str) -> str:
    # Parse the Host value as an RFC 3986 authority: drops ":port" and IPv6 brackets.
    try:
        return urlsplit(f"//{authority}").hostname or ""
    except ValueError:
        return ""


def _credential_ok(request: web.Request, expected: ServiceCredential) -> bool:
    if expected.header is None:
        return not any(name.lower() in MASKED_HEADERS for name in request.headers)
    sent = request.headers.getall(expected.header, [])
    if expected.value is None or len(sent) != 1:
        return False
    return hmac.compare_digest(sent[0].encode(), expected.value.encode())


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    echo: dict[str, Any] = {"service": request.app[_NAME]}
    services = request.app[_SERVICES]
    if services:
        expected = services.get(_hostname(request.host))
        if expected is None:
            return web.json_response({"error": "unknown_host", "host": request.host}, status=421)
        echo["service"] = expected.service
        if not _credential_ok(request, expected):
            return web.json_response(
                {
                    "error": "invalid_credential",
                    "service": expected.service,
                    "credential_ok": False,
                },
                status=401,
            )
        echo["credential_ok"] = True
    echo.update(
        method=request.method,
        host=request.host,
        path=request.path,
        query=request.query_string,
        headers=_masked_headers(request),
        body_bytes=len(body),
    )
    return web.json_response(echo)


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(
    name: str = "demo-upstream", services: Mapping[str, ServiceCredential] | None = None
) -> web.Application:
    """The echo application; ``name`` is reported in every answer. ``services`` (from
    :func:`load_services`, keyed by host) turns on the egress stand-in mode."""
    app = web.Application()
    app[_NAME] = name
    app[_SERVICES] = dict(services or {})
    app[_MASKED] = MASKED_HEADERS | {s.header for s in app[_SERVICES].values() if s.header}
    app.router.add_get("/healthz", _healthz)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


def _ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def main() -> None:
    """Serve the echo app on 127.0.0.1 (``--port``, ``--name``; HTTPS with ``--tls-cert``
    and ``--tls-key``; stand-in mode with ``--services`` and ``--credentials``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--name", default="demo-upstream")
    parser.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="... and this private key (PEM)")
    parser.add_argument("--services", type=Path, help="egress data.json (.services)")
    parser.add_argument("--credentials", type=Path, help="authz's egress secrets file (JSON)")
    args = parser.parse_args()
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if (args.services is None) != (args.credentials is None):
        parser.error("--services and --credentials go together")
    services: dict[str, ServiceCredential] = {}
    if args.services is not None:
        try:
            egress = specs(read_services(args.services))
            services = load_services(egress, load_credentials(args.credentials))
        except (OSError, ValueError) as exc:
            parser.error(f"cannot load services/credentials: {exc}")
    context = _ssl_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    web.run_app(
        create_app(args.name, services),
        host=args.host,
        port=args.port,
        ssl_context=context,
        print=None,
    )


if __name__ == "__main__":
    main()
