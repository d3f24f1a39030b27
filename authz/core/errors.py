"""One exception tree for authz; every class carries a stable snake_case ``code``.

The codes double as the ``reason`` in decision logs, the ``error`` field of deny bodies
and (later) metric labels, so they never change once released::

    AuthzError                      internal_error
    ├── ConfigError                 config_error          (startup only; never per request)
    ├── RequestError                invalid_request       (malformed CheckRequest / body)
    ├── DecisionPathError           invalid_decision_path (bad context_extensions path)
    ├── DeadlineExceeded            deadline_exceeded     (budget spent before a decision)
    ├── CredentialError             credential_unavailable (secret for injection missing)
    ├── RateLimitUnavailable        rate_limit_unavailable (shared limiter down, strict mode)
    └── PolicyError                 policy_error
        ├── OpaUnavailable          opa_unavailable       (connect/reset/refused)
        │   └── CircuitOpen         opa_circuit_open      (breaker open: not even tried)
        ├── OpaTimeout              opa_timeout           (no answer within the budget)
        ├── OpaResponseError        opa_error             (non-200 or non-JSON answer)
        ├── UndefinedDecision       undefined_decision    (no ``result`` at the path)
        └── InvalidDecision         invalid_decision      (result of the wrong shape)

``response.FAILURE_STATUS`` maps each code to the HTTP status of the deny that Envoy
sends; ``Check`` never lets one of these escape as a gRPC error.

``fail_open_eligible`` (a class attribute, inherited) says whether a fail-open decision
path may turn the error into an allow. Only :class:`OpaUnavailable` (and so
:class:`CircuitOpen`) sets it: OPA could not be reached, which nothing a caller sends can
cause. :class:`OpaTimeout` is not eligible: its budget is the request's, which authz's
own work (parsing a body, queueing, waiting for a pooled connection) spends too, so a
caller could buy a timeout; neither is :class:`DeadlineExceeded` nor anything OPA
answered. :data:`FAIL_OPEN_CODES` is derived from the tree.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

__all__ = [
    "FAIL_OPEN_CODES",
    "AuthzError",
    "CircuitOpen",
    "ConfigError",
    "CredentialError",
    "DeadlineExceeded",
    "DecisionPathError",
    "InvalidDecision",
    "OpaResponseError",
    "OpaTimeout",
    "OpaUnavailable",
    "PolicyError",
    "RateLimitUnavailable",
    "RequestError",
    "UndefinedDecision",
]


class AuthzError(Exception):
    """Base of every authz error. ``code`` is stable; ``public_message`` is safe to send
    to the client (it never contains input values), ``str(err)`` is for logs."""

    code: str = "internal_error"
    public_message: str = "internal error"
    # True only where OPA itself failed (see the module docstring); never per instance.
    fail_open_eligible: ClassVar[bool] = False


class ConfigError(AuthzError):
    """A configuration key holds a bad value; the message names the key and the value."""

    code = "config_error"
    public_message = "configuration error"


class RequestError(AuthzError):
    """The CheckRequest cannot be turned into an input document (e.g. bad percent-encoding
    in the path, a JSON body that does not parse)."""

    code = "invalid_request"
    public_message = "malformed request"


class DecisionPathError(AuthzError):
    """The decision path from ``context_extensions`` is not a valid OPA data path."""

    code = "invalid_decision_path"
    public_message = "authorization is misconfigured for this route"


class DeadlineExceeded(AuthzError):
    """The decision budget (config or Envoy's gRPC deadline) ran out."""

    code = "deadline_exceeded"
    public_message = "authorization timed out"


class CredentialError(AuthzError):
    """A credential the decision asks to inject cannot be resolved."""

    code = "credential_unavailable"
    public_message = "credential for this service is unavailable"


class RateLimitUnavailable(AuthzError):
    """The shared rate-limit backend is unreachable and the mode says deny."""

    code = "rate_limit_unavailable"
    public_message = "rate limiting is unavailable"


class PolicyError(AuthzError):
    """OPA could not give a usable decision."""

    code = "policy_error"
    public_message = "policy evaluation failed"


class OpaUnavailable(PolicyError):
    """OPA refused or dropped the connection. Fail-open eligible (as its subclasses)."""

    code = "opa_unavailable"
    public_message = "authorization service unavailable"
    fail_open_eligible = True


class CircuitOpen(OpaUnavailable):
    """OPA was not asked: the circuit breaker is open after repeated failures."""

    code = "opa_circuit_open"
    public_message = "authorization service unavailable"


class OpaTimeout(PolicyError):
    """OPA did not answer within the decision budget."""

    code = "opa_timeout"
    public_message = "authorization service timed out"


class OpaResponseError(PolicyError):
    """OPA answered with a non-200 status or a body that is not a JSON object."""

    code = "opa_error"
    public_message = "policy evaluation failed"


class UndefinedDecision(PolicyError):
    """OPA's answer has no ``result``: nothing is defined at the decision path."""

    code = "undefined_decision"
    public_message = "no policy decision for this request"


class InvalidDecision(PolicyError):
    """OPA's ``result`` is not a valid decision; the message names the field and the
    JSON type found (as opa-envoy-plugin's ``expected allowed to be of type 'boolean'``)."""

    code = "invalid_decision"
    public_message = "policy returned an invalid decision"


def _tree(cls: type[AuthzError]) -> Iterator[type[AuthzError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _tree(sub)


# The codes a fail-open decision path turns into an allow, read off the tree above.
FAIL_OPEN_CODES: frozenset[str] = frozenset(
    cls.code for cls in _tree(AuthzError) if cls.fail_open_eligible
)
