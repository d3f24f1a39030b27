"""Structured logging: every line authz writes is one JSON object.

Two streams share the format: operational logs (``{"time", "level", "logger", "msg"}``
plus any ``extra`` fields) and the decision log (:class:`DecisionLog`, one line per decision
on stdout) in one of two schemas (``AUTHZ_DECISION_LOG_FORMAT``):

- ``authz``: ``{"type": "decision", ...}`` with :meth:`DecisionRecord.log_fields`;
- ``opa``: OPA's decision-log event as OPA's console decision logger writes it
  (https://www.openpolicyagent.org/docs/management-decision-logs; the event is
  ``EventV1`` in OPA's ``v1/plugins/logs/plugin.go``, the console line adds ``level``,
  ``msg``, ``time`` and ``type``), with authz's own fields under ``custom.authz``: the
  event's slot for a wrapping project's data (OPA's CHANGELOG, "Data API Request/Response
  Metadata", #8570), so they survive any tool that reads events into OPA's own type.

Credentials never reach a log line: records carry digests only, :func:`redact_headers`
masks the header values named in :data:`SENSITIVE_HEADERS` for any code that must log
headers, and an input or result written to the decision log goes through the same
masking as the audit trail (:func:`redact_document`), each masked value named in the
event's ``masked``; a JWT (RFC 7519) is masked wherever it appears in a decision line.
Every decision line is bounded in bytes: every string is cut to a cap, a body is left out
unless small, and a line still over its cap sheds input fields (named in ``erased``) in
:data:`INPUT_SHED_ORDER`, as the audit projection does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import logging
import re
import sys
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import IO, Any, Final, Protocol
from urllib.parse import unquote, unquote_plus

import orjson

from authz import __version__
from authz.core.headers import CREDENTIAL_HEADERS, TOKEN
from authz.core.record import DecisionRecord
from authz.core.secret import MASK
from authz.runtime.config import (
    DECISION_LOG_FORMATS,
    DEFAULT_AUDIT_BODY_MAX_BYTES,
    DEFAULT_AUDIT_ROW_MAX_BYTES,
    DEFAULT_AUDIT_VALUE_MAX_BYTES,
    DEFAULT_DECISION_LOG_FORMAT,
    Settings,
)

__all__ = [
    "DECISION_LOGGER",
    "INPUT_SHED_ORDER",
    "OPA_EVENT_TYPE",
    "SENSITIVE_HEADERS",
    "SENSITIVE_QUERY_PARAMS",
    "DecisionLog",
    "EventUpload",
    "JsonFormatter",
    "configure",
    "cut_to_bytes",
    "opa_event",
    "redact_document",
    "redact_headers",
    "truncation_marker",
]

DECISION_LOGGER: Final = "authz.core.decision"
# The one credential list (authz.core.headers), plus the response-side cookie.
SENSITIVE_HEADERS: Final = frozenset(CREDENTIAL_HEADERS) | {"set-cookie"}
# What authz.core.input.mask_credential puts in place of a credential: safe to store, and
# replay needs it. Anything else in a sensitive header is masked.
_DIGEST_FORM: Final = re.compile(rf"(?:{TOKEN} )?sha256:[0-9a-f]{{64}}")
# Query parameters that commonly carry credentials; their values are masked wherever an
# input document is stored (audit trail).
SENSITIVE_QUERY_PARAMS: Final = frozenset(
    {
        "api_key",
        "apikey",
        "api-key",
        "key",
        "token",
        "access_token",
        "id_token",
        "refresh_token",
        "client_secret",
        "secret",
        "password",
        "sig",
        "signature",
        "x-api-key",
        "code",
    }
)
# Attributes every LogRecord has; anything else came from ``extra=`` and is logged.
_STANDARD_ATTRS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)))


def redact_headers(headers: Mapping[str, str], extra: Iterable[str] = ()) -> dict[str, str]:
    """A copy of ``headers`` with the values of sensitive headers (and ``extra`` names,
    e.g. injected credential headers) replaced by ``'**********'``. Names compare
    case-insensitively."""
    hidden = SENSITIVE_HEADERS | {name.lower() for name in extra}
    return {k: (MASK if k.lower() in hidden else v) for k, v in headers.items()}


def _redact_query(target: str) -> str:
    path, sep, query = target.partition("?")
    if not sep:
        return target
    parts = []
    for pair in query.split("&"):
        name, eq, _ = pair.partition("=")
        hidden = eq and unquote_plus(name).lower() in SENSITIVE_QUERY_PARAMS
        parts.append(f"{name}={MASK}" if hidden else pair)
    return f"{path}?{'&'.join(parts)}"


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and _DIGEST_FORM.fullmatch(value) is not None


def redact_document(document: Mapping[str, Any], extra: Iterable[str] = ()) -> dict[str, Any]:
    """A copy of an input document safe to store: the values of sensitive query
    parameters (:data:`SENSITIVE_QUERY_PARAMS`) masked in ``attributes.request.http.path``,
    the ``:path`` header and ``parsed_query``, and the value of every
    :data:`SENSITIVE_HEADERS` header (and ``extra`` names, e.g. ``AUTHZ_CREDENTIAL_HEADERS``)
    masked in ``headers`` and ``headerMap`` unless it is the digest form
    :func:`authz.core.input.mask_credential` writes (``sha256:<hex>``, with an optional auth
    scheme). The original is not modified."""
    return _redact(document, extra)[0]


def _pointer(*parts: object) -> str:
    """An RFC 6901 JSON Pointer to ``parts`` (``~`` and ``/`` escaped)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _redact(
    document: Mapping[str, Any], extra: Iterable[str] = ()
) -> tuple[dict[str, Any], list[str]]:
    """:func:`redact_document`, and the JSON Pointers (from the document's root) of every
    value it changed."""
    hidden = SENSITIVE_HEADERS | {name.lower() for name in extra}
    masked: list[str] = []
    copy: dict[str, Any] = orjson.loads(orjson.dumps(document))
    http = copy.get("attributes", {}).get("request", {}).get("http", {})
    where = ("attributes", "request", "http")
    if isinstance(http.get("path"), str):
        redacted = _redact_query(http["path"])
        if redacted != http["path"]:
            http["path"] = redacted
            masked.append(_pointer(*where, "path"))
    headers = http.get("headers")
    if isinstance(headers, dict):
        for name, value in list(headers.items()):
            if name == ":path" and isinstance(value, str):
                headers[name] = _redact_query(value)
            elif name in hidden and not _is_digest(value):
                headers[name] = MASK
            if headers[name] != value:
                masked.append(_pointer(*where, "headers", name))
    # Envoy's raw form (encode_raw_headers): [{"key", "value" | "rawValue" (base64)}].
    for index, entry in enumerate(http.get("headerMap", {}).get("headers", ())):
        if not isinstance(entry, dict):
            continue
        name = str(entry.get("key", "")).lower()
        if name != ":path" and name not in hidden:
            continue
        raw = entry.pop("rawValue", None)
        value = (
            base64.b64decode(raw).decode("utf-8", "replace") if raw else str(entry.get("value", ""))
        )
        if name == ":path":
            entry["value"] = _redact_query(value)
        elif not _is_digest(value):
            entry["value"] = MASK
        if entry.get("value") != value or raw:
            masked.append(_pointer(*where, "headerMap", "headers", index, "value"))
    query = copy.get("parsed_query")
    if isinstance(query, dict):
        for name in query:
            if name.lower() in SENSITIVE_QUERY_PARAMS:
                query[name] = [MASK for _ in query[name]]
                masked.append(_pointer("parsed_query", name))
    return copy, masked


