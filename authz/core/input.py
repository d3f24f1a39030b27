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
import binascii
import codecs
import enum
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final
from urllib.parse import unquote_to_bytes

import orjson
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError, Message
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from authz.core.errors import ConfigError, DecisionPathError, RequestError
from authz.core.headers import TOKEN

__all__ = [
    "INPUT_VERSION",
    "MAX_BASIC_CREDENTIALS",
    "MAX_BODY_BYTES",
    "MAX_FORM_FIELDS",
    "MAX_JSON_DEPTH",
    "MAX_MULTIPART_HEADER_BYTES",
    "MAX_MULTIPART_PARTS",
    "MAX_PART_HEADERS",
    "MAX_PART_HEADER_BYTES",
    "MAX_QUERY_FIELDS",
    "PARSE_BODY_EXTENSION",
    "BodyParsing",
    "GrpcDescriptors",
    "build_input",
    "is_bearer_jwt",
    "mask_credential",
    "message_to_input",
    "parse_body",
    "parse_path",
    "parse_proxy_basic",
    "parse_query",
    "without_large_body",
]

INPUT_VERSION: Final = {"ext_authz": "v3", "encoding": "protojson"}
# The context_extensions key an Envoy route sets to "true" to have its body parsed.
PARSE_BODY_EXTENSION: Final = "parse_body"


class BodyParsing(enum.StrEnum):
    """Where ``input.parsed_body`` is filled (``AUTHZ_PARSE_BODY``). Envoy sends a body
    only where ``with_request_body`` is set; authz parses it:

    - ``route``: only where the route's ``context_extensions`` has ``parse_body: "true"``;
    - ``always``: wherever Envoy sent one (opa-envoy-plugin's behaviour);
    - ``never``: nowhere.

    Where a body is not parsed, neither ``parsed_body`` nor ``truncated_body`` is in the
    input (as the plugin's ``skip_request_body_parse``); the raw body still is.
    """

    ROUTE = "route"
    ALWAYS = "always"
    NEVER = "never"


