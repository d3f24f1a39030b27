"""Command line: argument parsing only; every command calls into a module.

::

    authz serve [--config FILE]          run the ext_authz gRPC server (default command)
    authz key new                        print a new API key and its digest
    authz key hash                       read a key on stdin, print its SHA-256 digest
    authz lint-data FILE...              refuse bundle data holding plaintext credentials

Exit codes: 0 success, 1 a check failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from authz import config, keys, logs
from authz.errors import ConfigError

__all__ = ["main"]

log = logging.getLogger("authz")


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = config.load(os.environ, args.config)
    except ConfigError as exc:
        logs.configure("INFO")
        log.error("invalid configuration: %s", exc, extra={"code": exc.code})
        return 2
    logs.configure(settings.log_level)
    from authz.server import serve  # imported late: grpc is slow to import

    if settings.uvloop:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    else:
        runner = asyncio.Runner()
    with runner:
        runner.run(serve(settings))
    return 0


def _key_new(args: argparse.Namespace) -> int:
    key = keys.generate_key()
    entry = {
        keys.digest(key): {
            "id": args.id,
            "enabled": True,
            "role": args.role,
            "rate_limit_tier": args.tier,
            **({"expires_at": args.expires_at} if args.expires_at else {}),
        }
    }
    print(f"api key (shown once, store it now): {key}", file=sys.stderr)
    print(json.dumps(entry, indent=2))
    return 0


def _key_hash(_: argparse.Namespace) -> int:
    key = sys.stdin.readline()
    if not key.strip():
        print("error: no key on stdin", file=sys.stderr)
        return 2
    print(keys.digest(key))
    return 0


def _lint_data(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            print(f"{path}: cannot read JSON: {exc}", file=sys.stderr)
            failed = True
            continue
        for problem in keys.lint_data(data, where=str(path)):
            print(problem, file=sys.stderr)
            failed = True
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="authz", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command")

    serve = commands.add_parser("serve", help="run the ext_authz gRPC server")
    serve.add_argument("--config", type=Path, help="YAML settings file (AUTHZ_* env wins)")
    serve.set_defaults(func=_serve)

    key = commands.add_parser("key", help="API key helpers")
    key_commands = key.add_subparsers(dest="key_command", required=True)
    new = key_commands.add_parser(
        "new", help="generate a key; prints the data.json entry (key itself on stderr)"
    )
    new.add_argument("--id", required=True, help="key id, e.g. key-team-a")
    new.add_argument("--role", required=True, help="role, e.g. viewer, user, admin")
    new.add_argument("--tier", default="default", help="rate_limit_tier (default: default)")
    new.add_argument("--expires-at", help="RFC 3339 time, e.g. 2027-01-01T00:00:00Z")
    new.set_defaults(func=_key_new)
    hash_ = key_commands.add_parser("hash", help="SHA-256 digest of the key read from stdin")
    hash_.set_defaults(func=_key_hash)

    lint = commands.add_parser("lint-data", help="refuse plaintext credentials in data")
    lint.add_argument("files", nargs="+", type=Path)
    lint.set_defaults(func=_lint_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``authz`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]  # `authz [--config FILE]` means `authz serve ...`
    args = _parser().parse_args(argv)
    result: int = args.func(args)
    return result
