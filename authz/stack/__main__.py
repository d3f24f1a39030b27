"""``python -m authz.stack``: run the local stack until Ctrl-C/SIGTERM (``scripts/up``).

Expects the policy bundle at ``build/bundles/authz.tar.gz`` (``scripts/up`` builds it).
Prints the endpoints and curl examples once everything is ready, then waits; on
SIGINT/SIGTERM stops every process (children also die with this process if it is
killed hard).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from authz.stack.demo import DEMO_KEYS
from authz.stack.supervisor import Ports, Stack, StackError


def _banner(stack: Stack) -> str:
    p = stack.ports
    key = {name: entry[0] for name, entry in DEMO_KEYS.items()}
    gw = f"http://127.0.0.1:{p.gateway}"
    return f"""
authz local stack is up (logs: {stack.run_dir / "logs"})

  gateway (Envoy)        {gw}            admin http://127.0.0.1:{p.gateway_admin}
  authz  (ext_authz)     127.0.0.1:{p.authz_grpc} gRPC    admin http://127.0.0.1:{p.authz_admin}/readyz
  OPA                    http://127.0.0.1:{p.opa}
  demo upstream          http://127.0.0.1:{p.upstream}
  bundle server          http://127.0.0.1:{p.bundles}/bundles/authz.tar.gz

Try (expected status on the right):
  curl -i {gw}/api/v1/status                                              # 401 missing_api_key
  curl -i -H 'X-API-Key: wrong' {gw}/api/v1/status                        # 401 invalid_api_key
  curl -i -H 'X-API-Key: {key["viewer"]}' {gw}/api/v1/status          # 200
  curl -i -H 'Authorization: Bearer {key["user"]}' {gw}/api/v1/items     # 200
  curl -i -H 'X-API-Key: {key["viewer"]}' -X POST {gw}/api/v1/items   # 403 role_not_allowed
  curl -i -H 'X-API-Key: {key["user"]}' {gw}/api/v1/admin/users         # 403 role_not_allowed
  curl -i -H 'X-API-Key: {key["admin"]}' {gw}/api/v1/admin/users        # 200
  curl -i -H 'X-API-Key: {key["disabled"]}' {gw}/api/v1/status        # 401 disabled_api_key
  curl -i -H 'X-API-Key: {key["expired"]}' {gw}/api/v1/status         # 401 expired_api_key

Stop with Ctrl-C.
"""


def main() -> int:
    """Start the stack, print the banner, wait for a signal, stop."""
    parser = argparse.ArgumentParser(description="run the authz local stack")
    parser.add_argument("--root", type=Path, default=Path.cwd())
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--bundle-dir", type=Path, default=None)
    args = parser.parse_args()
    root = args.root.resolve()
    bundle_dir = args.bundle_dir or root / "build/bundles"
    if not (bundle_dir / "authz.tar.gz").is_file():
        print(f"no bundle at {bundle_dir}/authz.tar.gz: run scripts/up", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack = Stack(root, args.run_dir or root / ".run", bundle_dir, Ports())
    try:
        stack.start()
    except StackError as exc:
        print(f"stack failed to start: {exc}", file=sys.stderr)
        return 1
    try:
        print(_banner(stack), flush=True)
        while not stop.wait(0.5):
            dead = [p.name for p in stack.processes.values() if not p.running]
            if dead:
                print(f"process exited: {', '.join(dead)}; stopping", file=sys.stderr)
                return 1
    finally:
        print("stopping...", file=sys.stderr, flush=True)
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
