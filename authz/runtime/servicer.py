"""gRPC edge: ``envoy.service.auth.v3.Authorization/Check`` -> :class:`Authorizer`.

No business logic lives here. ``Check`` always returns a CheckResponse: the authorizer
already turns every :class:`~authz.core.errors.AuthzError` into a deny, and anything else
(a bug) is caught here and denied with ``internal_error`` (fail closed), so the outcome
never depends on Envoy's ``failure_mode_allow``.

That includes a request protobuf cannot parse (a ``string`` field holding invalid UTF-8,
which proto3 forbids; Go's protobuf refuses it too, so opa-envoy-plugin answers a gRPC
error): :func:`add_to_server` registers Check with :func:`decode_check_request`, which
never raises, and such a request gets a 400 ``invalid_request`` deny.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.protobuf.message import DecodeError

from authz.core.authorizer import Authorizer
from authz.core.errors import AuthzError, RequestError
from authz.core.response import error_response

__all__ = ["AuthorizationServicer", "UndecodableRequest", "add_to_server", "decode_check_request"]

log = logging.getLogger(__name__)

_SERVICE = "envoy.service.auth.v3.Authorization"


class UndecodableRequest:
    """What :func:`decode_check_request` gives for bytes that are not a CheckRequest:
    their size only (the bytes may hold a credential)."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def decode_check_request(data: bytes) -> external_auth_pb2.CheckRequest | UndecodableRequest:
    """The gRPC request deserializer for Check: the CheckRequest in ``data``, or an
    :class:`UndecodableRequest` when protobuf refuses it (never raises)."""
    try:
        return external_auth_pb2.CheckRequest.FromString(data)
    except DecodeError:
        return UndecodableRequest(len(data))


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Envoy ext_authz v3 servicer for grpc.aio."""

    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer

    async def Check(
        self,
        request: external_auth_pb2.CheckRequest | UndecodableRequest,
        context: grpc.aio.ServicerContext[
            external_auth_pb2.CheckRequest, external_auth_pb2.CheckResponse
        ],
    ) -> external_auth_pb2.CheckResponse:
        """Decide one request; never raises."""
        if isinstance(request, UndecodableRequest):
            decision_id = str(uuid.uuid4())
            log.warning(
                "CheckRequest of %d bytes is not valid protobuf (e.g. invalid UTF-8 in a "
                "string field): denied",
                request.size,
                extra={"decision_id": decision_id, "reason": RequestError.code},
            )
            return error_response(RequestError("CheckRequest does not parse"), decision_id)
        try:
            outcome = await self._authorizer.check(
                request,
                context.time_remaining(),
                peer=context.peer(),
                # The method, not a call: read only when tracing (Envoy's ext_authz span).
                metadata=context.invocation_metadata,
            )
        except Exception:
            decision_id = str(uuid.uuid4())
            log.exception("unexpected error in Check", extra={"decision_id": decision_id})
            return error_response(AuthzError("unexpected error"), decision_id)
        return outcome.response


def add_to_server(servicer: AuthorizationServicer, server: Any) -> None:
    """Register ``servicer``'s Check on ``server`` (a ``grpc.aio.Server``) as the generated
    ``add_AuthorizationServicer_to_server`` does, but with :func:`decode_check_request` as
    the request deserializer, so an unparsable request reaches Check (and gets a deny)
    instead of failing in grpc with a gRPC error."""
    handler = grpc.unary_unary_rpc_method_handler(
        servicer.Check,
        request_deserializer=decode_check_request,
        response_serializer=external_auth_pb2.CheckResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(_SERVICE, {"Check": handler}),)
    )
    server.add_registered_method_handlers(_SERVICE, {"Check": handler})
