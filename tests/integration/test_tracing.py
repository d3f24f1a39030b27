"""Tracing end to end in one process: authz built by ``build_runtime`` with only the
standard ``OTEL_*`` variables set exports its spans over OTLP/HTTP to a real receiver (a
small aiohttp server taking ``POST /v1/traces`` protobuf, decoded with
``opentelemetry-proto``), one Check joins the trace its ``traceparent`` names, and OPA
receives the ``traceparent`` of authz's OPA query span."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
from aiohttp import web
from envoy.service.auth.v3 import external_auth_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from authz.core.authorizer import CACHE_SPAN, CHECK_SPAN, OPA_SPAN
from authz.core.headers import CREDENTIAL_HEADERS
from authz.runtime import server
from authz.runtime.config import load
from authz.stack.supervisor import free_port
from tests.helpers.fakes import check_request

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
ALLOW = {"allowed": True, "authz": {"reason": "allowed", "identity": {"key_id": "k1"}}}


@dataclass
class _Received:
    """What the OTLP receiver and the fake OPA saw."""

    spans: list[tuple[str, trace_pb2.Span]] = field(default_factory=list)  # (service, span)
    content_types: list[str] = field(default_factory=list)
    opa_traceparents: dict[str, list[str | None]] = field(default_factory=dict)  # by path


def _receiver_app(received: _Received) -> web.Application:
    """An OTLP/HTTP trace receiver (https://opentelemetry.io/docs/specs/otlp/#otlphttp):
    ``POST /v1/traces`` with an ExportTraceServiceRequest, answered with an empty
    ExportTraceServiceResponse."""

    async def traces(request: web.Request) -> web.Response:
        received.content_types.append(request.content_type)
        export = trace_service_pb2.ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource_spans in export.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                received.spans.extend((service, span) for span in scope_spans.spans)
        body = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    return app


def _opa_app(received: _Received) -> web.Application:
    """OPA's data API as far as one decision needs: every query allows (with provenance)
    and records the ``traceparent`` it came with; every GET answers ``{}``."""

    async def query(request: web.Request) -> web.Response:
        path = request.match_info["path"]
        received.opa_traceparents.setdefault(path, []).append(request.headers.get("traceparent"))
        answer = {"result": ALLOW, "provenance": {"bundles": {"authz": {"revision": "r1"}}}}
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def other(_: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/data/{path:.*}", query)
    app.router.add_get("/{path:.*}", other)
    return app


@contextlib.asynccontextmanager
async def _serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _attributes(span: trace_pb2.Span) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for attribute in span.attributes:
        kind = attribute.value.WhichOneof("value")
        values[attribute.key] = getattr(attribute.value, kind) if kind else None
    return values


async def test_one_check_exports_its_span_tree_over_otlp_under_envoys_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    received = _Received()
    secrets = {name: f"secret-{i}-{name}" for i, name in enumerate(CREDENTIAL_HEADERS)}
    async with _serving(_receiver_app(received)) as otlp, _serving(_opa_app(received)) as opa:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "authz-under-test")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
        monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
        settings = load(
            {
                "AUTHZ_GRPC_ADDR": f"127.0.0.1:{free_port()}",
                "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
                "AUTHZ_OPA_URL": opa,
                "AUTHZ_AUDIT_DB": str(tmp_path / "audit.db"),
                "AUTHZ_OVERRIDES_FILE": str(tmp_path / "overrides.json"),
            }
        )
        async with contextlib.AsyncExitStack() as stack:
            runtime = await server.build_runtime(settings, stack)
            async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                request = check_request(headers={"traceparent": TRACEPARENT, **secrets})
                response = await stub.Check(request, timeout=5)
            assert response.HasField("ok_response")
            admin = f"http://127.0.0.1:{runtime.admin_port}/healthz"
            async with aiohttp.ClientSession() as client, client.get(admin) as answer:
                assert answer.status == 200
        # The exit stack shut the provider down, which flushed every queued span.
    assert set(received.content_types) == {"application/x-protobuf"}
    assert {service for service, _ in received.spans} == {"authz-under-test"}
    spans = {span.name: span for _, span in received.spans}
    assert {CHECK_SPAN, OPA_SPAN, CACHE_SPAN, "GET /healthz"} <= set(spans)
    check = spans[CHECK_SPAN]
    assert check.trace_id.hex() == TRACE_ID
    assert check.parent_span_id.hex() == PARENT_ID
    assert check.kind == trace_pb2.Span.SPAN_KIND_SERVER
    for name in (OPA_SPAN, CACHE_SPAN):
        assert spans[name].trace_id == check.trace_id, name
        assert spans[name].parent_span_id == check.span_id, name
    attributes = _attributes(check)
    assert attributes["authz.allowed"] is True
    assert attributes["authz.reason"] == "allowed"
    assert attributes["http.response.status_code"] == 200
    assert attributes["authz.decision_path"] == settings.default_decision_path
    # OPA got the OPA query span's context: its own spans would join this trace.
    decisions = received.opa_traceparents[settings.default_decision_path]
    assert decisions == [f"00-{TRACE_ID}-{spans[OPA_SPAN].span_id.hex()}-01"]
    exported = [str(v) for _, span in received.spans for v in _attributes(span).values()]
    assert not [s for s in secrets.values() if any(s in value for value in exported)]
