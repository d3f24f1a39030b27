"""Admin HTTP endpoints: /healthz, /readyz, and the OPA bundles readiness check."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import test_utils, web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from authz.core.errors import (
    AdminRequestError,
    InvalidDecision,
    OpaUnavailable,
    PolicyError,
    RequestError,
    UndefinedDecision,
)
from authz.core.mode import Control, Mode
from authz.core.opa import OpaClient
from authz.core.secret import Secret
from authz.runtime import readiness
from authz.runtime.admin import create_admin_app, start_admin
from authz.runtime.metrics import Metrics
from authz.runtime.overrides import OverrideStore
from authz.runtime.readiness import ReadinessCheck, opa_bundles_check
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
    monkeypatch.setattr(readiness, "_CHECK_TIMEOUT_S", 0.05)
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


# --- /metrics ----------------------------------------------------------------------------

ADMIN_TOKEN = "adm-t0ken-5f4e3d2c1b0a"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@asynccontextmanager
async def admin_api(
    **kwargs: Any,
) -> AsyncIterator[test_utils.TestClient[web.Request, web.Application]]:
    """A client for create_admin_app({}, **kwargs)."""
    server = test_utils.TestServer(create_admin_app({}, **kwargs), host="127.0.0.1")
    async with test_utils.TestClient(server) as client:
        yield client


class Actions:
    """The on_action callback: records (action, fields)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, action: str, fields: Mapping[str, Any]) -> None:
        self.calls.append((action, dict(fields)))


class FakeOpaPush:
    """OverrideStore's push: records documents, or raises ``error`` when set."""

    def __init__(self) -> None:
        self.documents: list[dict[str, Any]] = []
        self.error: PolicyError | None = None

    async def __call__(self, document: dict[str, Any]) -> None:
        if self.error is not None:
            raise self.error
        self.documents.append(document)


async def test_metrics_serves_prometheus_text_and_refreshes_first() -> None:
    metrics = Metrics()
    scrapes: list[int] = []

    def before_scrape() -> None:
        scrapes.append(1)
        metrics.overrides_active.set(len(scrapes))

    async with admin_api(metrics=metrics, before_scrape=before_scrape) as client:
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
        second = await (await client.get("/metrics")).text()
    assert scrapes == [1, 1]
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert {"authz_decisions", "authz_mode", "authz_opa_circuit_state", "authz_build_info"} <= set(
        families
    )
    assert all(name.startswith("authz_") for name in families)
    assert 'authz_mode{mode="enforce"} 1.0' in text
    # before_scrape ran before the answer was built: each scrape shows its own refresh.
    assert "authz_overrides_active 1.0" in text
    assert "authz_overrides_active 2.0" in second


async def test_metrics_not_enabled() -> None:
    async with admin_api() as client:
        resp = await client.get("/metrics")
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"


# --- admin API authentication ------------------------------------------------------------

ADMIN_ROUTES = [
    ("GET", "/v1/mode"),
    ("POST", "/v1/mode"),
    ("GET", "/v1/overrides"),
    ("POST", "/v1/overrides"),
    ("DELETE", "/v1/overrides/ovr-1"),
    ("POST", "/v1/preview"),
    ("POST", "/v1/reload"),
]
ROUTE_IDS = [f"{method} {path}" for method, path in ADMIN_ROUTES]


class FakePreview:
    """The preview callback: records bodies; answers ``answer`` or raises ``error``."""

    def __init__(self, error: Exception | None = None) -> None:
        self.bodies: list[Any] = []
        self.error = error

    async def __call__(self, body: Any) -> Mapping[str, Any]:
        self.bodies.append(body)
        if self.error is not None:
            raise self.error
        return {"allowed": False, "reason": "role_not_allowed", "source": "deny"}


class FakeReload:
    """The reload callback: records actors."""

    def __init__(self) -> None:
        self.actors: list[str] = []

    async def __call__(self, actor: str) -> Mapping[str, Any]:
        self.actors.append(actor)
        return {"mode": "enforce", "secrets": "reloaded", "revision": "r2"}


