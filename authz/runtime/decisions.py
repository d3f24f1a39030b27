"""gRPC edge of authz's own decision API: ``authz.v1.Decisions/BatchCheck``
(``proto/authz/v1/decisions.proto``) -> :meth:`Authorizer.check_batch`.

A BatchCheck names one principal (its credential headers, once) and up to
``max_actions`` actions (HTTP requests it would send). Each action becomes the
CheckRequest Envoy would send for it (``:method``, ``:path``, ``:authority`` and the
headers, the principal's and the action's), and all of them are decided together: one
policy snapshot, one decision id, decision-log line, audit row and rate-limit count per
action, exactly as a Check of that request (docs/contract.md, "BatchCheck").

Refused as a whole, with a gRPC status and no result (never an allow):

- bytes that are not a BatchCheckRequest, no action, an action whose method is not an
  HTTP token, whose path does not start with ``/``, a header name that is not a
  lowercase token or a value with CR, LF or NUL, a header the principal and an action
  both give, a forwarding header or one in authz's own ``x-authz-`` namespace (Envoy sets
  those, a caller must not), a ``decision_path`` context extension (the decision path is
  the deployment's): ``INVALID_ARGUMENT`` (:class:`~authz.core.errors.BatchRequestError`);
- more than ``max_actions`` actions or ``max_bytes`` bytes: ``RESOURCE_EXHAUSTED``
  (:class:`~authz.core.errors.BatchTooLarge`);
- decisions that could not all come from one bundle revision: ``ABORTED``
  (:class:`~authz.core.errors.BatchRevisionError`, retry);
- anything unexpected (a bug): ``INTERNAL``.

The status details name the action and field, never a header value (it may be a
credential).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

import grpc
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.protobuf.message import DecodeError

from authz.core.authorizer import Authorizer
from authz.core.errors import AuthzError, BatchRequestError, BatchRevisionError, BatchTooLarge
from authz.core.headers import (
    FORWARDING_HEADERS,
    OWN_PREFIX,
    is_header_name,
    is_safe_field_value,
    is_token,
)
from authz.v1 import decisions_pb2

__all__ = [
    "DECISIONS_SERVICE",
    "DecisionsServicer",
    "add_decisions_to_server",
    "request_deserializer",
]

DECISIONS_SERVICE: Final = "authz.v1.Decisions"
# Per-field bounds of one action (the message bound caps the whole request).
_MAX_ID: Final = 128
_MAX_METHOD: Final = 32
_MAX_PATH: Final = 8 * 1024
_MAX_HOST: Final = 255
_MAX_HEADERS: Final = 100
_MAX_HEADER_NAME: Final = 256
_MAX_EXTENSIONS: Final = 32
_REFUSED_HEADERS: Final = frozenset(FORWARDING_HEADERS) | {"host"}
_STATUS: Final[tuple[tuple[type[AuthzError], grpc.StatusCode], ...]] = (
    (BatchTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BatchRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (BatchRevisionError, grpc.StatusCode.ABORTED),
)

log = logging.getLogger(__name__)


class _Refused:
    """What the deserializer gives for bytes it will not decode: their size and why."""

    __slots__ = ("error", "size")

    def __init__(self, size: int, error: BatchRequestError) -> None:
        self.size = size
        self.error = error


def request_deserializer(max_bytes: int) -> Callable[[bytes], Any]:
    """The BatchCheck request deserializer: the message, or a :class:`_Refused` for more
    than ``max_bytes`` bytes (never parsed) or bytes protobuf refuses (never raises)."""

    def decode(data: bytes) -> decisions_pb2.BatchCheckRequest | _Refused:
        if len(data) > max_bytes:
            return _Refused(len(data), BatchTooLarge(f"{len(data)} bytes, at most {max_bytes}"))
        try:
            return decisions_pb2.BatchCheckRequest.FromString(data)
        except DecodeError:
            return _Refused(len(data), BatchRequestError("not a BatchCheckRequest"))

    return decode


class DecisionsServicer:
    """``authz.v1.Decisions`` for grpc.aio over ``authorizer``: at most ``max_actions``
    actions and ``max_bytes`` bytes per request; ``on_call(result, actions)`` counts each
    call (result ``ok`` or the refusal's gRPC status name, e.g. ``INVALID_ARGUMENT``)."""

    def __init__(
        self,
        authorizer: Authorizer,
        *,
        max_actions: int,
        max_bytes: int,
        on_call: Callable[[str, int], None] | None = None,
    ) -> None:
        self._authorizer = authorizer
        self._max_actions = max_actions
        self.max_bytes = max_bytes
        self._on_call = on_call

    async def BatchCheck(
        self,
        request: decisions_pb2.BatchCheckRequest | _Refused,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> decisions_pb2.BatchCheckResponse:
        """Decide every action of ``request`` (module docstring); a refusal aborts the
        call with its gRPC status."""
        actions = 0 if isinstance(request, _Refused) else len(request.actions)
        try:
            if isinstance(request, _Refused):
                raise request.error
            checks = self.check_requests(request)
            batch = await self._authorizer.check_batch(
                checks, context.time_remaining(), peer=context.peer()
            )
        except AuthzError as exc:
            status = next(
                (s for cls, s in _STATUS if isinstance(exc, cls)), grpc.StatusCode.INTERNAL
            )
            log.warning(
                "BatchCheck refused",
                extra={"code": exc.code, "actions": actions, "error": str(exc)},
            )
            self._count(status.name, actions)
            await context.abort(status, f"{exc.code}: {exc}")
        except Exception:
            log.exception("unexpected error in BatchCheck")
            self._count(grpc.StatusCode.INTERNAL.name, actions)
            await context.abort(grpc.StatusCode.INTERNAL, "internal_error")
        self._count("ok", actions)
        response = decisions_pb2.BatchCheckResponse(revision=batch.revision)
        for action, outcome in zip(request.actions, batch.outcomes, strict=True):
            record = outcome.record
            response.results.add(
                id=action.id,
                decision_id=record.decision_id,
                allowed=record.allowed,
                # What the client of a Check would get: dry-run allows what it would deny.
                http_status=200 if record.allowed else record.http_status,
                reason=record.reason,
            )
        return response

    def check_requests(
        self, request: decisions_pb2.BatchCheckRequest
    ) -> list[external_auth_pb2.CheckRequest]:
        """The CheckRequest Envoy would send for each action. Raises BatchRequestError
        (BatchTooLarge for too many actions) naming the action and field."""
        count = len(request.actions)
        if count == 0:
            raise BatchRequestError("no actions")
        if count > self._max_actions:
            raise BatchTooLarge(f"{count} actions, at most {self._max_actions}")
        principal = dict(request.principal.headers)
        _check_headers("principal", principal)
        return [_check_request(i, action, principal) for i, action in enumerate(request.actions)]

    def _count(self, result: str, actions: int) -> None:
        if self._on_call is not None:
            self._on_call(result, actions)


def _check_request(
    index: int, action: decisions_pb2.Action, principal: Mapping[str, str]
) -> external_auth_pb2.CheckRequest:
    where = f"actions[{index}]"
    if len(action.id.encode()) > _MAX_ID:
        raise BatchRequestError(f"{where}.id: longer than {_MAX_ID} bytes")
    if not is_token(action.method, _MAX_METHOD):
        raise BatchRequestError(f"{where}.method: not an HTTP method token")
    path = action.path
    if not path.startswith("/") or len(path) > _MAX_PATH or not is_safe_field_value(path):
        raise BatchRequestError(f"{where}.path: must start with / (at most {_MAX_PATH} bytes)")
    host = action.host
    if len(host) > _MAX_HOST or not is_safe_field_value(host) or " " in host:
        raise BatchRequestError(f"{where}.host: not a host (at most {_MAX_HOST} bytes)")
    headers = dict(action.headers)
    _check_headers(f"{where}.headers", headers)
    both = sorted(set(headers) & set(principal))
    if both:
        raise BatchRequestError(f"{where}.headers: {both[0]!r} is the principal's")
    extensions = dict(action.context_extensions)
    if len(extensions) > _MAX_EXTENSIONS:
        raise BatchRequestError(f"{where}.context_extensions: more than {_MAX_EXTENSIONS}")
    if "decision_path" in extensions:
        raise BatchRequestError(
            f"{where}.context_extensions: decision_path is the deployment's, not the caller's"
        )
    all_headers = {":method": action.method, ":path": path, ":authority": host}
    all_headers.update(principal)
    all_headers.update(headers)
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(
                http=attribute_context_pb2.AttributeContext.HttpRequest(
                    method=action.method,
                    path=path,
                    host=host,
                    headers=all_headers,
                    protocol="HTTP/1.1",
                )
            ),
            context_extensions=extensions,
        )
    )


