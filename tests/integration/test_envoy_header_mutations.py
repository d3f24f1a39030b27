"""What Envoy 1.40 itself does with the header mutations authz refuses
(``unsafe_header_mutation``, docs/contract.md "Header names and values").

opa-envoy-plugin passes a policy's header names and values to Envoy unchecked. An ext_authz
stand-in here answers with such mutations, a real Envoy (default ``ExtAuthz`` settings, as
the stack's configs use) applies them, and an echo upstream shows what arrived. The
findings decide authz's refusal:

- on an allow, a value with CR, LF or NUL, or a name with a space or ``:``, is answered by
  Envoy itself with a 503 (``invalid header value``/``invalid header name``): the request
  fails either way, authz's deny just names the cause;
- a pseudo-header on an allow rewrites the request after authorization (``:path``);
- on a deny, and in ``response_headers_to_add``, a CR/LF value is split into an extra
  client response header (response splitting);
- removing a header by such a name changes nothing (authz drops it too, never an error).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from authz.stack.supervisor import free_port
from tests.helpers.envoy_rig import ext_authz_envoy_config, running_echo, running_envoy


def _option(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value))


def _allow(**fields: Any) -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(**fields),
    )


def _deny(name: str, value: str) -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=403), headers=[_option(name, value)], body="no"
        ),
    )


# Request path (first segment) -> the stand-in's answer.
UNSAFE_UPSTREAM = {
    "crlf-value": ("x-a", "v\r\nx-injected: 1"),
    "lf-value": ("x-a", "v\nx-injected: 1"),
    "nul-value": ("x-a", "v\x00b"),
    "space-name": ("x bad", "v"),
    "colon-name": ("x:y", "v"),
}
ANSWERS: dict[str, external_auth_pb2.CheckResponse] = {
    **{f"allow-{case}": _allow(headers=[_option(*h)]) for case, h in UNSAFE_UPSTREAM.items()},
    "allow-pseudo-path": _allow(headers=[_option(":path", "/admin")]),
    "deny-crlf-value": _deny("x-a", "v\r\nx-injected: 1"),
    "response-crlf-value": _allow(response_headers_to_add=[_option("x-a", "v\r\nx-injected: 1")]),
    **{
        f"remove-{case}": _allow(headers_to_remove=[name])
        for case, name in {"space": "x bad", "colon": "x:y", "pseudo": ":path"}.items()
    },
    "allow-safe": _allow(headers=[_option("x-a", "fine")]),
}


class _StandIn(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        case = request.attributes.request.http.path.lstrip("/").split("/")[0]
        return ANSWERS[case]


@dataclass(frozen=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def upstream(self) -> dict[str, Any]:
        """What the echo upstream received (only on a 200 it answered)."""
        assert self.status == 200, self
        return dict(json.loads(self.body))


@pytest.fixture(scope="module")
def envoy_port(envoy_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    authz_port, upstream_port, listen, admin = (free_port() for _ in range(4))
    server = grpc.server(futures.ThreadPoolExecutor(2))
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(_StandIn(), server)
    server.add_insecure_port(f"127.0.0.1:{authz_port}")
    server.start()
    config = ext_authz_envoy_config(listen, admin, authz_port, upstream_port)
    try:
        with (
            running_echo(upstream_port),
            running_envoy(envoy_bin, config, tmp_path_factory.mktemp("envoy-mutations"), admin),
        ):
            yield listen
    finally:
        server.stop(0)


def _get(port: int, case: str) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", f"/{case}/resource", headers={"x-client": "1"})
        response = conn.getresponse()
        return Reply(
            response.status, [(k.lower(), v) for k, v in response.getheaders()], response.read()
        )
    finally:
        conn.close()


def test_a_safe_header_reaches_the_upstream(envoy_port: int) -> None:
    """The rig works: a valid mutation is applied."""
    assert _get(envoy_port, "allow-safe").upstream()["headers"]["x-a"] == "fine"


@pytest.mark.parametrize("case", sorted(UNSAFE_UPSTREAM))
def test_envoy_answers_an_unsafe_upstream_header_with_its_own_503(
    envoy_port: int, case: str
) -> None:
    reply = _get(envoy_port, f"allow-{case}")
    assert reply.status == 503
    assert reply.body.startswith((b"invalid header value", b"invalid header name"))


def test_envoy_rewrites_the_request_for_a_pseudo_header_after_authorization(
    envoy_port: int,
) -> None:
    assert _get(envoy_port, "allow-pseudo-path").upstream()["path"] == "/admin"


@pytest.mark.parametrize("case", ["deny-crlf-value", "response-crlf-value"])
def test_envoy_splits_a_crlf_value_into_an_extra_client_header(envoy_port: int, case: str) -> None:
    reply = _get(envoy_port, case)
    assert ("x-injected", "1") in reply.headers


@pytest.mark.parametrize("case", ["remove-space", "remove-colon", "remove-pseudo"])
def test_envoy_ignores_the_removal_of_a_header_no_request_can_have(
    envoy_port: int, case: str
) -> None:
    seen = _get(envoy_port, case).upstream()
    assert seen["path"] == f"/{case}/resource"
    assert seen["headers"]["x-client"] == "1"
