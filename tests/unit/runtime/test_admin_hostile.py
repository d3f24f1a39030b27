"""The admin API under malformed requests: a precise 4xx with a JSON error, never a 5xx,
and nothing changed or audited.

Finding 9 of issue #13: invalid UTF-8 in the admin ``Authorization`` header gave 500.
Requests are sent as raw bytes: HTTP clients refuse to send most of these.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from authz.core.mode import Control, Mode
from authz.core.secret import Secret
from authz.runtime.admin import create_admin_app, start_admin
from authz.runtime.overrides import OverrideStore

TOKEN = "adm-t0ken-" + "5f4e3d2c1b0a" * 3
AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()
JSON = b"Content-Type: application/json\r\n"
OVERRIDE = {
    "effect": "deny",
    "decision_path": "authz/gateway/decision",
    "match": {"key_id": "k1"},
    "ttl_seconds": 60,
    "reason": "INC-1",
}


@dataclass
class Admin:
    port: int
    control: Control
    overrides: OverrideStore
    actions: list[str]


class _Push:
    async def __call__(self, document: dict[str, Any]) -> None:
        return None


@asynccontextmanager
async def running_admin() -> AsyncIterator[Admin]:
    control = Control(Mode.ENFORCE)
    overrides = OverrideStore(_Push())
    actions: list[str] = []

    def on_action(action: str, fields: Mapping[str, Any]) -> None:
        # What AuditTrail.admin does with the fields: it must never fail for an action
        # that was applied.
        orjson.dumps({"action": action, **fields}, option=orjson.OPT_SORT_KEYS)
        actions.append(action)

    app = create_admin_app(
        {}, control=control, overrides=overrides, token=Secret(TOKEN), on_action=on_action
    )
    runner, port = await start_admin(app, "127.0.0.1", 0)
    try:
        yield Admin(port, control, overrides, actions)
    finally:
        await runner.cleanup()


async def send(port: int, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` (Content-Length fixed up to the body) and read the answer:
    (status, body)."""
    head, sep, body = request.partition(b"\r\n\r\n")
    if b"Content-Length:" in head:
        head = re.sub(rb"Content-Length: \d+", b"Content-Length: %d" % len(body), head)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + sep + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(1 << 20), 5)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def post(path: str, body: bytes, *headers: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n".encode()
        + b"".join(headers)
        + b"Content-Length: 0\r\n\r\n"
        + body
    )


MODE = b'{"mode": "dry-run", "reason": "test"}'
CHUNK = b"%x\r\n" % 0x4000 + b" " * 0x4000 + b"\r\n"


def get_mode(authorization: bytes) -> bytes:
    return b"GET /v1/mode HTTP/1.1\r\nHost: a\r\nAuthorization: " + authorization + b"\r\n\r\n"


def actor(value: bytes) -> bytes:
    return b"X-Authz-Actor: " + value + b"\r\n"


BAD = 400, "invalid_request"
HOSTILE = [
    pytest.param(get_mode(b"Bearer \xff\xfe"), 401, "unauthorized", id="auth-invalid-utf8"),
    pytest.param(
        get_mode(b"\xff\xfe " + TOKEN.encode()), 401, "unauthorized", id="auth-scheme-invalid-utf8"
    ),
    pytest.param(
        get_mode(b"Bearer " + TOKEN.encode() + b"\xc3\xa9"),
        401,
        "unauthorized",
        id="auth-token-plus-non-ascii",
    ),
    pytest.param(post("/v1/mode", MODE, AUTH, JSON, actor(b"\xff\xfe")), *BAD, id="actor-not-utf8"),
    pytest.param(post("/v1/mode", MODE, AUTH, JSON, actor(b"a\tb")), *BAD, id="actor-control"),
    pytest.param(post("/v1/mode", MODE, AUTH, JSON, actor(b"a\xc2\x85b")), *BAD, id="actor-c1"),
    pytest.param(
        post("/v1/overrides", json.dumps(OVERRIDE).encode(), AUTH, actor(b"\xed\xa0\x80")),
        *BAD,
        id="actor-encoded-surrogate",
    ),
    pytest.param(post("/v1/reload", b"", AUTH, actor(b"\xc3")), *BAD, id="actor-truncated-utf8"),
    pytest.param(
        post("/v1/mode", b'{"mode": "dry-run", "reason": "\xff"}', AUTH, JSON),
        *BAD,
        id="body-not-utf8",
    ),
    pytest.param(
        post("/v1/mode", b'{"mode": "dry-run", "reason": "x\\ud800y"}', AUTH, JSON),
        *BAD,
        id="body-lone-surrogate-escape",
    ),
    pytest.param(
        post("/v1/overrides", json.dumps({**OVERRIDE, "reason": "x\udcffy"}).encode(), AUTH),
        *BAD,
        id="override-lone-surrogate-escape",
    ),
    pytest.param(post("/v1/mode", b"[" * 16000, AUTH, JSON), *BAD, id="body-deeply-nested"),
    pytest.param(
        post("/v1/overrides", b"[" * 5000 + b"]" * 5000, AUTH, JSON),
        *BAD,
        id="override-deeply-nested",
    ),
    pytest.param(post("/v1/mode", b"NaN", AUTH, JSON), *BAD, id="body-nan"),
    pytest.param(post("/v1/mode", b"", AUTH, JSON), *BAD, id="body-empty"),
    pytest.param(
        post("/v1/mode", b" " * 100_000, AUTH, JSON), 413, "body_too_large", id="body-too-large"
    ),
    pytest.param(
        b"POST /v1/mode HTTP/1.1\r\nHost: a\r\n"
        + AUTH
        + JSON
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + CHUNK * 4
        + b"0\r\n\r\n",
        413,
        "body_too_large",
        id="chunked-body-too-large",
    ),
]