def _check_headers(where: str, headers: Mapping[str, str]) -> None:
    if len(headers) > _MAX_HEADERS:
        raise BatchRequestError(f"{where}: more than {_MAX_HEADERS} headers")
    for name, value in headers.items():
        if not is_header_name(name, _MAX_HEADER_NAME):
            raise BatchRequestError(f"{where}: {name[:64]!r} is not a lowercase header name")
        if name in _REFUSED_HEADERS or name.startswith(OWN_PREFIX):
            raise BatchRequestError(f"{where}: {name!r} may not be set by a caller")
        if not is_safe_field_value(value):
            raise BatchRequestError(f"{where}: the value of {name!r} holds CR, LF or NUL")


def add_decisions_to_server(servicer: DecisionsServicer, server: Any) -> None:
    """Register ``servicer``'s BatchCheck on ``server`` (a ``grpc.aio.Server``) as the
    generated ``add_DecisionsServicer_to_server`` does, with a deserializer that refuses
    more than the servicer's ``max_bytes`` bytes unparsed and turns bytes protobuf
    refuses into a precise ``INVALID_ARGUMENT`` instead of grpc's own error."""
    handler = grpc.unary_unary_rpc_method_handler(
        servicer.BatchCheck,
        request_deserializer=request_deserializer(servicer.max_bytes),
        response_serializer=decisions_pb2.BatchCheckResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(DECISIONS_SERVICE, {"BatchCheck": handler}),)
    )
    server.add_registered_method_handlers(DECISIONS_SERVICE, {"BatchCheck": handler})
