"""authz.core.http1.Http1Pool against in-process HTTP servers (asyncio streams on a free
127.0.0.1 port): kept-alive reuse, stale connections, abandoned requests never desync a
connection, the pool's bound, answer caps and garbage."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import uvloop

from authz.core.http1 import AnswerTooLarge, Http1Pool, TransportError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


class Server:
    """Counts connections; ``handler(reader, writer, n)`` answers request ``n`` (from 0,
    across connections) and says whether to keep the connection open."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests = 0
        self.open = 0
        self.most_open = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                n, self.requests = self.requests, self.requests + 1
                if not await self.handler(reader, writer, n):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@contextlib.asynccontextmanager
async def serving(handler: Handler, **kwargs: object) -> AsyncIterator[tuple[Server, Http1Pool]]:
    server = Server(handler)
    listener = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    pool = Http1Pool(
        host="127.0.0.1",
        port=port,
        host_header=f"127.0.0.1:{port}",
        max_body=kwargs.pop("max_body", 1 << 20),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )
    try:
        yield server, pool
    finally:
        await pool.close()
        listener.close()


async def echo_n(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
    writer.write(ok(b"answer-%d" % n))
    await writer.drain()
    return True


async def test_answers_reuse_one_kept_alive_connection() -> None:
    async with serving(echo_n) as (server, pool):
        bodies = [(await pool.request("POST", "/v1/data/x", b"{}")).body for _ in range(5)]
    assert bodies == [b"answer-%d" % n for n in range(5)]
    assert server.connections == 1


async def test_a_connection_the_server_closed_while_idle_is_replaced_once() -> None:
    async def close_after_answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> bool:
        writer.write(ok(b"answer-%d" % n))  # keep-alive announced, then closed anyway
        await writer.drain()
        return False

    async with serving(close_after_answer) as (server, pool):
        first = await pool.request("GET", "/health")
        await asyncio.sleep(0.05)  # the close reaches the client
        second = await pool.request("GET", "/health")
    assert (first.body, second.body) == (b"answer-0", b"answer-1")
    assert server.connections == 2


async def test_an_abandoned_request_never_hands_its_late_answer_to_the_next() -> None:
    async def slow_first(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> bool:
        if n == 0:
            await asyncio.sleep(0.3)
        writer.write(ok(b"answer-%d" % n))
        await writer.drain()
        return True

    async with serving(slow_first) as (server, pool):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await pool.request("POST", "/v1/data/x", b"{}")
        answer = await pool.request("POST", "/v1/data/x", b"{}")
    assert answer.body == b"answer-1"
    assert server.connections == 2  # the abandoned one was dropped, not reused


async def test_the_pool_never_opens_more_than_its_limit() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        await asyncio.sleep(0.02)
        return await echo_n(reader, writer, n)

    async with serving(slow, limit=3) as (server, pool):
        answers = await asyncio.gather(*(pool.request("GET", "/x") for _ in range(12)))
    assert sorted(a.body for a in answers) == sorted(b"answer-%d" % n for n in range(12))
    assert server.most_open <= 3


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n",  # announced only
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"200\r\n"
        + b"x" * 512
        + b"\r\n" * 1
        + b"400\r\n"
        + b"x" * 1024
        + b"\r\n0\r\n\r\n",
    ],
    ids=["content-length", "announced-over-the-cap", "chunked"],
)
async def test_an_answer_over_the_cap_is_refused(answer: bytes) -> None:
    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(0.2)
        return False

    async with serving(big, max_body=1024) as (_, pool):
        with pytest.raises(AnswerTooLarge):
            await pool.request("GET", "/x")


async def test_a_chunked_answer_within_the_cap_is_read_whole() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"ab", b"cde", b"f"):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async with serving(chunked) as (_, pool):
        assert (await pool.request("GET", "/x")).body == b"abcdef"
        assert (await pool.request("GET", "/x")).body == b"abcdef"


@pytest.mark.parametrize(
    "answer",
    [b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"],
    ids=["not-http", "closed-mid-body"],
)
async def test_garbage_or_a_cut_answer_is_a_transport_error(answer: bytes) -> None:
    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(answer)
        await writer.drain()
        return False

    async with serving(bad) as (_, pool):
        with pytest.raises(TransportError):
            await pool.request("GET", "/x")


async def test_connection_close_answers_are_not_reused() -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(ok(b"answer-%d" % n, b"Connection: close\r\n"))
        await writer.drain()
        return False

    async with serving(closing) as (server, pool):
        for _ in range(3):
            await pool.request("GET", "/x")
    assert server.connections == 3


@pytest.mark.parametrize(
    "header",
    [("X-Bad", "a\r\nInjected: 1"), ("X-Bad\n", "a"), ("X-Bad", "a\0"), ("X:Bad", "a")],
    ids=["crlf-in-value", "lf-in-name", "nul", "colon-in-name"],
)
async def test_a_header_that_would_split_the_request_is_refused(header: tuple[str, str]) -> None:
    async with serving(echo_n) as (server, pool):
        with pytest.raises(ValueError, match="CR, LF, NUL"):
            await pool.request("GET", "/x", headers=[header])
    assert server.requests == 0


async def test_connect_refused_is_a_transport_error() -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    pool = Http1Pool(host="127.0.0.1", port=port, host_header="x", max_body=10)
    with pytest.raises(TransportError, match="cannot connect"):
        await pool.request("GET", "/x")
    await pool.close()


def test_the_pool_works_on_uvloop_whose_transports_are_not_asyncio_classes() -> None:
    # The server runs on uvloop (AUTHZ_UVLOOP): its TCP and unix transports do not
    # subclass asyncio.Transport.
    async def run() -> list[bytes]:
        async with serving(echo_n) as (_, pool):
            return [(await pool.request("GET", "/x")).body for _ in range(2)]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(run()) == [b"answer-0", b"answer-1"]