# Deepest JSON body nesting accepted. Go's decoder reads 10,000 levels; orjson encodes
# 255, and the deepest body (a multipart JSON part) sits 4 levels deep in the input
# document, which sits up to 6 levels deep in what authz encodes (the OPA request, the
# decision cache key, the audit row).
MAX_JSON_DEPTH: Final = 245
# Body parsing runs before any credential is checked, so every parser is linear in its
# input and capped (issue 13): a hostile body costs a small constant multiple of a normal
# one. A longer body is not parsed (truncated_body); more parts, fields or part headers
# than below are a RequestError. MAX_BODY_BYTES is the max_request_bytes of the
# with_request_body a route sets to send its body (infra/envoy/envoy-gateway.yaml, README).
MAX_BODY_BYTES: Final = 64 * 1024
MAX_MULTIPART_PARTS: Final = 100
# Go's url.ParseQuery (1.26) refuses more than 10,000 parameters, counted as the "&"
# separators plus one, so the plugin refuses such a query or form body; authz refuses
# exactly the same ones. The count is one pass over the text before any parsing; parsing
# 10,000 fields costs about 3 ms (docs/performance.md).
MAX_FORM_FIELDS: Final = 10_000
MAX_QUERY_FIELDS: Final = 10_000
# Per multipart part: header lines, and bytes of one header line (name, colon, value).
MAX_PART_HEADERS: Final = 8
MAX_PART_HEADER_BYTES: Final = 1024
# Header names and values of all parts together: header parameters cost about 0.4 us per
# byte to parse, data about 1 ns (docs/performance.md, "Request bodies").
MAX_MULTIPART_HEADER_BYTES: Final = 16 * 1024
# python-multipart logs a WARNING for every malformed body it sees: a caller without a
# key could fill the log. The RequestError's message reaches the decision log instead.
logging.getLogger("python_multipart.multipart").setLevel(logging.ERROR)
_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_STRUCT_TYPES: Final = frozenset(
    {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
)
_SCHEMED_HEADERS: Final = frozenset({"authorization", "proxy-authorization"})
_SCHEME: Final = re.compile(rf"^({TOKEN}) +([^ \t].*)$", re.DOTALL)
# RFC 9110 section 5.5: optional whitespace around a field value is SP and HTAB only;
# any other (Unicode) whitespace is part of the value.
_OWS: Final = " \t"


def _go_replace(error: UnicodeError) -> tuple[str, int]:
    """Codec error handler: one U+FFFD for the first invalid byte, resume at the next,
    as Go's ``utf8.DecodeRune`` (size 1 for every invalid byte) and so encoding/json."""
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return "\ufffd", error.start + 1


# Decode with errors=GO_REPLACE: invalid UTF-8 reads as Go renders it, one U+FFFD per byte
# (Python's "replace" gives one per maximal bad sequence).
GO_REPLACE: Final = "authz-go-replace"
codecs.register_error(GO_REPLACE, _go_replace)


def message_to_input(message: Message) -> dict[str, Any]:
    """Convert a protobuf message to a JSON-ready dict the way the plugin's ``protomap``
    does: JSON field names, only populated fields, recursing into messages, maps and
    lists; ``Struct`` values become plain JSON; bytes become base64 strings."""
    descriptor = message.DESCRIPTOR
    if descriptor.full_name in _STRUCT_TYPES:
        result = _integral_numbers(MessageToDict(message))
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
    if plus_as_space and "+" in text:
        text = text.replace("+", " ")
    if "%" not in text:
        return text
    if _BAD_ESCAPE.search(text):
        raise RequestError(f"invalid percent-encoding in the {what}")
    return unquote_to_bytes(text).decode("utf-8", errors=GO_REPLACE)


def parse_path(path: str) -> list[str]:
    """``input.parsed_path``: the path before ``?``, percent-decoded, leading slashes
    trimmed, split on ``/`` (after decoding, as Go's ``url.PathUnescape`` then ``Split``):
    ``"//a/b%2Fc"`` -> ``["a", "b", "c"]``; ``"/"`` -> ``[""]``.
    Raises RequestError on invalid percent-encoding."""
    raw_path = path.split("?", 1)[0]
    return _unescape(raw_path, plus_as_space=False, what="path").lstrip("/").split("/")


def parse_query(
    query: str, what: str = "query", max_fields: int | None = None
) -> dict[str, list[str]]:
    """``input.parsed_query`` as Go's ``url.ParseQuery``: ``&``-separated pairs, ``+`` is a
    space, repeated keys collect values in order, a key without ``=`` maps to ``[""]``.
    Raises RequestError on a ``;`` separator or invalid percent-encoding (Go rejects both),
    or when the ``&`` separators plus one exceed ``max_fields`` (None: no cap), as Go 1.26
    counts its 10,000 limit.
    """
    if max_fields is not None and query.count("&") + 1 > max_fields:
        raise RequestError(f"more than {max_fields} fields in the {what}")
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


def _integral_numbers(value: Any) -> Any:
    """``value`` (a ``Struct`` as JSON) with integral doubles as integers (``-0.0`` as 0),
    as the plugin's input has them: ``Struct`` numbers are doubles, and Go writes an
    integral float64 without a fraction (``1``, not ``1.0``). Only below 2**53, where a
    double is an exact integer."""
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, dict):
        return {k: _integral_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral_numbers(v) for v in value]
    return value


# Go's strconv.ParseInt(s, 10, 64), which the plugin applies to content-length: a sign,
# then digits, leading zeros allowed. Its significant digits are matched apart so that
# int() never sees more than an int64's 19 (Python's int() refuses over 4300 digits
# with a ValueError, and costs quadratic time below that).
_CONTENT_LENGTH: Final = re.compile(r"([+-]?)0*([0-9]{1,19})?", re.ASCII)
_INT64_MAX: Final = 2**63 - 1


def _truncated(headers: Mapping[str, str], length: int) -> bool:
    declared = headers.get("content-length")
    if declared is None:
        return False
    match = _CONTENT_LENGTH.fullmatch(declared)
    expected = None
    if match is not None and declared.lstrip("+-"):
        expected = int(match.group(1) + (match.group(2) or "0"))
    if expected is None or not -_INT64_MAX - 1 <= expected <= _INT64_MAX:
        raise RequestError(f"invalid content-length {declared[:32]!r}")
    return expected != -1 and expected > length


