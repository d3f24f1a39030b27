"""Tunnel ends from Envoy's gRPC Access Log Service into the audit trail (issue 18).

The egress Envoy streams one ``HTTPAccessLogEntry`` for every CONNECT it answered 200
(``envoy.access_loggers.http_grpc`` on the outer listener, written when the tunnel
ends) to ``envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`` on authz's
gRPC port, behind the same mTLS as Check. Each entry becomes one audit entry of kind
``tunnel``: the CONNECT decision's id (from the ext_authz dynamic metadata Envoy keeps
for the stream), and a body ``{"sandbox_id", "host", "port", "bytes_received" (from the
sandbox), "bytes_sent" (to the sandbox), "duration_ms", "start_time" (Unix seconds),
"status"}``. Nothing else of the entry is kept: no header, no address, no other
metadata, so no credential can reach the trail this way.

The stream is hostile input even from Envoy: a message over :data:`MAX_MESSAGE_BYTES`
or with more than :data:`MAX_ENTRIES` entries, bytes that are not a
``StreamAccessLogsMessage``, TCP entries, and entries that are not an answered CONNECT
with a well-formed decision id, sandbox id, ``host:port``, byte counts and duration are
refused (counted by reason, never stored, never an exception out of the stream).

Spec: https://www.envoyproxy.io/docs/envoy/latest/api-v3/service/accesslog/v3/als.proto
and https://www.envoyproxy.io/docs/envoy/latest/api-v3/data/accesslog/v3/accesslog.proto
(HTTPAccessLogEntry, AccessLogCommon.metadata, .duration).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf.message import DecodeError

__all__ = [
    "ALS_SERVICE",
    "MAX_ENTRIES",
    "MAX_MESSAGE_BYTES",
    "REFUSALS",
    "AccessLogServicer",
    "Refused",
    "add_access_log_to_server",
    "decode_message",
    "tunnel_end",
]

log = logging.getLogger(__name__)

ALS_SERVICE: Final = "envoy.service.accesslog.v3.AccessLogService"
# Envoy batches entries (buffer_size_bytes, 16 KiB by default) into one message.
MAX_MESSAGE_BYTES: Final = 256 * 1024
MAX_ENTRIES: Final = 256
_EXT_AUTHZ: Final = "envoy.filters.http.ext_authz"
# authz's decision ids are UUIDs; sandbox ids are tokens of the sandboxes file.
_ID: Final = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
# A DNS name (RFC 1123 letters, digits, hyphens, dots) and a port: a CONNECT's target.
_AUTHORITY: Final = re.compile(r"([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?):([0-9]{1,5})")
# 2**53: exact in JSON numbers; no tunnel moves more.
_MAX_COUNT: Final = 2**53
_MAX_DURATION_MS: Final = 366 * 86400 * 1000
# Every refusal reason (metric label), so each has a series from the start.
REFUSALS: Final = (
    "undecodable",
    "oversized",
    "too_many_entries",
    "tcp_entry",
    "not_connect",
    "not_established",
    "no_decision_id",
    "bad_sandbox_id",
    "bad_authority",
    "bad_counts",
    "bad_duration",
)


@dataclass(frozen=True, slots=True)
class Refused:
    """A refused message or entry: the reason (one of :data:`REFUSALS`) and how many
    entries it held (1 for an entry; 0 when the message did not parse)."""

    reason: str
    entries: int = 1


def decode_message(data: bytes) -> als_pb2.StreamAccessLogsMessage | Refused:
    """The gRPC request deserializer: the message in ``data``, or :class:`Refused`
    (``oversized`` past :data:`MAX_MESSAGE_BYTES`, ``undecodable``); never raises."""
    if len(data) > MAX_MESSAGE_BYTES:
        return Refused("oversized", 0)
    try:
        return als_pb2.StreamAccessLogsMessage.FromString(data)
    except DecodeError:
        return Refused("undecodable", 0)


def _metadata_string(fields: Mapping[str, Any], key: str) -> str | None:
    value = fields.get(key)
    if value is None or value.WhichOneof("kind") != "string_value":
        return None
    text: str = value.string_value
    return text


def tunnel_end(entry: accesslog_pb2.HTTPAccessLogEntry) -> tuple[str, dict[str, Any]] | Refused:
    """``(decision id, body)`` of the audit entry for one ended tunnel, or
    :class:`Refused` naming the first field that is not what an answered CONNECT has.
    The body keeps only the fields named in this module's docstring."""
    request, response, common = entry.request, entry.response, entry.common_properties
    if request.request_method != base_pb2.RequestMethod.CONNECT:
        return Refused("not_connect")
    status = response.response_code.value
    if status != 200:
        return Refused("not_established")
    metadata = common.metadata.filter_metadata.get(_EXT_AUTHZ)
    fields: Mapping[str, Any] = metadata.fields if metadata is not None else {}
    decision_id = _metadata_string(fields, "decision_id")
    if decision_id is None or not _ID.fullmatch(decision_id):
        return Refused("no_decision_id")
    sandbox_id = _metadata_string(fields, "sandbox_id")
    if sandbox_id is None or not _ID.fullmatch(sandbox_id):
        return Refused("bad_sandbox_id")
    authority = _AUTHORITY.fullmatch(request.authority.lower())
    if authority is None or not 1 <= int(authority[3]) <= 65535:
        return Refused("bad_authority")
    received, sent = request.request_body_bytes, response.response_body_bytes
    if received > _MAX_COUNT or sent > _MAX_COUNT:
        return Refused("bad_counts")
    if not common.HasField("duration"):
        return Refused("bad_duration")
    duration_ms = common.duration.seconds * 1000 + common.duration.nanos // 1_000_000
    if not 0 <= duration_ms <= _MAX_DURATION_MS or common.duration.nanos < 0:
        return Refused("bad_duration")
    start = common.start_time
    body = {
        "sandbox_id": sandbox_id,
        "host": authority[1],
        "port": int(authority[3]),
        "bytes_received": received,
        "bytes_sent": sent,
        "duration_ms": duration_ms,
        "start_time": start.seconds + start.nanos / 1e9 if common.HasField("start_time") else None,
        "status": status,
    }
    return decision_id, body