def full_admin(token: Secret | None, **kwargs: Any) -> dict[str, Any]:
    return {
        "control": Control(),
        "overrides": OverrideStore(FakeOpaPush()),
        "token": token,
        "preview": FakePreview(),
        "reload": FakeReload(),
        **kwargs,
    }


@pytest.mark.parametrize("token", [None, Secret("")], ids=["no-token", "empty-token"])
@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES, ids=ROUTE_IDS)
async def test_admin_api_disabled_without_token(
    token: Secret | None, method: str, path: str
) -> None:
    actions = Actions()
    async with admin_api(**full_admin(token, on_action=actions)) as client:
        resp = await client.request(
            method, path, headers={"Authorization": "Bearer "}, json={"mode": "dry-run"}
        )
        assert resp.status == 403
        assert (await resp.json())["error"] == "admin_api_disabled"
    assert actions.calls == []


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", ADMIN_TOKEN, f"Bearer {ADMIN_TOKEN}x", f"Basic {ADMIN_TOKEN}", ""],
    ids=["missing", "wrong", "no-scheme", "longer", "basic-scheme", "empty"],
)
@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES, ids=ROUTE_IDS)
async def test_admin_api_wrong_or_missing_bearer(
    authorization: str | None, method: str, path: str
) -> None:
    actions = Actions()
    settings = full_admin(Secret(ADMIN_TOKEN), on_action=actions)
    headers = {} if authorization is None else {"Authorization": authorization}
    async with admin_api(**settings) as client:
        resp = await client.request(
            method, path, headers=headers, json={"mode": "dry-run", "reason": "x"}
        )
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="authz-admin"'
        text = await resp.text()
    assert json.loads(text)["error"] == "unauthorized"
    assert ADMIN_TOKEN not in text
    assert actions.calls == []
    assert settings["control"].mode is Mode.ENFORCE


@pytest.mark.parametrize(
    ("token", "authorization", "status"),
    [
        (None, f"Bearer {ADMIN_TOKEN}", 403),
        (Secret(ADMIN_TOKEN), None, 401),
        (Secret(ADMIN_TOKEN), "Bearer wrong", 401),
        (Secret(ADMIN_TOKEN), f"Bearer {ADMIN_TOKEN}", 200),
    ],
    ids=["disabled", "missing", "wrong", "right"],
)
async def test_every_v1_route_is_authenticated_even_one_without_its_own_check(
    token: Secret | None, authorization: str | None, status: int
) -> None:
    # Authentication is one middleware over /v1/, so a route added without any check of
    # its own is still refused without the token.
    called: list[str] = []

    async def extra(request: web.Request) -> web.Response:
        called.append(request.path)
        return web.json_response({"ok": True})

    app = create_admin_app({}, **full_admin(token))
    app.router.add_get("/v1/extra", extra)
    headers = {} if authorization is None else {"Authorization": authorization}
    client: test_utils.TestClient[web.Request, web.Application]
    async with test_utils.TestClient(test_utils.TestServer(app, host="127.0.0.1")) as client:
        resp = await client.get("/v1/extra", headers=headers)
        assert resp.status == status
    assert called == (["/v1/extra"] if status == 200 else [])


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/nothing-here", 404), ("PUT", "/v1/mode", 405)],
    ids=["unknown-path", "wrong-method"],
)
async def test_admin_routing_errors_come_before_authentication(
    method: str, path: str, status: int
) -> None:
    async with admin_api(**full_admin(Secret(ADMIN_TOKEN))) as client:
        resp = await client.request(method, path)
        assert resp.status == status


# --- /v1/mode -------------------------------------------------------------------------


async def test_get_mode() -> None:
    control = Control(Mode.DRY_RUN)
    async with admin_api(control=control, token=Secret(ADMIN_TOKEN)) as client:
        resp = await client.get("/v1/mode", headers=AUTH)
        assert (resp.status, await resp.json()) == (200, {"mode": "dry-run"})


