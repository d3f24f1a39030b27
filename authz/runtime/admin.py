"""Admin HTTP endpoints (aiohttp), on the admin address (default 127.0.0.1:9192).

Open (probes and Prometheus):

- ``GET /healthz`` -> 200 ``{"status": "ok"}`` while the process serves at all.
- ``GET /readyz``  -> 200 when every readiness check passes, else 503; the body names each
  check: ``{"status": "ready"|"not_ready", "checks": {name: {"ok": bool, "detail": str}}}``.
  Checks are plain async callables (:mod:`authz.runtime.readiness`) the server composes (OPA
  reachable with its bundles activated, the bundle revision, secrets loaded, ...).
- ``GET /metrics`` -> Prometheus text format (:mod:`authz.runtime.metrics`).

Admin API: every route under ``/v1/``, ``Authorization: Bearer <AUTHZ_ADMIN_TOKEN>``
required, checked by one middleware before any handler runs (403
``admin_api_disabled`` when no token is configured, 401 on a wrong one); every change is
logged and audited with the optional ``X-Authz-Actor`` header as the actor:

- ``GET /v1/mode``, ``POST /v1/mode`` ``{"mode": "dry-run", "reason": "..."}``
- ``GET /v1/overrides``, ``POST /v1/overrides`` (see :mod:`authz.runtime.overrides`),
  ``DELETE /v1/overrides/{id}``
- ``POST /v1/preview``: what would be decided for a key or sandbox and a request, and
  from what (see :mod:`authz.runtime.preview`); 4xx/5xx with the failure code when OPA cannot say
- ``POST /v1/reload``: re-read the settings and the secrets file, apply the settings that
  can change at runtime, ask OPA for the active bundle now, empty the decision cache;
  answers what it found, which settings changed and applied and which need a restart
  (:data:`Reloader`, :func:`authz.runtime.server.reload_settings`); audited as ``reload``

Errors are JSON ``{"error": code, "message": ...}``. A malformed request is a 4xx, never
a 5xx: a body over 16 KiB is 413 ``body_too_large``; a body that is not UTF-8 JSON (RFC
8259), an ``X-Authz-Actor`` that is not printable UTF-8, or a bad field is 400
``invalid_request`` (:class:`~authz.core.errors.AdminRequestError`); an override over the
cap is 409 ``too_many_overrides``; a grant or delete while the fleet's shared store
(Redis) is down is 503 ``overrides_unavailable`` with ``Retry-After: 1``; an
``Authorization`` header that is not the token, whatever its bytes, is 401.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, StatusCode, Tracer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from authz.core.errors import (
    AdminRequestError,
    AuthzError,
    ConfigError,
    OverridesUnavailable,
    PolicyError,
    RequestError,
)
from authz.core.mode import Control, parse_mode
from authz.core.secret import Secret
from authz.runtime.metrics import Metrics
from authz.runtime.overrides import OverrideBackend, parse_override_request
from authz.runtime.readiness import ReadinessCheck

__all__ = [
    "AdminAction",
    "Previewer",
    "Reloader",
    "create_admin_app",
    "start_admin",
]

# Called for every admin change: (action, fields) -> logged and audited by the server.
AdminAction = Callable[[str, Mapping[str, Any]], None]
# POST /v1/preview: the request body -> the answer; raises AdminRequestError or
# RequestError (400) or PolicyError (each answered with its class's http_status).
Previewer = Callable[[Any], Awaitable[Mapping[str, Any]]]
# POST /v1/reload: the actor -> what was reloaded (JSON-ready).
Reloader = Callable[[str], Awaitable[Mapping[str, Any]]]
_MAX_BODY: Final = 16 * 1024
# Every route under this prefix is the admin API: token required (_authenticate).
_ADMIN_API: Final = "/v1/"
# As for an override's reason (authz.runtime.overrides): it goes to every log line and audit row.
_MAX_REASON: Final = 500

log = logging.getLogger(__name__)


def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


def _unavailable(exc: OverridesUnavailable) -> web.Response:
    """503 ``overrides_unavailable``: the shared store is down, nothing changed."""
    log.error("override change refused", extra={"code": exc.code, "error": str(exc)})
    return _error(exc.http_status, exc.code, str(exc), **{"Retry-After": "1"})


@dataclass(frozen=True, slots=True)
class _Admin:
    control: Control | None
    overrides: OverrideBackend | None
    token: Secret | None
    on_action: AdminAction | None

    def authorized(self, request: web.Request) -> web.Response | None:
        """None when the bearer token matches and the request's ``X-Authz-Actor`` is
        usable; otherwise the error response (403, 401, or 400 for a bad actor)."""
        if self.token is None or not self.token:
            return _error(403, "admin_api_disabled", "set AUTHZ_ADMIN_TOKEN to enable")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # aiohttp decodes header bytes as UTF-8 with surrogateescape: invalid bytes come
        # back as lone surrogates, which surrogateescape turns back into the sent bytes.
        sent = given.strip().encode("utf-8", "surrogateescape")
        matches = hmac.compare_digest(sent, self.token.reveal().encode())
        if scheme.lower() != "bearer" or not matches:
            return _error(
                401,
                "unauthorized",
                "admin token required",
                **{"WWW-Authenticate": 'Bearer realm="authz-admin"'},
            )
        actor = request.headers.get("X-Authz-Actor", "")
        if not actor.isprintable():  # control characters, or bytes that are not UTF-8
            return _error(400, "invalid_request", "X-Authz-Actor: expected printable UTF-8 text")
        return None

    @staticmethod
    def actor(request: web.Request) -> str:
        """The ``X-Authz-Actor`` header (checked by :meth:`authorized` in the
        middleware before any handler runs), cut to 64
        characters; ``admin`` when absent."""
        return request.headers.get("X-Authz-Actor", "admin")[:64] or "admin"

    def audit(self, action: str, fields: Mapping[str, Any]) -> None:
        log.warning("admin action", extra={"action": action, **fields})
        if self.on_action is not None:
            self.on_action(action, fields)


def _authenticate(admin: _Admin) -> Middleware:
    """The admin API's one authentication point: every route under ``/v1/`` (those added
    later too) needs the bearer token and a usable ``X-Authz-Actor`` (see
    :meth:`_Admin.authorized`) before its handler runs; ``/healthz``, ``/readyz`` and
    ``/metrics`` stay open. A path or method no route serves keeps its 404/405."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        routed = request.match_info.http_exception is None
        if routed and request.path.startswith(_ADMIN_API):
            denied = admin.authorized(request)
            if denied is not None:
                return denied
        return await handler(request)

    return authenticate


