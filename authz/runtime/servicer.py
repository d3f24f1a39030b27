"""gRPC edge: ``envoy.service.auth.v3.Authorization/Check`` -> :class:`Authorizer`.

No business logic lives here. ``Check`` always returns a CheckResponse: the authorizer
already turns every :class:`~authz.core.errors.AuthzError` into a deny, and anything else
(a bug) is caught here and denied with ``internal_error`` (fail closed), so the outcome
never depends on Envoy's ``failure_mode_allow``.
"""

from __future__ import annotations

import logging
import uuid

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authz.core.authorizer import Authorizer
from authz.core.errors import AuthzError
from authz.core.response import error_response

__all__ = ["AuthorizationServicer"]

log = logging.getLogger(__name__)


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Envoy ext_authz v3 servicer for grpc.aio."""

    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer

    async def Check(
        self,
        request: external_auth_pb2.CheckRequest,
        context: grpc.aio.ServicerContext[
            external_auth_pb2.CheckRequest, external_auth_pb2.CheckResponse
        ],
    ) -> external_auth_pb2.CheckResponse:
        """Decide one request; never raises."""
        try:
            outcome = await self._authorizer.check(request, context.time_remaining())
        except Exception:
            decision_id = str(uuid.uuid4())
            log.exception("unexpected error in Check", extra={"decision_id": decision_id})
            return error_response(AuthzError("unexpected error"), decision_id)
        return outcome.response
