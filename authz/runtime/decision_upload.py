"""Decision-log upload: OPA decision-log events shipped the way OPA ships them.

The protocol is OPA's (https://www.openpolicyagent.org/docs/management-decision-logs):
batches of events ``POST``-ed to ``<service>/logs`` as a gzip-compressed JSON array
(``Content-Encoding: gzip``, ``Content-Type: application/json``), a 2xx answer accepting
the batch; any other answer or a transport error is retried with exponential backoff
between ``min_delay_s`` and ``max_delay_s``, as OPA's ``decision_logs.reporting``
(``min_delay_seconds``, ``max_delay_seconds``, ``upload_size_limit_bytes``,
``buffer_size_limit_bytes``; https://www.openpolicyagent.org/docs/configuration#decision-logs)
configures it. Any receiver of OPA decision logs can take authz's.

Events wait in a buffer bounded in bytes: when it is full the OLDEST events are dropped
(as OPA's size buffer drops them) and counted (``authz_decision_log_dropped_total``).
A batch is taken from the front of the buffer and removed only once the service accepted
it, so nothing is lost while the service answers; events dropped meanwhile are never sent.

Masking is the OPA-format line's (:func:`authz.runtime.logs.opa_event`: credential
headers, sensitive query parameters and JWTs masked, each named in ``masked``); the drop
rules (OPA's ``decision_logs.drop_decision``, here as settings) leave out allowed
decisions (``drop_allowed``) and decisions on given paths (``drop_paths``).

:meth:`DecisionUploader.add` runs on the Check path: it appends to the buffer and never
awaits. Uploads run in a task on the event loop (:meth:`DecisionUploader.run`); the gzip
of one batch (at most ``upload_size_limit_bytes``) is small enough to stay inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Final

import aiohttp

from authz.core.record import DecisionRecord
from authz.core.secret import Secret
from authz.runtime.config import (
    DEFAULT_DECISION_LOG_BUFFER_SIZE_LIMIT_BYTES,
    DEFAULT_DECISION_LOG_MAX_DELAY_S,
    DEFAULT_DECISION_LOG_MIN_DELAY_S,
    DEFAULT_DECISION_LOG_UPLOAD_SIZE_LIMIT_BYTES,
    Settings,
)
from authz.runtime.metrics import Metrics

__all__ = [
    "ANSWER_READ_MAX_BYTES",
    "LOGS_RESOURCE",
    "UPLOAD_TIMEOUT_S",
    "DecisionUploader",
    "Post",
    "aiohttp_post",
]

log = logging.getLogger(__name__)

# OPA's default decision_logs.resource.
LOGS_RESOURCE: Final = "/logs"
# One POST's budget: a service slower than this is retried like one that failed.
UPLOAD_TIMEOUT_S: Final = 10.0
# The longest answer body read (to reuse the connection); a longer one is left unread.
ANSWER_READ_MAX_BYTES: Final = 64 * 1024

# (url, gzip body, headers) -> the HTTP status; raises OSError/aiohttp.ClientError/TimeoutError.
Post = Callable[[str, bytes, dict[str, str]], Awaitable[int]]


def aiohttp_post(session: aiohttp.ClientSession, timeout_s: float = UPLOAD_TIMEOUT_S) -> Post:
    """A :data:`Post` sending with ``session``, each request bounded by ``timeout_s``."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def post(url: str, body: bytes, headers: dict[str, str]) -> int:
        async with session.post(url, data=body, headers=headers, timeout=timeout) as response:
            # Only the status matters. A short declared body is read so the connection is
            # reused; any other (chunked, long, endless) is left unread and the connection
            # closed on release: the service's answer never fills memory or the budget.
            length = response.content_length
            if length is not None and length <= ANSWER_READ_MAX_BYTES:
                await response.read()
            return response.status

    return post


