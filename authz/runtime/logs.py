"""Structured logging: every line authz writes is one JSON object.

Two streams share the format: operational logs (``{"time", "level", "logger", "msg"}``
plus any ``extra`` fields) and the decision log (logger ``authz.core.decision``, one line per
decision, ``{"type": "decision", ...}`` with :meth:`DecisionRecord.log_fields`).

Credentials never reach a log line: records carry digests only, and
:func:`redact_headers` masks the header values named in :data:`SENSITIVE_HEADERS` for any
code that must log headers.
"""

from __future__ import annotations

import base64
import logging
import re
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import IO, Any, Final
from urllib.parse import unquote_plus

import orjson

from authz.core.headers import CREDENTIAL_HEADERS, TOKEN
from authz.core.record import DecisionRecord
from authz.core.secret import MASK

__all__ = [
    "DECISION_LOGGER",
    "SENSITIVE_HEADERS",
    "SENSITIVE_QUERY_PARAMS",
    "DecisionLog",
    "JsonFormatter",
    "configure",
    "redact_document",
    "redact_headers",
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


def redact_document(document: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an input document safe to store: the values of sensitive query
    parameters (:data:`SENSITIVE_QUERY_PARAMS`) masked in ``attributes.request.http.path``,
    the ``:path`` header and ``parsed_query``, and the value of every
    :data:`SENSITIVE_HEADERS` header masked in ``headers`` and ``headerMap`` unless it is
    the digest form :func:`authz.core.input.mask_credential` writes (``sha256:<hex>``, with an
    optional auth scheme). The original is not modified."""
    copy: dict[str, Any] = orjson.loads(orjson.dumps(document))
    http = copy.get("attributes", {}).get("request", {}).get("http", {})
    if isinstance(http.get("path"), str):
        http["path"] = _redact_query(http["path"])
    headers = http.get("headers")
    if isinstance(headers, dict):
        for name, value in list(headers.items()):
            if name == ":path" and isinstance(value, str):
                headers[name] = _redact_query(value)
            elif name in SENSITIVE_HEADERS and not _is_digest(value):
                headers[name] = MASK
    # Envoy's raw form (encode_raw_headers): [{"key", "value" | "rawValue" (base64)}].
    for entry in http.get("headerMap", {}).get("headers", ()):
        if not isinstance(entry, dict):
            continue
        name = str(entry.get("key", "")).lower()
        if name != ":path" and name not in SENSITIVE_HEADERS:
            continue
        raw = entry.pop("rawValue", None)
        value = (
            base64.b64decode(raw).decode("utf-8", "replace") if raw else str(entry.get("value", ""))
        )
        if name == ":path":
            entry["value"] = _redact_query(value)
        elif not _is_digest(value):
            entry["value"] = MASK
    query = copy.get("parsed_query")
    if isinstance(query, dict):
        for name in query:
            if name.lower() in SENSITIVE_QUERY_PARAMS:
                query[name] = [MASK for _ in query[name]]
    return copy


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


class DecisionLog:
    """A :class:`~authz.core.record.DecisionSink` writing one JSON line per decision to
    ``stream`` (default stdout). Writes are line-buffered and never raise."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout

    def record(self, record: DecisionRecord) -> None:
        """Write ``record.log_fields()`` as one line."""
        try:
            self._stream.write(orjson.dumps(record.log_fields()).decode() + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # closed or full stream: keep serving
            pass


def configure(level: str, stream: IO[str] | None = None) -> None:
    """Route the root logger to ``stream`` (default stderr) as JSON lines at ``level``."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
