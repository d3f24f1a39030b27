"""Minimal bundle service for OPA's bundle plugin: serves ``<dir>/<name>.tar.gz``.

OPA polls ``GET /bundles/<name>.tar.gz`` (OPA "Bundle Service API"); answers carry an
``ETag`` and a matching ``If-None-Match`` gets ``304 Not Modified``, so OPA only
re-activates a bundle that changed. Bundles are written atomically by
``scripts/build-policy-bundle`` (write then rename), so a poll never sees half a file.

Run: ``python -m authz.stack.bundles --dir build/bundles --port 8282``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aiohttp import web

__all__ = ["create_app", "main"]


def create_app(directory: Path) -> web.Application:
    """Serve ``directory`` under ``/bundles/`` (static files, ETag and 304 handled by
    aiohttp's FileResponse) and ``GET /healthz``."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_static("/bundles/", directory, show_index=False, follow_symlinks=False)
    return app


def main() -> None:
    """Serve ``--dir`` on 127.0.0.1:``--port``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8282)
    args = parser.parse_args()
    web.run_app(create_app(args.dir), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