async def test_set_mode_dry_run() -> None:
    control, actions = Control(), Actions()
    async with admin_api(control=control, token=Secret(ADMIN_TOKEN), on_action=actions) as client:
        resp = await client.post(
            "/v1/mode",
            headers={**AUTH, "X-Authz-Actor": "bob"},
            json={"mode": "dry-run", "reason": "rolling out policy v2"},
        )
        assert (resp.status, await resp.json()) == (200, {"mode": "dry-run", "previous": "enforce"})
        assert (await (await client.get("/v1/mode", headers=AUTH)).json()) == {"mode": "dry-run"}
    assert control.mode is Mode.DRY_RUN
    assert actions.calls == [
        (
            "set_mode",
            {
                "mode": "dry-run",
                "previous": "enforce",
                "reason": "rolling out policy v2",
                "actor": "bob",
            },
        )
    ]


async def test_set_mode_default_actor_and_back_to_enforce() -> None:
    control, actions = Control(Mode.DRY_RUN), Actions()
    async with admin_api(control=control, token=Secret(ADMIN_TOKEN), on_action=actions) as client:
        resp = await client.post("/v1/mode", headers=AUTH, json={"mode": "enforce", "reason": "ok"})
        assert (await resp.json()) == {"mode": "enforce", "previous": "dry-run"}
    assert control.mode is Mode.ENFORCE
    assert actions.calls[0][1]["actor"] == "admin"


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"mode": "dry-run"}, "reason"),
        ({"mode": "dry-run", "reason": "   "}, "reason"),
        ({"mode": "audit", "reason": "x"}, "mode='audit'"),
        ({"reason": "x"}, "mode=None"),
        (["dry-run"], "JSON object"),
        ("dry-run", "JSON object"),
    ],
    ids=["missing-reason", "blank-reason", "bad-mode", "missing-mode", "array", "string"],
)
async def test_set_mode_invalid(payload: Any, fragment: str) -> None:
    control, actions = Control(), Actions()
    async with admin_api(control=control, token=Secret(ADMIN_TOKEN), on_action=actions) as client:
        resp = await client.post("/v1/mode", headers=AUTH, json=payload)
        assert resp.status == 400
        answer = await resp.json()
    assert answer["error"] == "invalid_request"
    assert fragment in answer["message"]
    assert control.mode is Mode.ENFORCE
    assert actions.calls == []


@pytest.mark.parametrize(
    "data",
    [b"{not json", b"", b"\xff\xfe"],
    ids=["broken-json", "empty", "not-utf8"],
)
async def test_set_mode_body_not_json(data: bytes) -> None:
    control = Control()
    async with admin_api(control=control, token=Secret(ADMIN_TOKEN)) as client:
        resp = await client.post(
            "/v1/mode", headers={**AUTH, "Content-Type": "application/json"}, data=data
        )
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_request"
    assert control.mode is Mode.ENFORCE


async def test_set_mode_bypass_refused_unless_allowed() -> None:
    control, actions = Control(allow_bypass=False), Actions()
    async with admin_api(control=control, token=Secret(ADMIN_TOKEN), on_action=actions) as client:
        resp = await client.post("/v1/mode", headers=AUTH, json={"mode": "bypass", "reason": "x"})
        assert resp.status == 400
        assert "AUTHZ_ALLOW_BYPASS" in (await resp.json())["message"]
    assert control.mode is Mode.ENFORCE
    assert actions.calls == []


async def test_set_mode_bypass_when_allowed() -> None:
    control = Control(allow_bypass=True)
    async with admin_api(control=control, token=Secret(ADMIN_TOKEN)) as client:
        resp = await client.post(
            "/v1/mode", headers=AUTH, json={"mode": "bypass", "reason": "debugging"}
        )
        assert (resp.status, await resp.json()) == (200, {"mode": "bypass", "previous": "enforce"})
    assert control.mode is Mode.BYPASS


async def test_mode_without_control_is_not_found() -> None:
    async with admin_api(token=Secret(ADMIN_TOKEN)) as client:
        assert (await client.get("/v1/mode", headers=AUTH)).status == 404
        resp = await client.post("/v1/mode", headers=AUTH, json={"mode": "enforce", "reason": "x"})
        assert resp.status == 404


# --- /v1/overrides --------------------------------------------------------------------

