"""A minimal Envoy in front of an ext_authz server and an echo upstream, for tests that
need Envoy's own handling of a CheckResponse (tests/integration, tests/e2e)."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

__all__ = ["ext_authz_envoy_config", "running_echo", "running_envoy"]

ENVOY_START_TIMEOUT_S = 30.0


class _Echo(BaseHTTPRequestHandler):
    """Answers every GET with ``{"path", "headers"}`` as it received them."""

    def do_GET(self) -> None:
        body = json.dumps({"path": self.path, "headers": dict(self.headers.items())}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def running_echo(port: int) -> Iterator[None]:
    """The echo upstream on 127.0.0.1:``port`` until the block exits."""
    echo = ThreadingHTTPServer(("127.0.0.1", port), _Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        echo.shutdown()
        echo.server_close()


_T = "type.googleapis.com/envoy.extensions."


def ext_authz_envoy_config(
    listen: int, admin: int, authz: int, upstream: int, *, forward_metadata: bool = False
) -> dict[str, Any]:
    """Envoy bootstrap (JSON-ready): HTTP on 127.0.0.1:``listen``, the ext_authz filter
    (gRPC, default settings, 2 s timeout) to 127.0.0.1:``authz`` over plaintext HTTP/2, every
    route to 127.0.0.1:``upstream``; ``forward_metadata``: the upstream request also gets
    ``x-ext-authz-metadata``, the ext_authz filter's dynamic metadata as Envoy holds it
    (JSON, ``%DYNAMIC_METADATA(envoy.filters.http.ext_authz)%``)."""
    route: dict[str, Any] = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
    if forward_metadata:
        route["request_headers_to_add"] = [
            {
                "header": {
                    "key": "x-ext-authz-metadata",
                    "value": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz)%",
                }
            }
        ]

    def cluster(name: str, port: int, h2: bool) -> dict[str, Any]:
        endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}
        found: dict[str, Any] = {
            "name": name,
            "type": "STATIC",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
            },
        }
        if h2:
            found["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": _T + "upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            }
        return found

    hcm: dict[str, Any] = {
        "@type": _T + "filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "t",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [route],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.ext_authz",
                "typed_config": {
                    "@type": _T + "filters.http.ext_authz.v3.ExtAuthz",
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "2s"},
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _T + "filters.http.router.v3.Router"},
            },
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "l",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {"filters": [{"name": "hcm", "typed_config": hcm}]},
                    ],
                }
            ],
            "clusters": [cluster("authz", authz, True), cluster("upstream", upstream, False)],
        },
    }


@contextmanager
def running_envoy(envoy_bin: str, config: dict[str, Any], base: Path, admin: int) -> Iterator[None]:
    """Envoy with ``config`` (written under ``base``, log beside it) until the block exits;
    yields once its admin port ``admin`` says ready. Fails the test with Envoy's log if it
    exits or is not ready within ENVOY_START_TIMEOUT_S."""
    path = base / "envoy.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    log_path = base / "envoy.log"
    with log_path.open("w") as log:
        envoy = subprocess.Popen(
            [envoy_bin, "-c", str(path), "--log-level", "warn", "--use-dynamic-base-id"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_ready(admin, envoy, log_path)
            yield
        finally:
            envoy.terminate()
            envoy.wait(10)


def _wait_ready(admin: int, envoy: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + ENVOY_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert envoy.poll() is None, log.read_text()
        conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=1)
        try:
            conn.request("GET", "/ready")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.1)
    pytest.fail(f"envoy not ready: {log.read_text()}")
