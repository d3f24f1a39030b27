"""OpenTelemetry tracing: the SDK set up from the standard ``OTEL_*`` variables.

Off unless configured. Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter
other than ``none``, or when an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), and ``OTEL_SDK_DISABLED`` is not ``true``. The
variables mean what the OpenTelemetry specification says
(https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/); the
SDK reads them itself: ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (the
resource; the service name defaults to ``authz`` here instead of ``unknown_service``),
``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` (sampling), ``OTEL_BSP_*`` (the batch
processor's queue, bounded), ``OTEL_EXPORTER_OTLP_*`` (endpoint, headers, timeout,
compression) and ``OTEL_PROPAGATORS`` (W3C ``tracecontext,baggage`` by default).

Exporters: ``otlp`` over HTTP/protobuf (``OTEL_EXPORTER_OTLP_PROTOCOL`` ``http/protobuf``,
the default; ``grpc`` is refused: its exporter is not installed), ``console`` (spans as
JSON on stdout, for debugging) and ``none``.

When off, :func:`build_tracing` returns None and the Authorizer gets no tracer: the hot
path creates no span, extracts no context and injects no header (``docs/performance.md``,
"Tracing off").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import Tracer

from authz.core.errors import ConfigError

__all__ = ["DEFAULT_SERVICE_NAME", "TRACER_NAME", "Tracing", "build_tracing", "tracing_enabled"]

# service.name when OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) is unset.
DEFAULT_SERVICE_NAME: Final = "authz"
# The instrumentation scope of authz's spans.
TRACER_NAME: Final = "authz"
_EXPORTERS: Final = ("otlp", "console", "none")
_PROTOCOLS: Final = ("http/protobuf",)


@dataclass(frozen=True, slots=True)
class Tracing:
    """The SDK's provider and authz's tracer from it; ``shutdown()`` flushes the queued
    spans (blocking: run it off the event loop) and stops the exporter."""

    provider: TracerProvider
    tracer: Tracer

    def shutdown(self) -> None:
        """Flush and stop (the batch processor exports what it holds, within the
        exporter's timeout)."""
        self.provider.shutdown()


def tracing_enabled(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` configures trace export (see the module docstring); raises
    ConfigError naming the variable for an unknown exporter or protocol."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = _exporter_name(environ)
    if exporter is not None:
        return exporter != "none"
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


def build_tracing(environ: Mapping[str, str] | None = None) -> Tracing | None:
    """The tracing ``environ`` (default ``os.environ``) configures, or None when off.

    Raises ConfigError naming the variable and value for an exporter other than
    ``otlp``, ``console`` or ``none`` (one only: authz exports to one place) or an OTLP
    protocol other than ``http/protobuf``. The SDK reads the other ``OTEL_*`` variables
    from ``os.environ`` itself."""
    env = os.environ if environ is None else environ
    if not tracing_enabled(env):
        return None
    exporter_name = _exporter_name(env) or "otlp"
    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        ).strip()
        if protocol not in _PROTOCOLS:
            raise ConfigError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: authz exports OTLP as "
                f"{', '.join(_PROTOCOLS)} only"
            )
        # Imported here: only a configured OTLP export pays for loading it.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider, provider.get_tracer(TRACER_NAME))


def _exporter_name(environ: Mapping[str, str]) -> str | None:
    """``OTEL_TRACES_EXPORTER`` lower-cased, or None when unset or empty."""
    raw = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not raw:
        return None
    if raw not in _EXPORTERS:
        raise ConfigError(f"OTEL_TRACES_EXPORTER={raw!r}: expected one of {', '.join(_EXPORTERS)}")
    return raw