OVERRIDE = {
    "effect": "allow",
    "decision_path": "authz/gateway/decision",
    "match": {"key_id": "key-oncall", "path": "/api/v1/admin/**", "methods": ["GET"]},
    "ttl_seconds": 3600,
    "reason": "INC-123",
}


async def test_override_add_list_delete() -> None:
    push, actions = FakeOpaPush(), Actions()
    store = OverrideStore(push)
    async with admin_api(overrides=store, token=Secret(ADMIN_TOKEN), on_action=actions) as client:
        before = time.time()
        resp = await client.post(
            "/v1/overrides", headers={**AUTH, "X-Authz-Actor": "carol"}, json=OVERRIDE
        )
        assert resp.status == 201
        added = await resp.json()
        override_id = added["id"]
        assert added["pushed"] is True
        assert added["actor"] == "carol"
        assert added["match"] == OVERRIDE["match"]
        expires = datetime.fromisoformat(added["expires_at"]).timestamp()
        assert before + 3600 <= expires <= time.time() + 3600
        assert push.documents[-1] == {
            override_id: {k: v for k, v in added.items() if k != "pushed"}
        }

        listed = await (await client.get("/v1/overrides", headers=AUTH)).json()
        assert [o["id"] for o in listed["overrides"]] == [override_id]

        resp = await client.delete(f"/v1/overrides/{override_id}", headers=AUTH)
        assert (resp.status, await resp.json()) == (200, {"deleted": override_id, "pushed": True})
        listed = await (await client.get("/v1/overrides", headers=AUTH)).json()
        assert listed == {"overrides": []}
    assert push.documents[-1] == {}
    assert [action for action, _ in actions.calls] == ["add_override", "delete_override"]
    assert actions.calls[0][1]["id"] == override_id
    assert actions.calls[0][1]["pushed"] is True
    assert actions.calls[1][1] == {"id": override_id, "actor": "admin", "pushed": True}


async def test_override_add_when_opa_is_down_is_kept() -> None:
    push = FakeOpaPush()
    push.error = OpaUnavailable("connection refused")
    store = OverrideStore(push)
    async with admin_api(overrides=store, token=Secret(ADMIN_TOKEN)) as client:
        resp = await client.post("/v1/overrides", headers=AUTH, json=OVERRIDE)
        assert resp.status == 201
        added = await resp.json()
    assert added["pushed"] is False
    assert [o.id for o in store.active()] == [added["id"]]


async def test_override_delete_unknown() -> None:
    actions = Actions()
    store = OverrideStore(FakeOpaPush())
    async with admin_api(overrides=store, token=Secret(ADMIN_TOKEN), on_action=actions) as client:
        resp = await client.delete("/v1/overrides/ovr-nope", headers=AUTH)
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"
    assert actions.calls == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"ttl_seconds": 0}, "override.ttl_seconds"),
        ({"effect": "permit"}, "override.effect"),
        ({"match": {}}, "override.match"),
        ({"match": {"key_id": "k", "methods": ["get"]}}, "override.match.methods"),
        ({"reason": ""}, "override.reason"),
        ({"decision_path": "/authz/gateway"}, "override.decision_path"),
    ],
    ids=["ttl", "effect", "match", "methods", "reason", "decision-path"],
)
async def test_override_add_invalid_names_field(changes: dict[str, Any], field: str) -> None:
    push, actions = FakeOpaPush(), Actions()
    store = OverrideStore(push)
    async with admin_api(overrides=store, token=Secret(ADMIN_TOKEN), on_action=actions) as client:
        resp = await client.post("/v1/overrides", headers=AUTH, json={**OVERRIDE, **changes})
        assert resp.status == 400
        answer = await resp.json()
    assert answer["error"] == "invalid_request"
    assert field in answer["message"]
    assert (store.active(), push.documents, actions.calls) == ([], [], [])


async def test_override_add_body_not_json() -> None:
    store = OverrideStore(FakeOpaPush())
    async with admin_api(overrides=store, token=Secret(ADMIN_TOKEN)) as client:
        resp = await client.post(
            "/v1/overrides", headers={**AUTH, "Content-Type": "application/json"}, data="{x"
        )
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_request"
    assert store.active() == []


