"""A throwaway PostgreSQL cluster for the tests that need one (the fleet audit store).

The cluster is made with ``initdb`` from the machine's packages (Debian ``postgresql``,
``scripts/install-deps``) in a new temporary directory, serves 127.0.0.1 on a free port
with a generated password (SCRAM), and can be stopped and started again on the same port
and data, for outage tests. As root it runs as ``nobody`` (PostgreSQL refuses root).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path

import psycopg

from authz.tools.launch import (
    find_postgres_bin,
    free_port,
    postgres_init,
    postgres_launch,
    started,
)

__all__ = ["PostgresServer"]

USER = "authz"


class PostgresServer:
    """A PostgreSQL cluster in its own temporary directory (removed by :meth:`remove`).

    ``url`` is ``postgresql://authz:<password>@127.0.0.1:<port>/postgres``; ``password``
    is generated. :meth:`start` / :meth:`stop` run and stop the server (same port, same
    data); :meth:`database` creates a new empty database and returns its URL, so tests
    sharing one cluster never see each other's rows."""

    def __init__(self, bin_dir: Path | None = None) -> None:
        self.bin_dir = bin_dir or find_postgres_bin()
        # Not under pytest's tmp_path: that is 0700 root's, and the server runs as nobody.
        self.root = Path(tempfile.mkdtemp(prefix="authz-pg-"))
        os.chmod(self.root, 0o711)  # noqa: S103 - nobody must traverse it, not list it
        self.datadir = self.root / "data"
        self.port = free_port()
        self.password = secrets.token_urlsafe(24)
        self.url = self.url_for("postgres")
        self._log = self.root / "postgres.log"
        self._running: ExitStack | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._databases = 0
        try:
            postgres_init(self.bin_dir, self.datadir, USER, self.password)
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        self.launch = postgres_launch(self.bin_dir, self.datadir, self.port, self.url)

    def url_for(self, database: str) -> str:
        """The URL of ``database`` on this cluster (with the password)."""
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self._running is not None

    def start(self) -> None:
        """Start the server; returns once it accepts connections."""
        with ExitStack() as stack:
            self._proc = stack.enter_context(started(self.launch, self._log, timeout_s=60))
            self._running = stack.pop_all()

    def stop(self) -> None:
        """Stop the server: SIGINT, PostgreSQL's fast shutdown (SIGTERM's smart shutdown
        would wait for the clients, authz's audit writer among them, to disconnect)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            # Past 30 s the stack's close sends SIGTERM, then SIGKILL.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(30)
        if self._running is not None:
            self._running.close()
        self._running = self._proc = None

    def database(self) -> str:
        """A new empty database; its URL."""
        self._databases += 1
        name = f"t{self._databases}_{secrets.token_hex(4)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # name made here: letters and digits
        return self.url_for(name)

    def remove(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
