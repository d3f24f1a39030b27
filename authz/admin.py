"""Admin HTTP endpoints (aiohttp): ``/healthz``, ``/readyz``.

- ``GET /healthz`` -> 200 ``{"status": "ok"}`` while the process serves at all.
- ``GET /readyz``  -> 200 when every readiness check passes, else 503; the body names each
  check: ``{"status": "ready"|"not_ready", "checks": {name: {"ok": bool, "detail": str}}}``.
  Checks are plain async callables (:data:`ReadinessCheck`) so the server composes them
  (OPA reachable with its bundles activated, shutting down, ...).

Binds the admin address from the settings (default 127.0.0.1:9192).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from aiohttp import web

from authz.errors import PolicyError
from authz.policy import OpaClient

__all__ = ["ReadinessCheck", "create_admin_app", "opa_bundles_check", "start_admin"]

# A check returns (ok, detail); detail is a short human string, never a secret.
ReadinessCheck = Callable[[], Awaitable[tuple[bool, str]]]
_CHECK_TIMEOUT_S: Final = 1.0


def opa_bundles_check(client: OpaClient) -> ReadinessCheck:
    """Ready when OPA answers ``GET /health?bundles`` with 200: reachable, and every
    configured bundle activated at least once (OPA's health API)."""

    async def check() -> tuple[bool, str]:
        try:
            status, body = await client.get("/health?bundles", _CHECK_TIMEOUT_S)
        except PolicyError as exc:
            return False, exc.code
        if status == 200:
            return True, "bundles activated"
        error = body.get("error", "") if isinstance(body, dict) else ""
        return False, f"OPA health HTTP {status} {error}".strip()

    return check


def create_admin_app(checks: Mapping[str, ReadinessCheck]) -> web.Application:
    """The admin application with ``/healthz`` and ``/readyz`` over ``checks``."""

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

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
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
