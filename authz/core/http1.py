"""A lean HTTP/1.1 client for OPA's REST API: kept-alive connections to one server.

One request at a time per connection (HTTP/1.1 without pipelining, RFC 9112 section 9.3),
up to ``limit`` connections; the request is written in one ``write`` (head and body), the
answer parsed by httptools (the llhttp parser, https://github.com/MagicStack/httptools)
as it arrives. Over TCP, TLS (``https``) or a unix socket. It exists because the OPA
query is on every cache miss and aiohttp's client spends about four times the CPU per
query on this one-small-POST pattern (``docs/decisions.md``, ``docs/performance.md``
"Cost of a miss").

Failures, for :mod:`authz.core.opa` to type:

- :class:`TransportError` (a ``ConnectionError``): connect refused or reset, the server
  closed the connection before the whole answer came, an answer that is not HTTP/1.x;
- :class:`AnswerTooLarge`: an answer body over ``max_body`` bytes (as announced or as
  received), read no further;
- ``TimeoutError`` / cancellation from the caller's ``asyncio.timeout`` pass through;
  the connection in use is closed (its state is unknown), never reused.

A kept-alive connection the server closed meanwhile fails on reuse before any byte of
an answer arrives; such a request is sent once more on a fresh connection (every request
authz sends OPA is idempotent: queries, PUT and DELETE of a document).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, cast

import httptools

__all__ = ["Answer", "AnswerTooLarge", "Http1Pool", "TransportError"]

_CRLF: Final = b"\r\n"


class TransportError(ConnectionError):
    """The connection failed or the answer is not HTTP/1.x (the message says which)."""


class AnswerTooLarge(Exception):
    """The answer's body is over the configured cap."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer: ``status``, ``headers`` (lowercase names; the last value of a
    repeated header) and the whole ``body`` (bytes, as sent: not inflated)."""

    status: int
    headers: dict[str, str]
    body: bytes


class _Connection(asyncio.Protocol):
    """One connection and its response parser; at most one request in flight."""

    def __init__(self, max_body: int) -> None:
        self._max_body = max_body
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[Answer] | None = None
        self._headers: dict[str, str] = {}
        self._field = b""
        self._body: list[bytes] = []
        self._size = 0
        self._started = False
        self._failure: Exception | None = None

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have asyncio.Transport's methods but not its class.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self._fail(TransportError("OPA sent bytes with no request pending"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(TransportError("OPA answered with a protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(self._failure or TransportError(f"OPA's answer is not HTTP/1.1: {exc}"))
        else:
            if self._failure is not None:
                self._fail(self._failure)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            reason = f": {exc}" if exc is not None else ""
            self._waiter.set_exception(
                TransportError(f"OPA closed the connection before its answer was complete{reason}")
            )

    # -- httptools callbacks ----------------------------------------------------------
    def on_message_begin(self) -> None:
        self._started = True
        self._headers, self._body, self._size = {}, [], 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length", "")
        if length.isdigit() and int(length) > self._max_body:
            self._failure = AnswerTooLarge(f"OPA's answer is larger than {self._max_body} bytes")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max_body:
            self._failure = AnswerTooLarge(f"OPA's answer is larger than {self._max_body} bytes")
        elif self._failure is None:
            self._body.append(body)

    def on_message_complete(self) -> None:
        waiter = self._waiter
        if self._failure is None and waiter is not None and not waiter.done():
            status = self._parser.get_status_code()
            if not self._parser.should_keep_alive():
                self._close()
            waiter.set_result(Answer(status, self._headers, b"".join(self._body)))

    # -- for the pool -----------------------------------------------------------------
    @property
    def answered_nothing(self) -> bool:
        """No byte of an answer to the current request has arrived (safe to resend)."""
        return not self._started

    def send(self, payload: bytes) -> asyncio.Future[Answer]:
        """Write one request; the future resolves with its Answer."""
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._started, self._failure = False, None
        self.transport.write(payload)
        return self._waiter

    def _fail(self, failure: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(failure)
        self._close()

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now (a request was abandoned mid-way)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Http1Pool:
    """Kept-alive HTTP/1.1 connections to one server. Create inside a running event loop.

    Exactly one of ``(host, port)`` (TCP; TLS with ``ssl_context``, checked against
    ``host``) or ``unix_path`` (a unix socket). ``host_header`` is the ``Host`` sent.
    ``default_headers`` go with every request (name, value). ``limit`` bounds the
    connections open at once (more requests wait); an idle connection is closed after
    ``keepalive_s`` seconds; ``max_body`` caps an answer's body in bytes. Raises
    ValueError for a header name or value with CR, LF or NUL in it.
    """

    def __init__(
        self,
        *,
        host: str | None = None,
        port: int | None = None,
        unix_path: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        host_header: str,
        default_headers: Iterable[tuple[str, str]] = (),
        limit: int = 64,
        keepalive_s: float = 60.0,
        max_body: int,
    ) -> None:
        if (unix_path is None) == (host is None or port is None):
            raise ValueError("give either host and port, or unix_path")
        self._host, self._port, self._unix_path = host, port, unix_path
        self._ssl = ssl_context
        self._head_tail = _render([("Host", host_header), *default_headers])
        self._slots = asyncio.Semaphore(limit)
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()
        self._keepalive_s = keepalive_s
        self._max_body = max_body
        self.closed = False

    async def request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> Answer:
        """Send one request and read its whole answer. ``target`` is the origin-form
        request target (``/v1/data/x?provenance``); ``body`` (None: none) is sent with
        its Content-Length. Raises TransportError, AnswerTooLarge, ValueError (a header
        with CR, LF or NUL)."""
        head = (
            f"{method} {target} HTTP/1.1\r\n".encode("latin-1") + self._head_tail + _render(headers)
        )
        if body is not None:
            payload = b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
        else:
            payload = head + _CRLF
        async with self._slots:
            for attempt in (1, 2):
                conn, reused = await self._connection()
                done = False
                try:
                    answer = await conn.send(payload)
                    done = True
                except TransportError:
                    done = True  # the connection is closed; nothing to abort
                    self._forget(conn)
                    if reused and attempt == 1 and conn.answered_nothing:
                        continue  # a stale kept-alive connection: once more, fresh
                    raise
                except AnswerTooLarge:
                    done = True
                    self._forget(conn)
                    raise
                finally:
                    if not done:  # cancelled (a timeout) or a bug: the state is unknown
                        conn.abort()
                        self._forget(conn)
                if conn.closed:
                    self._forget(conn)
                else:
                    conn.idle_since = time.monotonic()
                    self._idle.append(conn)
                return answer
        raise AssertionError("unreachable")  # pragma: no cover

    async def _connection(self) -> tuple[_Connection, bool]:
        """A live idle connection (True: reused), or a new one (False)."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self._keepalive_s:
                return conn, True
            conn.abort()
            self._forget(conn)
        loop = asyncio.get_running_loop()
        try:
            if self._unix_path is not None:
                _, conn = await loop.create_unix_connection(
                    lambda: _Connection(self._max_body), self._unix_path
                )
            else:
                assert self._host is not None
                assert self._port is not None
                _, conn = await loop.create_connection(
                    lambda: _Connection(self._max_body),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"cannot connect to OPA: {type(exc).__name__}: {exc}") from None
        self._open.add(conn)
        return conn, False

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)

    async def close(self) -> None:
        """Close every connection (``closed`` is True from then on)."""
        self.closed = True
        for conn in (*self._idle, *self._open):
            conn.abort()
        self._idle.clear()
        self._open.clear()


def _render(headers: Iterable[tuple[str, str]]) -> bytes:
    """``Name: value\\r\\n`` lines; raises ValueError for CR, LF or NUL in either."""
    lines = []
    for name, value in headers:
        if any(c in name or c in value for c in "\r\n\0") or ":" in name:
            raise ValueError(f"header {name!r}: CR, LF, NUL or ':' where none may be")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1")