def _json(payload: bytes, what: str) -> Any:
    """Read JSON as the plugin does (OPA's ``util.UnmarshalJSON``: Go's encoding/json with
    ``UseNumber``), so OPA receives the same value: strict RFC 8259 (no NaN, no trailing
    comma); invalid UTF-8 and escaped lone surrogates read as U+FFFD (one per byte, as
    Go); a body holding a number orjson would not read exactly (a float, an integer beyond
    64 bits) has every number as an ``orjson.Fragment`` of its text. Refused, unlike Go:
    nesting deeper than :data:`MAX_JSON_DEPTH` (the documents holding the body must stay
    encodable: orjson stops at 255 levels) and a number beyond the IEEE double range
    (``1e400``: orjson, which reads back what authz stores, refuses it)."""
    text = payload.decode("utf-8", errors=GO_REPLACE)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = None  # 1e400 or a lone surrogate, which orjson refuses, or invalid JSON
    else:
        deep, floats = _walk(value, MAX_JSON_DEPTH, fix_surrogates=False)
        if deep:
            raise RequestError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
        # A float's text may differ from what orjson writes: read again, exactly (the
        # same structure, so its depth is checked and it holds no lone surrogate).
        return _exact_json(text, what) if floats else value
    value = _exact_json(text, what)
    if _walk(value, MAX_JSON_DEPTH, fix_surrogates=True)[0]:
        raise RequestError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str) and not value.isascii():
        value = _SURROGATE.sub("\ufffd", value)
    try:
        # What authz keeps of an input (the audit trail, read back by its verification)
        # is read with orjson, which refuses a number beyond the IEEE double range.
        orjson.loads(orjson.dumps(value))
    except orjson.JSONDecodeError:
        raise RequestError(f"{what} holds a number beyond the IEEE double range") from None
    return value


# A lone surrogate (U+D800..U+DFFF) is what json.loads leaves of an unpaired escape.
_SURROGATE: Final = re.compile("[\\ud800-\\udfff]")


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _exact_json(text: str, what: str) -> Any:
    """``text`` read with the stdlib parser (linear, C): every number as an
    ``orjson.Fragment`` of its text (so it reaches OPA exactly as written, like Go's
    ``json.Number``). Raises RequestError for invalid JSON or nesting past the parser's
    recursion limit."""
    try:
        return json.loads(
            text, parse_float=orjson.Fragment, parse_int=orjson.Fragment, parse_constant=_not_json
        )
    except RecursionError:
        raise RequestError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise RequestError(f"{what} is not valid JSON: {message}") from None


def _walk(value: Any, limit: int, *, fix_surrogates: bool) -> tuple[bool, bool]:
    """``(deeper than limit, holds a float)`` for a parsed JSON value, in one iterative
    pass. With ``fix_surrogates``, every lone surrogate in a string or key below the top
    is replaced by U+FFFD in place, as Go's decoder reads an unpaired ``\\uD800``."""
    floats = type(value) is float
    stack: list[tuple[Any, int]] = [(value, 1)] if type(value) in (dict, list) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True, floats
        if fix_surrogates:
            _fix_surrogates(node)
        for child in node.values() if type(node) is dict else node:
            kind = type(child)
            if kind is dict or kind is list:
                stack.append((child, depth + 1))
            elif kind is float:
                floats = True
    return False, floats


def _has_surrogate(text: object) -> bool:
    return type(text) is str and not text.isascii() and _SURROGATE.search(text) is not None


def _fix_surrogates(node: dict[str, Any] | list[Any]) -> None:
    """Replace lone surrogates by U+FFFD in ``node``'s keys and string members."""
    if isinstance(node, list):
        for index, child in enumerate(node):
            if _has_surrogate(child):
                node[index] = _SURROGATE.sub("\ufffd", child)
        return
    if any(_has_surrogate(key) for key in node):
        # A fixed key may now equal another: rebuilt in order, the last one wins, as the
        # last of duplicate keys does in Go's decoder.
        items = list(node.items())
        node.clear()
        for key, child in items:
            node[_SURROGATE.sub("\ufffd", key) if _has_surrogate(key) else key] = child
    for key, child in node.items():
        if _has_surrogate(child):
            node[key] = _SURROGATE.sub("\ufffd", child)


class _Part:
    """One multipart part as the parser streams it: its headers, then its data."""

    __slots__ = ("data", "header_name", "header_value", "headers")

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.data = bytearray()


