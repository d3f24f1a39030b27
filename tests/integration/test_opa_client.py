"""OpaClient reading OPA's answers: gzip'd answers and answers over the size cap.

OPA gzips a response body of ``server.encoding.gzip.min_length`` bytes or more (default
1024) when the request's ``Accept-Encoding`` names gzip (OPA configuration reference,
"Server" section, https://www.openpolicyagent.org/docs/configuration#server). The stand-in
below, on 127.0.0.1, does exactly that: such a decision (over 1 KiB) is read like any
other, never a 500 opa_error.
"""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

from authz.core.errors import OpaResponseError
from authz.core.opa import MAX_ANSWER_BYTES, OpaClient

OPA_GZIP_MIN_LENGTH = 1024  # OPA's default server.encoding.gzip.min_length

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[Handler], Awaitable[OpaClient]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start a stand-in OPA on 127.0.0.1 (port chosen by the kernel); return an OpaClient
    for it. Both are closed at teardown."""
    runners: list[web.AppRunner] = []
    clients: list[OpaClient] = []

    async def start(handler: Handler) -> OpaClient:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        client = OpaClient(f"http://127.0.0.1:{runner.addresses[0][1]}")
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()
    for runner in runners:
        await runner.cleanup()


def decision_of_size(size: int) -> dict[str, Any]:
    """A decision whose OPA answer ``{"result": ...}`` is exactly ``size`` bytes."""
    decision: dict[str, Any] = {"allowed": True, "body": ""}
    overhead = len(orjson.dumps({"result": decision}))
    decision["body"] = "x" * (size - overhead)
    assert len(orjson.dumps({"result": decision})) == size
    return decision


def like_opa(answer: bytes) -> Handler:
    """Answer as OPA's server does: gzip when asked and the body is long enough."""

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        accepted = request.headers.get("Accept-Encoding", "")
        if "gzip" in accepted and len(answer) >= OPA_GZIP_MIN_LENGTH:
            return web.Response(
                body=gzip.compress(answer),
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        return web.Response(body=answer, content_type="application/json")

    return handler


def always_gzip(compressed: bytes) -> Handler:
    """Answer ``compressed`` as a gzip body whatever the request asked for."""

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            body=compressed,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    return handler


@pytest.mark.parametrize(
    "size",
    [OPA_GZIP_MIN_LENGTH - 1, OPA_GZIP_MIN_LENGTH, 50_000, MAX_ANSWER_BYTES],
    ids=["under-gzip-threshold", "at-gzip-threshold", "50k", "at-cap"],
)
async def test_answer_of_any_size_up_to_the_cap_is_read(serve: Serve, size: int) -> None:
    decision = decision_of_size(size)
    client = await serve(like_opa(orjson.dumps({"result": decision})))
    evaluation = await client.evaluate("authz/gateway/decision", {}, 5.0)
    assert evaluation.result == decision


async def test_gzip_answer_is_decoded_even_when_not_asked_for(serve: Serve) -> None:
    # A proxy or an OPA configured otherwise may still gzip: decode it (within the cap).
    decision = decision_of_size(5000)
    client = await serve(always_gzip(gzip.compress(orjson.dumps({"result": decision}))))
    evaluation = await client.evaluate("authz/gateway/decision", {}, 5.0)
    assert evaluation.result == decision


def gzip_bomb(decompressed_size: int) -> bytes:
    """A valid gzip JSON answer that inflates to ``decompressed_size`` bytes."""
    head, tail = b'{"result": {"allowed": true, "body": "', b'"}}'
    filler = decompressed_size - len(head) - len(tail)
    return gzip.compress(head + b"x" * filler + tail, compresslevel=9)


@pytest.mark.parametrize(
    ("handler", "match"),
    [
        (
            like_opa(orjson.dumps({"result": decision_of_size(MAX_ANSWER_BYTES + 1)})),
            "larger than",
        ),
        # 256 MiB once inflated, about 250 KB on the wire: inflated whole, it would cost
        # 256 MiB of memory per request.
        (always_gzip(gzip_bomb(256 * 1024 * 1024)), "larger than"),
        (always_gzip(gzip_bomb(MAX_ANSWER_BYTES + 1)), "larger than"),
        (always_gzip(b"\x1f\x8b not really gzip"), "gzip"),
        (always_gzip(gzip.compress(b'{"result": true}')[:-6]), "gzip"),
        (always_gzip(gzip.compress(b'{"result": true}') + b"trailing"), "gzip"),
    ],
    ids=[
        "plain-over-cap",
        "gzip-bomb-256MiB",
        "gzip-just-over-cap",
        "gzip-corrupt",
        "gzip-truncated",
        "gzip-trailing-garbage",
    ],
)
async def test_answer_over_the_cap_or_undecodable_is_a_response_error(
    serve: Serve, handler: Handler, match: str
) -> None:
    client = await serve(handler)
    with pytest.raises(OpaResponseError, match=match):
        await client.evaluate("authz/gateway/decision", {}, 5.0)


async def test_unknown_content_encoding_is_a_response_error(serve: Serve) -> None:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            body=b'{"result": true}',
            headers={"Content-Type": "application/json", "Content-Encoding": "br"},
        )

    client = await serve(handler)
    with pytest.raises(OpaResponseError, match="br"):
        await client.evaluate("authz/gateway/decision", {}, 5.0)
