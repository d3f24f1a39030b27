"""authz.runtime.tracing: the OTEL_* variables that switch tracing on, and the ones
refused."""

from __future__ import annotations

import re

import pytest
from opentelemetry.sdk.resources import SERVICE_NAME
from opentelemetry.sdk.trace import TracerProvider

from authz.core.errors import ConfigError
from authz.runtime.tracing import DEFAULT_SERVICE_NAME, build_tracing, tracing_enabled

ENDPOINT = "http://127.0.0.1:4318"


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK reads os.environ itself: none of the runner's OTEL_* variables leak in."""
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("environ", "enabled"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "authz"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{ENDPOINT}/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, False),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True),
    ],
    ids=[
        "nothing-set",
        "service-name-only",
        "otlp-endpoint",
        "otlp-traces-endpoint",
        "blank-endpoint",
        "exporter-otlp",
        "exporter-console",
        "exporter-none-wins",
        "sdk-disabled",
        "sdk-not-disabled",
    ],
)
def test_tracing_is_off_unless_an_exporter_or_endpoint_is_configured(
    environ: dict[str, str], enabled: bool
) -> None:
    assert tracing_enabled(environ) is enabled
    tracing = build_tracing(environ)
    assert (tracing is not None) is enabled
    if tracing is not None:
        tracing.shutdown()


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin'"),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, "OTEL_TRACES_EXPORTER='otlp,console'"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL='grpc'",
        ),
    ],
    ids=["unknown-exporter", "several-exporters", "grpc-protocol"],
)
def test_unsupported_tracing_settings_raise_config_error_naming_the_variable(
    environ: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        build_tracing(environ)


@pytest.mark.parametrize(
    ("service_name", "expected"),
    [(None, DEFAULT_SERVICE_NAME), ("gateway-authz", "gateway-authz")],
    ids=["default", "otel-service-name"],
)
def test_service_name_is_authz_unless_otel_service_name_sets_it(
    monkeypatch: pytest.MonkeyPatch, service_name: str | None, expected: str
) -> None:
    if service_name is not None:
        monkeypatch.setenv("OTEL_SERVICE_NAME", service_name)
    tracing = build_tracing({"OTEL_TRACES_EXPORTER": "console"})
    assert tracing is not None
    assert isinstance(tracing.provider, TracerProvider)
    assert tracing.provider.resource.attributes[SERVICE_NAME] == expected
    tracing.shutdown()
