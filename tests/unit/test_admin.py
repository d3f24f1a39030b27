"""Admin HTTP endpoints: /healthz, /readyz, and the OPA bundles readiness check."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import test_utils, web

from authz import admin
from authz.admin import ReadinessCheck, create_admin_app, opa_bundles_check, start_admin
from authz.policy import OpaClient
from authz.stack.supervisor import free_port


def fixed(ok: bool, detail: str) -> ReadinessCheck:
    async def check() -> tuple[bool, str]:
        return ok, detail

    return check


@asynccontextmanager
async def admin_client(
    checks: Mapping[str, ReadinessCheck],
) -> AsyncIterator[test_utils.TestClient[web.Request, web.Application]]:
    server = test_utils.TestServer(create_admin_app(checks), host="127.0.0.1")
    async with test_utils.TestClient(server) as client:
        yield client


@pytest.mark.parametrize(
    "checks",
    [{}, {"opa": fixed(True, "ok")}, {"opa": fixed(False, "opa_unavailable")}],
    ids=["no-checks", "ready", "not-ready"],
)
async def test_healthz_is_ok_whatever_readiness(checks: Mapping[str, ReadinessCheck]) -> None:
    async with admin_client(checks) as client:
        resp = await client.get("/healthz")
        assert (resp.status, await resp.json()) == (200, {"status": "ok"})


@pytest.mark.parametrize(
    ("checks", "status", "body"),
    [
        ({}, 200, {"status": "ready", "checks": {}}),
        (
            {"serving": fixed(True, "serving"), "opa": fixed(True, "bundles activated")},
            200,
            {
                "status": "ready",
                "checks": {
                    "serving": {"ok": True, "detail": "serving"},
                    "opa": {"ok": True, "detail": "bundles activated"},
                },
            },
        ),
        (
            {"serving": fixed(True, "serving"), "opa": fixed(False, "opa_unavailable")},
            503,
            {
                "status": "not_ready",
                "checks": {
                    "serving": {"ok": True, "detail": "serving"},
                    "opa": {"ok": False, "detail": "opa_unavailable"},
                },
            },
        ),
        (
            {"serving": fixed(False, "shutting down"), "opa": fixed(False, "opa_timeout")},
            503,
            {
                "status": "not_ready",
                "checks": {
                    "serving": {"ok": False, "detail": "shutting down"},
                    "opa": {"ok": False, "detail": "opa_timeout"},
                },
            },
        ),
    ],
    ids=["no-checks", "all-ok", "one-failing", "all-failing"],
)
async def test_readyz(
    checks: Mapping[str, ReadinessCheck], status: int, body: dict[str, Any]
) -> None:
    async with admin_client(checks) as client:
        resp = await client.get("/readyz")
        assert (resp.status, await resp.json()) == (status, body)


async def test_readyz_runs_checks_on_every_request() -> None:
    state = {"ok": False}

    async def flipping() -> tuple[bool, str]:
        return state["ok"], "flip"

    async with admin_client({"flip": flipping}) as client:
        assert (await client.get("/readyz")).status == 503
        state["ok"] = True
        assert (await client.get("/readyz")).status == 200


# --- opa_bundles_check -----------------------------------------------------------------


@asynccontextmanager
async def fake_opa(status: int, body: bytes, delay_s: float = 0.0) -> AsyncIterator[OpaClient]:
    """An OpaClient for a fake OPA whose /health answers ``status`` with ``body``."""
    seen: list[str] = []

    async def health(request: web.Request) -> web.Response:
        seen.append(request.path_qs)
        if delay_s:
            await asyncio.sleep(delay_s)
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/health", health)
    async with test_utils.TestServer(app, host="127.0.0.1") as server:
        client = OpaClient(str(server.make_url("")))
        try:
            yield client
        finally:
            await client.close()
    assert seen
    assert set(seen) == {"/health?bundles"}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b"{}", (True, "bundles activated")),
        (
            500,
            b'{"error": "not all bundles activated"}',
            (False, "OPA health HTTP 500 not all bundles activated"),
        ),
        (500, b"{}", (False, "OPA health HTTP 500")),
        (503, b"oops", (False, "OPA health HTTP 503")),
        (500, b'["error"]', (False, "OPA health HTTP 500")),
    ],
    ids=["ok", "500-error", "500-no-error", "503-not-json", "500-array"],
)
async def test_opa_bundles_check(status: int, body: bytes, expected: tuple[bool, str]) -> None:
    async with fake_opa(status, body) as client:
        assert await opa_bundles_check(client)() == expected


async def test_opa_bundles_check_unreachable() -> None:
    client = OpaClient(f"http://127.0.0.1:{free_port()}")
    try:
        assert await opa_bundles_check(client)() == (False, "opa_unavailable")
    finally:
        await client.close()


async def test_opa_bundles_check_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin, "_CHECK_TIMEOUT_S", 0.05)
    async with fake_opa(200, b"{}", delay_s=0.5) as client:
        assert await opa_bundles_check(client)() == (False, "opa_timeout")


async def test_readyz_with_opa_check_names_failure() -> None:
    async with (
        fake_opa(500, b'{"error": "bundle authz not activated"}') as opa,
        admin_client({"opa": opa_bundles_check(opa)}) as client,
    ):
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert (await resp.json())["checks"]["opa"] == {
            "ok": False,
            "detail": "OPA health HTTP 500 bundle authz not activated",
        }


async def test_start_admin_binds_free_port() -> None:
    runner, port = await start_admin(create_admin_app({}), "127.0.0.1", 0)
    try:
        assert port > 0
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as resp,
        ):
            assert (resp.status, await resp.json()) == (200, {"status": "ok"})
    finally:
        await runner.cleanup()
