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
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from authz.stack.demo import DEMO_SANDBOXES, EXAMPLES
from authz.stack.supervisor import Ports, Stack, StackError
from authz.tools.usage import command_parser


def _banner(stack: Stack) -> str:
    p = stack.ports
    scheme = "https" if stack.tls_listeners else "http"
    gw = f"{scheme}://127.0.0.1:{p.gateway}"
    eg = f"{scheme}://127.0.0.1:{p.egress}"
    base = {"gateway": gw, "egress": eg}
    ca = stack.mtls_dir / "ca.crt"
    curl = f"curl -i --cacert {ca}" if stack.tls_listeners else "curl -i"

    def examples(proxy: str) -> str:
        lines = []
        for example in EXAMPLES:
            if example.proxy == proxy:
                outcome = f"{example.status} {example.error or ''}".strip()
                command = example.curl(base[proxy]).replace("curl -i", curl, 1)
                lines.append(f"  {command}\n      # -> {outcome}")
        return "\n".join(lines)

    audit = (
        f"PostgreSQL 127.0.0.1:{p.postgres} (authz audit verify --url, URL in "
        f"{stack.run_dir / 'audit-url'})"
        if stack.postgres
        else f"SQLite {stack.run_dir / 'audit.db'}"
    )
    return f"""
authz local stack is up (logs: {stack.run_dir / "logs"})

  gateway (Envoy)     {gw}   admin http://127.0.0.1:{p.gateway_admin}
  egress  (Envoy)     {eg}   admin http://127.0.0.1:{p.egress_admin}
  authz (ext_authz)   127.0.0.1:{p.authz_grpc} (gRPC, mTLS: Envoy's client certificate; CA {ca})
                      admin http://127.0.0.1:{p.authz_admin}/readyz
  OPA                 http://127.0.0.1:{p.opa}
  demo upstream       http://127.0.0.1:{p.upstream}
  egress stand-in     https://127.0.0.1:{p.standin} (plays every service's host; CA {stack.tls.ca})
  bundle server       http://127.0.0.1:{p.bundles}/bundles/authz.tar.gz
  rate limiting       {f"redis://127.0.0.1:{p.redis} (shared)" if stack.redis else "in process"}
  audit trail         {audit}

Gateway (API key -> role/path rules; the upstream never sees the key):
{examples("gateway")}

Egress (call a service by name; authz injects the credential the sandbox never holds):
{examples("egress")}

Use it from an agent (README "Use it from an agent": standard proxy settings only):
{agent_example(stack)}

A process that crashes is restarted (0.5 s doubling to 10 s). Stop with Ctrl-C.
"""


def agent_example(stack: Stack, sandbox: str = "sb-demo-standard") -> str:
    """The environment a sandbox needs to use the egress as its proxy (demo sandbox
    ``sandbox``: its id and token in the proxy URL, the egress CA trusted) and commands
    that then reach the stand-in, intercepted, with the real credential."""
    scheme = "https" if stack.tls_listeners else "http"
    token = DEMO_SANDBOXES[sandbox][0]
    url = f"{scheme}://{sandbox}:{token}@127.0.0.1:{stack.ports.egress}"
    ca = stack.egress_ca
    return f"""\
  export HTTPS_PROXY={url}
  export HTTP_PROXY=$HTTPS_PROXY https_proxy=$HTTPS_PROXY http_proxy=$HTTPS_PROXY
  export SSL_CERT_FILE={ca} REQUESTS_CA_BUNDLE={ca}
  export NODE_EXTRA_CA_CERTS={ca} GIT_SSL_CAINFO={ca} CURL_CA_BUNDLE={ca}
  curl https://api.github.com/user
      # -> 200 from the stand-in, which got the real credential (the sandbox has none)
  python -c 'from openai import OpenAI; print(OpenAI(api_key="unused").models.list())'
  curl -sS -o /dev/null -w '%{{http_connect}}\\n' https://slack.com/api/chat.postMessage
      # -> 403 (service_not_allowed: tier standard has no slack)"""


PROG: Final = "python -m authz.stack"
EXIT_CODES: Final = (
    (0, "stopped by Ctrl-C/SIGTERM"),
    (1, "the stack failed to start"),
    (2, "bad usage, or no policy bundle (run scripts/up, which builds it)"),
)


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`main` (``scripts/up`` passes its options through)."""
    parser = command_parser(
        PROG,
        "run the authz local stack (OPA, authz, both Envoys, a demo upstream, the "
        "egress stand-in) on 127.0.0.1 until Ctrl-C/SIGTERM; scripts/up builds the "
        "bundle and the secrets file first",
        EXIT_CODES,
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path.cwd(),
        help="repository checkout: policy/, infra/ (default: the current directory)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="where logs, certificates and state go (default: <root>/.run)",
    )
    parser.add_argument(
        "--bundle-dir",
        type=Path,
        default=None,
        help="directory holding authz.tar.gz (default: <root>/build/bundles)",
    )
    parser.add_argument(
        "--secrets-file",
        type=Path,
        default=None,
        help="egress secrets file for authz (AUTHZ_SECRETS_FILE) and the stand-in",
    )
    parser.add_argument(
        "--redis",
        action="store_true",
        help="start redis-server and use it as authz's shared rate-limit backend",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="start PostgreSQL and keep authz's audit trail there (AUTHZ_AUDIT_URL) "
        "instead of SQLite",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="TLS on the gateway and egress listeners too (https://127.0.0.1, certificates "
        "from the stack's local CA, <run-dir>/mtls/ca.crt); Envoy -> authz is always mTLS",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Start the stack, print the banner, wait for a signal, stop. ``argv`` defaults to
    ``sys.argv[1:]``; returns the exit code (:data:`EXIT_CODES`)."""
    args = build_parser().parse_args(argv)
    root = args.root.resolve()
    bundle_dir = args.bundle_dir or root / "build/bundles"
    if not (bundle_dir / "authz.tar.gz").is_file():
        print(f"no bundle at {bundle_dir}/authz.tar.gz: run scripts/up", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    secrets_file = args.secrets_file.resolve() if args.secrets_file else None
    stack = Stack(
        root,
        args.run_dir or root / ".run",
        bundle_dir,
        Ports(),
        secrets_file=secrets_file,
        redis=args.redis,
        tls_listeners=args.tls,
        postgres=args.postgres,
    )
    try:
        stack.start()
    except StackError as exc:
        print(f"stack failed to start: {exc}", file=sys.stderr)
        return 1
    try:
        print(_banner(stack), flush=True)
        # A child that exits is restarted by the stack with backoff (one line each on
        # stderr), so the others keep serving: watch authz fail closed and recover.
        while not stop.wait(0.5):
            pass
    finally:
        print("stopping...", file=sys.stderr, flush=True)
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
