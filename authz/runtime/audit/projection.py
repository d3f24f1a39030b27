"""What an audit row keeps of a request: a documented, size-capped projection.

See README "Audit trail" for the table of what is kept.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from authz.core.headers import CREDENTIAL_HEADERS, TCHAR
from authz.core.record import DecisionRecord
from authz.runtime.config import (
    DEFAULT_AUDIT_BODY_MAX_BYTES,
    DEFAULT_AUDIT_HEADERS,
    DEFAULT_AUDIT_ROW_MAX_BYTES,
    DEFAULT_AUDIT_VALUE_MAX_BYTES,
)
from authz.runtime.logs import (
    SENSITIVE_HEADERS,
    SENSITIVE_QUERY_PARAMS,
    _redact_query,
    cut_to_bytes,
    redact_document,
    truncation_marker,
)

__all__ = [
    "Projection",
    "replay_input",
    "truncation_marker",
]

log = logging.getLogger(__name__)


# -- what a row keeps: the projection ------------------------------------------------------

# The input fields that carry the request body.
_BODY_FIELDS: Final = ("body", "rawBody")
# The input fields that carry the request headers (slim keeps only some).
_HEADER_FIELDS: Final = frozenset({"headers", "headerMap"})
# The columns besides body and decision_id: seq, kind, time and two 64-hex hashes.
_ROW_OVERHEAD: Final = 200
# A whole row that still does not fit keeps only these fields, cut to this size.
_CORE_FIELDS: Final = frozenset(
    {
        "type", "decision_id", "time", "decision_path", "revision", "mode", "result",
        "decision", "reason", "http_status", "request_id", "method", "path", "duration_ms",
        "opa_ms", "policy_result", "fail_open", "error", "policy", "input", "omitted",
        # who: what `keys health` and `audit replay` report by
        "key_id", "role", "tier", "sandbox_id", "service", "override_id", "source",
        "cached_from",
    }
)  # fmt: skip
_CORE_VALUE_MAX: Final = 128
# Shed in this order when a row is over its cap: (path in the input, name in "omitted").
_SHED_ORDER: Final = (
    (("parsed_body",), "parsed_body"),
    (("attributes", "request", "http", "body"), "body"),
    (("attributes", "request", "http", "rawBody"), "rawBody"),
    (("parsed_query",), "parsed_query"),
    (("parsed_path",), "parsed_path"),
    (("attributes", "metadataContext"), "metadataContext"),
    (("attributes", "routeMetadataContext"), "routeMetadataContext"),
    (("attributes", "source", "certificate"), "source.certificate"),
    (("attributes", "destination", "certificate"), "destination.certificate"),
    (("attributes", "tlsSession"), "tlsSession"),
    (("attributes", "request", "http", "headerMap"), "headerMap"),
    (("attributes", "request", "http", "headers"), "headers"),
    (("attributes", "contextExtensions"), "contextExtensions"),
)
_SCHEME_RE: Final = re.compile(rf"^({TCHAR}{{1,32}}) sha256:[0-9a-f]{{64}}$")


def _length(value: Any) -> int:
    """``len(value)``, or ``len(str(value))`` for a value with no length."""
    try:
        return len(value)
    except TypeError:
        return len(str(value))


def _capped(value: Any, limit: int) -> Any:
    """:func:`_cap_values`, skipping the walk when the whole of ``value`` fits in ``limit``
    bytes as JSON (then no string in it can be longer): most rows. ``value`` must be the
    caller's own copy (it may be returned as is)."""
    if len(orjson.dumps(value, default=str)) <= limit:
        return value
    return _cap_values(value, limit)


