"""CheckRequest -> OPA input document, exactly as opa-envoy-plugin builds it.

Follows opa-envoy-plugin ``envoyauth/request.go`` (``RequestToInput``) and
``envoyauth/protomap.go``: ``input.attributes`` is the CheckRequest's attributes with
protobuf JSON field names, only the fields Envoy set, integers as numbers, bytes as
base64, enums as numbers, messages (e.g. timestamps) as objects, ``Struct`` as plain JSON;
then ``version``, ``parsed_path``, ``parsed_query``, ``parsed_body``, ``truncated_body``
and ``source_principal``.

One addition (``docs/contract.md``): credentials never reach OPA in clear. Each configured
credential header is replaced in ``attributes.request.http.headers`` by
``"sha256:<hex>"`` (``"Bearer sha256:<hex>"`` for a schemed ``authorization``) and its
digest is listed in ``input.credentials``.

Everything here is a pure function of its arguments. Malformed parts of the request
(bad percent-encoding, a body that does not parse) raise :class:`RequestError`, which the
caller turns into a precise deny.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final
from urllib.parse import unquote_to_bytes

import orjson
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from authz.errors import RequestError

__all__ = [
    "INPUT_VERSION",
    "MAX_JSON_DEPTH",
    "build_input",
    "mask_credential",
    "message_to_input",
    "parse_body",
    "parse_path",
    "parse_query",
    "without_large_body",
]

INPUT_VERSION: Final = {"ext_authz": "v3", "encoding": "protojson"}
# Deepest JSON body nesting accepted (the input document adds a few levels around it).
MAX_JSON_DEPTH: Final = 200
_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_STRUCT_TYPES: Final = frozenset(
    {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
)
_SCHEMED_HEADERS: Final = frozenset({"authorization", "proxy-authorization"})
_SCHEME: Final = re.compile(r"^([!#$%&'*+.^_`|~0-9A-Za-z-]+) +([^ \t].*)$", re.DOTALL)
# RFC 9110 section 5.5: optional whitespace around a field value is SP and HTAB only;
# any other (Unicode) whitespace is part of the value.
_OWS: Final = " \t"


def message_to_input(message: Message) -> dict[str, Any]:
    """Convert a protobuf message to a JSON-ready dict the way the plugin's ``protomap``
    does: JSON field names, only populated fields, recursing into messages, maps and
    lists; ``Struct`` values become plain JSON; bytes become base64 strings."""
    descriptor = message.DESCRIPTOR
    if descriptor.full_name in _STRUCT_TYPES:
        result = MessageToDict(message)
        return result if isinstance(result, dict) else {"value": result}
    plans = _PLANS.get(descriptor)
    if plans is None:
        plans = _PLANS[descriptor] = {}
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        plan = plans.get(field.number)
        if plan is None:
            plan = plans[field.number] = _plan(field)
        name, shape, kind = plan
        if shape == _MAP:
            if kind == _SCALAR:
                out[name] = {str(k): v for k, v in value.items()}
            else:
                out[name] = {str(k): _convert(kind, v) for k, v in value.items()}
        elif shape == _LIST:
            out[name] = [_convert(kind, item) for item in value]
        else:
            out[name] = value if kind == _SCALAR else _convert(kind, value)
    return out


# How each field converts, worked out once per field (descriptor lookups such as
# GetOptions() cost more than the conversion): (JSON name, shape, kind of the values).
_SINGLE, _LIST, _MAP = 0, 1, 2
_SCALAR, _BYTES, _MESSAGE = 0, 1, 2
_PLANS: dict[Any, dict[int, tuple[str, int, int]]] = {}


def _plan(field: FieldDescriptor) -> tuple[str, int, int]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return field.json_name, _MAP, _kind(field.message_type.fields_by_name["value"])
    return field.json_name, _LIST if field.is_repeated else _SINGLE, _kind(field)


def _kind(field: FieldDescriptor) -> int:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _MESSAGE
    if field.type == FieldDescriptor.TYPE_BYTES:
        return _BYTES
    return _SCALAR


def _convert(kind: int, value: Any) -> Any:
    if kind == _MESSAGE:
        return message_to_input(value)
    if kind == _BYTES:
        return base64.b64encode(value).decode("ascii")
    return value


def _unescape(text: str, *, plus_as_space: bool, what: str) -> str:
    """Go's ``url.PathUnescape``/``QueryUnescape``: reject a ``%`` not followed by two hex
    digits; decode UTF-8 with replacement so the result is always JSON-encodable. The
    error names ``what`` (path, query) but never quotes the text: it may carry a key."""
    if _BAD_ESCAPE.search(text):
        raise RequestError(f"invalid percent-encoding in the {what}")
    if plus_as_space:
        text = text.replace("+", " ")
    return unquote_to_bytes(text).decode("utf-8", errors="replace")


def parse_path(path: str) -> list[str]:
    """``input.parsed_path``: the path before ``?``, percent-decoded, leading slashes
    trimmed, split on ``/`` (after decoding, as Go's ``url.PathUnescape`` then ``Split``):
    ``"//a/b%2Fc"`` -> ``["a", "b", "c"]``; ``"/"`` -> ``[""]``.
    Raises RequestError on invalid percent-encoding."""
    raw_path = path.split("?", 1)[0]
    return _unescape(raw_path, plus_as_space=False, what="path").lstrip("/").split("/")


def parse_query(query: str, what: str = "query") -> dict[str, list[str]]:
    """``input.parsed_query`` as Go's ``url.ParseQuery``: ``&``-separated pairs, ``+`` is a
    space, repeated keys collect values in order, a key without ``=`` maps to ``[""]``.
    Raises RequestError on a ``;`` separator or invalid percent-encoding (Go rejects both).
    """
    result: dict[str, list[str]] = {}
    for pair in query.split("&"):
        if not pair:
            continue
        if ";" in pair:
            raise RequestError(f"invalid semicolon separator in the {what}")
        key, _, value = pair.partition("=")
        result.setdefault(_unescape(key, plus_as_space=True, what=what), []).append(
            _unescape(value, plus_as_space=True, what=what)
        )
    return result


def _truncated(headers: Mapping[str, str], length: int) -> bool:
    declared = headers.get("content-length")
    if declared is None:
        return False
    try:
        expected = int(declared, 10)
    except ValueError:
        raise RequestError(f"invalid content-length {declared[:32]!r}") from None
    return expected != -1 and expected > length


def _json(payload: bytes, what: str) -> Any:
    """Strict JSON (RFC 8259, as Go's encoding/json: no NaN, no lone surrogates); invalid
    UTF-8 becomes U+FFFD first, as Go does. Nesting deeper than :data:`MAX_JSON_DEPTH`
    is refused: the input document must stay encodable (orjson stops at 255 levels)."""
    try:
        value = orjson.loads(payload.decode("utf-8", errors="replace"))
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"{what} is not valid JSON: {exc.msg}") from None
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise RequestError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return False


def _multipart(content_type: str, payload: bytes) -> dict[str, list[Any]] | None:
    parser = email.parser.BytesParser(policy=email.policy.HTTP)
    document = b"Content-Type: " + content_type.encode("latin-1", errors="replace") + b"\r\n\r\n"
    message = parser.parsebytes(document + payload)
    if message.get_param("boundary") is None:
        return None
    if message.defects:
        raise RequestError(f"malformed multipart body: {type(message.defects[0]).__name__}")
    values: dict[str, list[Any]] = {}
    for part in message.iter_parts():
        if part.get_content_disposition() != "form-data":
            continue
        name = part.get_param("name", header="content-disposition")
        if not name or not isinstance(name, str):
            continue
        raw = part.get_payload(decode=True)
        data = raw if isinstance(raw, bytes) else b""
        if "application/json" in part.get("content-type", ""):
            values.setdefault(name, []).append(_json(data, f"multipart field {name!r}"))
        else:
            values.setdefault(name, []).append(data.decode("utf-8", errors="replace"))
    return values


def parse_body(headers: Mapping[str, str], body: str, raw_body: bytes) -> tuple[Any, bool]:
    """``(input.parsed_body, input.truncated_body)`` for JSON, form-urlencoded and
    multipart bodies, as the plugin's ``getParsedBody``. A body is truncated when Envoy set
    ``x-envoy-auth-partial-body: true`` or ``content-length`` exceeds what was sent; then
    it is not parsed. Other content types give ``(None, False)``. Raises RequestError for
    a body that does not parse."""
    if headers.get("x-envoy-auth-partial-body") == "true":
        return None, True
    content_type = headers.get("content-type")
    if content_type is None:
        return None, False
    # Work on bytes: content-length counts bytes (Go's len(body)), and a multipart file
    # part may be binary.
    payload = body.encode("utf-8") if body else raw_body
    if not payload:
        return None, False
    if "application/json" in content_type:
        if _truncated(headers, len(payload)):
            return None, True
        return _json(payload, "request body"), False
    if "application/x-www-form-urlencoded" in content_type:
        if _truncated(headers, len(payload)):
            return None, True
        return parse_query(payload.decode("utf-8", errors="replace"), "form body"), False
    if "multipart/form-data" in content_type:
        if _truncated(headers, len(payload)):
            return None, True
        return _multipart(content_type, payload), False
    return None, False


def mask_credential(header: str, value: str) -> tuple[str, str]:
    """``(digest, masked value)`` for the credential header ``header`` = ``value``.

    The digest is the lowercase hex SHA-256 of the credential: for ``authorization`` and
    ``proxy-authorization`` in ``<scheme> <credentials>`` form (RFC 9110 section 11.4),
    of ``<credentials>``, and the masked value keeps the scheme (``Bearer sha256:<hex>``)
    so a policy can still check it; for any other header, of the whole trimmed value,
    masked as ``sha256:<hex>``. Only RFC 9110 optional whitespace (SP, HTAB) is trimmed:
    a key padded with U+00A0 or U+2003 hashes as the padded value, so it never matches."""
    credential = value.strip(_OWS)
    scheme = ""
    if header in _SCHEMED_HEADERS:
        match = _SCHEME.fullmatch(credential)
        if match:
            scheme, credential = match.group(1) + " ", match.group(2).strip(_OWS)
    digest = hashlib.sha256(credential.encode("utf-8")).hexdigest()
    return digest, f"{scheme}sha256:{digest}"


def build_input(
    request: external_auth_pb2.CheckRequest,
    credential_headers: Iterable[str],
    *,
    parse_request_body: bool = True,
) -> dict[str, Any]:
    """Build the OPA input document for ``request``.

    ``credential_headers`` are lowercase header names whose values are hashed (see module
    docstring). Returns a fresh JSON-ready dict; raises RequestError on a malformed path,
    query or body."""
    document = message_to_input(request)
    http = request.attributes.request.http
    path = http.path
    raw_path, _, raw_query = path.partition("?")
    document["version"] = dict(INPUT_VERSION)
    document["parsed_path"] = parse_path(raw_path)
    document["parsed_query"] = parse_query(raw_query)
    if parse_request_body:
        headers = http.headers
        document["parsed_body"], document["truncated_body"] = parse_body(
            headers, http.body, http.raw_body
        )
    principal = request.attributes.source.principal
    if principal:
        document["source_principal"] = principal
    document["credentials"] = _hash_credentials(document, frozenset(credential_headers))
    return document


def _hash_credentials(document: dict[str, Any], names: frozenset[str]) -> dict[str, str]:
    """Replace credential header values in ``document`` (both the ``headers`` map and
    Envoy's raw ``headerMap`` form) by their masked form; return ``{name: hex}``."""
    http = document.get("attributes", {}).get("request", {}).get("http", {})
    credentials: dict[str, str] = {}
    headers = http.get("headers")
    if headers:
        for name in names:
            value = headers.get(name)
            if value is not None:
                credentials[name], headers[name] = mask_credential(name, value)
    for entry in http.get("headerMap", {}).get("headers", ()):
        name = str(entry.get("key", "")).lower()
        if name not in names:
            continue
        if "rawValue" in entry:
            value = base64.b64decode(entry["rawValue"]).decode("utf-8", errors="replace")
        else:
            value = entry.get("value", "")
        digest, masked = mask_credential(name, value)
        credentials.setdefault(name, digest)
        entry.pop("rawValue", None)
        entry["value"] = masked
    return credentials


# The parts of an input document that carry the request body.
_BODY_FIELDS: Final = ("body", "rawBody")


def without_large_body(document: Mapping[str, Any], limit: int = 8192) -> Mapping[str, Any]:
    """``document`` itself when its request body is at most ``limit`` bytes; otherwise a
    copy without the body (``attributes.request.http.body``/``rawBody``, ``parsed_body``)
    and with ``body_omitted`` set to the body's size. For what is kept after the decision
    (decision cache, audit trail): a large body must not pin memory or disk per request."""
    http = document.get("attributes", {}).get("request", {}).get("http", {})
    size = sum(len(http.get(name, "")) for name in _BODY_FIELDS)
    if size <= limit:
        return document
    slim_http = {k: v for k, v in http.items() if k not in _BODY_FIELDS}
    request = {**document["attributes"]["request"], "http": slim_http}
    attributes = {**document["attributes"], "request": request}
    slim = {k: v for k, v in document.items() if k != "parsed_body"}
    slim["attributes"] = attributes
    slim["body_omitted"] = size
    return slim
