"""The gRPC listener's mTLS (issue 13, finding 5): only a client holding a certificate from
the configured client CA (Envoy's) gets an answer; bad TLS settings stop authz at start."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz.core.authorizer import Authorizer
from authz.core.errors import ConfigError
from authz.runtime.als import ALS_SERVICE, AccessLogServicer
from authz.runtime.config import Settings, load
from authz.runtime.server import create_server, grpc_server_credentials
from authz.stack.supervisor import free_port
from authz.stack.tls import Leaf, LeafFiles, ensure_pki
from tests.helpers.als import DECISION_ID, connect_entry, message
from tests.helpers.fakes import FakeEngine, check_request
from tests.helpers.serve import serve_until_exit

LEAVES = {
    "authz": Leaf("server", ("authz",)),
    "envoy-client": Leaf("client", ("envoy",)),
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LeafFiles]:
    """authz's server certificate and Envoy's client certificate from one CA, and a client
    certificate from another CA (same names: only the issuer differs)."""
    base = tmp_path_factory.mktemp("pki")
    files = ensure_pki(base / "mesh", LEAVES)
    files["stranger"] = ensure_pki(base / "other", LEAVES)["envoy-client"]
    return files


def _settings(pki: dict[str, LeafFiles], **changes: Path) -> Settings:
    server = pki["authz"]
    environ = {
        "AUTHZ_GRPC_TLS_CERT": str(changes.get("cert", server.cert)),
        "AUTHZ_GRPC_TLS_KEY": str(changes.get("key", server.key)),
        "AUTHZ_GRPC_TLS_CLIENT_CA": str(changes.get("ca", server.ca)),
    }
    return load(environ)


def _authorizer() -> Authorizer:
    return Authorizer(
        FakeEngine(True),
        default_decision_path="authz/gateway/decision",
        credential_headers=(),
        timeout_s=1.0,
    )


def _tls_channel(pki: dict[str, LeafFiles], client: str | None, port: int) -> grpc.aio.Channel:
    trust = pki["authz"].ca.read_bytes()
    chain = key = None
    if client is not None:
        chain, key = pki[client].cert.read_bytes(), pki[client].key.read_bytes()
    credentials = grpc.ssl_channel_credentials(trust, private_key=key, certificate_chain=chain)
    # Envoy checks the SAN "authz" (the service name); the test dials 127.0.0.1.
    options = (("grpc.ssl_target_name_override", "authz"),)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options)


CALLERS: dict[str, Callable[[dict[str, LeafFiles], int], grpc.aio.Channel]] = {
    "plaintext": lambda pki, port: grpc.aio.insecure_channel(f"127.0.0.1:{port}"),
    "tls-without-client-certificate": lambda pki, port: _tls_channel(pki, None, port),
    "client-certificate-from-another-ca": lambda pki, port: _tls_channel(pki, "stranger", port),
}


@pytest.mark.parametrize("caller", CALLERS.values(), ids=CALLERS.keys())
async def test_mtls_listener_refuses_callers_without_envoys_client_certificate(
    pki: dict[str, LeafFiles], caller: Callable[[dict[str, LeafFiles], int], grpc.aio.Channel]
) -> None:
    server = await create_server(
        _authorizer(), "127.0.0.1:0", grpc_server_credentials(_settings(pki))
    )
    try:
        async with caller(pki, server.port) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.Check(check_request(), timeout=2)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


async def test_mtls_listener_answers_envoys_client_certificate(
    pki: dict[str, LeafFiles],
) -> None:
    server = await create_server(
        _authorizer(), "127.0.0.1:0", grpc_server_credentials(_settings(pki))
    )
    try:
        async with _tls_channel(pki, "envoy-client", server.port) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            response = await stub.Check(check_request(), timeout=2)
        assert response.HasField("ok_response")
    finally:
        await server.stop(0)


def test_no_tls_settings_means_no_credentials() -> None:
    assert grpc_server_credentials(load({})) is None


BAD_FILES: dict[str, tuple[str, str, str]] = {
    # case -> (which setting, which file instead, the key the error names)
    "missing-certificate": ("cert", "absent", "AUTHZ_GRPC_TLS_CERT"),
    "missing-key": ("key", "absent", "AUTHZ_GRPC_TLS_KEY"),
    "missing-client-ca": ("ca", "absent", "AUTHZ_GRPC_TLS_CLIENT_CA"),
    "key-of-another-certificate": ("key", "stranger-key", "AUTHZ_GRPC_TLS_KEY"),
    "certificate-not-pem": ("cert", "garbage", "AUTHZ_GRPC_TLS_CERT"),
    "client-ca-not-pem": ("ca", "garbage", "AUTHZ_GRPC_TLS_CLIENT_CA"),
}


@pytest.mark.parametrize(("setting", "replacement", "key"), BAD_FILES.values(), ids=BAD_FILES)
def test_bad_tls_files_are_a_config_error_naming_key_and_path(
    pki: dict[str, LeafFiles], tmp_path: Path, setting: str, replacement: str, key: str
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    path = {
        "absent": tmp_path / "absent.pem",
        "stranger-key": pki["stranger"].key,
        "garbage": garbage,
    }[replacement]
    with pytest.raises(ConfigError) as caught:
        grpc_server_credentials(_settings(pki, **{setting: path}))
    message = str(caught.value)
    assert f"{key}={str(path)!r}" in message
    assert "PRIVATE KEY" not in message


def test_serve_refuses_a_plaintext_listener_off_loopback_with_exit_2(tmp_path: Path) -> None:
    """``authz serve`` on 0.0.0.0 without TLS stops before binding anything: exit 2, one
    log line naming the key and the address."""
    port = free_port()
    env = {
        **os.environ,
        "AUTHZ_GRPC_ADDR": f"0.0.0.0:{port}",
        "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
        "AUTHZ_AUDIT_DB": str(tmp_path / "audit.db"),
        "AUTHZ_OVERRIDES_FILE": str(tmp_path / "overrides.json"),
    }
    env.pop("AUTHZ_GRPC_ALLOW_PLAINTEXT", None)
    result = serve_until_exit(env, timeout_s=30)
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    message = json.loads(lines[0])["msg"]
    assert f"AUTHZ_GRPC_ADDR='0.0.0.0:{port}'" in message
    assert "AUTHZ_GRPC_ALLOW_PLAINTEXT" in message


def _copy_leaf(source: LeafFiles, target: Path) -> None:
    """Replace ``target``'s files as a renewal does: new files renamed into place."""
    for name in ("tls.crt", "tls.key", "ca.crt"):
        tmp = target / f".{name}.new"
        tmp.write_bytes((source.directory / name).read_bytes())
        tmp.replace(target / name)


