"""Decision-log upload (authz.runtime.decision_upload) against a small receiver: an
aiohttp server speaking the service side of OPA's decision-log upload protocol
(https://www.openpolicyagent.org/docs/management-decision-logs). Pauses go through an
injected sleep: no test waits on the wall clock."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import test_utils, web

from authz.core.record import DecisionRecord
from authz.core.secret import Secret
from authz.runtime import server
from authz.runtime.config import load
from authz.runtime.decision_upload import DecisionUploader, aiohttp_post
from authz.runtime.logs import DecisionLog
from authz.runtime.metrics import Metrics

TOKEN = "upload-token-0123456789"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNlY3JldA"
API_KEY = "sk_live_SECRETKEY"
# Fields of OPA's EventV1 (v1/plugins/logs/plugin.go) every authz event carries.
EVENT_FIELDS = {"decision_id", "path", "timestamp", "labels", "metrics", "req_id", "custom"}
CONSOLE_ONLY = {"type", "level", "msg", "time"}


@dataclass
class Receiver:
    """The service: ``statuses`` answers POST /logs in turn (the last one repeats);
    every accepted batch is kept (decoded), every request's headers too."""

    statuses: list[int] = field(default_factory=lambda: [200])
    batches: list[list[dict[str, Any]]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        # auto_decompress is off: the body arrives exactly as sent.
        body = await request.read()
        self.headers.append(dict(request.headers))
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if status == 200:
            self.raw.append(gzip.decompress(body))
            self.batches.append(orjson.loads(self.raw[-1]))
        return web.Response(status=status)

    @property
    def events(self) -> list[dict[str, Any]]:
        return [event for batch in self.batches for event in batch]


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str, aiohttp.ClientSession]]:
    state = Receiver()
    app = web.Application()
    app.router.add_post("/logs", state.handle)
    server = test_utils.TestServer(app, host="127.0.0.1")
    await server.start_server(auto_decompress=False)
    try:
        async with aiohttp.ClientSession() as session:
            yield state, str(server.make_url("")), session
    finally:
        await server.close()


