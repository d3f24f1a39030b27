"""OpaClient against a real OPA process, and against fake OPA servers for the failures a
real one will not produce on demand (slow, 5xx, garbage, closed port, unix socket)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from authz.core.errors import OpaResponseError, OpaTimeout, OpaUnavailable, UndefinedDecision
from authz.core.opa import OpaClient
from authz.core.secret import Secret
from authz.stack.supervisor import free_port
from tests.helpers.opa_server import running_opa

POLICY = """\
package authz.test

allow := true

decision := {
\t"allowed": false,
\t"reason": "missing_api_key",
\t"http_status": 401,
\t"echo": input.who,
}

# Two complete rules with different values: an eval_conflict_error at query time.
conflict := 1 if input.x == 1

conflict := 2 if input.x == 1
"""
REVISION = "r1"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- a real OPA ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def opa_url(opa_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real OPA on a free 127.0.0.1 port, serving POLICY as a bundle at REVISION."""
    base = tmp_path_factory.mktemp("opa")
    source = base / "policy"
    source.mkdir()
    (source / "policy.rego").write_text(POLICY, encoding="utf-8")
    bundle = base / "bundle.tar.gz"
    built = subprocess.run(
        [opa_bin, "build", "-b", str(source), "--revision", REVISION, "-o", str(bundle)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    with running_opa(
        opa_bin, "--bundle", str(bundle), log_path=base / "opa.log", ready_path="/health?bundles"
    ) as url:
        yield url


@pytest.fixture
async def real_opa(opa_url: str) -> AsyncIterator[OpaClient]:
    client = OpaClient(opa_url)
    yield client
    await client.close()


@pytest.mark.parametrize(
    ("path", "document", "expected"),
    [
        ("authz/test/allow", {}, True),
        (
            "authz/test/decision",
            {"who": "alice"},
            {"allowed": False, "reason": "missing_api_key", "http_status": 401, "echo": "alice"},
        ),
        ("authz/test", {"x": 2}, {"allow": True}),
    ],
    ids=["boolean", "object-uses-input", "package-document"],
)
async def test_real_opa_result_and_revision(
    real_opa: OpaClient, path: str, document: dict[str, Any], expected: Any
) -> None:
    evaluation = await real_opa.evaluate(path, document, 5.0)
    assert evaluation.result == expected
    assert evaluation.revision == REVISION
    assert list(evaluation.revisions.values()) == [REVISION]
    assert evaluation.duration_s > 0


async def test_concurrent_queries_each_get_their_own_answer_even_among_abandoned_ones(
    opa_url: str,
) -> None:
    """Many more queries than connections, some abandoned mid-way (a budget too short to
    answer): every query that is answered gets the answer to its own input, never one a
    connection still owed to an abandoned query."""
    client = OpaClient(opa_url, pool_size=4)

    async def ask(n: int) -> Any:
        budget = 0.0005 if n % 7 == 0 else 5.0
        try:
            evaluation = await client.evaluate("authz/test/decision", {"who": f"w{n}"}, budget)
        except OpaTimeout:
            return None
        return evaluation.result["echo"]

    try:
        for _ in range(3):
            answers = await asyncio.gather(*(ask(n) for n in range(200)))
            assert all(a in (None, f"w{n}") for n, a in enumerate(answers))
            assert sum(a is not None for a in answers) >= 170
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("path", "document"),
    [
        ("authz/test/missing", {}),
        ("no/such/package", {}),
        ("authz/test/decision", {}),  # the rule's body is undefined without input.who
    ],
    ids=["unknown-rule", "unknown-package", "rule-undefined-for-input"],
)
async def test_real_opa_undefined(real_opa: OpaClient, path: str, document: dict[str, Any]) -> None:
    with pytest.raises(UndefinedDecision):
        await real_opa.evaluate(path, document, 5.0)


async def test_real_opa_eval_conflict_is_response_error(real_opa: OpaClient) -> None:
    with pytest.raises(OpaResponseError, match=r"HTTP 500: internal_error"):
        await real_opa.evaluate("authz/test/conflict", {"x": 1}, 5.0)


async def test_real_opa_get_health_bundles(real_opa: OpaClient) -> None:
    assert await real_opa.get("/health?bundles", 5.0) == (200, {})


async def test_real_opa_get_data(real_opa: OpaClient) -> None:
    assert await real_opa.get("/v1/data/authz/test/allow", 5.0) == (200, {"result": True})


@pytest.mark.parametrize("size", [2_000, 200_000], ids=["2KB", "200KB"])
async def test_real_opa_decision_over_1kib_is_read(real_opa: OpaClient, size: int) -> None:
    # OPA gzips answers of 1 KiB or more for a client that accepts gzip; such a decision
    # (a large body, many headers) is read like any other, never a 500 opa_error.
    who = "w" * size
    evaluation = await real_opa.evaluate("authz/test/decision", {"who": who}, 5.0)
    assert evaluation.result["echo"] == who


# --- fake OPA servers ------------------------------------------------------------------


class Recorder:
    """What a fake OPA saw: one (method, path with query, headers, body) per request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []

    async def record(self, request: web.Request) -> None:
        body = await request.read()
        self.requests.append((request.method, request.path_qs, dict(request.headers), body))


def app_for(handler: Handler) -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Start a fake OPA on a free 127.0.0.1 port; returns its base URL."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        runner = web.AppRunner(app_for(handler), access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., OpaClient]]:
    """Create OpaClients that are closed at teardown."""
    clients: list[OpaClient] = []

    def make(url: str, **kwargs: Any) -> OpaClient:
        client = OpaClient(url, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def answering(status: int, body: bytes, content_type: str = "application/json") -> Handler:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, body=body, content_type=content_type)

    return handler


@pytest.mark.parametrize(
    ("body", "result", "revision"),
    [
        (b'{"result": true}', True, ""),
        (
            b'{"result": {"allowed": true}, "provenance": {"bundles": {"b": {"revision": "7"}}}}',
            {"allowed": True},
            "7",
        ),
        (
            b'{"result": false, "provenance": {"bundles": '
            b'{"b": {"revision": "2"}, "a": {"revision": "1"}}}}',
            False,
            "a=1,b=2",
        ),
        (b'{"result": 1, "provenance": "not-an-object"}', 1, ""),
        (b'{"result": 1, "provenance": {"bundles": ["b"]}}', 1, ""),
        (b'{"result": 1, "provenance": {"bundles": {"b": {}}}}', 1, ""),
    ],
    ids=[
        "no-provenance",
        "one-bundle",
        "two-bundles",
        "provenance-not-object",
        "bundles-not-object",
        "bundle-without-revision",
    ],
)
async def test_fake_answer_parsed(
    serve: Callable[[Handler], Awaitable[str]],
    connect: Callable[..., OpaClient],
    body: bytes,
    result: Any,
    revision: str,
) -> None:
    client = connect(await serve(answering(200, body)))
    evaluation = await client.evaluate("authz/gateway/decision", {}, 2.0)
    assert evaluation.result == result
    assert evaluation.revision == revision


@pytest.mark.parametrize(
    ("status", "body", "content_type", "error", "match"),
    [
        (
            500,
            b'{"code": "internal_error", "message": "boom"}',
            "application/json",
            OpaResponseError,
            r"HTTP 500: internal_error: boom",
        ),
        (400, b"[]", "application/json", OpaResponseError, r"HTTP 400"),
        (502, b"<html>bad gateway</html>", "text/html", OpaResponseError, r"HTTP 502 .*not JSON"),
        (200, b"not json", "text/plain", OpaResponseError, r"not JSON"),
        (200, b"", "application/json", OpaResponseError, r"not JSON"),
        (200, b"[1, 2]", "application/json", OpaResponseError, r"not an object"),
        (200, b"null", "application/json", OpaResponseError, r"not an object"),
        (200, b'{"provenance": {}}', "application/json", UndefinedDecision, r"undefined"),
        (200, b"{}", "application/json", UndefinedDecision, r"undefined"),
    ],
    ids=[
        "500-json",
        "400-json-array",
        "502-html",
        "200-not-json",
        "200-empty",
        "200-array",
        "200-null",
        "200-no-result",
        "200-empty-object",
    ],
)
async def test_fake_bad_answer(
    serve: Callable[[Handler], Awaitable[str]],
    connect: Callable[..., OpaClient],
    status: int,
    body: bytes,
    content_type: str,
    error: type[Exception],
    match: str,
) -> None:
    client = connect(await serve(answering(status, body, content_type)))
    with pytest.raises(error, match=match):
        await client.evaluate("authz/gateway/decision", {}, 2.0)


async def call(client: OpaClient, method: str, timeout_s: float) -> object:
    if method == "evaluate":
        return await client.evaluate("authz/gateway/decision", {}, timeout_s)
    return await client.get("/health?bundles", timeout_s)


@pytest.mark.parametrize("method", ["evaluate", "get"], ids=["evaluate", "get"])
async def test_slow_opa_times_out(
    serve: Callable[[Handler], Awaitable[str]],
    connect: Callable[..., OpaClient],
    method: str,
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"result": True})

    client = connect(await serve(slow))
    started = time.monotonic()
    try:
        with pytest.raises(OpaTimeout, match=r"within 100 ms"):
            await call(client, method, 0.1)
    finally:
        release.set()
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("method", ["evaluate", "get"], ids=["evaluate", "get"])
async def test_closed_port_is_unavailable(connect: Callable[..., OpaClient], method: str) -> None:
    client = connect(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(OpaUnavailable, match=r"unreachable"):
        await call(client, method, 2.0)


@pytest.mark.parametrize("method", ["evaluate", "get"], ids=["evaluate", "get"])
async def test_connection_dropped_is_unavailable(
    connect: Callable[..., OpaClient], method: str
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = connect(f"http://127.0.0.1:{port}")
        with pytest.raises(OpaUnavailable):
            await call(client, method, 2.0)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("token", "expected"),
    [(Secret("t"), "Bearer t"), (None, None), (Secret(""), None)],
    ids=["token", "no-token", "empty-token"],
)
async def test_bearer_token_header(
    serve: Callable[[Handler], Awaitable[str]],
    connect: Callable[..., OpaClient],
    token: Secret | None,
    expected: str | None,
) -> None:
    seen = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await seen.record(request)
        return web.json_response({"result": True})

    client = connect(await serve(handler), token=token)
    await client.evaluate("authz/gateway/decision", {}, 2.0)
    await client.get("/health?bundles", 2.0)
    assert [headers.get("Authorization") for _, _, headers, _ in seen.requests] == [
        expected,
        expected,
    ]


@pytest.mark.parametrize(
    ("base", "path", "expected_url"),
    [
        ("{url}", "authz/gateway/decision", "/v1/data/authz/gateway/decision?provenance"),
        ("{url}/", "authz/gateway/decision", "/v1/data/authz/gateway/decision?provenance"),
        ("{url}", "a", "/v1/data/a?provenance"),
    ],
    ids=["plain-base", "base-with-trailing-slash", "one-segment"],
)
async def test_evaluate_request_shape(
    serve: Callable[[Handler], Awaitable[str]],
    connect: Callable[..., OpaClient],
    base: str,
    path: str,
    expected_url: str,
) -> None:
    seen = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await seen.record(request)
        return web.json_response({"result": True})

    document = {"attributes": {"request": {"http": {"method": "GET"}}}, "parsed_path": ["x"]}
    client = connect(base.format(url=await serve(handler)))
    await client.evaluate(path, document, 2.0)
    [(method, path_qs, headers, body)] = seen.requests
    assert (method, path_qs) == ("POST", expected_url)
    assert orjson.loads(body) == {"input": document}
    assert headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b"{}", (200, {})),
        (500, b'{"error": "not ready"}', (500, {"error": "not ready"})),
        (503, b"", (503, None)),
        (200, b"not json", (200, None)),
    ],
    ids=["ok", "error-json", "empty-body", "not-json"],
)
async def test_get_returns_status_and_json(
    serve: Callable[[Handler], Awaitable[str]],
    connect: Callable[..., OpaClient],
    status: int,
    body: bytes,
    expected: tuple[int, Any],
) -> None:
    client = connect(await serve(answering(status, body)))
    assert await client.get("/health?bundles", 2.0) == expected


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    path = tmp_path / "opa.sock"
    if len(str(path)) > 100:  # AF_UNIX paths are limited to ~108 bytes
        pytest.fail(f"tmp_path too long for a unix socket: {path}")
    return path


async def test_unix_socket_url(connect: Callable[..., OpaClient], socket_path: Path) -> None:
    seen = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await seen.record(request)
        if request.method == "GET":
            return web.json_response({})
        return web.json_response(
            {"result": {"allowed": True}, "provenance": {"bundles": {"b": {"revision": "u1"}}}}
        )

    runner = web.AppRunner(app_for(handler), access_log=None)
    await runner.setup()
    try:
        await web.UnixSite(runner, str(socket_path)).start()
        client = connect(f"unix://{socket_path}")
        evaluation = await client.evaluate("authz/gateway/decision", {"k": "v"}, 2.0)
        health = await client.get("/health?bundles", 2.0)
    finally:
        await runner.cleanup()
    assert (evaluation.result, evaluation.revision) == ({"allowed": True}, "u1")
    assert health == (200, {})
    assert [(method, path_qs) for method, path_qs, _, _ in seen.requests] == [
        ("POST", "/v1/data/authz/gateway/decision?provenance"),
        ("GET", "/health?bundles"),
    ]
    assert orjson.loads(seen.requests[0][3]) == {"input": {"k": "v"}}


async def test_unix_socket_missing_is_unavailable(
    connect: Callable[..., OpaClient], socket_path: Path
) -> None:
    client = connect(f"unix://{socket_path}")
    with pytest.raises(OpaUnavailable):
        await client.evaluate("authz/gateway/decision", {}, 2.0)
