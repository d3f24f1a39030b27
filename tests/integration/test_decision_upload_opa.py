"""authz's decision-log upload against OPA's own, at one receiver.

A real OPA (the pinned binary) uploads its decision log to a small aiohttp receiver
(``services`` + ``decision_logs.service``,
https://www.openpolicyagent.org/docs/management-decision-logs); authz's uploader sends
its events for the same decision to the same receiver. Both requests must look alike to
the receiver (``POST /logs``, ``Content-Encoding: gzip``, ``Content-Type:
application/json``, a gzip'd JSON array) and each event must have the same top-level keys
as OPA's, each of the same JSON type: a receiver of OPA decision logs takes authz's.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import test_utils, web

from authz.runtime.decision_upload import DecisionUploader, aiohttp_post
from authz.runtime.logs import DecisionLog
from authz.runtime.metrics import Metrics
from tests.helpers.opa_decision import (
    TOKEN,
    authz_record,
    build_policy_bundle,
    post_with_metadata,
    shape,
)
from tests.helpers.opa_server import running_opa

# How long OPA may take to upload (its min/max delay is 1 s here).
UPLOAD_WAIT_S = 20.0


@dataclass
class Received:
    """One POST as the receiver saw it: path, headers, the decompressed events."""

    path: str
    headers: dict[str, str]
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Receiver:
    """Every POST kept; ``opa_event`` set once an event with ``custom`` (OPA's, asked for
    with request metadata) arrived."""

    url: str = ""
    posts: list[Received] = field(default_factory=list)
    opa_event: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
def bundle(opa_bin: str, tmp_path: Path) -> Path:
    return build_policy_bundle(opa_bin, tmp_path)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()  # auto_decompress is off: as sent
        events = json.loads(gzip.decompress(body))
        state.posts.append(Received(request.path, dict(request.headers), events))
        if any(event.get("custom") for event in events):
            state.opa_event.set()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    server = test_utils.TestServer(app, host="127.0.0.1")
    await server.start_server(auto_decompress=False)
    state.url = str(server.make_url("")).rstrip("/")
    try:
        yield state
    finally:
        await server.close()


async def test_authz_upload_looks_like_opas_upload_to_a_receiver(
    opa_bin: str, tmp_path: Path, bundle: Path, receiver: Receiver
) -> None:
    posts, receiver_url = receiver.posts, receiver.url
    args = (
        "--log-level=info",
        f"--set=services.log.url={receiver_url}",
        "--set=decision_logs.service=log",
        "--set=decision_logs.reporting.min_delay_seconds=1",
        "--set=decision_logs.reporting.max_delay_seconds=1",
        "--bundle",
        str(bundle),
    )
    with running_opa(opa_bin, *args, log_path=tmp_path / "opa.log") as url:
        record = await authz_record(url)
        assert record.document is not None
        # OPA's own event for the same input, with request metadata (OPA's `custom`).
        post_with_metadata(url, dict(record.document))
        async with asyncio.timeout(UPLOAD_WAIT_S):
            await receiver.opa_event.wait()
    theirs_post = next(p for p in posts if any(e.get("custom") for e in p.events))
    theirs = next(e for e in theirs_post.events if e.get("custom"))

    async with aiohttp.ClientSession() as session:
        uploader = DecisionUploader(receiver_url, aiohttp_post(session), metrics=Metrics())
        DecisionLog(upload=uploader, console=False).record(record)
        assert await uploader.flush()
    ours_post = posts[-1]
    [ours] = ours_post.events

    assert ours_post.path == theirs_post.path == "/logs"
    for name in ("Content-Encoding", "Content-Type"):
        assert ours_post.headers[name] == theirs_post.headers[name], name
    assert shape(ours) == shape(theirs)
    for key in ("path", "input", "result"):
        assert ours[key] == theirs[key], key
    assert TOKEN not in json.dumps(ours)