def _multipart(content_type: str, payload: bytes) -> dict[str, list[Any]] | None:
    """``parsed_body`` of a multipart/form-data body (RFC 7578), as the plugin's Go
    ``mime/multipart`` reading: each part whose Content-Disposition is ``form-data`` with a
    ``name`` gives a value (JSON when the part's Content-Type says application/json, else
    text, invalid UTF-8 replaced); quoted-printable parts are decoded. None when the
    Content-Type has no boundary. Bodies whose first delimiter line ends in a bare LF are
    read in LF mode, as Go does. Raises RequestError for a malformed body or one over the
    part and header caps (MAX_MULTIPART_PARTS, MAX_PART_HEADERS, MAX_PART_HEADER_BYTES,
    which also bounds ``content_type``, and MAX_MULTIPART_HEADER_BYTES).

    python-multipart (the parser Starlette uses) does the work: a state machine that
    finds delimiters with ``bytes.find``, so the cost is linear in the body."""
    if len(content_type) > MAX_PART_HEADER_BYTES:
        raise RequestError(f"multipart Content-Type is over {MAX_PART_HEADER_BYTES} bytes")
    _, params = parse_options_header(content_type.encode("latin-1", errors="replace"))
    boundary = params.get(b"boundary")
    if boundary is None:
        return None
    if not boundary:
        raise RequestError("multipart body has an empty boundary")
    delimiter = b"--" + boundary
    if not payload.startswith(delimiter):
        # A preamble before the first delimiter line is ignored (RFC 2046 section 5.1.1).
        found = payload.find(b"\n" + delimiter)
        if found < 0:
            raise RequestError("multipart body has no delimiter line")
        payload = payload[found + 1 :]
    end_of_line = len(delimiter)
    lf_mode = payload[end_of_line : end_of_line + 1] == b"\n"
    if lf_mode:
        # Go's multipart.Reader switches to bare-LF lines when the first delimiter line
        # ends in LF. Doubling every LF into CRLF is undone exactly on each value below.
        payload = payload.replace(b"\n", b"\r\n")
    parts: list[_Part] = []
    ended = False
    header_bytes = 0

    def count_header_bytes(size: int) -> None:
        nonlocal header_bytes
        header_bytes += size
        if header_bytes > MAX_MULTIPART_HEADER_BYTES:
            raise RequestError(
                f"multipart part headers exceed {MAX_MULTIPART_HEADER_BYTES} bytes in total"
            )

    def on_part_begin() -> None:
        if len(parts) >= MAX_MULTIPART_PARTS:
            raise RequestError(f"multipart body has more than {MAX_MULTIPART_PARTS} parts")
        parts.append(_Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        count_header_bytes(end - start)
        parts[-1].header_name += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        count_header_bytes(end - start)
        parts[-1].header_value += data[start:end]

    def on_header_end() -> None:
        part = parts[-1]
        name = part.header_name.decode("latin-1").lower()
        part.headers.setdefault(name, part.header_value.decode("utf-8", errors=GO_REPLACE))
        part.header_name.clear()
        part.header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data += data[start:end]

    def on_end() -> None:
        nonlocal ended
        ended = True

    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": on_part_begin,
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
                "on_part_data": on_part_data,
                "on_end": on_end,
            },
            max_header_count=MAX_PART_HEADERS,
            max_header_size=MAX_PART_HEADER_BYTES,
        )
        parser.write(payload)
        parser.finalize()
    except FormParserError as exc:
        raise RequestError(f"malformed multipart body: {exc}") from None
    if not ended:
        raise RequestError("multipart body has no closing delimiter")
    values: dict[str, list[Any]] = {}
    for part in parts:
        name = _form_name(part.headers.get("content-disposition", ""))
        if not name:
            continue
        data = bytes(part.data)
        if lf_mode:
            data = data.replace(b"\r\n", b"\n")
        encoding = part.headers.get("content-transfer-encoding", "").strip(_OWS).lower()
        if encoding == "quoted-printable":
            data = binascii.a2b_qp(data)
        if "application/json" in part.headers.get("content-type", ""):
            values.setdefault(name, []).append(_json(data, f"multipart field {name!r}"))
        else:
            values.setdefault(name, []).append(data.decode("utf-8", errors=GO_REPLACE))
    return values


def _form_name(disposition: str) -> str:
    """The ``name`` parameter of a ``form-data`` Content-Disposition (RFC 7578 section
    4.2), as Go's ``Part.FormName``; ``""`` for any other disposition or none."""
    kind, params = parse_options_header(disposition.encode("utf-8"))
    if kind != b"form-data":
        return ""
    return params.get(b"name", b"").decode("utf-8", errors=GO_REPLACE)


