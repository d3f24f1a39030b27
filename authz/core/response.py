"""Decision -> CheckResponse; an error -> the deny its class says.

Follows opa-envoy-plugin ``internal/internal.go`` (``check``): an allow becomes an
``OkHttpResponse`` with ``headers``, ``headers_to_remove``, ``response_headers_to_add``
and query parameter edits; a deny becomes a ``DeniedHttpResponse`` with ``http_status``
(default 403), ``headers`` and ``body``; ``dynamic_metadata`` goes on both, and
``decision_id`` is always added to it.

Differences, deliberate:
- Every header authz sets on the upstream request uses ``append_action:
  OVERWRITE_IF_EXISTS_OR_ADD`` for its first value (then ``APPEND_IF_EXISTS_OR_ADD`` for
  further values of the same name), so a client-sent header of the same name never
  survives next to the policy's (Envoy's ``config.core.v3.HeaderValueOption``: an unset
  ``append_action`` is ``APPEND_IF_EXISTS_OR_ADD``, so a client value would stay).
- A deny without a body gets a JSON body ``{"error": <reason>, "decision_id": ...}`` and
  ``content-type: application/json`` (replacing a content-type the policy set: the body
  it would describe is authz's).
- Failures never become gRPC errors: :func:`error_response` denies with the status the
  error's class declares (``http_status`` in :mod:`authz.core.errors`; Authorino's
  ``statusCodeMapping``), so the outcome never depends on Envoy's ``failure_mode_allow``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from authz.core.decision import Decision, Header
from authz.core.errors import AuthzError, InvalidDecision, meanings

__all__ = [
    "DECISION_ID_HEADER",
    "DEFAULT_DENY_STATUS",
    "build_response",
    "error_response",
    "status_for",
]

DEFAULT_DENY_STATUS: Final = 403
DECISION_ID_HEADER: Final = "x-authz-decision-id"

_OVERWRITE: Final = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_APPEND: Final = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
_JSON: Final = "application/json"


def status_for(code: str) -> int:
    """HTTP status for a failure ``code``: the ``http_status`` of the
    :class:`~authz.core.errors.AuthzError` class that declares it; 500 if no class does."""
    meaning = meanings().get(code)
    return 500 if meaning is None else meaning.http_status


def _header_options(headers: Iterable[Header]) -> list[base_pb2.HeaderValueOption]:
    seen: set[str] = set()
    options = []
    for name, value in headers:
        action = _APPEND if name in seen else _OVERWRITE
        seen.add(name)
        options.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=name, value=value), append_action=action
            )
        )
    return options


def _metadata(decision_id: str, extra: Mapping[str, Any]) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    if extra:
        try:
            metadata.update(dict(extra))
        except RecursionError:
            raise InvalidDecision(_TOO_DEEP) from None
    metadata["decision_id"] = decision_id
    return metadata


def _response(**fields: Any) -> external_auth_pb2.CheckResponse:
    """A CheckResponse of ``fields``. Raises InvalidDecision when the dynamic_metadata
    Struct is nested past protobuf's recursion limit (100 messages; Envoy could not read
    it either): the message constructor refuses it with a DecodeError."""
    try:
        return external_auth_pb2.CheckResponse(**fields)
    except DecodeError:
        raise InvalidDecision(_TOO_DEEP) from None


_TOO_DEEP: Final = "dynamic_metadata is nested too deeply for a protobuf Struct"


def _denied(
    status: int, headers: Iterable[Header], body: str, decision_id: str, metadata: Mapping[str, Any]
) -> external_auth_pb2.CheckResponse:
    return _response(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=_header_options(headers),
            body=body,
        ),
        dynamic_metadata=_metadata(decision_id, metadata),
    )


def build_response(decision: Decision, decision_id: str) -> external_auth_pb2.CheckResponse:
    """Build the CheckResponse for a parsed decision.

    ``decision_id`` (UUID string) is added to ``dynamic_metadata`` and sent in the
    ``x-authz-decision-id`` header: to the upstream on an allow (unless the decision
    removes that header), to the client on a deny (so a user can quote it). A header the
    decision sets is never also removed: Envoy applies removals after additions, which
    would drop the policy's own value."""
    if decision.allowed:
        upstream_headers = [h for h in decision.headers if h[0] != DECISION_ID_HEADER]
        # A policy that removes the decision-id header (egress: third parties need not
        # see it) keeps it off the upstream request.
        if DECISION_ID_HEADER not in decision.request_headers_to_remove:
            upstream_headers.append((DECISION_ID_HEADER, decision_id))
        set_names = {name for name, _ in upstream_headers}
        ok = external_auth_pb2.OkHttpResponse(
            headers=_header_options(upstream_headers),
            headers_to_remove=[
                name for name in decision.request_headers_to_remove if name not in set_names
            ],
            response_headers_to_add=_header_options(decision.response_headers_to_add),
            query_parameters_to_remove=list(decision.query_parameters_to_remove),
            query_parameters_to_set=[
                base_pb2.QueryParameter(key=k, value=v) for k, v in decision.query_parameters_to_set
            ],
        )
        return _response(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=ok,
            dynamic_metadata=_metadata(decision_id, decision.dynamic_metadata),
        )
    headers = [
        *(h for h in decision.headers if h[0] != DECISION_ID_HEADER),
        (DECISION_ID_HEADER, decision_id),
    ]
    body = decision.body
    if body is None:
        # The body is authz's JSON, so is its one content-type (a policy's would label it
        # wrongly, or twice).
        headers = [h for h in headers if h[0] != "content-type"]
        headers.append(("content-type", _JSON))
        body = _error_body(decision.reason_code, None, decision_id)
    return _denied(
        decision.http_status or DEFAULT_DENY_STATUS,
        headers,
        body,
        decision_id,
        decision.dynamic_metadata,
    )


def _error_body(code: str, message: str | None, decision_id: str) -> str:
    body: dict[str, str] = {"error": code}
    if message:
        body["message"] = message
    body["decision_id"] = decision_id
    return json.dumps(body, separators=(",", ":"))


def error_response(error: AuthzError, decision_id: str) -> external_auth_pb2.CheckResponse:
    """Fail closed: a deny for ``error`` with its class's ``http_status`` and a
    JSON body ``{"error": code, "message": public message, "decision_id": id}``. The body
    never holds ``str(error)``, which may quote request values."""
    return _denied(
        error.http_status,
        [("content-type", _JSON), (DECISION_ID_HEADER, decision_id)],
        _error_body(error.code, error.public_message, decision_id),
        decision_id,
        {"reason": error.code},
    )
