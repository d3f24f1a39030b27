"""OPA's result -> a frozen, typed :class:`Decision`, parsed once.

Accepts opa-envoy-plugin's decision forms (``envoyauth/response.go``): a boolean, or an
object with ``allowed`` (required) and the optional ``headers``,
``response_headers_to_add``, ``request_headers_to_remove``, ``query_parameters_to_set``,
``query_parameters_to_remove``, ``body``, ``http_status``, ``dynamic_metadata``; plus
authz's extensions, all under the one key ``authz`` (``reason``, ``source``, ``rate_limit``,
``identity``, ``credential``, ``tunnel``, ``override``, ``cache_ttl_s``;
``docs/contract.md``), so they never collide with a plugin policy's own top-level fields
(a free-text ``reason``, an ``identity`` of the policy's shape): a top-level field of
those names means nothing to authz, as to the plugin.

The rule: a decision the plugin accepts is never invalid here. Like the plugin
(``internal/internal.go``, ``check``), only the fields the outcome uses are read: on an
allow ``body`` and ``http_status`` are ignored, on a deny ``request_headers_to_remove``,
``response_headers_to_add`` and the query-parameter edits. Such fields (and an ``authz``
key that is not an object) are listed in :attr:`Decision.ignored`, never an error. Unknown
fields are ignored, as the plugin does.

Every type error raises :class:`InvalidDecision` naming the field and the JSON type found,
e.g. ``expected allowed to be of type 'boolean' but got 'string'``. Header names and values
authz hands Envoy are also checked for syntax (RFC 9110 token names, so no pseudo-headers;
no CR, LF or NUL in values) and refused with :class:`UnsafeHeaderMutation`: Envoy 1.40 would
answer 503 for them on an allow, rewrite the request for ``:path``, and split a CR/LF value
into extra client response headers on a deny. A removal of such a name is dropped (Envoy
ignores it; no header can have that name) and reported in :attr:`Decision.ignored`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from operator import attrgetter
from types import MappingProxyType
from typing import Any, Final, Literal

from envoy.type.v3 import http_status_pb2

from authz.core.errors import InvalidDecision, UnsafeHeaderMutation
from authz.core.headers import is_safe_field_value, is_token
from authz.core.secret import is_secret_ref

__all__ = [
    "EXTENSION_KEY",
    "CredentialRef",
    "Decision",
    "Header",
    "RateLimitRef",
    "TunnelRef",
    "json_type",
    "parse_decision",
]

Header = tuple[str, str]
_REASON: Final = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_OVERRIDE_ID: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ENVOY_STATUSES: Final = frozenset(
    v
    for v in http_status_pb2.StatusCode.values()
    if v != 0  # 0 is "Empty"
)
_EMPTY: Final[Mapping[str, Any]] = MappingProxyType({})
# The one top-level key under which authz reads its own extensions.
EXTENSION_KEY: Final = "authz"
# Fields the plugin reads only for one outcome (internal/internal.go, check).
_DENY_ONLY: Final = ("body", "http_status")
_ALLOW_ONLY: Final = (
    "query_parameters_to_remove",
    "query_parameters_to_set",
    "request_headers_to_remove",
    "response_headers_to_add",
)


@dataclass(frozen=True, slots=True)
class RateLimitRef:
    """Which tier applies and the bucket key (never a raw credential).

    ``requests_per_minute`` (required) is the tier's limit as the bundle data states it
    (-1 means unlimited, 0 means no requests); ``burst`` is the bucket size in requests
    (None: the configured default, ``rate_limit_burst_s`` seconds worth)."""

    tier: str
    key: str
    requests_per_minute: int
    burst: int | None = None


@dataclass(frozen=True, slots=True)
class CredentialRef:
    """A credential to inject, by reference: ``ref`` names an entry of the secrets file
    (never the value); the upstream request gets header ``header`` set to ``format`` with
    ``{secret}`` replaced by the resolved secret, e.g. ``Bearer {secret}``."""

    ref: str
    header: str
    format: str = "{secret}"


@dataclass(frozen=True, slots=True)
class TunnelRef:
    """An egress tunnel to open (``authz.tunnel``): the DNS name ``host`` (lowercase) and
    ``port`` the CONNECT asked for, which authz resolves and checks
    (:mod:`authz.core.tunnel`) before Envoy connects."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy decision. Headers keep the policy's order; names are lowercased."""

    allowed: bool
    form: Literal["boolean", "object"] = "boolean"
    headers: tuple[Header, ...] = ()
    response_headers_to_add: tuple[Header, ...] = ()
    request_headers_to_remove: tuple[str, ...] = ()
    query_parameters_to_set: tuple[tuple[str, str], ...] = ()
    query_parameters_to_remove: tuple[str, ...] = ()
    body: str | None = None
    http_status: int | None = None
    dynamic_metadata: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    reason: str | None = None
    rate_limit: RateLimitRef | None = None
    identity: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    credential: CredentialRef | None = None
    tunnel: TunnelRef | None = None
    override_id: str | None = None
    cache_ttl_s: float | None = None
    # What the decision came from (snake_case): policy_rule, namespace_default, override,
    # deny in the shipped policies.
    source: str | None = None
    # Fields the policy set that this outcome does not use (sorted): plugin fields of the
    # other outcome, or an ``authz`` key that is not an object. Counted, never an error.
    ignored: tuple[str, ...] = ()

    @property
    def reason_code(self) -> str:
        """The policy's ``reason``, or ``allowed`` / ``denied`` when it gave none."""
        return self.reason or ("allowed" if self.allowed else "denied")

    def with_headers(self, headers: tuple[Header, ...]) -> Decision:
        """This decision with ``headers`` replaced: equal to ``dataclasses.replace(self,
        headers=headers)`` at half its cost (it runs on every allow that injects a
        credential or pins a tunnel)."""
        return self._replacing(_HEADERS_INDEX, headers)

    def with_response_headers(self, headers: tuple[Header, ...]) -> Decision:
        """This decision with ``response_headers_to_add`` replaced: equal to
        ``dataclasses.replace(self, response_headers_to_add=headers)`` at half its cost (it
        runs on every rate-limited allow, cache hits included)."""
        return self._replacing(_RESPONSE_HEADERS_INDEX, headers)

    def _replacing(self, index: int, value: Any) -> Decision:
        # Every field, positionally, in declaration order (no default factories, no
        # keyword matching): what dataclasses.replace spends most of its time on.
        values = list(_FIELD_VALUES(self))
        values[index] = value
        return Decision(*values)


