"""authz.runtime.config transport rules (issue 13, finding 5): no credential in clear on a hop.

The gRPC listener is mTLS (certificate, key and client CA together) or bound to loopback;
OPA is reached over https, loopback or a unix socket; each unless explicitly allowed.
Every refusal names the key and the value.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from authz.core.errors import ConfigError
from authz.runtime.config import is_loopback_host, load

TLS = {
    "AUTHZ_GRPC_TLS_CERT": "/run/authz/tls/tls.crt",
    "AUTHZ_GRPC_TLS_KEY": "/run/authz/tls/tls.key",
    "AUTHZ_GRPC_TLS_CLIENT_CA": "/run/authz/tls/ca.crt",
}


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("[::1]", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("[::]", False),
        ("10.0.0.5", False),
        ("authz", False),
        ("localhost.example.com", False),
        ("", False),
    ],
    ids=lambda value: str(value) or "empty",
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize(
    "addr",
    ["0.0.0.0:9191", "[::]:9191", "10.0.0.5:9191", "authz:9191"],
    ids=["any-v4", "any-v6", "private-ip", "dns-name"],
)
def test_plaintext_grpc_on_a_non_loopback_address_is_refused(addr: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({"AUTHZ_GRPC_ADDR": addr})
    message = str(caught.value)
    assert f"AUTHZ_GRPC_ADDR={addr!r}" in message
    assert "AUTHZ_GRPC_TLS_CERT" in message
    assert "AUTHZ_GRPC_ALLOW_PLAINTEXT=true" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "environ",
    [
        {"AUTHZ_GRPC_ADDR": "127.0.0.1:9191"},
        {"AUTHZ_GRPC_ADDR": "localhost:9191"},
        {"AUTHZ_GRPC_ADDR": "[::1]:9191"},
        {"AUTHZ_GRPC_ADDR": "0.0.0.0:9191", **TLS},
        {"AUTHZ_GRPC_ADDR": "0.0.0.0:9191", "AUTHZ_GRPC_ALLOW_PLAINTEXT": "true"},
    ],
    ids=["loopback-v4", "localhost", "loopback-v6", "any-with-mtls", "any-explicitly-plaintext"],
)
def test_grpc_listener_accepted_when_loopback_mtls_or_explicit(environ: dict[str, str]) -> None:
    settings = load(environ)
    assert settings.grpc_addr == environ["AUTHZ_GRPC_ADDR"]


def test_mtls_settings_are_paths() -> None:
    settings = load({"AUTHZ_GRPC_ADDR": "0.0.0.0:9191", **TLS})
    assert settings.grpc_tls is True
    assert settings.grpc_tls_cert == Path("/run/authz/tls/tls.crt")
    assert settings.grpc_tls_key == Path("/run/authz/tls/tls.key")
    assert settings.grpc_tls_client_ca == Path("/run/authz/tls/ca.crt")
    assert load({}).grpc_tls is False


@pytest.mark.parametrize("missing", sorted(TLS), ids=sorted(TLS))
def test_mtls_needs_certificate_key_and_client_ca_together(missing: str) -> None:
    environ = {key: value for key, value in TLS.items() if key != missing}
    with pytest.raises(ConfigError) as caught:
        load(environ)
    message = str(caught.value)
    assert f"{missing} not set" in message
    for key, value in environ.items():
        assert f"{key}={value!r}" in message


def test_mtls_setting_from_the_file(tmp_path: Path) -> None:
    config = tmp_path / "authz.yaml"
    config.write_text(
        "grpc_addr: 0.0.0.0:9191\n"
        "grpc_tls_cert: /tls/tls.crt\n"
        "grpc_tls_key: /tls/tls.key\n"
        "grpc_tls_client_ca: /tls/ca.crt\n",
        encoding="utf-8",
    )
    assert load({}, config).grpc_tls is True


def test_allow_plaintext_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match=r"AUTHZ_GRPC_ALLOW_PLAINTEXT='sure': expected"):
        load({"AUTHZ_GRPC_ALLOW_PLAINTEXT": "sure"})


@pytest.mark.parametrize(
    "url",
    ["http://opa:8181", "http://10.0.0.7:8181", "http://0.0.0.0:8181", "http://opa.internal"],
    ids=["service-name", "private-ip", "any", "no-port"],
)
def test_plaintext_opa_url_to_a_non_loopback_host_is_refused(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({"AUTHZ_OPA_URL": url})
    message = str(caught.value)
    assert f"AUTHZ_OPA_URL={url!r}" in message
    assert "AUTHZ_OPA_ALLOW_PLAINTEXT=true" in message


@pytest.mark.parametrize(
    "environ",
    [
        {"AUTHZ_OPA_URL": "http://127.0.0.1:8181"},
        {"AUTHZ_OPA_URL": "http://localhost:8181"},
        {"AUTHZ_OPA_URL": "http://[::1]:8181"},
        {"AUTHZ_OPA_URL": "https://opa:8181"},
        {"AUTHZ_OPA_URL": "unix:///run/opa/opa.sock"},
        {"AUTHZ_OPA_URL": "http://opa:8181", "AUTHZ_OPA_ALLOW_PLAINTEXT": "true"},
    ],
    ids=["loopback", "localhost", "loopback-v6", "https", "unix-socket", "explicit"],
)
def test_opa_url_accepted_when_loopback_tls_socket_or_explicit(environ: dict[str, str]) -> None:
    assert load(environ).opa_url == environ["AUTHZ_OPA_URL"]