async def _answers(pki: dict[str, LeafFiles], client: str, port: int) -> bool:
    async with _tls_channel(pki, client, port) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        try:
            response = await stub.Check(check_request(), timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return bool(response.HasField("ok_response"))


async def test_renewed_certificates_are_used_without_a_restart(
    pki: dict[str, LeafFiles], tmp_path: Path
) -> None:
    """A renewal (new CA, new certificates) written over the files takes effect for new
    connections; a broken renewal is refused and the working files stay in use."""
    served = tmp_path / "served"
    served.mkdir()
    _copy_leaf(pki["authz"], served)
    settings = load(
        {
            "AUTHZ_GRPC_TLS_CERT": str(served / "tls.crt"),
            "AUTHZ_GRPC_TLS_KEY": str(served / "tls.key"),
            "AUTHZ_GRPC_TLS_CLIENT_CA": str(served / "ca.crt"),
        }
    )
    renewed = ensure_pki(tmp_path / "renewed", LEAVES)
    server = await create_server(_authorizer(), "127.0.0.1:0", grpc_server_credentials(settings))
    try:
        assert await _answers(pki, "envoy-client", server.port)
        _copy_leaf(renewed["authz"], served)
        # Envoy's new client certificate (and trust in authz's new one) works; the old
        # one, from the CA no longer trusted, does not.
        clients = {**pki, "renewed-client": renewed["envoy-client"], "authz": renewed["authz"]}
        assert await _answers(clients, "renewed-client", server.port)
        assert not await _answers(clients, "envoy-client", server.port)
        (served / "tls.key").write_text("not a key\n")
        assert await _answers(clients, "renewed-client", server.port)
    finally:
        await server.stop(0)


# -- tunnel ends (issue 18): Envoy's access log service on the same port and mTLS ----------


async def _stream_one_tunnel_end(channel: grpc.aio.Channel) -> None:
    call = channel.stream_unary(
        f"/{ALS_SERVICE}/StreamAccessLogs",
        request_serializer=als_pb2.StreamAccessLogsMessage.SerializeToString,
        response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
    )
    await call(iter([message(connect_entry())]), timeout=2)


@pytest.mark.parametrize("caller", CALLERS.values(), ids=CALLERS.keys())
async def test_access_log_service_refuses_callers_without_envoys_client_certificate(
    pki: dict[str, LeafFiles], caller: Callable[[dict[str, LeafFiles], int], grpc.aio.Channel]
) -> None:
    stored: list[str] = []
    server = await create_server(
        _authorizer(),
        "127.0.0.1:0",
        grpc_server_credentials(_settings(pki)),
        access_log=AccessLogServicer(lambda decision_id, body: stored.append(decision_id)),
    )
    try:
        async with caller(pki, server.port) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await _stream_one_tunnel_end(channel)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert stored == []
    finally:
        await server.stop(0)


async def test_access_log_service_audits_a_tunnel_end_from_envoys_certificate(
    pki: dict[str, LeafFiles],
) -> None:
    stored: list[tuple[str, Mapping[str, Any]]] = []
    server = await create_server(
        _authorizer(),
        "127.0.0.1:0",
        grpc_server_credentials(_settings(pki)),
        access_log=AccessLogServicer(lambda decision_id, body: stored.append((decision_id, body))),
    )
    try:
        async with _tls_channel(pki, "envoy-client", server.port) as channel:
            await _stream_one_tunnel_end(channel)
        [(decision_id, body)] = stored
        assert decision_id == DECISION_ID
        assert (body["host"], body["port"], body["sandbox_id"]) == ("pypi.org", 443, "sb-standard")
    finally:
        await server.stop(0)
