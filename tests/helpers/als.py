"""Builders for Envoy's access-log messages (:mod:`authz.runtime.als`): the entry the
egress Envoy's http_grpc logger writes for an ended tunnel, and a stream message."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import struct_pb2

DECISION_ID = "0b6c55a4-4a63-4c3e-9d0e-7a1f2d9d1c11"


def connect_entry(
    *,
    method: int = base_pb2.RequestMethod.CONNECT,
    status: int | None = 200,
    authority: str = "pypi.org:443",
    metadata: Mapping[str, Any] | None = None,
    received: int = 70_000,
    sent: int = 66_000,
    duration_ms: int | None = 1234,
) -> accesslog_pb2.HTTPAccessLogEntry:
    """The HTTPAccessLogEntry Envoy's http_grpc logger writes for an ended tunnel."""
    fields = {"decision_id": DECISION_ID, "sandbox_id": "sb-standard"}
    if metadata is not None:
        fields = {k: v for k, v in {**fields, **metadata}.items() if v is not None}
    struct = struct_pb2.Struct()
    struct.update(fields)
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.request.request_method = method
    entry.request.authority = authority
    entry.request.request_body_bytes = received
    entry.response.response_body_bytes = sent
    if status is not None:
        entry.response.response_code.value = status
    entry.common_properties.metadata.filter_metadata["envoy.filters.http.ext_authz"].CopyFrom(
        struct
    )
    entry.common_properties.start_time.seconds = 1_800_000_000
    if duration_ms is not None:
        entry.common_properties.duration.FromMilliseconds(duration_ms)
    return entry


def message(*entries: accesslog_pb2.HTTPAccessLogEntry) -> als_pb2.StreamAccessLogsMessage:
    msg = als_pb2.StreamAccessLogsMessage()
    msg.identifier.log_name = "authz_tunnels"
    msg.http_logs.log_entry.extend(entries)
    return msg
