"""Demo upstream API standing in for the agents' API behind the gateway.

Answers every request with JSON describing what it received, so a user (or a test) sees
exactly which headers survived the gateway: ``{"method", "path", "query", "headers"}``.
``GET /healthz`` answers ``{"status": "ok"}``.

Run: ``python -m authz.stack.upstream --port 8090``.
"""

from __future__ import annotations

import argparse

from aiohttp import web

__all__ = ["create_app", "main"]


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "service": request.app["name"],
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body_bytes": len(body),
        }
    )


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(name: str = "demo-upstream") -> web.Application:
    """The echo application; ``name`` is reported in every answer."""
    app = web.Application()
    app["name"] = name
    app.router.add_get("/healthz", _healthz)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


def main() -> None:
    """Serve the echo app on 127.0.0.1 (``--port``, ``--name``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--name", default="demo-upstream")
    args = parser.parse_args()
    web.run_app(create_app(args.name), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
