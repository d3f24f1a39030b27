"""Container health check for authz: GET an admin endpoint, exit 0 on HTTP 200.

Installed in the image as ``authz-healthcheck`` (the Dockerfile's HEALTHCHECK, and the
Compose file's with ``/readyz``). It reads the admin port from ``AUTHZ_ADMIN_ADDR``
(default 9192) and always asks 127.0.0.1, so it works whatever interface authz binds.

Usage: authz-healthcheck [PATH]   (default /healthz)
Exit codes: 0 healthy, 1 not (any other status, refused, timeout).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    port = os.environ.get("AUTHZ_ADMIN_ADDR", "0.0.0.0:9192").rpartition(":")[2]
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError, ValueError):
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
