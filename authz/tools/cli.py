"""Command line: argument parsing only; every command calls into a module.

::

    authz serve [--config FILE]          run the ext_authz gRPC server (default command)
    authz key new                        print a new API key and its digest
    authz key hash                       read a key on stdin, print its SHA-256 digest
    authz keys health --bundle FILE      expired/expiring/disabled/unused keys; exit 1 if any
                                         needs action (``keys`` and ``key`` are the same)
    authz sandbox new --id ID --tier T   print a new sandbox token and its data entry
    authz secrets generate               build the egress secrets file from env / .env
    authz lint-data FILE...              refuse bundle data holding plaintext credentials
    authz audit tail [--limit N] [--kind K]  print the last audit entries (JSON lines)
    authz audit verify [--head SEQ:HASH] check the hash chain(s); exit 1 naming the first bad entry
                                         (and its replica, in a PostgreSQL store: --url)
    authz audit replay --bundle FILE     re-evaluate recorded inputs against another bundle;
                                         exit 1 when a decision changes (a CI gate)
    authz generate deploy                the Compose/Kubernetes configs (authz.tools.deploy)
    authz generate egress-envoy          the egress Envoy config (authz.tools.egress_envoy)
    authz config check [--config FILE]   validate the settings file and AUTHZ_* environment;
                                         print the effective settings, secrets masked (exit 2
                                         if invalid)

``--help`` at every level prints :data:`DESCRIPTION` or the verb's one-line description and
its exit codes (:data:`EXIT_CODES` overall: 0 success, 1 a check found something, 2 bad usage
or a check could not run). ``--json`` (``keys health``, ``audit verify``, ``audit replay``)
prints one JSON document on stdout; ``audit tail`` always prints JSON lines. The local
stack is not a verb: it is ``python -m authz.stack`` (``scripts/up``), which the runtime
wheel's command line must not import.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from dotenv import dotenv_values

from authz import __version__
from authz.core.errors import ConfigError, DataFileError
from authz.core.rfc3339 import parse_rfc3339
from authz.core.secret import Secret
from authz.runtime import audit, config, logs, secrets
from authz.tools import (
    batch_rule,
    bundle_data,
    deploy,
    egress_envoy,
    key_health,
    key_health_report,
    keys,
)
from authz.tools.services import ServicesError, read_services
from authz.tools.usage import exit_codes, paragraph

__all__ = ["DESCRIPTION", "EXIT_CODES", "build_parser", "main"]

DESCRIPTION: Final = (
    "authz: an Envoy ext_authz (v3) policy-decision service backed by OPA, and its operator "
    "tools: API keys and sandbox tokens, the egress secrets file, the audit trail, and the "
    "generated Envoy and deployment configs."
)
EXIT_CODES: Final = exit_codes(
    (
        (0, "success; for a check: nothing found"),
        (
            1,
            "a check found something: a key needs action (keys health), a credential is "
            "missing (secrets generate --require-all), data holds a plaintext credential "
            "(lint-data), the audit chain is broken (audit verify), a decision changes "
            "(audit replay), a generated file is stale (generate ... --check)",
        ),
        (2, "bad usage or configuration, or a check could not run (a missing file, OPA)"),
    )
)

log = logging.getLogger("authz")


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = config.load(os.environ, args.config)
    except ConfigError as exc:
        logs.configure("INFO")
        log.error("invalid configuration: %s", exc, extra={"code": exc.code})
        return 2
    logs.configure(settings.log_level)
    unknown = config.unknown_variables(os.environ)
    if unknown:  # names only: a value may be a credential
        log.warning(
            "unknown AUTHZ_* variables, ignored: %s", ", ".join(unknown), extra={"names": unknown}
        )
    from authz.runtime.server import serve  # imported late: grpc is slow to import

    if settings.uvloop:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    else:
        runner = asyncio.Runner()
    with runner:
        try:
            runner.run(serve(settings, lambda: config.load(os.environ, args.config)))
        except ConfigError as exc:  # e.g. the secrets file, read before serving
            log.error("invalid configuration: %s", exc, extra={"code": exc.code})
            return 2
    return 0


def _shown(value: object) -> object:
    """A setting's value as JSON: secrets masked, paths and enums as text, tuples as lists."""
    if isinstance(value, Secret):
        return str(value)  # the mask, never the value
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_shown(item) for item in value]
    return value


def _as_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_as_text(item) for item in value)
    return str(value)


