"""Admin preview: what would be decided for a key or sandbox and a request.

``POST /v1/preview`` (:mod:`authz.runtime.admin`) answers "what would the policy decide if key
``key-demo-user`` sent ``GET /api/v1/admin/users``?" without sending the request and
without the key itself. Request body (a JSON object)::

    {"key_id": "key-demo-user"          # or "sandbox_id": "sb-demo-standard" (exactly one)
     "method": "GET",                   # default GET
     "path": "/api/v1/items?x=1",       # required, starts with /
     "service": "openai",               # egress: the service the route forwards to
     "decision_path": "authz/egress/decision",  # default: the gateway's, or the
                                        # egress one when sandbox_id is given
     "headers": {"content-type": "application/json"},  # optional, more request headers
     "body": "..."}                     # optional request body

The request becomes the CheckRequest Envoy would send and its input is built exactly as
for real traffic (:func:`authz.core.input.build_input`), plus ``input.preview`` =
``{"key_id": ...}`` or ``{"sandbox_id": ...}``: the shipped policies then take that
identity as proven (the gateway finds the key by id, the egress policy skips the token
check). Only this module sets ``input.preview``; an input built from a CheckRequest never
has it. Everything else is the real evaluation: path rules, namespace defaults, TTL
overrides. Nothing is enforced: no rate limit is consumed, no credential resolved, the
decision is neither cached nor written to the decision log (the admin action is).

The answer (:func:`preview_answer`)::

    {"decision_path", "revision", "allowed", "http_status", "reason",
     "source",        # policy_rule | namespace_default | override | deny
     "identity", "rate_limit", "override_id",
     "ignored"}       # decision fields this outcome does not use (docs/contract.md)

``reason``, ``source``, ``identity``, ``rate_limit`` and ``override_id`` come from the
decision's ``authz`` object (authz's extensions, ``docs/contract.md``), never from
top-level fields of those names, which are the policy's own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

from authz.core.decision import Decision, parse_decision
from authz.core.errors import AdminRequestError, ConfigError
from authz.core.headers import is_header_name
from authz.core.input import build_input
from authz.core.opa import Evaluation, PolicyEngine, parse_decision_path

__all__ = [
    "EGRESS_DECISION_PATH",
    "PreviewRequest",
    "parse_preview_request",
    "preview",
    "preview_answer",
    "preview_input",
]

EGRESS_DECISION_PATH: Final = "authz/egress/decision"
_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")
_METHOD: Final = re.compile(r"[A-Z]{1,16}")
_MAX_HEADERS: Final = 64
_MAX_HEADER_NAME: Final = 128
_MAX_BODY: Final = 8192
_EMPTY: Final[Mapping[str, str]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class PreviewRequest:
    """A validated preview request: ``identity`` is ``("key_id" | "sandbox_id", id)``."""

    decision_path: str
    identity: tuple[str, str]
    method: str
    path: str
    service: str = ""
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    body: str = ""


def _show(value: Any) -> str:
    """``repr(value)``, cut to 64 characters: bad input is named, never echoed whole."""
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def parse_preview_request(body: Any, *, default_decision_path: str) -> PreviewRequest:
    """Validate a ``POST /v1/preview`` body. Raises AdminRequestError naming the field and the
    bad value; ``default_decision_path`` applies to a key (a sandbox defaults to
    :data:`EGRESS_DECISION_PATH`)."""
    if not isinstance(body, dict):
        raise AdminRequestError("preview: expected a JSON object")
    unknown = set(body) - {
        "key_id",
        "sandbox_id",
        "method",
        "path",
        "service",
        "decision_path",
        "headers",
        "body",
    }
    if unknown:
        raise AdminRequestError(f"preview: unknown field(s) {sorted(unknown)}")
    if ("key_id" in body) == ("sandbox_id" in body):
        raise AdminRequestError("preview: exactly one of key_id or sandbox_id is required")
    kind = "key_id" if "key_id" in body else "sandbox_id"
    ident = body[kind]
    if not isinstance(ident, str) or not _ID.fullmatch(ident):
        raise AdminRequestError(f"preview.{kind}={_show(ident)}: not an id")
    method = body.get("method", "GET")
    if not isinstance(method, str) or not _METHOD.fullmatch(method):
        raise AdminRequestError(f"preview.method={_show(method)}: expected GET, POST, ...")
    path = body.get("path")
    if not isinstance(path, str) or not path.startswith("/") or len(path) > 2048:
        raise AdminRequestError(f"preview.path={_show(path)}: expected a /path")
    service = body.get("service", "")
    if not isinstance(service, str) or (service and not _ID.fullmatch(service)):
        raise AdminRequestError(f"preview.service={_show(service)}: not a service name")
    default = EGRESS_DECISION_PATH if kind == "sandbox_id" else default_decision_path
    try:  # the settings' parser, so ConfigError
        decision_path = parse_decision_path(
            "preview.decision_path", str(body.get("decision_path", default))
        )
    except ConfigError as exc:
        raise AdminRequestError(str(exc)) from None
    headers = body.get("headers", {})
    if not isinstance(headers, dict) or len(headers) > _MAX_HEADERS:
        raise AdminRequestError(f"preview.headers: expected an object of at most {_MAX_HEADERS}")
    for name, value in headers.items():
        if (
            not is_header_name(name, _MAX_HEADER_NAME)
            or not isinstance(value, str)
            or "\n" in value
        ):
            raise AdminRequestError(
                f"preview.headers[{_show(name)}]: expected a lowercase name: str"
            )
    payload = body.get("body", "")
    if not isinstance(payload, str) or len(payload) > _MAX_BODY:
        raise AdminRequestError(
            f"preview.body: expected a string of at most {_MAX_BODY} characters"
        )
    return PreviewRequest(
        decision_path=decision_path,
        identity=(kind, ident),
        method=method,
        path=path,
        service=service,
        headers=MappingProxyType(dict(headers)),
        body=payload,
    )


def preview_input(request: PreviewRequest, credential_headers: Iterable[str]) -> dict[str, Any]:
    """The OPA input for ``request``: the CheckRequest Envoy would send for it, built
    like real traffic, plus ``preview`` naming the asserted identity."""
    host = request.service or "gateway"
    headers = {
        **request.headers,
        ":method": request.method,
        ":path": request.path,
        ":authority": host,
        "host": host,
    }
    extensions = {"decision_path": request.decision_path}
    if request.service:
        extensions["service"] = request.service
    check = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(
                http=attribute_context_pb2.AttributeContext.HttpRequest(
                    method=request.method,
                    path=request.path,
                    host=host,
                    scheme="http",
                    protocol="HTTP/1.1",
                    headers=headers,
                    body=request.body,
                    size=len(request.body),
                )
            ),
            context_extensions=extensions,
        )
    )
    document = build_input(check, credential_headers)
    kind, ident = request.identity
    document["preview"] = {kind: ident}
    return document


def preview_answer(
    request: PreviewRequest, decision: Decision, evaluation: Evaluation
) -> dict[str, Any]:
    """The JSON answer for ``decision`` (see the module docstring). ``source`` is the
    policy's, else ``policy_rule`` for an allow and ``deny`` for a deny."""
    rate_limit = decision.rate_limit
    return {
        "decision_path": request.decision_path,
        "revision": evaluation.revision,
        "allowed": decision.allowed,
        "http_status": 200 if decision.allowed else decision.http_status or 403,
        "reason": decision.reason_code,
        "source": decision.source or ("policy_rule" if decision.allowed else "deny"),
        "identity": dict(decision.identity),
        "rate_limit": (
            {
                "tier": rate_limit.tier,
                "key": rate_limit.key,
                "requests_per_minute": rate_limit.requests_per_minute,
            }
            if rate_limit is not None
            else None
        ),
        "override_id": decision.override_id,
        "ignored": list(decision.ignored),
    }


async def preview(
    engine: PolicyEngine,
    request: PreviewRequest,
    *,
    credential_headers: Iterable[str],
    timeout_s: float,
) -> dict[str, Any]:
    """Evaluate ``request`` on ``engine`` and answer as :func:`preview_answer`. Raises
    RequestError for a malformed path or body, and the PolicyError subclasses of
    :meth:`~authz.core.opa.PolicyEngine.evaluate` and :func:`~authz.core.decision.parse_decision`
    (undefined or malformed decision)."""
    document = preview_input(request, credential_headers)
    evaluation = await engine.evaluate(request.decision_path, document, timeout_s)
    return preview_answer(request, parse_decision(evaluation.result), evaluation)