class GrpcDescriptors:
    """The message types of gRPC services, from a FileDescriptorSet (``protoc
    --descriptor_set_out``, with ``--include_imports``), as the plugin's
    ``proto-descriptor`` option loads them: with one, a gRPC request body
    (``application/grpc``, sent by Envoy as ``raw_body`` with ``pack_as_bytes``) becomes
    ``input.parsed_body``, the request message in protobuf JSON."""

    __slots__ = ("_pool",)

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    @classmethod
    def from_bytes(cls, data: bytes, key: str = "AUTHZ_PROTO_DESCRIPTOR") -> GrpcDescriptors:
        """Load a serialized FileDescriptorSet. Raises ConfigError naming ``key`` when it is
        not one, misses a file another imports, or declares no service."""
        files = descriptor_pb2.FileDescriptorSet()
        pool = descriptor_pool.DescriptorPool()
        try:
            files.ParseFromString(data)
            for file in files.file:
                pool.Add(file)
            services = [pool.FindFileByName(file.name).services_by_name for file in files.file]
        except (DecodeError, TypeError, KeyError, ValueError) as exc:
            raise ConfigError(f"{key}: not a usable descriptor set: {exc}") from None
        if not any(services):
            raise ConfigError(f"{key}: the descriptor set declares no service")
        return cls(pool)

    def request_type(self, service: str, method: str) -> Any:
        """The message class of ``service``'s ``method`` request (full names, as in the
        gRPC path ``/<service>/<method>``); None when the set has no such unary or
        server-streaming method (a client-streaming request is not one message)."""
        try:
            found = self._pool.FindServiceByName(service)
        except KeyError:
            return None
        rpc = found.methods_by_name.get(method)
        if rpc is None or rpc.client_streaming:
            return None
        return message_factory.GetMessageClass(rpc.input_type)


# gRPC over HTTP/2, Length-Prefixed-Message: a compressed flag byte, a 4-byte big-endian
# length, the message.
_GRPC_FRAME_HEADER: Final = 5


def _grpc_body(
    payload: bytes, parsed_path: list[str], descriptors: GrpcDescriptors
) -> tuple[Any, bool]:
    """``(parsed_body, truncated_body)`` of the first message in a gRPC request body, as
    the plugin's ``getGRPCBody``: None for a compressed message or a method the
    descriptors do not know; truncated when the message is longer than what was sent.
    Raises RequestError when the path is not ``/<service>/<method>``, the body is shorter
    than a frame header, or the message does not parse as the method's request type."""
    if len(parsed_path) != 2:
        raise RequestError("gRPC request path is not /<service>/<method>")
    if len(payload) < _GRPC_FRAME_HEADER:
        raise RequestError("gRPC request body is shorter than a frame header")
    if payload[0] != 0:
        return None, False  # compressed: not decoded, as the plugin
    size = int.from_bytes(payload[1:_GRPC_FRAME_HEADER], "big")
    if size > len(payload) - _GRPC_FRAME_HEADER:
        return None, True
    message_type = descriptors.request_type(parsed_path[0], parsed_path[1])
    if message_type is None:
        return None, False
    try:
        message = message_type.FromString(payload[_GRPC_FRAME_HEADER : _GRPC_FRAME_HEADER + size])
    except DecodeError:
        raise RequestError("gRPC request message does not parse") from None
    return MessageToDict(message), False


def parse_body(
    headers: Mapping[str, str],
    body: str,
    raw_body: bytes,
    *,
    parsed_path: list[str] | None = None,
    grpc_descriptors: GrpcDescriptors | None = None,
) -> tuple[Any, bool]:
    """``(input.parsed_body, input.truncated_body)`` for JSON, form-urlencoded and
    multipart bodies, and gRPC bodies given ``grpc_descriptors`` (decoded with the
    request's ``parsed_path``), as the plugin's ``getParsedBody``. A body is truncated
    when Envoy set ``x-envoy-auth-partial-body: true`` or ``content-length`` exceeds what
    was sent; then it is not parsed. A body over MAX_BODY_BYTES is not parsed either and counts as
    truncated. Other content types give ``(None, False)``. Raises RequestError for a body
    that does not parse or that exceeds a cap (JSON depth, form fields, multipart parts
    and part headers: see the ``MAX_*`` constants)."""
    if headers.get("x-envoy-auth-partial-body") == "true":
        return None, True
    content_type = headers.get("content-type")
    if content_type is None:
        return None, False
    if "application/json" in content_type:
        parse = _json_body
    elif "application/grpc" in content_type:
        if grpc_descriptors is None or not raw_body:
            return None, False
        if len(raw_body) > MAX_BODY_BYTES:
            return None, True
        return _grpc_body(raw_body, parsed_path or [], grpc_descriptors)
    elif "application/x-www-form-urlencoded" in content_type:
        parse = _form_body
    elif "multipart/form-data" in content_type:
        parse = _multipart
    else:
        return None, False
    # Work on bytes: content-length counts bytes (Go's len(body)), and a multipart file
    # part may be binary.
    payload = body.encode("utf-8") if body else raw_body
    if not payload:
        return None, False
    if _truncated(headers, len(payload)) or len(payload) > MAX_BODY_BYTES:
        return None, True
    return parse(content_type, payload), False


