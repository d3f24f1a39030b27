"""Re-exports :mod:`tests.helpers.fakes` for the test files not yet moved to the package
layout (issue #14); import from ``tests.helpers.fakes`` in new code."""

from __future__ import annotations

from tests.helpers.fakes import (
    LARGE_JSON_BODY,
    FakeEngine,
    FlakyEngine,
    ListSink,
    ManualClock,
    bytes_retained_per_check,
    check_request,
    multipart_body,
    upstream_headers,
)

__all__ = [
    "LARGE_JSON_BODY",
    "FakeEngine",
    "FlakyEngine",
    "ListSink",
    "ManualClock",
    "bytes_retained_per_check",
    "check_request",
    "multipart_body",
    "upstream_headers",
]