def _config_check(args: argparse.Namespace) -> int:
    try:
        settings = config.load(os.environ, args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    where = config.sources(os.environ, args.config)
    unknown = config.unknown_variables(os.environ)
    shown = {
        field.name: _shown(getattr(settings, field.name)) for field in dataclasses.fields(settings)
    }
    if args.json:
        report = {
            "valid": True,
            "settings": {
                name: {"value": value, "source": where.get(name, "default")}
                for name, value in shown.items()
            },
            "unknown_variables": unknown,
        }
        print(json.dumps(report, indent=2))
    else:
        for name, value in shown.items():
            source = where.get(name, "default")
            print(f"{config.ENV_PREFIX}{name.upper()}={_as_text(value)}  # {source}")
    if unknown:
        print(f"warning: unknown AUTHZ_* variables, ignored: {', '.join(unknown)}", file=sys.stderr)
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


def _fleet_last_seen(url: str) -> dict[str, float]:
    """:func:`authz.runtime.audit.postgres.read_last_seen` of the store at ``url``
    (``env``: AUTHZ_AUDIT_URL(_FILE) from the settings)."""
    from authz.runtime.audit import postgres  # psycopg only for a database

    secret = Secret(url)
    if url == "env":
        configured = config.load(os.environ).audit_url
        if configured is None:
            raise ConfigError("--audit-url env: AUTHZ_AUDIT_URL(_FILE) is not set")
        secret = configured
    conn = postgres.open_reader(secret)
    try:
        return postgres.read_last_seen(conn)
    finally:
        conn.close()


def _keys_health(args: argparse.Namespace) -> int:
    now = args.now if args.now is not None else time.time()
    try:
        api_keys = bundle_data.load_api_keys(args.bundle)
        last_seen = audit.read_last_seen(args.audit) if args.audit is not None else None
        if args.audit_url:
            last_seen = _fleet_last_seen(args.audit_url)
        report = key_health.assess(
            api_keys,
            now=now,
            last_seen=last_seen,
            expiring_days=args.expiring_days,
            unused_days=args.unused_days,
        )
    except (ConfigError, DataFileError) as exc:  # the audit store; the bundle's data
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(key_health_report.report_json(report), indent=2))
    else:
        print(key_health_report.report_text(report))
    return 1 if report.needs_action else 0


def _days(*, positive: bool) -> Callable[[str], float]:
    def conv(text: str) -> float:
        try:
            days = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
        if not (days > 0 if positive else days >= 0) or days == float("inf"):
            bound = "> 0" if positive else ">= 0"
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number of days {bound}")
        return days

    return conv


# https://www.sqlite.org/datatype3.html: an INTEGER is at most 8 bytes, signed.
_SQLITE_MAX_INTEGER: Final = 2**63 - 1