TunnelSink = Callable[[str, Mapping[str, Any]], None]
Counted = Callable[[str, int], None]


class AccessLogServicer:
    """``StreamAccessLogs`` for grpc.aio: every accepted entry goes to ``sink(decision
    id, body)`` (``AuditTrail.tunnel``); ``on_result(result, n)`` counts ``n`` entries
    ``audited`` or refused for a reason of :data:`REFUSALS`."""

    def __init__(self, sink: TunnelSink, on_result: Counted | None = None) -> None:
        self._sink = sink
        self._on_result = on_result

    def _count(self, result: str, entries: int) -> None:
        if self._on_result is not None:
            self._on_result(result, entries)

    def handle(self, message: als_pb2.StreamAccessLogsMessage | Refused) -> None:
        """Audit or refuse every entry of one message; never raises."""
        if isinstance(message, Refused):
            self._count(message.reason, max(1, message.entries))
            return
        if message.tcp_logs.log_entry:
            self._count("tcp_entry", len(message.tcp_logs.log_entry))
        entries = message.http_logs.log_entry
        if len(entries) > MAX_ENTRIES:
            self._count("too_many_entries", len(entries))
            return
        for entry in entries:
            result = tunnel_end(entry)
            if isinstance(result, Refused):
                self._count(result.reason, 1)
                continue
            self._sink(*result)
            self._count("audited", 1)

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage | Refused],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> als_pb2.StreamAccessLogsResponse:
        """Consume Envoy's stream until it closes; never raises for what it carries."""
        async for message in request_iterator:
            try:
                self.handle(message)
            except Exception:  # a bug: lose the message, never the stream
                log.exception("access-log message not handled")
        return als_pb2.StreamAccessLogsResponse()


def add_access_log_to_server(servicer: AccessLogServicer, server: Any) -> None:
    """Register ``servicer`` on ``server`` (a ``grpc.aio.Server``) with
    :func:`decode_message` as the deserializer, so an oversized or unparsable message is
    counted and skipped instead of failing the stream inside grpc."""
    handler = grpc.stream_unary_rpc_method_handler(
        servicer.StreamAccessLogs,
        request_deserializer=decode_message,
        response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(ALS_SERVICE, {"StreamAccessLogs": handler}),)
    )
    server.add_registered_method_handlers(ALS_SERVICE, {"StreamAccessLogs": handler})
