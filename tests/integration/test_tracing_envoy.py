"""One gateway request traced through a real Envoy (its OpenTelemetry tracer), authz and
OPA (a stand-in recording the ``traceparent`` it gets), every span collected by one OTLP/HTTP
receiver: authz's Check span joins Envoy's trace."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
from pathlib import Path
from typing import Any

import pytest

from authz.core.authorizer import CHECK_SPAN, OPA_SPAN
from authz.core.headers import CREDENTIAL_HEADERS
from authz.runtime import server
from authz.runtime.config import load
from authz.stack.supervisor import free_port
from tests.helpers.envoy_rig import ext_authz_envoy_config, running_echo, running_envoy
from tests.integration.test_tracing import (
    PARENT_ID,
    TRACE_ID,
    TRACEPARENT,
    _attributes,
    _opa_app,
    _Received,
    _receiver_app,
    _serving,
)

_T = "type.googleapis.com/envoy."


def _traced_envoy(config: dict[str, Any], otlp_port: int) -> dict[str, Any]:
    """``config`` with Envoy's OpenTelemetry tracer on every request, exporting OTLP/HTTP
    to 127.0.0.1:``otlp_port`` at once (runtime ``tracing.opentelemetry.*``)."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm["typed_config"]["tracing"] = {
        "random_sampling": {"value": 100},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": _T + "config.trace.v3.OpenTelemetryConfig",
                "service_name": "envoy",
                "http_service": {
                    "http_uri": {
                        "uri": f"http://127.0.0.1:{otlp_port}/v1/traces",
                        "cluster": "otlp",
                        "timeout": "2s",
                    }
                },
            },
        },
    }
    endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": otlp_port}}}
    config["static_resources"]["clusters"].append(
        {
            "name": "otlp",
            "type": "STATIC",
            "load_assignment": {
                "cluster_name": "otlp",
                "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
            },
        }
    )
    config["layered_runtime"] = {
        "layers": [
            {
                "name": "tracing",
                "static_layer": {
                    "tracing.opentelemetry.flush_interval_ms": 100,
                    "tracing.opentelemetry.min_flush_spans": 1,
                },
            }
        ]
    }
    return config


def _get(port: int, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/api/v1/status", headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


async def test_gateway_request_trace_joins_envoy_authz_and_opa(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, envoy_bin: str
) -> None:
    received = _Received()
    secrets = {name: f"secret-{i}-{name}" for i, name in enumerate(CREDENTIAL_HEADERS)}
    async with _serving(_receiver_app(received)) as otlp, _serving(_opa_app(received)) as opa:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "authz")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        settings = load(
            {
                "AUTHZ_GRPC_ADDR": f"127.0.0.1:{free_port()}",
                "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
                "AUTHZ_OPA_URL": opa,
                "AUTHZ_AUDIT_DB": str(tmp_path / "audit.db"),
                "AUTHZ_OVERRIDES_FILE": str(tmp_path / "overrides.json"),
            }
        )
        listen, admin, upstream = free_port(), free_port(), free_port()
        authz_port = int(settings.grpc_addr.rpartition(":")[2])
        config = _traced_envoy(
            ext_authz_envoy_config(listen, admin, authz_port, upstream),
            int(otlp.rpartition(":")[2]),
        )
        async with contextlib.AsyncExitStack() as stack:
            await server.build_runtime(settings, stack)
            with running_echo(upstream), running_envoy(envoy_bin, config, tmp_path, admin):
                status = await asyncio.to_thread(
                    _get, listen, {**secrets, "traceparent": TRACEPARENT}
                )
                assert status == 200
                for _ in range(50):  # Envoy flushes every 100 ms
                    if {"envoy"} <= {service for service, _ in received.spans}:
                        break
                    await asyncio.sleep(0.1)
    spans = {(service, span.name): span for service, span in received.spans}
    ingress = spans["envoy", "ingress"]
    egress = spans["envoy", "async envoy.service.auth.v3.Authorization.Check egress"]
    check, query = spans["authz", CHECK_SPAN], spans["authz", OPA_SPAN]
    # One trace: the client's, continued by Envoy's ingress span, its ext_authz call and
    # authz's Check with its steps; OPA got the OPA query span's context.
    assert {span.trace_id.hex() for span in spans.values()} == {TRACE_ID}
    assert ingress.parent_span_id.hex() == PARENT_ID
    assert egress.parent_span_id == ingress.span_id
    assert query.parent_span_id == check.span_id
    decisions = received.opa_traceparents[settings.default_decision_path]
    assert decisions == [f"00-{TRACE_ID}-{query.span_id.hex()}-01"]
    # The servicer does not pass the gRPC metadata (Authorizer.check's ``metadata``) yet,
    # so the Check's parent is the caller's span from the CheckRequest headers, a sibling
    # of Envoy's ingress span; with it, the parent is Envoy's ext_authz call span.
    assert check.parent_span_id.hex() == PARENT_ID
    exported = [str(v) for _, span in received.spans for v in _attributes(span).values()]
    assert not [s for s in secrets.values() if any(s in value for value in exported)]