def _count(text: str) -> int:
    """A ``--limit``: a whole number from 1 (SQLite would read -1 as no limit at all) to
    SQLite's largest INTEGER (a larger one cannot be bound: OverflowError)."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= count <= _SQLITE_MAX_INTEGER:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a count from 1 to {_SQLITE_MAX_INTEGER}"
        )
    return count


def _rfc3339(text: str) -> float:
    when = parse_rfc3339(text)
    if when is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time")
    return when


def _sandbox_new(args: argparse.Namespace) -> int:
    token = keys.generate_key(keys.SANDBOX_TOKEN_PREFIX)
    entry = {args.id: {"tier": args.tier, "enabled": True, "token_sha256": keys.digest(token)}}
    print(f"sandbox token (shown once, give it to the sandbox): {token}", file=sys.stderr)
    print(json.dumps(entry, indent=2))
    return 0


def _secrets_generate(args: argparse.Namespace) -> int:
    environ: dict[str, str] = {}
    if args.env_file is not None:
        if not args.env_file.is_file():
            print(f"error: no env file at {args.env_file}", file=sys.stderr)
            return 2
        try:
            values = dotenv_values(args.env_file)
        except (OSError, UnicodeDecodeError) as exc:
            # Never the exception's text for a decode error: it quotes the file's bytes.
            why = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else exc.strerror or exc
            print(f"error: {args.env_file}: cannot read the env file: {why}", file=sys.stderr)
            return 2
        environ.update({k: v for k, v in values.items() if v is not None})
    environ.update(os.environ)  # the process environment wins over the file
    try:
        egress = read_services(args.services)
    except ServicesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    refs = sorted(name for name, service in egress.items() if service.credential)
    found, missing = secrets.collect_credentials(refs, environ)
    try:
        secrets.write_secrets_file(args.out, found)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Names only: a secret value is never printed.
    print(f"wrote {len(found)} credentials to {args.out} (mode 0600): {', '.join(found) or '-'}")
    for ref in missing:
        print(
            f"warning: no {secrets.env_name(ref)}; {ref} requests will be denied 503",
            file=sys.stderr,
        )
    return 1 if missing and args.require_all else 0


class _AuditStore:
    """The audit store a command reads: a SQLite file (one chain) or a PostgreSQL
    database (one chain per replica), opened read-only."""

    def __init__(self, sqlite: sqlite3.Connection | None = None, postgres: Any = None) -> None:
        self.sqlite, self.postgres = sqlite, postgres

    def close(self) -> None:
        (self.sqlite or self.postgres).close()

    def entries(
        self, *, last: int | None = None, kind: str | None = None
    ) -> Iterator[audit.AuditEntry]:
        """Entries oldest first (every chain's, by time, in PostgreSQL)."""
        if self.sqlite is not None:
            return audit.read_entries(self.sqlite, last=last, kind=kind)
        from authz.runtime.audit import postgres

        return postgres.read_entries(self.postgres, last=last, kind=kind)

    def verify(self, head: tuple[int, str] | None, replica: str | None) -> list[audit.VerifyReport]:
        """One report per chain (only ``replica``'s when given)."""
        if self.sqlite is not None:
            return [audit.verify(self.sqlite, head=head)]
        from authz.runtime.audit import postgres

        names = [replica] if replica is not None else postgres.replicas(self.postgres)
        return [
            audit.verify(postgres.PostgresChain(self.postgres, name), head=head) for name in names
        ]


def _audit_db(args: argparse.Namespace) -> Path | Secret | None:
    """Where the audit trail is: ``--url``, ``--db``, else the settings' AUTHZ_AUDIT_URL
    (a Secret) or AUTHZ_AUDIT_DB."""
    if getattr(args, "url", None) is not None:
        return Secret(args.url)
    if args.db is not None:
        return Path(args.db)
    try:
        settings = config.load(os.environ, args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return settings.audit_url or settings.audit_db


def _open_audit(args: argparse.Namespace) -> _AuditStore | None:
    where = _audit_db(args)
    if where is None:
        print(
            "error: no audit database (AUTHZ_AUDIT_DB or --db) and no PostgreSQL audit "
            "store (AUTHZ_AUDIT_URL or --url)",
            file=sys.stderr,
        )
        return None
    if isinstance(where, Secret):
        from authz.runtime.audit import postgres  # psycopg only for a database

        try:
            return _AuditStore(postgres=postgres.open_reader(where))
        except DataFileError as exc:  # names the URL, password masked
            print(f"error: {exc}", file=sys.stderr)
            return None
    path = where
    if not path.is_file():
        print(f"error: no audit database at {path}", file=sys.stderr)
        return None
    # Read-only: the tools never write the trail (as_uri: a '?' or '#' in the path is
    # part of the name, not of the URI's query).
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        # Preparing reads the schema: a file that is not SQLite, or has no audit table,
        # fails here, before a command reads anything.
        conn.execute("SELECT seq FROM audit LIMIT 0")
    except sqlite3.Error as exc:
        conn.close()
        print(f"error: {path}: cannot read the audit trail: {exc}", file=sys.stderr)
        return None
    return _AuditStore(sqlite=conn)


def _audit_tail(args: argparse.Namespace) -> int:
    conn = _open_audit(args)
    if conn is None:
        return 2
    with contextlib.closing(conn):
        try:
            for entry in conn.entries(last=args.limit, kind=args.kind):
                body = dict(entry.body)
                if not args.input:
                    body.pop("input", None)
                where = {"replica": entry.replica} if entry.replica is not None else {}
                line = {"seq": entry.seq, "kind": entry.kind, **where, **body}
                print(json.dumps(line, sort_keys=True))
        except DataFileError as exc:  # an edited row: audit verify names the break
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    conn = _open_audit(args)
    if conn is None:
        return 2
    head = None
    if args.head:
        seq, _, digest = args.head.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            print("error: --head expects SEQ:HASH (from an 'audit head' log line)", file=sys.stderr)
            return 2
        head = (int(seq), digest)
    with contextlib.closing(conn):
        if conn.postgres is not None and head is not None and args.replica is None:
            print("error: --head needs --replica (each replica has its own chain)", file=sys.stderr)
            return 2
        if conn.sqlite is not None and args.replica is not None:
            print("error: --replica is for a PostgreSQL audit store", file=sys.stderr)
            return 2
        reports = conn.verify(head, args.replica)
    ok = all(report.ok for report in reports)
    if args.json:
        if conn.sqlite is not None:
            print(json.dumps(dataclasses.asdict(reports[0]), indent=2))
        else:
            chains = [dataclasses.asdict(report) for report in reports]
            print(json.dumps({"ok": ok, "chains": chains}, indent=2))
        return 0 if ok else 1
    if not reports:
        print("ok: no chains")
    for report in reports:
        chain = f"replica {report.replica}: " if report.replica is not None else ""
        if report.ok:
            n = report.entries
            span = f"entries {report.first_seq}..{report.last_seq}" if n else "no entries"
            print(f"ok: {chain}{n} entries, chain intact ({span})")
            continue
        who = f" (decision {report.broken_decision_id})" if report.broken_decision_id else ""
        where = f" in replica {report.replica}" if report.replica is not None else ""
        print(
            f"BROKEN{where} at entry {report.broken_seq}{who}: {report.problem}",
            file=sys.stderr,
        )
    return 0 if ok else 1


def _audit_replay(args: argparse.Namespace) -> int:
    conn = _open_audit(args)
    if conn is None:
        return 2
    from authz.core.opa import OpaClient
    from authz.tools.launch import LaunchError, find_binary, free_port
    from authz.tools.replay import ReplayReport, describe, opa_serving, replay

    with contextlib.closing(conn):
        if not args.bundle.is_file():
            print(f"error: no bundle at {args.bundle}", file=sys.stderr)
            return 2
        try:
            opa_bin = find_binary("opa", "AUTHZ_OPA_BIN")
        except LaunchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        # Rows keep credential digests, not headers: put back the masked headers OPA saw.
        entries = [
            dataclasses.replace(entry, body={**entry.body, "input": audit.replay_input(doc)})
            if isinstance(doc := entry.body.get("input"), dict)
            else entry
            for entry in conn.entries(last=args.limit, kind="decision")
        ]

    async def run(url: str) -> ReplayReport:
        client = OpaClient(url)
        try:
            return await replay(entries, client)
        finally:
            await client.close()

    try:
        with opa_serving(args.bundle, opa_bin, free_port()) as url:
            report = asyncio.run(run(url))
    except (RuntimeError, DataFileError) as exc:  # OPA would not serve; a malformed entry
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        print(report.summary())
        for change in report.changed:
            print(describe(change))
    # A CI gate: any difference (an evaluation error included) fails the job.
    return 1 if report.changed else 0


def _lint_data(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            problems = keys.lint_file(path)
        except DataFileError as exc:  # names the file: "<path>: cannot read JSON: ..."
            print(exc, file=sys.stderr)
            failed = True
            continue
        for problem in problems:
            print(problem, file=sys.stderr)
            failed = True
    return 1 if failed else 0


def _verb(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    *,
    codes: Sequence[tuple[int, str]] = (),
    aliases: Sequence[str] = (),
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    """Add command ``name``: ``summary`` is its line in the parent's listing and the
    description of its own ``--help``, ``codes`` its ``exit codes:`` epilog."""
    return commands.add_parser(
        name,
        help=summary,
        description=paragraph(summary),
        epilog=exit_codes(codes) if codes else None,
        aliases=list(aliases),
        parents=list(parents),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


_USAGE_ERROR: Final = (2, "bad usage")
_PRINTED: Final = ((0, "printed"), _USAGE_ERROR)


def _group(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    *,
    aliases: Sequence[str] = (),
) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction[argparse.ArgumentParser]]:
    """Add command ``name`` (:func:`_verb`) that only groups commands: returns it and its
    required subcommands (dest ``<name>_command``), to add them to."""
    group = _verb(commands, name, summary, aliases=aliases)
    subcommands = group.add_subparsers(
        dest=f"{name}_command", required=True, title="commands", metavar="COMMAND"
    )
    return group, subcommands


def _json_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--json`` (``args.json``): print the report as JSON, for scripts."""
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def build_parser() -> argparse.ArgumentParser:
    """The ``authz`` argument parser: every verb with its one-line description, option
    help and exit codes (what ``--help`` prints at each level)."""
    parser = argparse.ArgumentParser(
        prog="authz",
        description=paragraph(DESCRIPTION),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"authz {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    serve = _verb(
        commands,
        "serve",
        "run the ext_authz gRPC server (the default command)",
        codes=((0, "stopped by SIGTERM/SIGINT"), (2, "invalid configuration")),
    )
    serve.add_argument("--config", type=Path, help="YAML settings file (AUTHZ_* env wins)")
    serve.set_defaults(func=_serve)

    _, key_commands = _group(
        commands, "key", "API key helpers: new, hash, health", aliases=["keys"]
    )
    new = _verb(
        key_commands,
        "new",
        "generate an API key; print its data.json entry (the key itself on stderr)",
        codes=_PRINTED,
    )
    new.add_argument("--id", required=True, help="key id, e.g. key-team-a")
    new.add_argument("--role", required=True, help="role, e.g. viewer, user, admin")
    new.add_argument("--tier", default="default", help="rate_limit_tier (default: default)")
    new.add_argument("--expires-at", help="RFC 3339 time, e.g. 2027-01-01T00:00:00Z")
    new.set_defaults(func=_key_new)
    hash_ = _verb(
        key_commands,
        "hash",
        "print the SHA-256 digest of the key read from stdin",
        codes=((0, "printed"), (2, "no key on stdin")),
    )
    hash_.set_defaults(func=_key_hash)
    health = _verb(
        key_commands,
        "health",
        "report expired, expiring, disabled and unused API keys",
        codes=(
            (0, "no key needs action (disabled keys are listed, never a failure)"),
            (1, "a key is expired, expiring, unused or has an invalid expires_at"),
            (2, "could not run: unreadable bundle or audit database, bad usage"),
        ),
    )
    health.add_argument(
        "--bundle",
        type=Path,
        required=True,
        help="bundle .tar.gz, bundle/data directory, or data.json holding data.gateway.api_keys",
    )
    audit_source = health.add_mutually_exclusive_group()
    audit_source.add_argument(
        "--audit", type=Path, help="audit database: keys without a recent decision are unused"
    )
    audit_source.add_argument(
        "--audit-url",
        help="as --audit, from a PostgreSQL audit store (every replica's decisions); 'env': "
        "AUTHZ_AUDIT_URL(_FILE), keeping the password off the command line",
    )
    health.add_argument(
        "--expiring-days",
        type=_days(positive=False),
        default=config.DEFAULT_KEY_EXPIRY_WARNING_DAYS,
        help="a key expiring within this many days is 'expiring' (default: %(default)g)",
    )
    health.add_argument(
        "--unused-days",
        type=_days(positive=True),
        default=30.0,
        help="with --audit: no decision in this many days is 'unused' (default: %(default)g)",
    )
    health.add_argument("--now", type=_rfc3339, help="assess as of this RFC 3339 time")
    _json_flag(health)
    health.set_defaults(func=_keys_health)

    _, sandbox_commands = _group(commands, "sandbox", "sandbox identity helpers: new")
    sandbox_new = _verb(
        sandbox_commands,
        "new",
        "generate a sandbox token; print its data entry (the token on stderr)",
        codes=_PRINTED,
    )
    sandbox_new.add_argument("--id", required=True, help="sandbox id, e.g. sb-team-a-1")
    sandbox_new.add_argument("--tier", default="default", help="egress tier (default: default)")
    sandbox_new.set_defaults(func=_sandbox_new)

    _, secrets_commands = _group(commands, "secrets", "egress secrets file helpers: generate")
    generate = _verb(
        secrets_commands,
        "generate",
        "write the egress secrets file from EGRESS_SECRET_<SERVICE> variables (env or .env)",
        codes=(
            (0, "written (a missing credential is a warning)"),
            (1, "with --require-all: a credential is missing (the file is still written)"),
            (2, "could not run: unreadable env file or services, unwritable --out"),
        ),
    )
    generate.add_argument("--env-file", type=Path, help="a .env file (environment wins)")
    generate.add_argument("--out", type=Path, required=True, help="secrets file to write")
    generate.add_argument(
        "--services",
        type=Path,
        default=Path("policy/egress/data.json"),
        help="services config naming the credentials (default: policy/egress/data.json)",
    )
    generate.add_argument(
        "--require-all", action="store_true", help="exit 1 if any credential is missing"
    )
    generate.set_defaults(func=_secrets_generate)

    lint = _verb(
        commands,
        "lint-data",
        "refuse bundle data holding plaintext credentials",
        codes=((0, "clean"), (1, "a file holds a plaintext credential or is not JSON")),
    )
    lint.add_argument("files", nargs="+", type=Path, help="JSON data files to check")
    lint.set_defaults(func=_lint_data)

    # --db / --config work before or after the subcommand (authz audit verify --db X).
    # Given after the subcommand, they must not reset a value given before it: SUPPRESS.
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--db", default=argparse.SUPPRESS, help="audit database")
    where.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="PostgreSQL audit store, postgresql://... (prefer AUTHZ_AUDIT_URL(_FILE): a "
        "password on the command line is visible to other users)",
    )
    where.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="settings file")
    audit_, audit_commands = _group(
        commands, "audit", "the tamper-evident audit trail: tail, verify, replay"
    )
    audit_.add_argument("--db", help="audit database (default: AUTHZ_AUDIT_DB / settings)")
    audit_.add_argument(
        "--url", help="PostgreSQL audit store (default: AUTHZ_AUDIT_URL(_FILE) / settings)"
    )
    audit_.add_argument("--config", type=Path, help="YAML settings file")
    no_db = (2, "could not run: no audit database")
    tail = _verb(
        audit_commands,
        "tail",
        "print the last entries, one JSON object per line",
        codes=((0, "printed"), no_db),
        parents=[where],
    )
    tail.add_argument(
        "--limit", type=_count, default=20, help="how many entries, newest last (default: 20)"
    )
    tail.add_argument("--input", action="store_true", help="include the recorded input")
    tail.add_argument(
        "--kind",
        choices=["decision", "admin", "gap", "anchor", "tunnel"],
        help="only entries of this kind (anchor: retention's anchor moves)",
    )
    tail.set_defaults(func=_audit_tail)
    verify = _verb(
        audit_commands,
        "verify",
        "check the hash chain from the anchor to the head",
        codes=(
            (0, "the chain is intact"),
            (1, "a chain is broken; its first bad entry (and replica) is named"),
            (2, "could not run: no audit database, bad --head"),
        ),
        parents=[where],
    )
    verify.add_argument(
        "--head", help="SEQ:HASH from an 'audit head' log line: the chain must still hold it"
    )
    verify.add_argument(
        "--replica",
        help="PostgreSQL store: verify only this replica's chain (needed with --head)",
    )
    _json_flag(verify)
    verify.set_defaults(func=_audit_verify)
    replay_ = _verb(
        audit_commands,
        "replay",
        "re-evaluate recorded inputs against another bundle; show each decision that changes",
        codes=(
            (0, "no decision changes"),
            (1, "a decision changes (an input the bundle cannot evaluate counts as changed)"),
            (2, "could not run: no audit database or bundle, OPA did not start"),
        ),
        parents=[where],
    )
    replay_.add_argument("--bundle", type=Path, required=True, help="bundle .tar.gz to compare")
    replay_.add_argument("--limit", type=_count, default=None, help="only the last N decisions")
    _json_flag(replay_)
    replay_.set_defaults(func=_audit_replay)

    _, config_commands = _group(commands, "config", "the settings: check")
    check = _verb(
        config_commands,
        "check",
        "validate the settings (file and AUTHZ_* environment) as serve would read them; "
        "print the effective settings, secrets masked",
        codes=(
            (
                0,
                "valid; every setting printed with its source (unknown AUTHZ_* names: a warning)",
            ),
            (2, "invalid: the error names the setting (and the file), never a secret"),
        ),
    )
    check.add_argument("--config", type=Path, help="YAML settings file (AUTHZ_* env wins)")
    _json_flag(check)
    check.set_defaults(func=_config_check)

    _, generator_commands = _group(
        commands, "generate", "generate Envoy and deployment configs from their sources"
    )
    for name, module in (
        ("deploy", deploy),
        ("egress-envoy", egress_envoy),
        ("batch-rule", batch_rule),
    ):
        tool = _verb(
            generator_commands,
            name,
            module.SUMMARY,
            codes=module.EXIT_CODES,
            parents=[module.arguments()],
        )
        tool.set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``authz`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["serve", *argv]  # `authz [--config FILE]` means `authz serve ...`
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