_FIELD_NAMES: Final = tuple(f.name for f in fields(Decision))
_FIELD_VALUES: Final = attrgetter(*_FIELD_NAMES)
_HEADERS_INDEX: Final = _FIELD_NAMES.index("headers")
_RESPONSE_HEADERS_INDEX: Final = _FIELD_NAMES.index("response_headers_to_add")


def json_type(value: Any) -> str:
    """The JSON type name of a decoded JSON value: boolean, number, string, array,
    object or null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _type_error(name: str, expected: str, value: Any) -> InvalidDecision:
    return InvalidDecision(
        f"expected {name} to be of type '{expected}' but got '{json_type(value)}'"
    )


# Header names already found to be tokens, as the policy wrote them -> lowercased: a
# policy sets the same few names in every decision. Plain str only (a subclass may
# lower() differently), at most _NAMES_MAX names of at most _NAME_MAX characters.
_NAMES: dict[str, str] = {}
_NAMES_MAX: Final = 4096
_NAME_MAX: Final = 64
# The same for reason and source codes that matched _REASON.
_CODES: set[str] = set()


def _header_name(field_name: str, name: str) -> str:
    if not is_token(name):
        raise UnsafeHeaderMutation(f"{field_name}: {name[:64]!r} is not a valid header name")
    lowered = name.lower()
    if type(name) is str and len(name) <= _NAME_MAX and len(_NAMES) < _NAMES_MAX:
        _NAMES[name] = lowered
    return lowered


def _header_value(field_name: str, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _type_error(f"{field_name}[{name!r}] value", "string", value)
    if not is_safe_field_value(value):
        raise UnsafeHeaderMutation(f"{field_name}[{name!r}]: value contains CR, LF or NUL")
    return value


def _headers(field_name: str, raw: Any) -> tuple[Header, ...]:
    """``{name: str | [str]}`` or a list of such objects -> ordered (name, value) pairs."""
    if isinstance(raw, dict):
        objects = [raw]
    elif isinstance(raw, list):
        objects = raw
    else:
        raise _type_error(field_name, "object", raw)
    out: list[Header] = []
    names = _NAMES
    for obj in objects:
        if not isinstance(obj, dict):
            raise _type_error(field_name, "object", obj)
        for name, value in obj.items():
            key = names.get(name) if type(name) is str else None
            if key is None:
                key = _header_name(field_name, name)
            # A plain str value: _header_value's checks, inline (the common case).
            if (
                type(value) is str
                and "\r" not in value
                and "\n" not in value
                and "\x00" not in value
            ):
                out.append((key, value))
                continue
            values = value if isinstance(value, list) else [value]
            out.extend((key, _header_value(field_name, name, v)) for v in values)
    return tuple(out)


def _strings(field_name: str, raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise _type_error(field_name, "array", raw)
    for item in raw:
        if not isinstance(item, str):
            raise _type_error(f"{field_name} value", "string", item)
    return tuple(raw)


def _query_to_set(raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict):
        raise _type_error("query_parameters_to_set", "object", raw)
    out: list[tuple[str, str]] = []
    for key, value in raw.items():
        if isinstance(value, str):
            out.append((key, value))
        elif isinstance(value, list):
            for item in value:
                if not isinstance(item, str):
                    raise _type_error(f"query_parameters_to_set[{key!r}] value", "string", item)
                out.append((key, item))
        else:
            raise _type_error(f"query_parameters_to_set[{key!r}]", "string or array", value)
    return tuple(out)


def _http_status(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise _type_error("http_status", "number", raw)
    if isinstance(raw, float) and not raw.is_integer():
        raise InvalidDecision(f"http_status {raw!r} is not an integer")
    status = int(raw)
    if status not in _ENVOY_STATUSES:
        raise InvalidDecision(f"invalid HTTP status code {status}")
    return status


def _rate_limit(raw: Any) -> RateLimitRef:
    if not isinstance(raw, dict):
        raise _type_error("authz.rate_limit", "object", raw)
    tier, key = raw.get("tier"), raw.get("key")
    if not isinstance(tier, str):
        raise _type_error("authz.rate_limit.tier", "string", tier)
    if not isinstance(key, str):
        raise _type_error("authz.rate_limit.key", "string", key)
    if not tier or not key:
        raise InvalidDecision("authz.rate_limit.tier and authz.rate_limit.key must not be empty")
    requests_per_minute = _optional_int(raw, "requests_per_minute", minimum=-1)
    if requests_per_minute is None:
        raise _type_error("authz.rate_limit.requests_per_minute", "number", None)
    return RateLimitRef(
        tier=tier,
        key=key,
        requests_per_minute=requests_per_minute,
        burst=_optional_int(raw, "burst", minimum=1),
    )


def _optional_int(raw: Mapping[str, Any], name: str, *, minimum: int) -> int | None:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(f"authz.rate_limit.{name}", "number", value)
    if value != int(value) or value < minimum:
        raise InvalidDecision(f"authz.rate_limit.{name} must be an integer >= {minimum}")
    return int(value)


def _override_id(raw: Any) -> str:
    if not isinstance(raw, dict):
        raise _type_error("authz.override", "object", raw)
    override_id = raw.get("id")
    if not isinstance(override_id, str):
        raise _type_error("authz.override.id", "string", override_id)
    if not _OVERRIDE_ID.fullmatch(override_id):
        raise InvalidDecision(f"authz.override.id {override_id[:64]!r} is not an override id")
    return override_id


def _credential(raw: Any) -> CredentialRef:
    if not isinstance(raw, dict):
        raise _type_error("authz.credential", "object", raw)
    ref, header, fmt = raw.get("ref"), raw.get("header"), raw.get("format", "{secret}")
    if not isinstance(ref, str):
        raise _type_error("authz.credential.ref", "string", ref)
    if not is_secret_ref(ref):
        raise InvalidDecision(f"authz.credential.ref {ref[:64]!r} is not a secret reference")
    if not isinstance(header, str):
        raise _type_error("authz.credential.header", "string", header)
    if not isinstance(fmt, str):
        raise _type_error("authz.credential.format", "string", fmt)
    if fmt.count("{secret}") != 1 or not is_safe_field_value(fmt):
        raise InvalidDecision("authz.credential.format must contain {secret} exactly once")
    return CredentialRef(
        ref=ref, header=_header_name("authz.credential.header", header), format=fmt
    )


# A DNS name as the egress policy passes it (RFC 1035 letters, digits, '-', '.', and '_'
# found in real names), at most 253 characters.
_TUNNEL_HOST: Final = re.compile(r"[a-z0-9_]([a-z0-9_.-]{0,251}[a-z0-9_])?")


def _tunnel(raw: Any) -> TunnelRef:
    if not isinstance(raw, dict):
        raise _type_error("authz.tunnel", "object", raw)
    host, port = raw.get("host"), raw.get("port")
    if not isinstance(host, str):
        raise _type_error("authz.tunnel.host", "string", host)
    if not _TUNNEL_HOST.fullmatch(host):
        raise InvalidDecision(f"authz.tunnel.host {host[:64]!r} is not a lowercase DNS name")
    if isinstance(port, float) and port.is_integer():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidDecision(f"authz.tunnel.port {str(port)[:16]!r} is not a port (1-65535)")
    return TunnelRef(host, port)


def _code(name: str, raw: Any) -> str:
    """A stable snake_case code (``reason``, ``source``)."""
    if type(raw) is str and raw in _CODES:
        return raw
    if not isinstance(raw, str):
        raise _type_error(name, "string", raw)
    if not _REASON.fullmatch(raw):
        raise InvalidDecision(f"{name} {raw[:64]!r} is not a snake_case code")
    if type(raw) is str and len(_CODES) < _NAMES_MAX:
        _CODES.add(raw)  # at most 64 characters (_REASON)
    return raw


def _identity(raw: Any) -> Mapping[str, str]:
    if not isinstance(raw, dict):
        raise _type_error("authz.identity", "object", raw)
    for key, value in raw.items():
        if not isinstance(value, str):
            raise _type_error(f"authz.identity.{key}", "string", value)
    return MappingProxyType(dict(raw))


def parse_decision(result: Any) -> Decision:
    """Parse the ``result`` member of OPA's ``POST /v1/data`` answer.

    Returns a :class:`Decision`; raises :class:`InvalidDecision` for any other type at the
    top level, a missing or non-boolean ``allowed``, a field the outcome uses of the wrong
    type (as the plugin does), or a malformed extension under ``authz``."""
    if isinstance(result, bool):
        return Decision(allowed=result)
    if not isinstance(result, dict):
        raise InvalidDecision(f"illegal value for policy evaluation result: '{json_type(result)}'")
    if "allowed" not in result:
        raise InvalidDecision('unable to determine evaluation result: missing "allowed" key')
    allowed = result["allowed"]
    if not isinstance(allowed, bool):
        raise _type_error("allowed", "boolean", allowed)
    fields: dict[str, Any] = {"allowed": allowed, "form": "object"}
    unused = _ALLOW_ONLY if not allowed else _DENY_ONLY
    ignored = [name for name in unused if name in result]
    if "headers" in result:
        fields["headers"] = _headers("headers", result["headers"])
    if "dynamic_metadata" in result:
        if not isinstance(result["dynamic_metadata"], dict):
            raise _type_error("dynamic_metadata", "object", result["dynamic_metadata"])
        fields["dynamic_metadata"] = MappingProxyType(dict(result["dynamic_metadata"]))
    if allowed:
        _allow_fields(result, fields, ignored)
    else:
        _deny_fields(result, fields)
    extensions = result.get(EXTENSION_KEY)
    if isinstance(extensions, dict):
        _extension_fields(extensions, fields)
    elif EXTENSION_KEY in result:
        ignored.append(EXTENSION_KEY)
    return Decision(**fields, ignored=tuple(sorted(ignored)))


def _allow_fields(result: Mapping[str, Any], fields: dict[str, Any], ignored: list[str]) -> None:
    """The fields the plugin reads on an allow only, into ``fields``; a removal naming no
    possible header goes to ``ignored``."""
    if "response_headers_to_add" in result:
        fields["response_headers_to_add"] = _headers(
            "response_headers_to_add", result["response_headers_to_add"]
        )
    if "request_headers_to_remove" in result:
        names = _strings("request_headers_to_remove", result["request_headers_to_remove"])
        known = _NAMES
        lowered: list[str] = []
        for name in names:
            key = known.get(name) if type(name) is str else None
            if key is not None:
                lowered.append(key)
            elif is_token(name):
                lowered.append(_header_name("request_headers_to_remove", name))
        valid = tuple(lowered)
        if len(valid) != len(names):
            ignored.append("request_headers_to_remove")
        fields["request_headers_to_remove"] = valid
    if "query_parameters_to_set" in result:
        fields["query_parameters_to_set"] = _query_to_set(result["query_parameters_to_set"])
    if "query_parameters_to_remove" in result:
        fields["query_parameters_to_remove"] = _strings(
            "query_parameters_to_remove", result["query_parameters_to_remove"]
        )


def _deny_fields(result: Mapping[str, Any], fields: dict[str, Any]) -> None:
    """The fields the plugin reads on a deny only, into ``fields``."""
    if "body" in result:
        if not isinstance(result["body"], str):
            raise _type_error("body", "string", result["body"])
        fields["body"] = result["body"]
    if "http_status" in result:
        fields["http_status"] = _http_status(result["http_status"])


def _extension_fields(raw: Mapping[str, Any], fields: dict[str, Any]) -> None:
    """authz's extensions (the ``authz`` object), into ``fields``; strict: authz's own."""
    for name in ("reason", "source"):
        if name in raw:
            fields[name] = _code(f"{EXTENSION_KEY}.{name}", raw[name])
    if "rate_limit" in raw:
        fields["rate_limit"] = _rate_limit(raw["rate_limit"])
    if "identity" in raw:
        fields["identity"] = _identity(raw["identity"])
    if "credential" in raw:
        fields["credential"] = _credential(raw["credential"])
    if "override" in raw:
        fields["override_id"] = _override_id(raw["override"])
    if "tunnel" in raw:
        fields["tunnel"] = _tunnel(raw["tunnel"])
    if "cache_ttl_s" in raw:
        ttl = raw["cache_ttl_s"]
        if isinstance(ttl, bool) or not isinstance(ttl, int | float):
            raise _type_error(f"{EXTENSION_KEY}.cache_ttl_s", "number", ttl)
        fields["cache_ttl_s"] = max(0.0, float(ttl))
