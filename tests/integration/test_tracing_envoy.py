"""One gateway request traced through a real Envoy (its OpenTelemetry tracer), authz and a
real OPA (its distributed tracing, OTLP/HTTP), every span collected by one OTLP/HTTP
receiver: authz's Check span joins Envoy's trace and OPA's span joins authz's."""

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
from tests.helpers.opa_server import running_opa
from tests.integration.test_tracing import (
    PARENT_ID,
    TRACE_ID,
    TRACEPARENT,
    _attributes,
    _Received,
    _receiver_app,
    _serving,
)

POLICY = """package authz.gateway

decision := {"allowed": true, "authz": {"reason": "allowed", "identity": {"key_id": "k1"}}}
"""

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
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, envoy_bin: str, opa_bin: str
) -> None:
    received = _Received()
    trace_id = bytes.fromhex(TRACE_ID)
    secrets = {name: f"secret-{i}-{name}" for i, name in enumerate(CREDENTIAL_HEADERS)}
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "gateway.rego").write_text(POLICY, encoding="utf-8")
    # Both SDKs (authz's Python, OPA's Go) export their batches every 50 ms.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    async with contextlib.AsyncExitStack() as services:
        otlp = await services.enter_async_context(_serving(_receiver_app(received)))
        # OPA's distributed tracing (https://www.openpolicyagent.org/docs/configuration#distributed-tracing)
        (tmp_path / "opa.yaml").write_text(
            "distributed_tracing:\n  type: http\n"
            f"  address: {otlp.removeprefix('http://')}\n  sample_percentage: 100\n"
            "  service_name: opa\n",
            encoding="utf-8",
        )
        opa_process = running_opa(
            opa_bin,
            f"--config-file={tmp_path / 'opa.yaml'}",
            str(tmp_path / "policy"),
            log_path=tmp_path / "opa.log",
        )
        opa = opa_process.__enter__()
        # Stopped off the loop: OPA flushes its spans to the receiver this loop serves.
        services.push_async_callback(asyncio.to_thread, opa_process.__exit__, None, None, None)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "authz")
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
                for _ in range(100):  # Envoy flushes every 100 ms, OPA every 50 ms
                    in_trace = {s for s, span in received.spans if span.trace_id == trace_id}
                    if {"envoy", "opa"} <= in_trace:
                        break
                    await asyncio.sleep(0.1)
        # Leaving: authz's exit stack flushes its spans, OPA flushes its own as it stops.
    spans = {(service, span.name): span for service, span in received.spans}
    ingress = spans["envoy", "ingress"]
    egress = spans["envoy", "async envoy.service.auth.v3.Authorization.Check egress"]
    check, query = spans["authz", CHECK_SPAN], spans["authz", OPA_SPAN]
    # OPA's span for the decision query (the bundle watcher's queries are traces of their own).
    [opa_span] = [
        span
        for service, span in received.spans
        if service == "opa" and span.parent_span_id == query.span_id
    ]
    # One trace: the client's, continued by Envoy's ingress span, its ext_authz call,
    # authz's Check with its steps, and OPA's handling of the query under authz's.
    assert {span.trace_id.hex() for span in (ingress, egress, check, query, opa_span)} == {TRACE_ID}
    assert ingress.parent_span_id.hex() == PARENT_ID
    assert egress.parent_span_id == ingress.span_id
    assert query.parent_span_id == check.span_id
    assert opa_span.parent_span_id == query.span_id
    # The servicer passes the gRPC metadata, so the Check's parent is Envoy's own span
    # for the ext_authz call (not the caller's span from the CheckRequest headers).
    assert check.parent_span_id == egress.span_id
    exported = [str(v) for _, span in received.spans for v in _attributes(span).values()]
    assert not [s for s in secrets.values() if any(s in value for value in exported)]
