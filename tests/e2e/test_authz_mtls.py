"""The gRPC port gives nothing to a caller without Envoy's client certificate. A sandbox
that reached authz directly and asked, with its own valid id and token, for the openai
route's decision would get ``authorization: Bearer <the real secret>`` back: its
connection is refused (plaintext, TLS without a client certificate, a client
certificate from another CA), while Envoy's certificate works."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authz.stack.supervisor import Ports, Stack
from authz.stack.tls import Leaf, ensure_pki
from tests.helpers.e2e import Env, authz_channel
from tests.helpers.fakes import check_request

pytestmark = pytest.mark.e2e


def _sandbox_asks_for_openai(e2e: Env) -> external_auth_pb2.CheckRequest:
    """What a sandbox would send to authz directly: its own id and token, and the
    context Envoy's openai route adds."""
    return check_request(
        method="POST",
        path="/v1/chat/completions",
        headers={
            ":authority": "openai",
            "x-sandbox-id": "sb-premium",
            "x-sandbox-token": e2e.tokens["sb-premium"],
        },
        context_extensions={"decision_path": "authz/egress/decision", "service": "openai"},
    )


def _injected(response: external_auth_pb2.CheckResponse) -> str:
    return repr(response.ok_response.headers)


def test_with_envoys_certificate_the_same_request_gets_the_credential(e2e: Env) -> None:
    """The control: the request below is one authz answers with the real secret, so the
    refusals that follow are what keeps it from the sandbox."""
    with authz_channel(e2e) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        response = stub.Check(_sandbox_asks_for_openai(e2e), timeout=5)
    assert response.HasField("ok_response")
    assert e2e.secrets["openai"] in _injected(response)


def _other_ca_client(tmp_path: Path) -> Path:
    """A client certificate with Envoy's names from a CA authz does not trust."""
    files = ensure_pki(tmp_path / "other", {"envoy-client": Leaf("client", ("envoy",))})
    return files["envoy-client"].directory


CALLERS = {
    "plaintext": {"tls": False},
    "tls-without-client-certificate": {"client": Path("/nonexistent")},
    "client-certificate-from-another-ca": {"client": "other-ca"},
}


@pytest.mark.parametrize("caller", CALLERS.values(), ids=CALLERS.keys())
def test_grpc_port_refuses_a_caller_without_envoys_client_certificate(
    e2e: Env, tmp_path: Path, caller: dict[str, object]
) -> None:
    options = dict(caller)
    if options.get("client") == "other-ca":
        options["client"] = _other_ca_client(tmp_path)
    with authz_channel(e2e, **options) as channel:  # type: ignore[arg-type]
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.Check(_sandbox_asks_for_openai(e2e), timeout=5)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert e2e.secrets["openai"] not in str(failed.value)


def test_through_envoy_the_sandbox_never_sees_the_credential(e2e: Env) -> None:
    """The way sandboxes are meant to go: the egress proxy forwards with the credential
    injected, and the sandbox's response carries none of it."""
    resp = e2e.egress.post(
        "/v1/chat/completions", headers=e2e.sandbox_headers("sb-premium", "openai"), json={}
    )
    assert resp.status_code == 200, resp.text
    assert e2e.secrets["openai"] not in resp.text
    assert e2e.secrets["openai"] not in repr(resp.headers)


def test_local_stack_offers_tls_listeners(e2e: Env, repo_root: Path, tmp_path: Path) -> None:
    """``scripts/up --tls``: the gateway and egress listeners speak TLS with a certificate
    from the stack's CA (and refuse plaintext); requests behave as over plain HTTP."""
    stack = Stack(
        repo_root,
        tmp_path / "run",
        e2e.bundle_dir,
        Ports.free(),
        secrets_file=e2e.secrets_file,
        tls_listeners=True,
    )
    with stack:
        ca = ssl.create_default_context(cafile=stack.mtls_dir / "ca.crt")
        gateway = f"https://localhost:{stack.ports.gateway}"
        egress = f"https://localhost:{stack.ports.egress}"
        viewer = {"x-api-key": e2e.keys["viewer"]}
        assert httpx.get(f"{gateway}/api/v1/status", headers=viewer, verify=ca).status_code == 200
        assert httpx.get(f"{gateway}/api/v1/status", verify=ca).status_code == 401
        resp = httpx.get(
            f"{egress}/v1/models", headers=e2e.sandbox_headers("sb-premium", "openai"), verify=ca
        )
        assert resp.status_code == 200, resp.text
        for url in (f"{gateway}/api/v1/status", f"{egress}/v1/models"):
            with pytest.raises(httpx.HTTPError):
                httpx.get(url.replace("https://", "http://"), headers=viewer, timeout=5)
