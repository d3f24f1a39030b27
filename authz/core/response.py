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
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2

from authz.core.decision import Decision, Header
from authz.core.errors import AuthzError, InvalidDecision, meanings

__all__ = [
    "DECISION_ID_HEADER",
    "DEFAULT_DENY_STATUS",
    "ResponsePrototype",
    "build_response",
    "error_response",
    "response_prototype",
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


def _add_header_options(field: Any, headers: Iterable[Header]) -> None:
    """Append ``headers`` to the repeated HeaderValueOption ``field``: the first value of
    a name OVERWRITE_IF_EXISTS_OR_ADD, further ones APPEND_IF_EXISTS_OR_ADD. Built in place
    (a constructed option would be copied into the response, which costs more)."""
    seen: set[str] = set()
    for name, value in headers:
        option = field.add(append_action=_APPEND if name in seen else _OVERWRITE)
        seen.add(name)
        header = option.header
        header.key = name
        header.value = value


def _metadata(decision_id: str, extra: Mapping[str, Any]) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    if extra:
        try:
            metadata.update(dict(extra))
        except RecursionError:
            raise InvalidDecision(_TOO_DEEP) from None
    metadata["decision_id"] = decision_id
    return metadata


# JSON scalars: a dynamic_metadata of only these is one level deep, so it can be written
# into the response in place (no depth to check).
_SCALARS: Final = frozenset({str, int, float, bool, type(None)})


def _new_response(decision_id: str, extra: Mapping[str, Any]) -> external_auth_pb2.CheckResponse:
    """A CheckResponse whose ``dynamic_metadata`` is ``extra`` plus ``decision_id``.
    Raises InvalidDecision when the Struct is nested past protobuf's recursion limit (100
    messages; Envoy could not read it either): the message constructor refuses it with a
    DecodeError (a merge into an existing message does not report it reliably)."""
    if all(type(value) in _SCALARS for value in extra.values()):
        response = external_auth_pb2.CheckResponse()
        fields = response.dynamic_metadata.fields
        # What Struct.update writes for each scalar (well_known_types._SetStructValue),
        # without its chain of isinstance checks.
        for key, value in extra.items():
            kind = type(value)
            if kind is str:
                fields[key].string_value = value
            elif value is None:
                fields[key].null_value = struct_pb2.NULL_VALUE
            elif kind is bool:
                fields[key].bool_value = value
            else:  # int or float
                fields[key].number_value = value
        fields["decision_id"].string_value = decision_id
        return response
    try:
        return external_auth_pb2.CheckResponse(dynamic_metadata=_metadata(decision_id, extra))
    except DecodeError:
        raise InvalidDecision(_TOO_DEEP) from None


_TOO_DEEP: Final = "dynamic_metadata is nested too deeply for a protobuf Struct"


def _denied(
    status: int, headers: Iterable[Header], body: str, decision_id: str, metadata: Mapping[str, Any]
) -> external_auth_pb2.CheckResponse:
    response = _new_response(decision_id, metadata)
    response.status.code = code_pb2.PERMISSION_DENIED
    denied = response.denied_response
    denied.status.SetInParent()  # present even for a code of 0, as a constructed one
    denied.status.code = status
    _add_header_options(denied.headers, headers)
    denied.body = body
    return response


def build_response(
    decision: Decision, decision_id: str, prototype: ResponsePrototype | None = None
) -> external_auth_pb2.CheckResponse:
    """Build the CheckResponse for a parsed decision.

    ``decision_id`` (UUID string) is added to ``dynamic_metadata`` and sent in the
    ``x-authz-decision-id`` header: to the upstream on an allow (unless the decision
    removes that header), to the client on a deny (so a user can quote it). A header the
    decision sets is never also removed: Envoy applies removals after additions, which
    would drop the policy's own value. Raises InvalidDecision when ``dynamic_metadata`` is
    nested too deeply for a protobuf Struct.

    ``prototype`` (a cached allow's, :attr:`authz.core.cache.CachedDecision.prototype`)
    is used when it was built from this decision's fields (the same objects: a credential
    or tunnel header added since, or a deny, do not use it): the response is a copy of it
    plus what varies per request, the same message."""
    if (
        prototype is not None
        and decision.allowed
        and prototype.headers is decision.headers
        and prototype.request_headers_to_remove is decision.request_headers_to_remove
        and prototype.query_parameters_to_set is decision.query_parameters_to_set
        and prototype.query_parameters_to_remove is decision.query_parameters_to_remove
        and prototype.dynamic_metadata is decision.dynamic_metadata
    ):
        response = external_auth_pb2.CheckResponse()
        response.CopyFrom(prototype.message)
        response.dynamic_metadata.fields["decision_id"].string_value = decision_id
        ok = response.ok_response
        if prototype.adds_id:
            header = ok.headers.add(append_action=_OVERWRITE).header
            header.key = DECISION_ID_HEADER
            header.value = decision_id
        if decision.response_headers_to_add:
            _add_header_options(ok.response_headers_to_add, decision.response_headers_to_add)
        return response
    if decision.allowed:
        upstream_headers = [h for h in decision.headers if h[0] != DECISION_ID_HEADER]
        # A policy that removes the decision-id header (egress: third parties need not
        # see it) keeps it off the upstream request.
        if DECISION_ID_HEADER not in decision.request_headers_to_remove:
            upstream_headers.append((DECISION_ID_HEADER, decision_id))
        response = _new_response(decision_id, decision.dynamic_metadata)
        response.status.SetInParent()  # code OK (0)
        ok = response.ok_response
        ok.SetInParent()
        _add_header_options(ok.headers, upstream_headers)
        if decision.request_headers_to_remove:
            set_names = {name for name, _ in upstream_headers}
            ok.headers_to_remove.extend(
                name for name in decision.request_headers_to_remove if name not in set_names
            )
        _add_header_options(ok.response_headers_to_add, decision.response_headers_to_add)
        if decision.query_parameters_to_remove:
            ok.query_parameters_to_remove.extend(decision.query_parameters_to_remove)
        for key, value in decision.query_parameters_to_set:
            parameter = ok.query_parameters_to_set.add()
            parameter.key = key
            parameter.value = value
        return response
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


class ResponsePrototype:
    """What :func:`build_response` writes for an allowed ``decision`` that is the same for
    every request: the response without the decision id (its ``dynamic_metadata`` key and
    its header) and without ``response_headers_to_add`` (rate-limit headers vary per
    request). ``message`` is never changed after construction (each response is a copy);
    the decision fields it was built from are kept to check, by identity, that a decision
    carrying it still has them. ``size`` is what it accounts for in a cache entry, in
    bytes."""

    __slots__ = (
        "adds_id",
        "dynamic_metadata",
        "headers",
        "message",
        "query_parameters_to_remove",
        "query_parameters_to_set",
        "request_headers_to_remove",
        "size",
    )

    def __init__(self, decision: Decision) -> None:
        message = build_response(decision.with_response_headers(()), "")
        del message.dynamic_metadata.fields["decision_id"]
        self.adds_id = DECISION_ID_HEADER not in decision.request_headers_to_remove
        if self.adds_id:
            del message.ok_response.headers[-1]
        self.message = message
        self.headers = decision.headers
        self.request_headers_to_remove = decision.request_headers_to_remove
        self.query_parameters_to_set = decision.query_parameters_to_set
        self.query_parameters_to_remove = decision.query_parameters_to_remove
        self.dynamic_metadata = decision.dynamic_metadata
        elements = (
            len(decision.headers)
            + len(decision.request_headers_to_remove)
            + len(decision.query_parameters_to_set)
            + len(decision.query_parameters_to_remove)
            + len(decision.dynamic_metadata)
        )
        self.size = PROTOTYPE_OVERHEAD + PROTOTYPE_PER_ELEMENT * elements + 2 * message.ByteSize()


# A prototype's accounted memory in bytes: this overhead, this much per header, removal,
# query parameter and metadata field, and twice its encoded size. upb holds the message
# in arena blocks, which tracemalloc does not see; the process's resident memory grew by
# about 1.6 KB per prototype of an empty allow, 3.2 KB for the gateway's allow (8
# elements, 170 bytes encoded), 11 KB for 40 elements of 548 bytes and 23 KB for 40 of
# 8.6 KB, each below this formula (python -m bench.prototype_memory measures it).
PROTOTYPE_OVERHEAD: Final = 2048
PROTOTYPE_PER_ELEMENT: Final = 384


def response_prototype(decision: Decision) -> ResponsePrototype | None:
    """A :class:`ResponsePrototype` for ``decision``, or None when it has none: a deny
    (its body and headers hold the decision id), or a ``dynamic_metadata`` that is not
    flat (its depth is checked per response, as it always was)."""
    if not decision.allowed:
        return None
    if not all(type(value) in _SCALARS for value in decision.dynamic_metadata.values()):
        return None
    return ResponsePrototype(decision)


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