async def test_override_add_body_too_large() -> None:
    store = OverrideStore(FakeOpaPush())
    big = {**OVERRIDE, "reason": "r" * (64 * 1024)}
    async with admin_api(overrides=store, token=Secret(ADMIN_TOKEN)) as client:
        resp = await client.post("/v1/overrides", headers=AUTH, json=big)
        assert resp.status in (400, 413)
        await resp.read()

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length
            yield json.dumps(big).encode()

        resp = await client.post(
            "/v1/overrides",
            headers={**AUTH, "Content-Type": "application/json"},
            data=chunks(),
        )
        assert resp.status in (400, 413)
    assert store.active() == []


async def test_overrides_not_enabled() -> None:
    async with admin_api(token=Secret(ADMIN_TOKEN)) as client:
        assert (await client.get("/v1/overrides", headers=AUTH)).status == 404
        resp = await client.post("/v1/overrides", headers=AUTH, json=OVERRIDE)
        assert resp.status == 404
        assert (await client.delete("/v1/overrides/x", headers=AUTH)).status == 404


# --- /v1/preview and /v1/reload -------------------------------------------------------


async def test_preview_answers_and_logs_nothing_secret() -> None:
    previewer = FakePreview()
    body = {"key_id": "key-user", "method": "GET", "path": "/api/v1/admin/users"}
    async with admin_api(preview=previewer, token=Secret(ADMIN_TOKEN)) as client:
        resp = await client.post("/v1/preview", headers=AUTH, json=body)
        assert resp.status == 200
        assert await resp.json() == {
            "allowed": False,
            "reason": "role_not_allowed",
            "source": "deny",
        }
    assert previewer.bodies == [body]


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (AdminRequestError("preview.path=None: expected a /path"), 400, "invalid_request"),
        (RequestError("malformed query"), 400, "invalid_request"),
        (OpaUnavailable("connection refused"), 503, "opa_unavailable"),
        (UndefinedDecision("no decision"), 403, "undefined_decision"),
        (InvalidDecision("expected allowed"), 500, "invalid_decision"),
    ],
    ids=["bad-body", "bad-request", "opa-down", "undefined", "malformed-decision"],
)
async def test_preview_failures(error: Exception, status: int, code: str) -> None:
    async with admin_api(preview=FakePreview(error), token=Secret(ADMIN_TOKEN)) as client:
        resp = await client.post("/v1/preview", headers=AUTH, json={"key_id": "k"})
        assert resp.status == status
        assert (await resp.json())["error"] == code


async def test_preview_body_not_json() -> None:
    previewer = FakePreview()
    async with admin_api(preview=previewer, token=Secret(ADMIN_TOKEN)) as client:
        resp = await client.post("/v1/preview", headers=AUTH, data=b"{nope")
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_request"
    assert previewer.bodies == []


async def test_reload_runs_and_is_audited() -> None:
    reloader, actions = FakeReload(), Actions()
    async with admin_api(reload=reloader, token=Secret(ADMIN_TOKEN), on_action=actions) as client:
        resp = await client.post("/v1/reload", headers={**AUTH, "X-Authz-Actor": "alice"})
        assert resp.status == 200
        assert await resp.json() == {"mode": "enforce", "secrets": "reloaded", "revision": "r2"}
    assert reloader.actors == ["alice"]
    assert actions.calls == [
        ("reload", {"actor": "alice", "mode": "enforce", "secrets": "reloaded", "revision": "r2"})
    ]


@pytest.mark.parametrize("path", ["/v1/preview", "/v1/reload"])
async def test_preview_and_reload_not_enabled(path: str) -> None:
    async with admin_api(token=Secret(ADMIN_TOKEN)) as client:
        resp = await client.post(path, headers=AUTH, json={})
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"


# --- malformed admin requests ------------------------------------------------------------