class DecisionUploader:
    """Buffers OPA decision-log events (bytes: one ``EventV1`` JSON object each) and
    uploads them in batches to ``service_url`` + ``/logs`` (module docstring: protocol).

    ``token``: sent as ``Authorization: Bearer``. ``upload_size_limit_bytes``: one
    batch's JSON array at most this long before gzip (an event longer than it alone is
    dropped, reason ``too_large``). ``buffer_size_limit_bytes``: the buffer's bound, the
    oldest events dropped beyond it (reason ``buffer_full``). ``min_delay_s``: the pause
    between uploads (a full batch wakes the uploader sooner); after ``n`` failures in a
    row the pause is ``min(max_delay_s, min_delay_s * 2**n)``. ``sleep`` is injectable
    (tests)."""

    def __init__(
        self,
        service_url: str,
        post: Post,
        *,
        metrics: Metrics,
        token: Secret | None = None,
        min_delay_s: float = DEFAULT_DECISION_LOG_MIN_DELAY_S,
        max_delay_s: float = DEFAULT_DECISION_LOG_MAX_DELAY_S,
        upload_size_limit_bytes: int = DEFAULT_DECISION_LOG_UPLOAD_SIZE_LIMIT_BYTES,
        buffer_size_limit_bytes: int = DEFAULT_DECISION_LOG_BUFFER_SIZE_LIMIT_BYTES,
        drop_allowed: bool = False,
        drop_paths: Iterable[str] = (),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._url = service_url.rstrip("/") + LOGS_RESOURCE
        self._post = post
        self._metrics = metrics
        self._token = token
        self._min_delay = min_delay_s
        self._max_delay = max_delay_s
        self._upload_limit = upload_size_limit_bytes
        self._buffer_limit = buffer_size_limit_bytes
        self._drop_allowed = drop_allowed
        self._drop_paths = frozenset(drop_paths)
        self._sleep = sleep
        self._buffer: deque[tuple[int, bytes]] = deque()
        self._bytes = 0
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        # The batch in flight (its last sequence number) and how many of its events the
        # buffer has evicted since: counted as dropped only if the service refuses it.
        self._in_flight = -1
        self._evicted_in_flight = 0
        metrics.decision_log_buffer_max_bytes.set(buffer_size_limit_bytes)

    @classmethod
    def from_settings(cls, settings: Settings, post: Post, metrics: Metrics) -> DecisionUploader:
        """The uploader ``settings.decision_log_*`` describe (the service URL must be set)."""
        if settings.decision_log_service_url is None:
            raise ValueError("decision_log_service_url is not set")
        return cls(
            settings.decision_log_service_url,
            post,
            metrics=metrics,
            token=settings.decision_log_service_token,
            min_delay_s=settings.decision_log_min_delay_s,
            max_delay_s=settings.decision_log_max_delay_s,
            upload_size_limit_bytes=settings.decision_log_upload_size_limit_bytes,
            buffer_size_limit_bytes=settings.decision_log_buffer_size_limit_bytes,
            drop_allowed=settings.decision_log_drop_allowed,
            drop_paths=settings.decision_log_drop_paths,
        )

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the events waiting (each event's JSON length)."""
        return self._bytes

    def wants(self, record: DecisionRecord) -> bool:
        """False for a decision a drop rule leaves out: an allowed one with
        ``drop_allowed``, one on a ``drop_paths`` path."""
        if self._drop_allowed and record.allowed:
            return False
        return record.decision_path not in self._drop_paths

    def add(self, event: bytes) -> None:
        """Buffer one event; drop the oldest while over the byte bound. Never blocks."""
        size = len(event)
        if size + 2 > self._upload_limit:  # "[" + event + "]" would never fit a batch
            self._metrics.decision_log_dropped.labels(reason="too_large").inc()
            return
        self._buffer.append((next(self._seq), event))
        self._bytes += size
        while self._bytes > self._buffer_limit:
            seq, old = self._buffer.popleft()
            self._bytes -= len(old)
            if seq <= self._in_flight:
                self._evicted_in_flight += 1
            else:
                self._metrics.decision_log_dropped.labels(reason="buffer_full").inc()
        self._metrics.decision_log_buffer_bytes.set(self._bytes)
        if self._bytes >= self._upload_limit:
            self._wake.set()

    def _batch(self) -> tuple[int, list[bytes]]:
        """The front of the buffer as one batch within the upload limit: the last event's
        sequence number and the events."""
        events: list[bytes] = []
        size = 1  # "["
        last = -1
        for seq, event in self._buffer:
            if events and size + len(event) + 1 > self._upload_limit:
                break
            events.append(event)
            size += len(event) + 1  # "," or "]"
            last = seq
        return last, events

    def _release(self, last: int) -> None:
        """Remove the events up to sequence ``last`` (those still buffered)."""
        while self._buffer and self._buffer[0][0] <= last:
            _, event = self._buffer.popleft()
            self._bytes -= len(event)
        self._metrics.decision_log_buffer_bytes.set(self._bytes)

    async def flush(self) -> bool:
        """Upload every buffered event, batch by batch; False at the first batch the
        service did not accept (it stays buffered), True once the buffer is empty."""
        while self._buffer:
            last, events = self._batch()
            body = gzip.compress(b"[" + b",".join(events) + b"]")
            headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
            if self._token is not None:
                headers["Authorization"] = f"Bearer {self._token.reveal()}"
            self._in_flight, self._evicted_in_flight = last, 0
            try:
                status = await self._post(self._url, body, headers)
            except (OSError, aiohttp.ClientError, TimeoutError) as exc:
                self._failed()
                log.warning(
                    "decision log upload failed",
                    extra={"url": self._url, "error": type(exc).__name__},
                )
                return False
            finally:
                self._in_flight = -1
            if not 200 <= status < 300:
                self._failed()
                log.warning(
                    "decision log upload refused", extra={"url": self._url, "status": status}
                )
                return False
            self._metrics.decision_log_uploads.labels(result="ok").inc()
            self._metrics.decision_log_upload_events.inc(len(events))
            self._metrics.decision_log_upload_bytes.inc(len(body))
            self._release(last)
        self._wake.clear()
        return True

    def _failed(self) -> None:
        self._metrics.decision_log_uploads.labels(result="error").inc()
        if self._evicted_in_flight:
            lost = self._evicted_in_flight
            self._metrics.decision_log_dropped.labels(reason="buffer_full").inc(lost)
        self._evicted_in_flight = 0

    def delay(self, failures: int) -> float:
        """The pause before the next upload after ``failures`` failed ones in a row."""
        if failures == 0:
            return self._min_delay
        backoff: float = self._min_delay * 2.0 ** min(failures, 32)
        return min(self._max_delay, backoff)

    async def run(self) -> None:
        """Upload forever: pause (:meth:`delay`; a full batch ends a pause without
        failures early), then :meth:`flush`. Cancel to stop."""
        failures = 0
        while True:
            waiters: set[asyncio.Future[Any]] = {
                asyncio.ensure_future(self._sleep(self.delay(failures)))
            }
            if failures == 0:
                waiters.add(asyncio.ensure_future(self._wake.wait()))
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            failures = 0 if await self.flush() else failures + 1

    @contextlib.asynccontextmanager
    async def running(self, grace_s: float) -> AsyncIterator[DecisionUploader]:
        """:meth:`run` in a task while the context is open; on exit the task stops and
        what is buffered is flushed once within ``grace_s`` seconds (what is left then is
        counted as dropped, reason ``shutdown``)."""
        task = asyncio.create_task(self.run(), name="decision-log-upload")
        try:
            yield self
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self.flush()
            if self._buffer:
                self._metrics.decision_log_dropped.labels(reason="shutdown").inc(len(self._buffer))
