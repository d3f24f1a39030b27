"""One exception tree for authz; every class carries what its failure means.

Each class declares its stable snake_case ``code`` (the ``reason`` in decision logs, the
``error`` field of deny bodies and admin answers, the ``code`` label of the metrics: it
never changes once released), the ``http_status`` of the answer, whether a fail-open
decision path may turn it into an allow (``fail_open_eligible``) and whether it counts as
an OPA failure (``opa_error``, counted in ``authz_opa_errors_total``). Every table of
codes (:func:`meanings`, :data:`FAIL_OPEN_CODES`, :func:`opa_error_codes`,
``response.status_for``, the metrics) is read off the tree, so adding a failure is one new
class here. Subclasses inherit; a subclass that keeps its parent's code keeps its
meaning::

    class                           code                    status  fail-open  opa_error
    AuthzError                      internal_error          500
    ├── ConfigError                 config_error            500     settings: startup only, exit 2
    │   └── StartupError            config_error            500     cannot start (port, file)
    ├── DataFileError               invalid_data_file       500     a tool's input file: exit 2
    ├── RequestError                invalid_request         400     malformed CheckRequest / body
    │   ├── AdminRequestError       invalid_request         400     malformed admin API body
    │   │   └── TooManyOverrides    too_many_overrides      409     override cap reached
    │   └── BatchRequestError       invalid_batch           400     malformed BatchCheck request
    │       └── BatchTooLarge       batch_too_large         413     BatchCheck over its bounds
    ├── BatchRevisionError          batch_revision_changed  503     batch spanned bundle revisions
    ├── DecisionPathError           invalid_decision_path   500     bad context_extensions path
    ├── DeadlineExceeded            deadline_exceeded       503     budget spent before a decision
    ├── CredentialError             credential_unavailable  503     secret for injection missing
    ├── RateLimitUnavailable        rate_limit_unavailable  503     shared limiter down, strict
    ├── AddressNotAllowed           address_not_allowed     403     tunnel name resolves non-public
    ├── DestinationUnresolved       destination_unresolved  502     tunnel name does not resolve
    ├── OverridesUnavailable        overrides_unavailable   503     shared override store down
    └── PolicyError                 policy_error            500
        ├── OpaUnavailable          opa_unavailable         503     yes        yes
        │   └── CircuitOpen         opa_circuit_open        503     yes        yes
        ├── OpaTimeout              opa_timeout             503                yes
        ├── OpaResponseError        opa_error               500                yes
        ├── UndefinedDecision       undefined_decision      403                yes
        └── InvalidDecision         invalid_decision        500                yes
            └── UnsafeHeaderMutation unsafe_header_mutation 500               yes

Three kinds of bad input, three classes: a setting (:class:`ConfigError`, startup refuses
to run, exit 2), a body sent to the admin API (:class:`AdminRequestError`, answered with
its status; never a ConfigError per request), and a data file an offline tool reads
(:class:`DataFileError`, the tool exits 2). ``Check`` never lets an error escape as a gRPC
error: ``response.error_response`` denies with the class's ``http_status``.

``fail_open_eligible``: only :class:`OpaUnavailable` (and so :class:`CircuitOpen`) sets
it: OPA could not be reached, which nothing a caller sends can cause. :class:`OpaTimeout`
is not eligible: its budget is the request's, which authz's own work (parsing a body,
queueing, waiting for a pooled connection) spends too, so a caller could buy a timeout;
neither is :class:`DeadlineExceeded` nor anything OPA answered.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

__all__ = [
    "FAIL_OPEN_CODES",
    "AddressNotAllowed",
    "AdminRequestError",
    "AuthzError",
    "BatchRequestError",
    "BatchRevisionError",
    "BatchTooLarge",
    "CircuitOpen",
    "ConfigError",
    "CredentialError",
    "DataFileError",
    "DeadlineExceeded",
    "DecisionPathError",
    "DestinationUnresolved",
    "InvalidDecision",
    "Meaning",
    "OpaResponseError",
    "OpaTimeout",
    "OpaUnavailable",
    "OverridesUnavailable",
    "PolicyError",
    "RateLimitUnavailable",
    "RequestError",
    "StartupError",
    "TooManyOverrides",
    "UndefinedDecision",
    "UnsafeHeaderMutation",
    "error_classes",
    "fail_open_codes",
    "meanings",
    "opa_error_codes",
]


# -- the tables, read off the tree ----------------------------------------------------------
# Defined before the classes: creating each class below clears the cache of meanings().


@dataclass(frozen=True, slots=True)
class Meaning:
    """What a failure ``code`` means: the HTTP status of its answer, whether a fail-open
    path may allow it, whether it counts as an OPA error."""

    http_status: int
    fail_open_eligible: bool
    opa_error: bool


def error_classes(root: type[AuthzError] | None = None) -> Iterator[type[AuthzError]]:
    """``root`` (default :class:`AuthzError`) and every subclass, direct or not, currently
    defined; parents first."""
    top = AuthzError if root is None else root
    yield top
    for sub in top.__subclasses__():
        yield from error_classes(sub)


@functools.cache
def meanings() -> Mapping[str, Meaning]:
    """Failure code -> :class:`Meaning`, for every class of the tree (cached until a
    subclass is defined or collected). Raises TypeError naming the classes when two give
    one code different meanings."""
    table: dict[str, tuple[type[AuthzError], Meaning]] = {}
    for cls in error_classes():
        meaning = Meaning(cls.http_status, cls.fail_open_eligible, cls.opa_error)
        first = table.setdefault(cls.code, (cls, meaning))
        if first[1] != meaning:
            raise TypeError(
                f"error code {cls.code!r}: {first[0].__qualname__} says {first[1]}, "
                f"{cls.__qualname__} says {meaning}"
            )
    return MappingProxyType({code: meaning for code, (_, meaning) in table.items()})


def fail_open_codes() -> frozenset[str]:
    """The codes a fail-open decision path may turn into an allow."""
    return frozenset(code for code, m in meanings().items() if m.fail_open_eligible)


def opa_error_codes() -> frozenset[str]:
    """The codes counted as OPA failures (``authz_opa_errors_total``)."""
    return frozenset(code for code, m in meanings().items() if m.opa_error)


class AuthzError(Exception):
    """Base of every authz error. ``code`` is stable; ``public_message`` is safe to send
    to the client (it never contains input values), ``str(err)`` is for logs.
    ``http_status``, ``fail_open_eligible`` and ``opa_error`` are what the code means (see
    the module docstring); they are class attributes, never set per instance."""

    code: ClassVar[str] = "internal_error"
    public_message: ClassVar[str] = "internal error"
    http_status: ClassVar[int] = 500
    # True only where OPA itself could not be reached (see the module docstring).
    fail_open_eligible: ClassVar[bool] = False
    # True where OPA failed to give a usable answer (authz_opa_errors_total).
    opa_error: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The derived tables follow the live tree: a new class, or one collected (a
        # class a test defined), invalidates them.
        meanings.cache_clear()
        weakref.finalize(cls, meanings.cache_clear)


class ConfigError(AuthzError):
    """A setting holds a bad value; the message names the key and the value. Raised while
    reading settings (startup, a settings reload); the process refuses to start (exit 2)."""

    code = "config_error"
    public_message = "configuration error"


class StartupError(ConfigError):
    """authz cannot start: a port in use, an unreadable file, a dependency that must be
    reachable and is not. The message is one line naming what failed (the setting, its
    value unless secret, and why). A :class:`ConfigError`, so whoever handles a bad
    configuration (the CLI: one line on stderr, exit 2) handles this too."""


class DataFileError(AuthzError):
    """A data file an offline tool reads (a bundle, its ``data.json``, an audit database,
    the egress services file) cannot be used; the message names the file and the place.
    The tool exits 2."""

    code = "invalid_data_file"
    public_message = "a data file cannot be used"


class RequestError(AuthzError):
    """The CheckRequest cannot be turned into an input document (e.g. bad percent-encoding
    in the path, a JSON body that does not parse)."""

    code = "invalid_request"
    public_message = "malformed request"
    http_status = 400


class AdminRequestError(RequestError):
    """A request to the admin API cannot be carried out as sent: a body that is not JSON,
    or a field the message names with its (shortened) value. Answered with
    ``http_status`` and ``code`` by the admin app in one place."""


class TooManyOverrides(AdminRequestError):
    """A new override would exceed the cap on active overrides (409 Conflict: the body is
    fine, the current state refuses it)."""

    code = "too_many_overrides"
    public_message = "too many active overrides"
    http_status = 409


class BatchRequestError(RequestError):
    """A BatchCheck request (``authz.v1.Decisions``) that cannot be decided as sent: no
    action, an action field that is malformed, a header given both by the principal and
    an action, a ``decision_path`` context extension. The message names the action and
    the field, never a header value. gRPC ``INVALID_ARGUMENT``."""

    code = "invalid_batch"
    public_message = "malformed batch request"


class BatchTooLarge(BatchRequestError):
    """A BatchCheck request with more actions or bytes than ``AUTHZ_BATCH_CHECK_MAX_*``
    allow. gRPC ``RESOURCE_EXHAUSTED``."""

    code = "batch_too_large"
    public_message = "batch request too large"
    http_status = 413


class BatchRevisionError(AuthzError):
    """A batch's decisions could not all come from one bundle revision (a bundle
    activated while it was asked, twice). gRPC ``ABORTED``: the caller may retry."""

    code = "batch_revision_changed"
    public_message = "the policy changed while the batch was decided; retry"
    http_status = 503


class DecisionPathError(AuthzError):
    """The decision path from ``context_extensions`` is not a valid OPA data path."""

    code = "invalid_decision_path"
    public_message = "authorization is misconfigured for this route"


class DeadlineExceeded(AuthzError):
    """The decision budget (config or Envoy's gRPC deadline) ran out."""

    code = "deadline_exceeded"
    public_message = "authorization timed out"
    http_status = 503


class CredentialError(AuthzError):
    """A credential the decision asks to inject cannot be resolved."""

    code = "credential_unavailable"
    public_message = "credential for this service is unavailable"
    http_status = 503


class RateLimitUnavailable(AuthzError):
    """The shared rate-limit backend is unreachable and the mode says deny."""

    code = "rate_limit_unavailable"
    public_message = "rate limiting is unavailable"
    http_status = 503


class AddressNotAllowed(AuthzError):
    """A tunnel's destination (egress CONNECT the policy allowed) resolves to an address
    that is not public: loopback, private, link-local (cloud metadata 169.254.169.254),
    shared, reserved, multicast or unspecified (``authz.core.tunnel``)."""

    code = "address_not_allowed"
    public_message = "the destination's address is not allowed"
    http_status = 403


class DestinationUnresolved(AuthzError):
    """A tunnel's destination name did not resolve (no answer, an error, or no answer
    within the resolution timeout)."""

    code = "destination_unresolved"
    public_message = "the destination could not be resolved"
    http_status = 502


class OverridesUnavailable(AuthzError):
    """The shared override store (Redis, :mod:`authz.runtime.fleet`) is unreachable: an
    override cannot be granted or deleted now (the last known ones stay enforced)."""

    code = "overrides_unavailable"
    public_message = "the shared override store is unavailable"
    http_status = 503


class PolicyError(AuthzError):
    """OPA could not give a usable decision."""

    code = "policy_error"
    public_message = "policy evaluation failed"


class OpaUnavailable(PolicyError):
    """OPA refused or dropped the connection. Fail-open eligible (as its subclasses)."""

    code = "opa_unavailable"
    public_message = "authorization service unavailable"
    http_status = 503
    fail_open_eligible = True
    opa_error = True


class CircuitOpen(OpaUnavailable):
    """OPA was not asked: the circuit breaker is open after repeated failures."""

    code = "opa_circuit_open"
    public_message = "authorization service unavailable"


class OpaTimeout(PolicyError):
    """OPA did not answer within the decision budget."""

    code = "opa_timeout"
    public_message = "authorization service timed out"
    http_status = 503
    opa_error = True


class OpaResponseError(PolicyError):
    """OPA answered with a non-200 status or a body that is not a JSON object."""

    code = "opa_error"
    public_message = "policy evaluation failed"
    opa_error = True


class UndefinedDecision(PolicyError):
    """OPA's answer has no ``result``: nothing is defined at the decision path. 403: the
    same answer as a policy deny."""

    code = "undefined_decision"
    public_message = "no policy decision for this request"
    http_status = 403
    opa_error = True


class InvalidDecision(PolicyError):
    """OPA's ``result`` is not a valid decision; the message names the field and the
    JSON type found (as opa-envoy-plugin's ``expected allowed to be of type 'boolean'``)."""

    code = "invalid_decision"
    public_message = "policy returned an invalid decision"
    opa_error = True


class UnsafeHeaderMutation(InvalidDecision):
    """The decision sets a header Envoy must not be handed: a name that is not an RFC 9110
    token (spaces, ``:``, a pseudo-header such as ``:path``) or a value with CR, LF or NUL.
    Envoy 1.40 answers such a mutation on an allow with its own 503 (``invalid header
    value``), rewrites the request for ``:path``, and on a deny or in
    ``response_headers_to_add`` splits a CR/LF value into extra client response headers
    (``tests/integration/test_envoy_header_mutations.py``); opa-envoy-plugin passes them
    on. authz refuses them, naming the field (``docs/contract.md``)."""

    code = "unsafe_header_mutation"
    public_message = "policy set a header Envoy cannot send safely"


# The codes a fail-open decision path turns into an allow (the classes above).
FAIL_OPEN_CODES: frozenset[str] = fail_open_codes()
