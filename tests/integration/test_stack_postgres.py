"""authz.stack with ``--postgres``: the local stack's PostgreSQL is made once with a
generated password, authz gets its URL through a mode-0600 file, and a second start
reuses the cluster and the password."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path

import psycopg

from authz.stack.supervisor import Ports, Stack
from authz.tools.launch import Launch, started


def test_stack_postgres_is_made_once_and_reached_through_a_private_url_file(
    tmp_path: Path, repo_root: Path
) -> None:
    ports = Ports.free()
    stack = Stack(repo_root, tmp_path / "run", tmp_path / "bundles", ports, postgres=True)
    datadir = (
        Path(tempfile.gettempdir()) / f"authz-stack-postgres-{ports.postgres}"
        if os.geteuid() == 0
        else tmp_path / "run/postgres"
    )
    try:
        for _ in range(2):  # the second start finds the cluster and its password
            process = stack._postgres()
            url_file = tmp_path / "run/audit-url"
            url = url_file.read_text().strip()
            for private in (url_file, tmp_path / "run/postgres.password"):
                assert stat.S_IMODE(private.stat().st_mode) == 0o600
            password = (tmp_path / "run/postgres.password").read_text().strip()
            assert url == f"postgresql://authz:{password}@127.0.0.1:{ports.postgres}/postgres"
            launch = Launch("postgres", tuple(process.argv), url, process.ready)
            with started(launch, tmp_path / "postgres.log", timeout_s=60) as proc:
                with psycopg.connect(url) as conn:
                    assert conn.execute("SELECT 1").fetchone() == (1,)
                proc.send_signal(signal.SIGINT)  # fast shutdown
                proc.wait(30)
        assert password not in " ".join(process.argv)
    finally:
        shutil.rmtree(datadir, ignore_errors=True)