@pytest.mark.parametrize(("request_bytes", "status", "code"), HOSTILE)
async def test_malformed_admin_request_is_a_precise_4xx_and_changes_nothing(
    request_bytes: bytes, status: int, code: str
) -> None:
    async with running_admin() as admin:
        got, body = await send(admin.port, request_bytes)
        assert (got, json.loads(body)["error"]) == (status, code), body
        assert TOKEN.encode() not in body
        assert admin.control.mode is Mode.ENFORCE
        assert admin.overrides.active() == []
        assert admin.actions == []
        # The server is unharmed: a good request right after works.
        got, body = await send(admin.port, post("/v1/mode", MODE, AUTH, JSON))
        assert got == 200, body
        assert admin.actions == ["set_mode"]


@pytest.mark.parametrize(
    "actor",
    ["alice", "Zoë Müller", "ops@example.com (INC-1)", "a" * 200],
    ids=["ascii", "utf8-name", "punctuation", "long-is-cut-to-64"],
)
async def test_admin_actor_header_accepts_printable_names(actor: str) -> None:
    async with running_admin() as admin:
        got, body = await send(
            admin.port,
            post("/v1/mode", MODE, AUTH, JSON, f"X-Authz-Actor: {actor}\r\n".encode()),
        )
        assert got == 200, body
        assert admin.control.mode is Mode.DRY_RUN
        assert admin.actions == ["set_mode"]


@pytest.mark.parametrize(
    "charset", ["nope", "latin-1", "utf-16"], ids=["unknown", "latin1", "utf16"]
)
async def test_json_charset_parameter_is_ignored_json_is_utf8(charset: str) -> None:
    # RFC 8259 section 11: application/json has no charset parameter; JSON is UTF-8.
    content_type = f"Content-Type: application/json; charset={charset}\r\n".encode()
    async with running_admin() as admin:
        got, body = await send(admin.port, post("/v1/mode", MODE, AUTH, content_type))
        assert got == 200, body
        assert admin.control.mode is Mode.DRY_RUN


@pytest.mark.parametrize(
    "body",
    [
        {"mode": "dry-run", "reason": {"a": 1}},
        {"mode": "dry-run", "reason": ["INC-1"]},
        {"mode": "dry-run", "reason": 5},
        {"mode": "dry-run", "reason": "r" * 501},
        {"mode": {"dry-run": 1}, "reason": "INC-1"},
        {"mode": ["dry-run"], "reason": "INC-1"},
        {"mode": None, "reason": "INC-1"},
    ],
    ids=[
        "reason-object",
        "reason-list",
        "reason-number",
        "reason-too-long",
        "mode-object",
        "mode-list",
        "mode-null",
    ],
)
async def test_set_mode_refuses_ill_typed_fields_with_400(body: dict[str, Any]) -> None:
    async with running_admin() as admin:
        got, answer = await send(admin.port, post("/v1/mode", json.dumps(body).encode(), AUTH))
        assert (got, json.loads(answer)["error"]) == (400, "invalid_request"), answer
        assert admin.control.mode is Mode.ENFORCE
        assert admin.actions == []