_TRACE_HEADERS: Final = ("traceparent", "tracestate", "baggage")


def _traced(tracer: Tracer) -> Middleware:
    """A server span per admin request, named ``<METHOD> <route>`` (OpenTelemetry's HTTP
    server span convention), its parent the request's W3C ``traceparent``, with the
    method, route template and status as attributes: never a header value, the path's
    parameters (an override id) or the body."""

    @web.middleware
    async def traced(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        carrier = {
            name: request.headers[name] for name in _TRACE_HEADERS if name in request.headers
        }
        with tracer.start_as_current_span(
            f"{request.method} {route}",
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            span.set_attribute("http.request.method", request.method)
            span.set_attribute("http.route", route)
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                span.set_attribute("http.response.status_code", exc.status)
                raise
            except BaseException as exc:
                span.set_status(StatusCode.ERROR, type(exc).__name__)
                raise
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(StatusCode.ERROR)
            return response

    return traced


class _BodyTooLarge(Exception):
    """The request body is over ``_MAX_BODY`` bytes (answered 413 ``body_too_large``)."""


async def _json_body(request: web.Request) -> Any:
    """The request body parsed as JSON (RFC 8259: UTF-8 whatever the Content-Type's
    charset, no NaN, no lone surrogates) by orjson, which is linear and caps nesting at
    1024 levels. Raises _BodyTooLarge over ``_MAX_BODY`` bytes (declared or read),
    AdminRequestError for anything that is not such JSON."""
    if request.content_length is not None and request.content_length > _MAX_BODY:
        raise _BodyTooLarge
    try:
        data = await request.read()  # aiohttp stops reading at client_max_size
    except web.HTTPRequestEntityTooLarge:
        raise _BodyTooLarge from None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        # orjson's message names the position, never the content.
        raise AdminRequestError(f"request body is not UTF-8 JSON ({exc})") from None


@web.middleware
async def _body_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """An over-large body is 413 ``body_too_large`` (JSON) on every route; a request the
    caller got wrong (:class:`~authz.core.errors.RequestError`: an admin body, a preview's
    request) is answered here, for every route, with its class's ``http_status`` and
    ``code`` (400 ``invalid_request``, 409 ``too_many_overrides``) and the message, which
    names the field."""
    try:
        return await handler(request)
    except (_BodyTooLarge, web.HTTPRequestEntityTooLarge):
        return _error(413, "body_too_large", f"the request body is over {_MAX_BODY} bytes")
    except RequestError as exc:
        return _error(exc.http_status, exc.code, str(exc))


def create_admin_app(
    checks: Mapping[str, ReadinessCheck],
    *,
    metrics: Metrics | None = None,
    before_scrape: Callable[[], None] | None = None,
    control: Control | None = None,
    overrides: OverrideBackend | None = None,
    token: Secret | None = None,
    on_action: AdminAction | None = None,
    preview: Previewer | None = None,
    reload: Reloader | None = None,
    tracer: Tracer | None = None,
) -> web.Application:
    """The admin application. ``before_scrape`` runs before every ``/metrics`` answer
    (refreshing gauges, warning about bypass mode); ``tracer`` (None: none) records a
    span per request."""
    admin = _Admin(control, overrides, token, on_action)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        results = {name: await check() for name, check in checks.items()}
        ready = all(ok for ok, _ in results.values())
        body = {
            "status": "ready" if ready else "not_ready",
            "checks": {
                name: {"ok": ok, "detail": detail} for name, (ok, detail) in results.items()
            },
        }
        return web.json_response(body, status=200 if ready else 503)

    async def metrics_(_: web.Request) -> web.Response:
        if metrics is None:
            return _error(404, "not_found", "metrics are not enabled")
        if before_scrape is not None:
            before_scrape()
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def get_mode(request: web.Request) -> web.Response:
        if control is None:
            return _error(404, "not_found", "no mode control")
        return web.json_response({"mode": control.mode.value})

    async def set_mode(request: web.Request) -> web.Response:
        if control is None:
            return _error(404, "not_found", "no mode control")
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise AdminRequestError("expected a JSON object")
        reason = body.get("reason")
        try:
            # The parser and the bypass guard are the settings' too: ConfigError there.
            mode = parse_mode("mode", body.get("mode"))
            if not isinstance(reason, str) or not reason.strip() or len(reason) > _MAX_REASON:
                raise AdminRequestError(
                    f"reason: a reason is required (a string of at most {_MAX_REASON} characters)"
                )
            reason = reason.strip()
            previous = control.set_mode(mode, actor=admin.actor(request), reason=reason)
        except ConfigError as exc:
            raise AdminRequestError(str(exc)) from None
        admin.audit(
            "set_mode",
            {
                "mode": mode.value,
                "previous": previous.value,
                "reason": reason,
                "actor": admin.actor(request),
            },
        )
        return web.json_response({"mode": mode.value, "previous": previous.value})

    async def list_overrides(request: web.Request) -> web.Response:
        if overrides is None:
            return _error(404, "not_found", "overrides are not enabled")
        return web.json_response({"overrides": [o.opa_document() for o in overrides.active()]})

    async def add_override(request: web.Request) -> web.Response:
        if overrides is None:
            return _error(404, "not_found", "overrides are not enabled")
        body = await _json_body(request)
        try:
            # The store's clock (Redis's in a fleet); TooManyOverrides (409) at the cap;
            # if not pushed, the periodic sync pushes it.
            now = await overrides.now()
            override = parse_override_request(body, actor=admin.actor(request), now=now)
            pushed = await overrides.add(override)
        except OverridesUnavailable as exc:
            return _unavailable(exc)
        document = override.opa_document()
        admin.audit("add_override", {**document, "pushed": pushed})
        return web.json_response({**document, "pushed": pushed}, status=201)

    async def delete_override(request: web.Request) -> web.Response:
        if overrides is None:
            return _error(404, "not_found", "overrides are not enabled")
        override_id = request.match_info["override_id"]
        try:
            removed, pushed = await overrides.remove(override_id)
        except OverridesUnavailable as exc:
            return _unavailable(exc)
        if removed is None:
            return _error(404, "not_found", f"no override {override_id[:64]!r}")
        admin.audit(
            "delete_override", {"id": override_id, "actor": admin.actor(request), "pushed": pushed}
        )
        return web.json_response({"deleted": override_id, "pushed": pushed})

    async def preview_(request: web.Request) -> web.Response:
        if preview is None:
            return _error(404, "not_found", "preview is not enabled")
        try:
            answer = await preview(await _json_body(request))
        except PolicyError as exc:
            return _error(exc.http_status, exc.code, str(exc))
        log.info(
            "admin preview",
            extra={
                "actor": admin.actor(request),
                "decision_path": answer.get("decision_path"),
                "allowed": answer.get("allowed"),
                "reason": answer.get("reason"),
                "source": answer.get("source"),
            },
        )
        return web.json_response(answer)

    async def reload_(request: web.Request) -> web.Response:
        if reload is None:
            return _error(404, "not_found", "reload is not enabled")
        try:
            result = await reload(admin.actor(request))
        except AuthzError as exc:
            return _error(500, exc.code, str(exc))
        admin.audit("reload", {"actor": admin.actor(request), **result})
        return web.json_response(result)

    middlewares: list[Middleware] = [_body_errors, _authenticate(admin)]
    if tracer is not None:
        middlewares.insert(0, _traced(tracer))
    app = web.Application(client_max_size=_MAX_BODY, middlewares=middlewares)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_)
    app.router.add_get("/v1/mode", get_mode)
    app.router.add_post("/v1/mode", set_mode)
    app.router.add_get("/v1/overrides", list_overrides)
    app.router.add_post("/v1/overrides", add_override)
    app.router.add_delete("/v1/overrides/{override_id}", delete_override)
    app.router.add_post("/v1/preview", preview_)
    app.router.add_post("/v1/reload", reload_)
    return app


async def start_admin(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` (port 0 picks a free one); returns the runner (call
    ``cleanup()`` to stop) and the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound: int = runner.addresses[0][1]
    return runner, bound