class Pauses:
    """An injected sleep: records each pause and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def record(n: int, **overrides: Any) -> DecisionRecord:
    fields: dict[str, Any] = {
        "decision_id": f"d-{n}",
        "timestamp": 1_700_000_000.5,
        "decision_path": "authz/gateway/decision",
        "allowed": True,
        "reason": "allowed",
        "http_status": 200,
        "revision": "r1",
        "document": {
            "attributes": {
                "request": {
                    "http": {
                        "path": f"/v1/items?api_key={API_KEY}",
                        "headers": {"authorization": f"Bearer {JWT}", "x-api-key": API_KEY},
                    }
                }
            }
        },
        "opa_result": {"allowed": True, "headers": {"authorization": f"Bearer {JWT}"}},
    } | overrides
    return DecisionRecord(**fields)


def uploader(
    url: str, session: aiohttp.ClientSession, metrics: Metrics, **kwargs: Any
) -> DecisionUploader:
    return DecisionUploader(
        url,
        aiohttp_post(session),
        metrics=metrics,
        token=Secret(TOKEN),
        min_delay_s=1.0,
        max_delay_s=8.0,
        sleep=kwargs.pop("sleep", Pauses()),
        **kwargs,
    )


def feed(log: DecisionLog, numbers: range | list[int]) -> None:
    for n in numbers:
        log.record(record(n))


def dropped(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "authz_decision_log_dropped_total", {"reason": reason}
    )
    return value or 0.0


def ids(events: list[dict[str, Any]]) -> list[str]:
    return [event["decision_id"] for event in events]


Fixture = tuple[Receiver, str, aiohttp.ClientSession]


async def test_upload_batches_arrive_gzipped_in_opa_schema(receiver: Fixture) -> None:
    state, url, session = receiver
    metrics = Metrics()
    up = uploader(url, session, metrics, upload_size_limit_bytes=4096)
    log = DecisionLog(format="authz", upload=up, console=False)
    feed(log, range(20))
    assert await up.flush()
    assert len(state.batches) > 1  # 20 events do not fit one 4 KiB batch
    assert all(len(raw) <= 4096 for raw in state.raw)
    for headers in state.headers:
        assert headers["Content-Encoding"] == "gzip"
        assert headers["Content-Type"] == "application/json"
        assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert ids(state.events) == [f"d-{n}" for n in range(20)]
    for event in state.events:
        assert event.keys() >= EVENT_FIELDS
        assert not CONSOLE_ONLY & event.keys()
        assert event["path"] == "authz/gateway/decision"
        assert event["custom"]["authz"]["result"] == "allow"
    assert metrics.registry.get_sample_value("authz_decision_log_upload_events_total") == 20
    assert up.buffered_bytes == 0


async def test_upload_retries_after_503_and_loses_nothing(receiver: Fixture) -> None:
    state, url, session = receiver
    state.statuses = [503, 503, 200]
    pauses = Pauses()
    metrics = Metrics()
    up = uploader(url, session, metrics, sleep=pauses)
    feed(DecisionLog(upload=up, console=False), range(5))
    task = asyncio.create_task(up.run())
    for _ in range(1000):  # bounded: the loop only ever pauses in the injected sleep
        if state.batches:
            break
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert pauses.delays[:3] == [1.0, 2.0, 4.0]  # min delay, then backing off
    assert ids(state.events) == [f"d-{n}" for n in range(5)]
    assert (
        metrics.registry.get_sample_value("authz_decision_log_uploads_total", {"result": "error"})
        == 2
    )
    assert dropped(metrics, "buffer_full") == 0


async def test_upload_post_never_reads_an_endless_answer_body() -> None:
    """A hostile or broken service answering with an endless body: the POST reports the
    status once the headers arrive, it neither buffers the body nor waits it out."""

    async def endless(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        chunk = b"x" * 65536
        with contextlib.suppress(ConnectionError):
            while True:
                await response.write(chunk)
        return response

    app = web.Application()
    app.router.add_post("/logs", endless)
    service = test_utils.TestServer(app, host="127.0.0.1")
    await service.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            post = aiohttp_post(session, timeout_s=3.0)
            assert await post(str(service.make_url("/logs")), b"[]", {}) == 200
    finally:
        await service.close()


def test_upload_backoff_doubles_up_to_max_delay() -> None:
    up = DecisionUploader(
        "http://127.0.0.1:1", _never_post, metrics=Metrics(), min_delay_s=1.0, max_delay_s=8.0
    )
    assert [up.delay(n) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


async def _never_post(url: str, body: bytes, headers: dict[str, str]) -> int:
    raise OSError("no service")


async def test_upload_drops_oldest_first_when_service_stays_down(receiver: Fixture) -> None:
    state, url, session = receiver
    state.statuses = [503]
    metrics = Metrics()
    up = uploader(url, session, metrics, upload_size_limit_bytes=2048, buffer_size_limit_bytes=4096)
    log = DecisionLog(upload=up, console=False)
    feed(log, range(40))
    assert not await up.flush()
    assert not await up.flush()
    assert 0 < up.buffered_bytes <= 4096
    kept = 40 - int(dropped(metrics, "buffer_full"))
    assert 0 < kept < 40
    assert metrics.registry.get_sample_value("authz_decision_log_buffer_bytes") == up.buffered_bytes
    state.statuses = [200]
    assert await up.flush()
    assert ids(state.events) == [f"d-{n}" for n in range(40 - kept, 40)]  # the newest


@pytest.mark.parametrize("first_status", [200, 503], ids=["accepted", "refused"])
async def test_upload_events_evicted_during_a_post_are_counted_once_and_newer_never_lost(
    first_status: int,
) -> None:
    # While a batch is in flight new events push it out of the buffer: its answer must
    # then release only what it held (never the newer events), and its evicted events
    # count as dropped only when the service refused them.
    metrics = Metrics()
    received: list[str] = []
    first: list[str] = []

    async def post(url: str, body: bytes, headers: dict[str, str]) -> int:
        batch = ids(orjson.loads(gzip.decompress(body)))
        if not first:
            first.extend(batch)
            feed(log, range(100, 110))  # arrives while the first batch is in flight
            if first_status != 200:
                return first_status
        received.extend(batch)
        return 200

    up = DecisionUploader(
        "http://127.0.0.1:1",
        post,
        metrics=metrics,
        upload_size_limit_bytes=2048,
        buffer_size_limit_bytes=4096,
    )
    log = DecisionLog(upload=up, console=False)
    feed(log, range(3))
    await up.flush()
    if first_status != 200:
        assert await up.flush()
    newer = [f"d-{n}" for n in range(100, 110)]
    rest = [i for i in received if i not in first]
    assert rest
    assert rest == newer[-len(rest) :]
    delivered = len(received)
    assert len(received) == len(set(received))
    assert delivered + dropped(metrics, "buffer_full") == 13  # every event once
    assert up.buffered_bytes == 0


async def test_upload_nothing_lost_while_service_is_up(receiver: Fixture) -> None:
    state, url, session = receiver
    metrics = Metrics()
    up = uploader(
        url, session, metrics, upload_size_limit_bytes=4096, buffer_size_limit_bytes=65536
    )
    log = DecisionLog(upload=up, console=False)
    for start in range(0, 200, 10):
        feed(log, range(start, start + 10))
        assert await up.flush()
    assert ids(state.events) == [f"d-{n}" for n in range(200)]
    assert dropped(metrics, "buffer_full") == 0


async def test_uploaded_event_never_holds_a_credential(receiver: Fixture) -> None:
    state, url, session = receiver
    up = uploader(url, session, Metrics())
    for format in ("authz", "opa"):
        DecisionLog(format=format, upload=up, console=False).record(record(1))
    assert await up.flush()
    assert len(state.events) == 2
    for raw in state.raw:
        assert JWT not in raw.decode()
        assert API_KEY not in raw.decode()
        assert TOKEN not in raw.decode()
    assert all(event["masked"] for event in state.events)


@pytest.mark.parametrize(
    ("rules", "kept"),
    [
        ({}, ["d-0", "d-1", "d-2"]),
        ({"drop_allowed": True}, ["d-1"]),
        ({"drop_paths": ["authz/other/decision"]}, ["d-0", "d-1"]),
    ],
    ids=["no-rule-keeps-all", "drop-allowed-keeps-denied", "drop-path-keeps-other-paths"],
)
async def test_upload_drop_rules_leave_out_only_what_they_name(
    receiver: Fixture, rules: dict[str, Any], kept: list[str]
) -> None:
    state, url, session = receiver
    up = uploader(url, session, Metrics(), **rules)
    log = DecisionLog(upload=up, console=False)
    log.record(record(0))
    log.record(record(1, allowed=False, reason="denied", http_status=403))
    log.record(record(2, decision_path="authz/other/decision"))
    assert await up.flush()
    assert ids(state.events) == kept


def test_upload_event_larger_than_a_batch_is_dropped_and_counted() -> None:
    metrics = Metrics()
    up = DecisionUploader(
        "http://127.0.0.1:1", _never_post, metrics=metrics, upload_size_limit_bytes=1024
    )
    up.add(b"{" + b'"x":"' + b"a" * 2000 + b'"}')
    assert up.buffered_bytes == 0
    assert dropped(metrics, "too_large") == 1


async def test_upload_flushes_on_shutdown_within_grace(receiver: Fixture) -> None:
    state, url, session = receiver
    pauses = _Forever()
    up = uploader(url, session, Metrics(), sleep=pauses)
    async with up.running(grace_s=5.0):
        feed(DecisionLog(upload=up, console=False), range(3))
        await asyncio.sleep(0)
        assert state.events == []  # still pausing
    assert ids(state.events) == ["d-0", "d-1", "d-2"]


async def test_upload_shutdown_counts_what_it_could_not_send() -> None:
    metrics = Metrics()
    up = DecisionUploader("http://127.0.0.1:1", _never_post, metrics=metrics, sleep=_Forever())
    async with up.running(grace_s=1.0):
        up.add(b'{"decision_id":"d-0"}')
    assert dropped(metrics, "shutdown") == 1


class _Forever:
    """An injected sleep that never returns (the uploader only ends on cancel)."""

    async def __call__(self, delay: float) -> None:
        await asyncio.Event().wait()


def test_upload_add_never_awaits() -> None:
    # add() runs on the Check path: a plain function, not a coroutine.
    assert not asyncio.iscoroutinefunction(DecisionUploader.add)


async def test_runtime_wiring_uploads_until_the_exit_stack_unwinds_then_flushes(
    receiver: Fixture,
) -> None:
    # authz.runtime.server builds the uploader from settings onto the runtime's exit stack:
    # unwinding it (shutdown) flushes what is buffered.
    state, url, _ = receiver
    settings = load(
        {
            "AUTHZ_DECISION_LOG_SERVICE_URL": url,
            "AUTHZ_DECISION_LOG_SERVICE_TOKEN": TOKEN,
            "AUTHZ_DECISION_LOG_MIN_DELAY_S": "3600",
            "AUTHZ_DECISION_LOG_MAX_DELAY_S": "3600",
            "AUTHZ_DECISION_LOG": "false",
        }
    )
    metrics = Metrics()
    async with contextlib.AsyncExitStack() as stack:
        up = await server._decision_upload(settings, metrics, stack)
        assert up is not None
        log = DecisionLog.from_settings(settings, upload=up)
        feed(log, range(3))
        await asyncio.sleep(0)
        assert state.events == []  # the next upload is an hour away
    assert ids(state.events) == ["d-0", "d-1", "d-2"]
    assert state.headers[0]["Authorization"] == f"Bearer {TOKEN}"


async def test_runtime_wiring_without_a_service_url_uploads_nothing() -> None:
    async with contextlib.AsyncExitStack() as stack:
        assert await server._decision_upload(load({}), Metrics(), stack) is None