TOKEN = "adm-t0ken-" + "5f4e3d2c1b0a" * 3
RAW_AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()
JSON = b"Content-Type: application/json\r\n"
DENY_OVERRIDE = {
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
    pytest.param(
        post("/v1/mode", MODE, RAW_AUTH, JSON, actor(b"\xff\xfe")), *BAD, id="actor-not-utf8"
    ),
    pytest.param(post("/v1/mode", MODE, RAW_AUTH, JSON, actor(b"a\tb")), *BAD, id="actor-control"),
    pytest.param(post("/v1/mode", MODE, RAW_AUTH, JSON, actor(b"a\xc2\x85b")), *BAD, id="actor-c1"),
    pytest.param(
        post("/v1/overrides", json.dumps(DENY_OVERRIDE).encode(), RAW_AUTH, actor(b"\xed\xa0\x80")),
        *BAD,
        id="actor-encoded-surrogate",
    ),
    pytest.param(
        post("/v1/reload", b"", RAW_AUTH, actor(b"\xc3")), *BAD, id="actor-truncated-utf8"
    ),
    pytest.param(
        post("/v1/mode", b'{"mode": "dry-run", "reason": "\xff"}', RAW_AUTH, JSON),
        *BAD,
        id="body-not-utf8",
    ),
    pytest.param(
        post("/v1/mode", b'{"mode": "dry-run", "reason": "x\\ud800y"}', RAW_AUTH, JSON),
        *BAD,
        id="body-lone-surrogate-escape",
    ),
    pytest.param(
        post(
            "/v1/overrides", json.dumps({**DENY_OVERRIDE, "reason": "x\udcffy"}).encode(), RAW_AUTH
        ),
        *BAD,
        id="override-lone-surrogate-escape",
    ),
    pytest.param(post("/v1/mode", b"[" * 16000, RAW_AUTH, JSON), *BAD, id="body-deeply-nested"),
    pytest.param(
        post("/v1/overrides", b"[" * 5000 + b"]" * 5000, RAW_AUTH, JSON),
        *BAD,
        id="override-deeply-nested",
    ),
    pytest.param(post("/v1/mode", b"NaN", RAW_AUTH, JSON), *BAD, id="body-nan"),
    pytest.param(post("/v1/mode", b"", RAW_AUTH, JSON), *BAD, id="body-empty"),
    pytest.param(
        post("/v1/mode", b" " * 100_000, RAW_AUTH, JSON), 413, "body_too_large", id="body-too-large"
    ),
    pytest.param(
        b"POST /v1/mode HTTP/1.1\r\nHost: a\r\n"
        + RAW_AUTH
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
        got, body = await send(admin.port, post("/v1/mode", MODE, RAW_AUTH, JSON))
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
            post("/v1/mode", MODE, RAW_AUTH, JSON, f"X-Authz-Actor: {actor}\r\n".encode()),
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
        got, body = await send(admin.port, post("/v1/mode", MODE, RAW_AUTH, content_type))
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
        got, answer = await send(admin.port, post("/v1/mode", json.dumps(body).encode(), RAW_AUTH))
        assert (got, json.loads(answer)["error"]) == (400, "invalid_request"), answer
        assert admin.control.mode is Mode.ENFORCE
        assert admin.actions == []


# -- tracing -----------------------------------------------------------------------------


async def test_admin_request_span_names_the_route_under_the_callers_traceparent() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_admin_app(
        {}, control=Control(), token=Secret(ADMIN_TOKEN), tracer=provider.get_tracer("test")
    )
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with test_utils.TestClient(test_utils.TestServer(app, host="127.0.0.1")) as client:
        resp = await client.get(
            "/v1/mode", headers={**AUTH, "X-Authz-Actor": "ops", "traceparent": traceparent}
        )
        assert resp.status == 200
        denied = await client.get("/v1/mode", headers={"Authorization": "Bearer wrong"})
        assert denied.status == 401
    first, second = exporter.get_finished_spans()
    assert first.name == second.name == "GET /v1/mode"
    assert first.parent is not None
    assert f"{first.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert dict(first.attributes or {}) == {
        "http.request.method": "GET",
        "http.route": "/v1/mode",
        "http.response.status_code": 200,
    }
    assert (second.attributes or {})["http.response.status_code"] == 401
    texts = [str(v) for span in (first, second) for v in (span.attributes or {}).values()]
    assert not [t for t in texts if ADMIN_TOKEN in t or "wrong" in t or "ops" in t]