class JsonFormatter(logging.Formatter):
    """Formats a LogRecord as one JSON line: time (RFC 3339, UTC), level, logger, msg,
    the ``extra`` fields, and ``exc`` (traceback text) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


# What OPA's console decision logger writes besides the event (plugin.go, logEvent).
OPA_EVENT_TYPE: Final = "openpolicyagent.org/decision_logs"
_OPA_MSG: Final = "Decision Log"
# Input fields left out of a decision line over its byte cap, in this order (the audit
# projection's order, authz.runtime.audit.projection): as paths in the input document.
INPUT_SHED_ORDER: Final[tuple[tuple[str, ...], ...]] = (
    ("parsed_body",),
    ("attributes", "request", "http", "body"),
    ("attributes", "request", "http", "rawBody"),
    ("parsed_query",),
    ("parsed_path",),
    ("attributes", "metadataContext"),
    ("attributes", "routeMetadataContext"),
    ("attributes", "source", "certificate"),
    ("attributes", "destination", "certificate"),
    ("attributes", "tlsSession"),
    ("attributes", "request", "http", "headerMap"),
    ("attributes", "request", "http", "headers"),
    ("attributes", "contextExtensions"),
)
_BODY_PATHS: Final = INPUT_SHED_ORDER[:3]
# The authz line's own fields: anything else in it is the policy's identity.
_AUTHZ_FIELDS: Final = frozenset(
    {
        "type", "decision_id", "time", "decision_path", "revision", "mode", "result",
        "decision", "policy_result", "reason", "http_status", "request_id", "method", "path",
        "duration_ms", "opa_ms", "fail_open", "tier", "override_id", "source", "cached_from",
        "error",
    }
)  # fmt: skip
# Fields of the authz line that OPA's event already carries in its own schema.
_IN_OPA_SCHEMA: Final = frozenset(
    {"type", "decision_id", "time", "decision_path", "revision", "duration_ms", "opa_ms", "error"}
)
# A line still over its cap once every optional part is gone keeps its values this short.
_CORE_VALUE_MAX: Final = 128
# Deeper JSON than this (a policy's result) is cut: orjson refuses to write past 255.
_MAX_DEPTH: Final = 64
_TOO_DEEP: Final = "...[nested too deep]"


def truncation_marker(size: int) -> str:
    """What replaces the end of a value cut to its cap (the decision log's and the audit
    trail's): names the original size (bytes)."""
    return f"...[truncated from {size} bytes]"


def cut_to_bytes(text: str, limit: int) -> str:
    """``text`` if at most ``limit`` UTF-8 bytes, else its longest prefix that fits with
    the :func:`truncation_marker` appended (a cut never splits a character)."""
    if len(text) * 4 <= limit:
        return text
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text
    marker = truncation_marker(len(raw))
    return raw[: max(0, limit - len(marker))].decode("utf-8", "ignore") + marker


def _cap(value: Any, limit: int, depth: int = 0) -> Any:
    """A copy of the JSON ``value`` with every string (keys too) cut to ``limit`` bytes
    and anything nested deeper than ``_MAX_DEPTH`` replaced by a marker string."""
    if isinstance(value, str):
        return cut_to_bytes(value, limit)
    if depth >= _MAX_DEPTH and isinstance(value, dict | list | tuple):
        return _TOO_DEEP
    if isinstance(value, dict):
        return {cut_to_bytes(str(k), limit): _cap(v, limit, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_cap(item, limit, depth + 1) for item in value]
    return value


def _mask_result(
    value: Any, hidden: frozenset[str], masked: list[str], at: tuple[object, ...], depth: int = 0
) -> Any:
    """A copy of a policy's result with the value of every credential header it names
    masked, as a map entry (``{"authorization": "..."}``) or an Envoy-style pair
    (``{"key": "authorization", "value": "..."}``), unless a digest; each masked value's
    pointer is appended to ``masked``. A policy may set a header from the credential it saw
    (a JWT passed through): the log never shows it."""
    if depth >= _MAX_DEPTH:
        return value  # cut by _cap
    if isinstance(value, list):
        return [
            _mask_result(item, hidden, masked, (*at, i), depth + 1) for i, item in enumerate(value)
        ]
    if not isinstance(value, dict):
        return value
    pair = isinstance(value.get("key"), str) and value["key"].lower() in hidden
    copy: dict[str, Any] = {}
    for key, item in value.items():
        secret = (pair and key == "value") or (isinstance(key, str) and key.lower() in hidden)
        if secret and isinstance(item, str) and not _is_digest(item):
            copy[key] = MASK
            masked.append(_pointer(*at, key))
        elif secret and isinstance(item, list) and all(isinstance(v, str) for v in item):
            copy[key] = [v if _is_digest(v) else MASK for v in item]
            if copy[key] != item:
                masked.append(_pointer(*at, key))
        else:
            copy[key] = _mask_result(item, hidden, masked, (*at, key), depth + 1)
    return copy


# A JWT wherever it is (RFC 7519: a compact JWS, header.payload.signature, or a JWE of
# five parts; each base64url, the header a JSON object, so starting "eyJ").
_JWT: Final = re.compile(r"eyJ[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*){2,4}")


def _mask_jwts(value: Any, masked: list[str], at: tuple[object, ...], depth: int = 0) -> Any:
    """A copy of the JSON ``value`` with every JWT in a string (a key or a value, alone or
    inside text) replaced by the mask; each changed value's pointer appended to ``masked``.
    A bearer JWT passed through to the policy (``io.jwt.*``) can land anywhere a client or
    a policy puts it, under any name."""
    if isinstance(value, str):
        if "eyJ" not in value:
            return value
        masked_text = _JWT.sub(MASK, value)
        if masked_text != value:
            masked.append(_pointer(*at))
        return masked_text
    if depth >= _MAX_DEPTH:
        return value  # cut by _cap
    if isinstance(value, list):
        return [_mask_jwts(v, masked, (*at, i), depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {
            _JWT.sub(MASK, k) if "eyJ" in k else k: _mask_jwts(v, masked, (*at, k), depth + 1)
            for k, v in value.items()
        }
    return value


def _rfc3339(timestamp: float, *, fraction: bool) -> str:
    """UTC RFC 3339 as Go writes it: ``time.RFC3339Nano`` (up to nine fraction digits,
    trailing zeros dropped; OPA's ``timestamp``) or ``time.RFC3339`` (whole seconds; the
    console logger's ``time``). The record's clock gives microseconds."""
    micros = round(timestamp * 1_000_000)
    seconds, rest = divmod(micros, 1_000_000)
    text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    digits = f"{rest * 1000:09d}".rstrip("0") if fraction else ""
    return f"{text}.{digits}Z" if digits else f"{text}Z"


def _peer_address(peer: str) -> str:
    """A gRPC peer name (``ipv4:127.0.0.1:5000``, ``ipv6:%5B::1%5D:5000``; gRPC's naming
    doc) as OPA writes a client address (Go's ``RemoteAddr``: ``127.0.0.1:5000``,
    ``[::1]:5000``); any other name (``unix:...``) as it is."""
    scheme, sep, rest = peer.partition(":")
    if sep and scheme in ("ipv4", "ipv6"):
        return unquote(rest)
    return peer


def _erase(document: dict[str, Any], path: tuple[str, ...]) -> bool:
    """Remove ``path`` from ``document``; True when it was there."""
    holder: Any = document
    for key in path[:-1]:
        holder = holder.get(key) if isinstance(holder, dict) else None
    if isinstance(holder, dict) and path[-1] in holder:
        del holder[path[-1]]
        return True
    return False


def _dumps(line: Mapping[str, Any]) -> bytes:
    return orjson.dumps(line, option=orjson.OPT_SORT_KEYS)


def opa_event(
    record: DecisionRecord,
    *,
    labels: Mapping[str, str],
    req_id: int,
    credential_headers: Iterable[str] = (),
    value_max_bytes: int = DEFAULT_AUDIT_VALUE_MAX_BYTES,
    body_max_bytes: int = DEFAULT_AUDIT_BODY_MAX_BYTES,
) -> dict[str, Any]:
    """``record`` as OPA's console decision logger writes an event (the module docstring
    names the schema), before the line's byte cap (:class:`DecisionLog` applies it).

    ``decision_id``, ``path`` (the decision path), ``bundles`` (``{name: {"revision"}}``; a
    record that only knows one revision string gets OPA's older top-level ``revision``),
    ``input`` (masked by :func:`redact_document` plus ``credential_headers``; a body over
    ``body_max_bytes`` left out), ``result`` (OPA's answer, credential header values in it
    masked; in both, any JWT masked), ``requested_by`` (the gRPC peer), ``timestamp`` (RFC
    3339, nanosecond syntax), ``labels``, ``metrics`` (``timer_server_handler_ns``: the whole Check;
    ``timer_authz_opa_request_ns``: the OPA round trip, absent for a cached decision;
    ``counter_authz_decision_cache_hit``), ``req_id`` (a counter from 1 per process),
    ``error`` (authz's detail when no decision could be made), ``masked``/``erased`` (JSON
    Pointers into the event), and ``custom.authz``: the authz line's fields that OPA's
    schema has no place for (``reason``, ``mode``, ``result``/``decision``/``policy_result``
    as ``allow``/``deny``, ``http_status``, ``fail_open``, ``cached_from``: the decision a
    cache hit reused, ...), the policy's identity fields nested under ``identity``. Every
    string is cut to ``value_max_bytes`` UTF-8 bytes. Absent values are left out, as OPA
    leaves them out."""
    hidden = SENSITIVE_HEADERS | {name.lower() for name in credential_headers}
    fields = record.log_fields()
    authz: dict[str, Any] = {
        k: v for k, v in fields.items() if k in _AUTHZ_FIELDS and k not in _IN_OPA_SCHEMA
    }
    identity = {k: v for k, v in fields.items() if k not in _AUTHZ_FIELDS}
    if identity:
        authz["identity"] = _mask_jwts(identity, [], ())
    metrics: dict[str, int] = {
        "timer_server_handler_ns": round(record.duration_s * 1e9),
        "counter_authz_decision_cache_hit": int(record.cached_from is not None),
    }
    if record.opa_duration_s > 0 and record.cached_from is None:
        metrics["timer_authz_opa_request_ns"] = round(record.opa_duration_s * 1e9)
    event: dict[str, Any] = {
        "type": OPA_EVENT_TYPE,
        "level": "info",
        "msg": _OPA_MSG,
        "time": _rfc3339(record.timestamp, fraction=False),
        "labels": dict(labels),
        "decision_id": record.decision_id,
        "path": record.decision_path,
        "timestamp": _rfc3339(record.timestamp, fraction=True),
        "metrics": metrics,
        "req_id": req_id,
        "custom": {"authz": authz},
    }
    if record.revisions:
        event["bundles"] = {
            name: ({"revision": rev} if rev else {}) for name, rev in record.revisions.items()
        }
    elif record.revision:
        event["revision"] = record.revision
    if record.peer:
        event["requested_by"] = _peer_address(record.peer)
    if record.error is not None:
        event["error"] = record.error
    masked: list[str] = []
    erased: list[str] = []
    if record.document is not None:
        document = dict(record.document)
        http = document.get("attributes", {}).get("request", {}).get("http", {})
        size = sum(len(http.get(name, "")) for name in ("body", "rawBody"))
        if size > body_max_bytes:  # left out before the copy: it may be large
            document["attributes"] = {
                **document["attributes"],
                "request": {
                    **document["attributes"]["request"],
                    "http": {k: v for k, v in http.items() if k not in ("body", "rawBody")},
                },
            }
            for path in _BODY_PATHS:
                if _erase(document, path) or path[-1] in http:
                    erased.append(_pointer("input", *path))
        redacted, pointers = _redact(document, hidden)
        masked.extend(_pointer("input") + p for p in pointers)
        event["input"] = _mask_jwts(redacted, masked, ("input",))
    if record.opa_result is not None:
        result = _mask_result(record.opa_result, hidden, masked, ("result",))
        event["result"] = _mask_jwts(result, masked, ("result",))
    event = _cap(event, value_max_bytes)
    if masked:  # a pointer names a key, and a client chooses header names
        event["masked"] = _cap(masked, value_max_bytes)
    if erased:
        event["erased"] = erased
    return event


def _unmask(event: dict[str, Any], pointer: str) -> None:
    """Drop the ``masked`` pointers into ``pointer``: it is no longer in the event."""
    masked = [p for p in event.pop("masked", ()) if not p.startswith(pointer + "/")]
    if masked:
        event["masked"] = masked


def _fit_opa(event: dict[str, Any], limit: int) -> bytes:
    """``event`` as one JSON line of at most ``limit`` bytes (newline excluded): input
    fields erased in :data:`INPUT_SHED_ORDER`, then the whole input, the result and the
    identity (each erased pointer listed in ``erased``), then every value cut to
    ``_CORE_VALUE_MAX``, and last only the event's fixed fields."""
    line = _dumps(event)
    if len(line) <= limit:
        return line
    erased: list[str] = event.setdefault("erased", [])
    document = event.get("input")
    if isinstance(document, dict):
        for path in INPUT_SHED_ORDER:
            if _erase(document, path):
                erased.append(_pointer("input", *path))
                _unmask(event, _pointer("input", *path))
                line = _dumps(event)
                if len(line) <= limit:
                    return line
    authz = event.get("custom", {}).get("authz", {})
    for pointer, holder, key in (
        ("/input", event, "input"),
        ("/result", event, "result"),
        ("/custom/authz/identity", authz, "identity"),
    ):
        if key in holder:
            del holder[key]
            erased[:] = [p for p in erased if not p.startswith(pointer + "/")] + [pointer]
            _unmask(event, pointer)
            line = _dumps(event)
            if len(line) <= limit:
                return line
    event.pop("masked", None)
    line = _dumps(_cap(event, _CORE_VALUE_MAX))
    if len(line) <= limit:
        return line
    keep = ("type", "level", "msg", "time", "decision_id", "timestamp", "req_id", "erased")
    minimal = {k: event[k] for k in keep if k in event}
    minimal["custom"] = {
        "authz": {k: authz[k] for k in ("result", "decision", "http_status") if k in authz}
    }
    return _dumps(_cap(minimal, _CORE_VALUE_MAX))


def _fit_authz(fields: dict[str, Any], limit: int) -> bytes:
    """The authz line within ``limit`` bytes: the policy's identity fields left out first
    (their size in ``omitted.fields``), then every value cut to ``_CORE_VALUE_MAX``, last
    only the outcome."""
    line = orjson.dumps(fields)
    if len(line) <= limit:
        return line
    extra = {k: fields.pop(k) for k in list(fields) if k not in _AUTHZ_FIELDS}
    fields["omitted"] = {"fields": len(orjson.dumps(extra))}
    line = orjson.dumps(fields)
    if len(line) <= limit:
        return line
    line = orjson.dumps(_cap(fields, _CORE_VALUE_MAX))
    if len(line) <= limit:
        return line
    keep = ("type", "decision_id", "time", "result", "decision", "http_status")
    minimal = {k: fields[k] for k in keep if k in fields}
    minimal["omitted"] = {"row": len(line)}
    return orjson.dumps(_cap(minimal, _CORE_VALUE_MAX))


def _authz_line_slow(fields: dict[str, Any], value_max: int, line_max: int) -> bytes:
    """The authz line for ``fields`` (:meth:`DecisionRecord.log_fields`): JWTs masked,
    values capped, the line fitted. :func:`_authz_line` takes it whenever its shortcut
    cannot prove the same bytes."""
    return _fit_authz(_cap(_mask_jwts(fields, [], ()), value_max), line_max)


# Values orjson writes as one JSON scalar, exactly these types (a subclass may serialize
# otherwise): nothing in them for _cap's depth limit to cut.
_SCALARS: Final = frozenset({str, int, float, bool, type(None)})


def _any_over(fields: dict[str, Any], value_max: int) -> bool:
    """True when a key or string value of ``fields`` is over ``value_max`` UTF-8 bytes."""
    quarter = value_max // 4  # a string of at most this many characters fits in any case
    return any(
        type(text) is str
        and len(text) > quarter
        and len(text.encode("utf-8", "surrogatepass")) > value_max
        for text in itertools.chain(fields, fields.values())
    )


def _authz_line(fields: dict[str, Any], value_max: int, line_max: int) -> bytes:
    """:func:`_authz_line_slow`'s bytes, most lines without its walks: ``fields`` written
    once is the line when nothing in it would change (test_logs proves it on a corpus):

    - every value is a :data:`_SCALARS` type, so nothing is nested for ``_cap`` to cut;
    - no ``eyJ`` in the line, so ``_mask_jwts`` finds no JWT: every string (key or value)
      is in the line as a substring, escapes only added for ``"``, ``\\`` and control
      characters (orjson writes every other character as itself);
    - no key or string value over ``value_max`` UTF-8 bytes (``cut_to_bytes``'s own test),
      certain when the whole line is within it (no string is longer in the line);
    - the line within ``line_max``, so ``_fit_authz`` returns it as written.

    Anything orjson cannot write (a key not a string, an integer beyond 64 bits, a lone
    surrogate) goes the slow way, which raises or copes as it always did."""
    try:
        line = orjson.dumps(fields)
    except orjson.JSONEncodeError:
        return _authz_line_slow(fields, value_max, line_max)
    if (
        len(line) > line_max
        or b"eyJ" in line
        or not _SCALARS.issuperset(map(type, fields.values()))
        or (len(line) > value_max and _any_over(fields, value_max))
    ):
        return _authz_line_slow(fields, value_max, line_max)
    return line


# The console line's own fields (plugin.go, logEvent): not part of an uploaded event.
_CONSOLE_FIELDS: Final = ("type", "level", "msg", "time")


class EventUpload(Protocol):
    """Where :class:`DecisionLog` hands OPA decision-log events for upload
    (:class:`authz.runtime.decision_upload.DecisionUploader`)."""

    def wants(self, record: DecisionRecord) -> bool:
        """False when a drop rule leaves ``record`` out of the upload."""
        ...

    def add(self, event: bytes) -> None:
        """Take one event (OPA's ``EventV1`` as JSON, masked and byte-capped); never blocks."""
        ...


class DecisionLog:
    """A :class:`~authz.core.record.DecisionSink` writing one JSON line per decision to
    ``stream`` (default stdout), in ``format`` (``authz``: :meth:`DecisionRecord.log_fields`;
    ``opa``: :func:`opa_event`). Writes never raise; the stream is flushed once per
    event-loop turn (every line of a turn out before the loop next waits), at once when
    no loop runs, and by :meth:`flush` (shutdown).

    Bounded as the audit trail is (README "Decision log"): every string is cut to
    ``value_max_bytes`` UTF-8 bytes, a request body over ``body_max_bytes`` is left out of
    the OPA event's input, and a line stays within ``line_max_bytes`` (newline excluded).
    ``credential_headers`` are masked besides :data:`SENSITIVE_HEADERS`. ``labels`` are
    OPA's ``labels``: ``id`` (this process, a random UUID unless given), ``version``
    (authz's) and ``app`` (``authz``).

    ``upload`` (when given) receives every decision it :meth:`~EventUpload.wants` as OPA's
    event (:meth:`upload_event`: the OPA line without the console's own fields), whatever
    ``format`` the line has; ``console=False`` writes no line (upload only)."""

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        format: str = DEFAULT_DECISION_LOG_FORMAT,
        credential_headers: Iterable[str] = (),
        value_max_bytes: int = DEFAULT_AUDIT_VALUE_MAX_BYTES,
        body_max_bytes: int = DEFAULT_AUDIT_BODY_MAX_BYTES,
        line_max_bytes: int = DEFAULT_AUDIT_ROW_MAX_BYTES,
        instance_id: str | None = None,
        upload: EventUpload | None = None,
        console: bool = True,
    ) -> None:
        if format not in DECISION_LOG_FORMATS:
            raise ValueError(
                f"decision log format {format!r}: expected one of {DECISION_LOG_FORMATS}"
            )
        self._stream = stream if stream is not None else sys.stdout
        self._format = format
        self._credential_headers = tuple(credential_headers)
        self._value_max = value_max_bytes
        self._body_max = body_max_bytes
        self._line_max = line_max_bytes
        self._labels = {
            "id": instance_id if instance_id is not None else str(uuid.uuid4()),
            "version": __version__,
            "app": "authz",
        }
        self._req_ids = itertools.count(1)
        self._upload = upload
        self._console = console
        # The loop a flush is scheduled on (None: none pending), see _flush_soon.
        self._flush_on: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        stream: IO[str] | None = None,
        *,
        upload: EventUpload | None = None,
    ) -> DecisionLog:
        """The decision log ``settings`` describe: ``decision_log_format``, the credential
        headers, and the audit trail's caps (``audit_value_max_bytes``,
        ``audit_body_max_bytes``, ``audit_row_max_bytes``)."""
        return cls(
            stream,
            format=settings.decision_log_format,
            credential_headers=settings.credential_headers,
            value_max_bytes=settings.audit_value_max_bytes,
            body_max_bytes=settings.audit_body_max_bytes,
            line_max_bytes=settings.audit_row_max_bytes,
            upload=upload,
            console=settings.decision_log,
        )

    def line(self, record: DecisionRecord) -> bytes:
        """The line for ``record``, without its newline. An input or result JSON cannot
        hold as orjson writes it (an integer beyond 64 bits) is left out (``erased``)."""
        return self._line_as(record, self._format)

    def _line_as(self, record: DecisionRecord, format: str) -> bytes:
        try:
            return self._line(record, format)
        except orjson.JSONEncodeError:
            if record.document is None and record.opa_result is None:
                raise
        line = self._line(dataclasses.replace(record, document=None, opa_result=None), format)
        if format != "opa":
            return line
        event = orjson.loads(line)
        left_out = [
            pointer
            for pointer, part in (("/input", record.document), ("/result", record.opa_result))
            if part is not None
        ]
        event["erased"] = [*event.get("erased", ()), *left_out]
        return _fit_opa(event, self._line_max)

    def _line(self, record: DecisionRecord, format: str) -> bytes:
        if format == "opa":
            event = opa_event(
                record,
                labels=self._labels,
                req_id=next(self._req_ids),
                credential_headers=self._credential_headers,
                value_max_bytes=self._value_max,
                body_max_bytes=self._body_max,
            )
            return _fit_opa(event, self._line_max)
        return _authz_line(record.log_fields(), self._value_max, self._line_max)

    def _flush_soon(self) -> None:
        """Flush once per event-loop turn (every line written in it, before the loop next
        waits for I/O), not once per line: each flush of a pipe is a system call. Called
        from no running loop (a thread, a script), flush now."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._flush_on is not loop:
            self._flush_on = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Flush the stream: every line :meth:`record` wrote reaches it. Never raises (a
        closed or full stream is ignored, as :meth:`record` ignores it)."""
        self._flush_on = None
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def upload_event(self, record: DecisionRecord, line: bytes | None = None) -> bytes:
        """``record`` as the OPA event an upload carries: OPA's ``EventV1`` (the console
        line without ``type``, ``level``, ``msg`` and ``time``), masked and capped as the
        OPA line is. ``line``: the OPA-format line already made for ``record``, if any."""
        if line is None or self._format != "opa":
            line = self._line_as(record, "opa")
        event = orjson.loads(line)
        for name in _CONSOLE_FIELDS:
            event.pop(name, None)
        return _dumps(event)

    def record(self, record: DecisionRecord) -> None:
        """Write :meth:`line` for ``record`` (unless ``console`` is off), and hand its
        :meth:`upload_event` to ``upload`` when that wants it."""
        line: bytes | None = None
        if self._console:
            try:
                line = self.line(record)
                self._stream.write(line.decode() + "\n")
            except (OSError, ValueError):  # closed or full stream: keep serving
                pass
            else:
                self._flush_soon()
        if self._upload is not None and self._upload.wants(record):
            # An unencodable record: the console line has the story.
            with contextlib.suppress(OSError, ValueError):
                self._upload.add(self.upload_event(record, line))


def configure(level: str, stream: IO[str] | None = None) -> None:
    """Route the root logger to ``stream`` (default stderr) as JSON lines at ``level``."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