def _json_body(content_type: str, payload: bytes) -> Any:
    return _json(payload, "request body")


def _form_body(content_type: str, payload: bytes) -> dict[str, list[str]]:
    text = payload.decode("utf-8", errors=GO_REPLACE)
    return parse_query(text, "form body", MAX_FORM_FIELDS)


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


# -- egress: identity from the standard proxy settings (issue 18) -----------------------

# The base64 credentials of a ``Proxy-Authorization: Basic`` longer than this are not
# decoded (a sandbox id and a token are well under 200 bytes).
MAX_BASIC_CREDENTIALS: Final = 1024
_PROXY_AUTHORIZATION: Final = "proxy-authorization"
_BASIC: Final = re.compile(r"[Bb][Aa][Ss][Ii][Cc] +([A-Za-z0-9+/]+={0,2})")
# What a decoded user-id may hold: visible ASCII without ':' (RFC 7617 section 2).
_BASIC_USER: Final = re.compile(r"[!-9;-~]{1,253}")


def parse_proxy_basic(value: str) -> dict[str, str] | None:
    """``input.proxy_authorization`` for a ``Proxy-Authorization`` value: ``{"user":
    <user-id>, "password_sha256": <lowercase hex SHA-256 of the password>}`` when it is
    ``Basic <base64(user-id ":" password)>`` (RFC 7617 section 2; RFC 9110 section 11.7.1;
    scheme case-insensitive, RFC 4648 base64 with padding), else None: another scheme,
    credentials longer than :data:`MAX_BASIC_CREDENTIALS` characters, invalid base64, not
    UTF-8, no ``:``, an empty or non-visible-ASCII user-id, an empty password, or a
    control character. The password (the sandbox token) is only ever kept as its digest.
    Linear in ``value`` and capped: the regular expression has no nested repetition."""
    text = value.strip(_OWS)
    if len(text) > MAX_BASIC_CREDENTIALS + 16:
        return None
    match = _BASIC.fullmatch(text)
    if match is None or len(match.group(1)) % 4:
        return None
    try:
        decoded = binascii.a2b_base64(match.group(1), strict_mode=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    if not colon or not password or _BASIC_USER.fullmatch(user) is None:
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in password):
        return None
    return {"user": user, "password_sha256": hashlib.sha256(password.encode("utf-8")).hexdigest()}


def build_input(
    request: external_auth_pb2.CheckRequest,
    credential_headers: Iterable[str],
    *,
    parse_request_body: BodyParsing | bool = True,
    pass_jwts: bool = True,
    grpc_descriptors: GrpcDescriptors | None = None,
) -> dict[str, Any]:
    """Build the OPA input document for ``request``.

    ``credential_headers`` are lowercase header names whose values are hashed (see module
    docstring). ``parse_request_body`` says where the body is parsed (:class:`BodyParsing`;
    True and False, the old boolean, mean ``always`` and ``never``). With ``pass_jwts``, a
    bearer JWT in ``authorization`` stays in clear (:func:`is_bearer_jwt`). With
    ``grpc_descriptors``, a gRPC request body is decoded (:class:`GrpcDescriptors`). A
    ``Proxy-Authorization: Basic`` header adds ``input.proxy_authorization``
    (:func:`parse_proxy_basic`: the user-id and the password's digest). Returns a fresh
    JSON-ready dict; raises RequestError on a malformed path, query or body, and
    DecisionPathError when the route's ``parse_body`` is neither "true" nor "false"."""
    document = message_to_input(request)
    http = request.attributes.request.http
    path = http.path
    raw_path, _, raw_query = path.partition("?")
    document["version"] = dict(INPUT_VERSION)
    document["parsed_path"] = parse_path(raw_path)
    document["parsed_query"] = parse_query(raw_query, max_fields=MAX_QUERY_FIELDS)
    if _wants_body(parse_request_body, request.attributes.context_extensions):
        headers = http.headers
        document["parsed_body"], document["truncated_body"] = parse_body(
            headers,
            http.body,
            http.raw_body,
            parsed_path=document["parsed_path"],
            grpc_descriptors=grpc_descriptors,
        )
    principal = request.attributes.source.principal
    if principal:
        document["source_principal"] = principal
    names = frozenset(credential_headers)
    # Read before hashing replaces the value (only when it is a credential header: a
    # deployment that removed it from the list gets no decoding either).
    proxy = http.headers.get(_PROXY_AUTHORIZATION) if _PROXY_AUTHORIZATION in names else None
    document["credentials"] = _hash_credentials(document, names, pass_jwts=pass_jwts)
    if proxy is not None:
        basic = parse_proxy_basic(proxy)
        if basic is not None:
            document["proxy_authorization"] = basic
    return document