def _cap_values(value: Any, limit: int) -> Any:
    """A copy of the JSON ``value`` with every string (keys too) cut to ``limit`` bytes."""
    if isinstance(value, str):
        return cut_to_bytes(value, limit)
    if isinstance(value, dict):
        return {cut_to_bytes(str(k), limit): _cap_values(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_cap_values(item, limit) for item in value]
    return value


@dataclass(frozen=True, slots=True)
class Projection:
    """What an audit row keeps of a request (README "Audit trail" has the table).

    ``headers``: lowercase names kept, a trailing ``*`` making a prefix; a name in
    ``never`` (the credential headers) is never kept, whatever the list says. Kept
    headers are limited to a quarter of the row (exact names first, in list order, then
    prefix matches by name); the others are counted in ``headers_omitted``
    (``{"count", "bytes"}``: names plus values). ``body_max_bytes``: a request body up
    to this size is kept with its ``parsed_body``; a bigger one (or any, at 0) is left
    out and ``body_omitted`` records its size. ``value_max_bytes``: every string, key
    or value, is cut to this many UTF-8 bytes, ending in :func:`truncation_marker`.
    ``row_max_bytes``: the whole row (every column) stays within this; over it, input
    fields are shed in a fixed order (``_SHED_ORDER``), each named with its size in
    ``input.omitted``, then the whole input, then every non-core field. Credential
    digests (``input.credentials``) are kept: replay needs what the policy keyed on.
    """

    headers: tuple[str, ...] = DEFAULT_AUDIT_HEADERS
    body_max_bytes: int = DEFAULT_AUDIT_BODY_MAX_BYTES
    value_max_bytes: int = DEFAULT_AUDIT_VALUE_MAX_BYTES
    row_max_bytes: int = DEFAULT_AUDIT_ROW_MAX_BYTES
    never: frozenset[str] = frozenset(CREDENTIAL_HEADERS)

    def header_rank(self) -> tuple[dict[str, int], tuple[str, ...]]:
        """``({exact name: rank}, prefixes)`` of the allow-list, without ``never``."""
        exact = [h for h in self.headers if not h.endswith("*") and h not in self.never]
        prefixes = tuple(h[:-1] for h in self.headers if h.endswith("*"))
        return {name: i for i, name in enumerate(exact)}, prefixes


class _Projector:
    """Applies a :class:`Projection`: :meth:`slim` on the event loop (cheap: drops what a
    row never keeps, so a queued entry pins little), :meth:`body` on the writer thread."""

    def __init__(self, projection: Projection) -> None:
        self.p = projection
        self._exact, self._prefixes = projection.header_rank()
        self._never = projection.never

    def _keeps(self, name: str) -> bool:
        return name in self._exact or (
            bool(self._prefixes) and name.startswith(self._prefixes) and name not in self._never
        )

    def slim(self, document: Mapping[str, Any]) -> dict[str, Any]:
        """``document`` without the headers a row does not keep (counted) and without a
        body it does not keep (its size recorded); credential schemes noted for replay.
        :meth:`slim_charged`'s document."""
        return self.slim_charged(document)[0]

    def slim_charged(self, document: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
        """``(slim document, charge)``: :meth:`slim`'s document and the bytes of it a
        queued entry is charged for beyond its fixed overhead: the request path twice
        (``parsed_path`` and ``parsed_query`` repeat it), a kept body twice and a kept
        ``rawBody`` once, each kept header's name and value, each kept ``headerMap``
        entry's values (``str()`` of each); lengths in characters, counted without
        copying. A value with no length (not from :func:`authz.core.input.build_input`)
        counts as ``str()`` of it.

        One pass, on the event loop once per decision: plain dicts (what ``build_input``
        makes) are tested with ``type(x) is dict`` before the slower ``Mapping`` check
        any other mapping takes; the credential-scheme scan runs only with credentials
        and a value of that form. Raises what reading an odd document raises (the caller
        keeps the entry without its input)."""
        attributes = document.get("attributes", {})
        request = attributes.get("request", {})
        http = request.get("http", {})
        omitted_count = omitted_bytes = 0
        slim_http = {k: v for k, v in http.items() if k not in _HEADER_FIELDS}
        path = http.get("path", "")
        charge = 2 * (len(path) if type(path) is str else _length(path))
        headers = http.get("headers")
        headers_is_mapping = type(headers) is dict or isinstance(headers, Mapping)
        if headers_is_mapping:
            exact, prefixes, never = self._exact, self._prefixes, self._never
            kept = {}
            for name, value in headers.items():
                if name in exact or (prefixes and name.startswith(prefixes) and name not in never):
                    kept[name] = value
                    charge += len(name) + (len(value) if type(value) is str else _length(value))
                else:
                    omitted_count += 1
                    omitted_bytes += len(name) + len(value if type(value) is str else str(value))
            slim_http["headers"] = kept
        header_map = http.get("headerMap")
        if header_map is not None and (type(header_map) is dict or isinstance(header_map, Mapping)):
            entries = []
            for entry in header_map.get("headers", ()):
                name = (
                    str(entry.get("key", "")).lower()
                    if type(entry) is dict or isinstance(entry, Mapping)
                    else ""
                )
                if name and self._keeps(name):
                    entries.append(entry)
                    charge += sum(len(str(v)) for v in entry.values())
                else:
                    omitted_count += 1
                    omitted_bytes += len(orjson.dumps(entry, default=str))
            slim_http["headerMap"] = {**header_map, "headers": entries}
        body = http.get("body", "")
        raw_body = http.get("rawBody", "")
        size = len(body) + len(raw_body)
        keep_body = 0 < size <= self.p.body_max_bytes
        slim = dict(document)
        if keep_body:
            charge += 2 * len(body) + len(raw_body)
        else:
            for field in _BODY_FIELDS:
                slim_http.pop(field, None)
            slim.pop("parsed_body", None)
        slim["attributes"] = {**attributes, "request": {**request, "http": slim_http}}
        if size and not keep_body:
            slim["body_omitted"] = size
        if omitted_count:
            slim["headers_omitted"] = {"count": omitted_count, "bytes": omitted_bytes}
        credentials = document.get("credentials")
        if credentials and headers_is_mapping:
            schemes = self._schemes(credentials, headers)
            if schemes:
                slim["credential_schemes"] = schemes
        return slim, charge

    @staticmethod
    def _schemes(credentials: Any, headers: Mapping[str, Any]) -> dict[str, str]:
        """``{header: scheme}`` of masked ``<scheme> sha256:<hex>`` credentials (RFC 9110
        section 11.4), so replay can rebuild the masked header from the digest. The
        pattern is tried only on a value with `` sha256:`` 72 characters from its end
        (where a match has it): a plain ``sha256:<hex>`` digest, most, is not."""
        if not (type(credentials) is dict or isinstance(credentials, Mapping)):
            return {}
        schemes = {}
        for name in credentials:
            value = headers.get(name, "")
            if type(value) is not str:
                value = str(value)
            if value[-72:-64] != " sha256:":
                continue
            match = _SCHEME_RE.fullmatch(value)
            if match:
                schemes[name] = match.group(1)
        return schemes

    def _headers_within(self, http: dict[str, Any], omitted: dict[str, int]) -> None:
        """Keep headers (already value-capped) up to a quarter of the row: exact names in
        allow-list order first, then prefix matches by name."""
        headers = http.get("headers")
        if not isinstance(headers, dict) or not headers:
            return
        budget = self.p.row_max_bytes // 4
        order = sorted(headers, key=lambda n: (self._exact.get(n, len(self._exact)), n))
        kept: dict[str, Any] = {}
        used = 0
        for name in order:
            cost = len(name) + len(str(headers[name]).encode()) + 6
            if used + cost > budget:
                omitted["count"] = omitted.get("count", 0) + 1
                omitted["bytes"] = omitted.get("bytes", 0) + cost - 6
                continue
            kept[name] = headers[name]
            used += cost
        http["headers"] = kept

    def body(self, record: DecisionRecord) -> str:
        """The row body (canonical JSON) for ``record`` (its document already slimmed),
        within ``row_max_bytes`` together with the other columns.

        :meth:`_body_slow`'s text, most rows without its walks (test_audit proves it on a
        corpus): the input is copied once (orjson out and back, as ``redact_document``
        does) and used as it is when :meth:`_input_as_is` shows nothing in it would be
        redacted, capped or dropped, and the row is written once when it is within its
        budget (``_fit`` would return it as written); anything else goes the slow way.
        What orjson cannot write raises here as it does there (the same write of the
        same values)."""
        limit = self.p.value_max_bytes
        body = _row_head(record, limit)
        if record.document is not None:
            document = self._input_as_is(record.document)
            if document is None:
                return self._body_slow(record)
            body["input"] = document
        budget = self.p.row_max_bytes - _ROW_OVERHEAD - len(record.decision_id.encode())
        row = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)  # raises as _fit would
        if len(row) > budget:
            return self._body_slow(record)
        return row.decode()

    def _input_as_is(self, document: Mapping[str, Any]) -> dict[str, Any] | None:
        """A JSON copy of ``document`` equal to what :meth:`_body_slow` stores of it
        (redacted, capped, headers within their quarter), or None when that is not
        certain. Equal, not the same order: every row is written with sorted keys.

        - the copy is plain JSON (dict, list, str, int, float, bool, None);
        - :func:`_redacts_nothing`, so ``redact_document`` would change no value;
        - no string (key or value) over ``value_max_bytes`` when the whole copy is within
          it (a string is no longer in UTF-8 than in the JSON), else capped as before;
        - the headers' cost within the quarter of the row, so ``_headers_within`` keeps
          every one (it only reorders them), and ``headers_omitted`` a dict or falsy
          (``_headers_within`` writes back ``dict()`` of it)."""
        raw = orjson.dumps(document)  # raises as redact_document would
        copy: dict[str, Any] = orjson.loads(raw)
        if not _redacts_nothing(copy):
            return None
        limit = self.p.value_max_bytes
        if len(raw) > limit:
            copy = _cap_values(copy, limit)
        http = copy.get("attributes", {}).get("request", {}).get("http")
        if not isinstance(http, dict):
            return copy
        headers = http.get("headers")
        if isinstance(headers, dict):
            cost = sum(len(name) + len(str(value).encode()) + 6 for name, value in headers.items())
            if cost > self.p.row_max_bytes // 4:
                return None
        omitted = copy.get("headers_omitted")
        if omitted and type(omitted) is not dict:
            return None
        return copy

    def _body_slow(self, record: DecisionRecord) -> str:
        """:meth:`body` by walking and copying every value: redacted, capped, headers
        within their quarter, the row fitted. :meth:`body` takes it whenever its shortcut
        cannot prove the same bytes."""
        limit = self.p.value_max_bytes
        body = _row_head(record, limit)
        if record.document is not None:
            document: dict[str, Any] = _capped(redact_document(record.document), limit)
            http = document.get("attributes", {}).get("request", {}).get("http")
            if isinstance(http, dict):
                omitted = dict(document.get("headers_omitted") or {})
                self._headers_within(http, omitted)
                if omitted:
                    document["headers_omitted"] = omitted
            body["input"] = document
        budget = self.p.row_max_bytes - _ROW_OVERHEAD - len(record.decision_id.encode())
        return _fit(body, budget)


def _row_head(record: DecisionRecord, limit: int) -> dict[str, Any]:
    """The row body without its input: the record's log fields and the policy's own
    result, every string capped to ``limit`` bytes."""
    body = record.log_fields()
    body["policy"] = (
        {"allowed": record.policy_allowed, "reason": record.policy_reason}
        if record.policy_allowed is not None
        else None
    )
    capped: dict[str, Any] = _capped(body, limit)
    return capped


def _redacts_nothing(document: Any) -> bool:
    """True when :func:`~authz.runtime.logs.redact_document` would change no value of the
    plain JSON ``document`` (a copy orjson made): no sensitive query parameter in
    ``http.path`` or the ``:path`` header, no :data:`~authz.runtime.logs.SENSITIVE_HEADERS`
    name in ``headers`` or ``headerMap`` (nor a ``:path`` entry there, whose ``rawValue``
    would be decoded), none in ``parsed_query``. Conservative: a digest-form credential
    header, which stays as it is, takes the slow way too. Reads ``document`` as
    ``redact_document`` does, so it raises where that would."""
    http = document.get("attributes", {}).get("request", {}).get("http", {})
    path = http.get("path")
    if type(path) is str and _redact_query(path) != path:
        return False
    headers = http.get("headers")
    if type(headers) is dict:
        for name, value in headers.items():
            if name in SENSITIVE_HEADERS:
                return False
            if name == ":path" and type(value) is str and _redact_query(value) != value:
                return False
    for entry in http.get("headerMap", {}).get("headers", ()):
        if type(entry) is dict:
            name = str(entry.get("key", "")).lower()
            if name == ":path" or name in SENSITIVE_HEADERS:
                return False
    query = document.get("parsed_query")
    return not (
        type(query) is dict and any(name.lower() in SENSITIVE_QUERY_PARAMS for name in query)
    )


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _fit(body: dict[str, Any], budget: int) -> str:
    """``body`` as canonical JSON within ``budget`` bytes: input fields shed in
    ``_SHED_ORDER`` (named with their size in ``input.omitted``), then the whole input
    (``omitted.input``), then every non-core field (``omitted.fields``), then core values
    cut to ``_CORE_VALUE_MAX``, and last only the outcome (``omitted.row``; the decision
    id and time are columns of the row anyway)."""
    text = _dumps(body)
    if len(text.encode()) <= budget:
        return text
    document = body.get("input")
    if isinstance(document, dict):
        shed: dict[str, int] = document.setdefault("omitted", {})
        for path, name in _SHED_ORDER:
            *parents, leaf = path
            holder: Any = document
            for key in parents:
                holder = holder.get(key) if isinstance(holder, dict) else None
            if not isinstance(holder, dict) or leaf not in holder:
                continue
            shed[name] = len(_dumps(holder.pop(leaf)).encode())
            text = _dumps(body)
            if len(text.encode()) <= budget:
                return text
        body["input"] = None
        body["omitted"] = {"input": len(_dumps(document).encode())}
        text = _dumps(body)
        if len(text.encode()) <= budget:
            return text
    extra = {k: body.pop(k) for k in list(body) if k not in _CORE_FIELDS}
    omitted = body.setdefault("omitted", {})
    if extra:
        omitted["fields"] = len(_dumps(extra).encode())
    text = _dumps(body)
    if len(text.encode()) <= budget:
        return text
    text = _dumps(_cap_values(body, _CORE_VALUE_MAX))
    if len(text.encode()) <= budget:
        return text
    # Only fixed-size fields are left (row_max_bytes is at least 4096).
    minimal: dict[str, Any] = {
        k: body[k] for k in ("type", "result", "decision", "http_status") if k in body
    }
    minimal["omitted"] = {"row": len(text.encode())}
    return _dumps(minimal)


def replay_input(document: Mapping[str, Any]) -> dict[str, Any]:
    """A stored input made ready for replay: each credential header the policy saw is put
    back in its masked form (``sha256:<hex>``, ``<scheme> sha256:<hex>`` for a scheme
    recorded in ``credential_schemes``) from the digests in ``credentials``; no secret
    is involved, the row only ever held digests."""
    copy: dict[str, Any] = orjson.loads(orjson.dumps(document))
    credentials = copy.get("credentials")
    http = copy.get("attributes", {}).get("request", {}).get("http")
    if not isinstance(credentials, dict) or not isinstance(http, dict):
        return copy
    schemes = copy.get("credential_schemes") or {}
    headers = http.setdefault("headers", {})
    for name, digest in credentials.items():
        scheme = schemes.get(name) if isinstance(schemes, dict) else None
        headers[name] = f"{scheme} sha256:{digest}" if scheme else f"sha256:{digest}"
    return copy


def _safe_body(projector: _Projector, record: DecisionRecord) -> bytes:
    try:
        return projector.body(record).encode()
    except Exception as exc:  # never lose the entry (or the batch) over one odd value
        log.exception("audit body for %s not serializable", record.decision_id)
        fallback = {"decision_id": record.decision_id, "audit_error": type(exc).__name__}
        return orjson.dumps(fallback, option=orjson.OPT_SORT_KEYS, default=str)