def _wants_body(mode: BodyParsing | bool, extensions: Mapping[str, str]) -> bool:
    if mode is True or mode is BodyParsing.ALWAYS:
        return True
    if mode is False or mode is BodyParsing.NEVER:
        return False
    asked = extensions.get(PARSE_BODY_EXTENSION)
    if asked is None or asked == "false":
        return False
    if asked == "true":
        return True
    raise DecisionPathError(
        f"context_extensions {PARSE_BODY_EXTENSION}={asked!r}: expected 'true' or 'false'"
    )


# A JWS compact serialization (RFC 7515 section 7.1: three base64url parts, the
# signature empty for an unsecured JWT) after the Bearer scheme (RFC 6750 section 2.1).
_BEARER_JWT: Final = re.compile(
    r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9_-]+)\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
)
# The JOSE header of a real token is a few dozen bytes; a longer one is not decoded.
_MAX_JOSE_HEADER: Final = 4096
# The one header whose bearer JWT reaches the policy in clear (the OPA Envoy tutorial's).
_JWT_HEADER: Final = "authorization"


def is_bearer_jwt(value: str) -> bool:
    """True when the ``authorization`` header value ``value`` is ``Bearer <JWT>``: a JWS
    compact serialization whose protected header is base64url JSON, an object with a
    string ``alg`` (RFC 7515 sections 4.1.1 and 7.1; RFC 7519 section 7.2, steps 1-4).
    Such a token reaches the policy in clear, usable by ``io.jwt.decode_verify``; an opaque
    token (or a JWE, five parts) does not. Nothing is verified here: OPA does that."""
    match = _BEARER_JWT.fullmatch(value.strip(_OWS))
    if match is None or len(match.group(1)) > _MAX_JOSE_HEADER:
        return False
    encoded = match.group(1)
    try:
        header = orjson.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    except (binascii.Error, ValueError):  # orjson.JSONDecodeError is a ValueError
        return False
    return isinstance(header, dict) and isinstance(header.get("alg"), str)


def _hash_credentials(
    document: dict[str, Any], names: frozenset[str], *, pass_jwts: bool
) -> dict[str, str]:
    """Replace credential header values in ``document`` (both the ``headers`` map and
    Envoy's raw ``headerMap`` form) by their masked form, except a bearer JWT in
    ``authorization`` when ``pass_jwts`` (:func:`is_bearer_jwt`); return ``{name: hex}``
    for every credential, passed through or not."""
    http = document.get("attributes", {}).get("request", {}).get("http", {})
    credentials: dict[str, str] = {}
    headers = http.get("headers")
    if headers:
        for name in names:
            value = headers.get(name)
            if value is None:
                continue
            digest, masked = mask_credential(name, value)
            credentials[name] = digest
            if not (pass_jwts and name == _JWT_HEADER and is_bearer_jwt(value)):
                headers[name] = masked
    for entry in http.get("headerMap", {}).get("headers", ()):
        name = str(entry.get("key", "")).lower()
        if name not in names:
            continue
        if "rawValue" in entry:
            value = base64.b64decode(entry["rawValue"]).decode("utf-8", errors=GO_REPLACE)
        else:
            value = entry.get("value", "")
        digest, masked = mask_credential(name, value)
        credentials.setdefault(name, digest)
        if pass_jwts and name == _JWT_HEADER and is_bearer_jwt(value):
            continue
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
