"""Start, watch and stop the local stack's processes, in dependency order.

Each :class:`Process` is a real binary (OPA, Envoy) or a Python module (authz, the demo
upstream, the egress stand-in, the bundle server) with a readiness probe. :class:`Stack`
starts them in order (bundle server -> OPA -> upstream -> stand-in -> authz -> Envoy
gateway -> Envoy egress), waiting for each to be ready, and stops them in reverse.
Children get ``PR_SET_PDEATHSIG`` so they die with the supervisor even if it is killed
hard: no orphans.

Once everything is ready, a :class:`Supervisor` thread restarts a child that exits, as
Docker's ``unless-stopped`` restart policy does (restart whatever the exit code, except
a child the user stopped; a doubling delay between restarts, Docker Engine API
``RestartPolicy``,
https://docs.docker.com/reference/api/engine/version/v1.57/schemas/RestartPolicy/): by
default 0.5 s doubling to 10 s, back to 0.5 s once the child ran 10 s
(:data:`DEFAULT_BACKOFF`). Each restart is one warning line on the ``authz.stack``
logger; the other children keep serving, so authz can be watched failing closed while
OPA is down and recovering when it is back.

All processes bind 127.0.0.1. Logs go to ``<run_dir>/logs/<name>.log``. Envoy -> authz
is mTLS, as in every deployment: the certificates come from a throwaway CA in
``<run_dir>/mtls`` (:data:`STACK_LEAVES`); ``tls_listeners`` also puts TLS on the
gateway and egress listeners (the same certificates' CA, ``<run_dir>/mtls/ca.crt``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any, Final, Self

import yaml

from authz.stack import envoy, tls
from authz.tools import egress_envoy
from authz.tools.launch import (
    LaunchError,
    find_binary,
    find_postgres_bin,
    free_port,
    http_ok,
    opa_launch,
    postgres_init,
    postgres_launch,
    redis_launch,
)
from authz.tools.services import ServicesError, read_services, specs

__all__ = [
    "DEFAULT_BACKOFF",
    "EGRESS_SERVICES",
    "STACK_LEAVES",
    "Backoff",
    "Ports",
    "Process",
    "Restart",
    "Stack",
    "StackError",
    "Supervisor",
    "find_binary",
    "free_port",
    "http_ok",
]

HOST: Final = "127.0.0.1"
# The longest unix socket path, in bytes (sun_path of sockaddr_un less its NUL; unix(7)).
_MAX_UNIX_PATH: Final = 107
# A stack process could not be started or did not become ready (the launcher's error).
StackError = LaunchError
# The egress services (relative to the repository root): the stand-in plays their hosts.
EGRESS_SERVICES: Final = "policy/egress/data.json"
_PR_SET_PDEATHSIG: Final = 1
# The deployment's certificates the stack needs: authz's server certificate, Envoy's
# client certificate, the two listeners' (used with tls_listeners only).
STACK_LEAVES: Final = {
    name: tls.DEPLOYMENT_LEAVES[name]
    for name in ("authz", "envoy-client", "envoy-gateway", "envoy-egress")
}


# Resolved once here: the child must not dlopen between fork and exec (another thread
# of the parent, the supervisor's, may have held the loader's lock at the fork).
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_LOG = logging.getLogger("authz.stack")
# Restarts remembered for tests and callers (a child crash-looping at the 10 s cap adds
# 360 an hour): the oldest are dropped.
_RESTARTS_KEPT: Final = 1_000


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel for SIGTERM when the
    # thread that forked us dies (the supervisor's, for a restarted child; it lives as
    # long as the stack).
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


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
    egress: int = 8443
    egress_admin: int = 9902
    standin: int = 9443
    redis: int = 6379
    postgres: int = 5432

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
        """The OS process id of the last start (also after it exited)."""
        return self._popen.pid if self._popen is not None else None

    @property
    def exit_code(self) -> int | None:
        """The exit status once the process exited (negative: killed by that signal, as
        ``subprocess.Popen.returncode``); None while running or never started."""
        return self._popen.poll() if self._popen is not None else None

    def start(self) -> None:
        """Spawn the process (appending to its log)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._log is not None:  # a restart: the previous run's handle
            self._log.close()
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


@dataclass(frozen=True, slots=True)
class Backoff:
    """When to restart a crashed child: attempt ``n`` (1, 2, ... since the last stable
    run) waits ``initial_s * factor ** (n - 1)`` seconds, at most ``cap_s``; a child that
    ran ``stable_s`` seconds or more before it exited starts over at attempt 1. Raises
    ValueError naming the field for a policy that would spin (``initial_s`` <= 0) or
    shrink (``factor`` < 1, ``cap_s`` < ``initial_s``, ``stable_s`` < 0)."""

    initial_s: float = 0.5
    factor: float = 2.0
    cap_s: float = 10.0
    stable_s: float = 10.0

    def __post_init__(self) -> None:
        checks = {
            "initial_s": self.initial_s > 0,
            "factor": self.factor >= 1,
            "cap_s": self.cap_s >= self.initial_s,
            "stable_s": self.stable_s >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"Backoff.{name}={getattr(self, name)!r} is out of range")

    def next_attempt(self, previous: int, up_s: float) -> int:
        """The attempt number of a restart after a child that had reached attempt
        ``previous`` (0: never restarted) ran ``up_s`` seconds and exited."""
        return 1 if previous < 1 or up_s >= self.stable_s else previous + 1

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait before restart ``attempt`` (>= 1)."""
        # The exponent is bounded so a long crash loop cannot overflow the float.
        return min(self.cap_s, self.initial_s * self.factor ** min(attempt - 1, 64))


DEFAULT_BACKOFF: Final = Backoff()


@dataclass(frozen=True, slots=True)
class Restart:
    """One restart decided by the :class:`Supervisor`: ``name`` exited with
    ``exit_code`` (negative: killed by that signal; None: unknown, a container, or the
    restart itself failed), restart number ``attempt`` follows after ``delay_s`` seconds.
    ``at``: when the exit was seen (``time.monotonic()``). ``reason``: why a restart
    could not start the child, if that is what happened."""

    name: str
    exit_code: int | None
    attempt: int
    delay_s: float
    at: float
    reason: str = ""

    def line(self) -> str:
        """The log line, e.g. ``opa exited with code -9 (SIGKILL); restart 1 in 0.5 s``."""
        if self.reason:
            what = f"could not be restarted ({self.reason})"
        elif self.exit_code is None:
            what = "exited"
        elif self.exit_code < 0:
            what = f"exited with code {self.exit_code} ({_signal_name(-self.exit_code)})"
        else:
            what = f"exited with code {self.exit_code}"
        return f"{self.name} {what}; restart {self.attempt} in {self.delay_s:g} s"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass(slots=True)
class _Watch:
    process: Process
    started_at: float
    attempt: int = 0
    restart_at: float | None = None  # set while a restart waits for its delay
    held: bool = False  # stopped on purpose (Supervisor.paused): not restarted


class Supervisor:
    """Starts processes in order, restarts one that exits (:class:`Backoff`, one
    :meth:`Restart.line` warning on the ``authz.stack`` logger each), stops them in
    reverse. ``backoff=None``: no restarts (a child that exits stays down).
    ``poll_s``: how often the watcher thread looks at the children (seconds).

    Thread-safe: the watcher thread and the caller share one lock. Children restarted by
    the watcher are forked from it, so their ``PR_SET_PDEATHSIG`` fires when it ends:
    it runs until :meth:`stop`, which stops the children first.
    """

    def __init__(self, *, backoff: Backoff | None = DEFAULT_BACKOFF, poll_s: float = 0.25) -> None:
        self.backoff = backoff
        self.poll_s = poll_s
        self.processes: dict[str, Process] = {}
        self._watches: dict[str, _Watch] = {}
        self._restarts: deque[Restart] = deque(maxlen=_RESTARTS_KEPT)
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def restarts(self) -> list[Restart]:
        """Every restart decided so far, oldest first (the last 1,000)."""
        with self._lock:
            return list(self._restarts)

    def start(self, processes: Iterable[Process], timeout_s: float) -> None:
        """Start each process and wait until it is ready (``Process.wait_ready``) before
        the next; then watch them all. On any failure stop what was started and raise
        (StackError: a process exited early or was not ready in ``timeout_s`` s)."""
        try:
            for process in processes:
                self.processes[process.name] = process
                process.start()
                process.wait_ready(timeout_s)
                self._watches[process.name] = _Watch(process, time.monotonic())
        except BaseException:
            self.stop()
            raise
        if self.backoff is not None:
            self._thread = threading.Thread(
                target=self._watch, name="stack-supervisor", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop watching, then stop every process, last started first (a pending restart
        never happens). Idempotent."""
        self._closing.set()
        with self._lock:  # waits for a restart in progress
            for process in reversed(list(self.processes.values())):
                process.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    @contextlib.contextmanager
    def paused(self, name: str, timeout_s: float = 30.0) -> Iterator[Process]:
        """Stop ``name`` for the duration of the block (not restarted meanwhile), then
        start it again and wait until it is ready (raises StackError if it is not within
        ``timeout_s`` seconds)."""
        process = self.processes[name]
        watch = self._watches.get(name)
        with self._lock:
            if watch is not None:
                watch.held = True
            process.stop()
        try:
            yield process
        finally:
            try:
                process.start()
                process.wait_ready(timeout_s)
            finally:  # watched again even if it failed to come back
                with self._lock:
                    if watch is not None:
                        watch.held, watch.restart_at, watch.attempt = False, None, 0
                        watch.started_at = time.monotonic()

    def _watch(self) -> None:
        while not self._closing.wait(self.poll_s):
            with self._lock:
                if self._closing.is_set():
                    return
                for watch in self._watches.values():
                    try:
                        self._check(watch, time.monotonic())
                    except Exception:  # never let the watcher die: its children would
                        _LOG.exception("supervising %s failed", watch.process.name)

    def _check(self, watch: _Watch, now: float) -> None:
        if watch.held:
            return
        process = watch.process
        if watch.restart_at is None:
            if not process.running:
                self._crashed(watch, now, process.exit_code)
            return
        if now < watch.restart_at:
            return
        watch.restart_at = None
        try:
            process.stop()  # releases the last run (its log, a container)
            process.start()
        except Exception as exc:
            watch.started_at = now  # it never ran: the next attempt, not a reset
            self._crashed(watch, now, None, reason=str(exc) or type(exc).__name__)
            return
        watch.started_at = now

    def _crashed(self, watch: _Watch, now: float, code: int | None, reason: str = "") -> None:
        assert self.backoff is not None  # the watcher runs only with a backoff
        watch.attempt = self.backoff.next_attempt(watch.attempt, now - watch.started_at)
        delay = self.backoff.delay_s(watch.attempt)
        restart = Restart(watch.process.name, code, watch.attempt, delay, now, reason)
        self._restarts.append(restart)
        _LOG.warning("%s", restart.line())
        watch.restart_at = now + delay


class Stack:
    """OPA + authz + Envoy gateway and egress + demo upstream + egress stand-in + bundle
    server on 127.0.0.1.

    ``root`` is the repository (for ``infra/`` and ``policy/egress/data.json``);
    ``bundle_dir`` holds ``authz.tar.gz`` (built by ``scripts/build-policy-bundle``);
    ``run_dir`` receives logs, rendered configs, ``tls/`` (a local CA and the
    stand-in's certificate for every egress service host) and ``mtls/`` (another CA,
    authz's server and Envoy's client certificates: authz requires the client certificate
    on its gRPC port, Envoy requires authz's). ``tls_listeners``: the gateway and egress
    listeners speak TLS too (certificates for ``localhost``/``127.0.0.1`` from
    ``mtls/ca.crt``). ``authz_env`` adds ``AUTHZ_*``
    settings for the authz process. ``secrets_file`` (authz's egress secrets file, JSON
    ``{"version": 1, "credentials": {service: secret}}``) goes to authz as
    ``AUTHZ_SECRETS_FILE`` and to the stand-in, which then checks the credential each
    call carries as the real API would. ``redis`` starts a redis-server (from the
    machine's packages) and points authz's shared rate-limit backend at it. ``wrap``
    replaces each process definition before start (``authz.stack.containers`` runs OPA
    and Envoy as containers with it). ``restart``: how a child that exits is restarted
    once the stack is up (:class:`Supervisor`; None: it stays down).
    ``gateway_body_routes``: routes added to the gateway that send authz the request body
    and ask it to parse it (:class:`authz.stack.envoy.BodyRoute`; the shipped gateway
    has none). ``tunnel_max_duration_s``: the egress tunnels' longest life (the
    generator's, :data:`authz.tools.egress_envoy.TUNNEL_MAX_DURATION_S` by default).

    The egress Envoy is ``egress_envoy.generate(...)`` of the same services with every
    service host overridden to the stand-in (TLS, SNI and SAN checks as in production,
    against the local CA): egress traffic never leaves the machine.
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
        secrets_file: Path | None = None,
        redis: bool = False,
        wrap: Callable[[Process], Process] | None = None,
        tls_listeners: bool = False,
        restart: Backoff | None = DEFAULT_BACKOFF,
        gateway_body_routes: Sequence[envoy.BodyRoute] = (),
        postgres: bool = False,
        tunnel_max_duration_s: int = egress_envoy.TUNNEL_MAX_DURATION_S,
    ) -> None:
        self.root = root
        self.run_dir = run_dir
        self.bundle_dir = bundle_dir
        self.ports = ports or Ports()
        self.secrets_file = secrets_file
        self.redis = redis
        self.tls = tls.TlsFiles(run_dir / "tls")
        self.mtls_dir = run_dir / "mtls"
        self.mtls = {name: tls.LeafFiles(self.mtls_dir / name) for name in STACK_LEAVES}
        self.tls_listeners = tls_listeners
        self._authz_env = dict(authz_env or {})
        self._envoy_concurrency = envoy_concurrency
        # Replaces process definitions before start (authz.stack.containers runs OPA and
        # Envoy as containers this way); None runs every process locally.
        self._wrap = wrap
        self._supervisor = Supervisor(backoff=restart)
        self._gateway_body_routes = tuple(gateway_body_routes)
        self.postgres = postgres
        self._tunnel_max_duration_s = tunnel_max_duration_s

    @property
    def intercept_dir(self) -> Path:
        """Where the egress interception's certificates live (one directory per
        intercepted host, ``ca.crt`` the egress CA): the generator's
        :data:`authz.tools.egress_envoy.INTERCEPT_TLS_DIR`, relocated."""
        rel = Path(egress_envoy.INTERCEPT_TLS_DIR).relative_to(egress_envoy.ENVOY_TLS_DIR)
        return self.mtls_dir / rel

    @property
    def egress_ca(self) -> Path:
        """The egress CA's certificate (PEM): what a sandbox trusts (``SSL_CERT_FILE``,
        ``REQUESTS_CA_BUNDLE``, ``NODE_EXTRA_CA_CERTS``, ``GIT_SSL_CAINFO``) so that the
        certificates the egress presents for intercepted hosts verify."""
        return self.intercept_dir / "ca.crt"

    @property
    def processes(self) -> dict[str, Process]:
        """The processes started so far by name, in start order."""
        return self._supervisor.processes

    @property
    def restarts(self) -> list[Restart]:
        """Every restart of a crashed child so far, oldest first."""
        return self._supervisor.restarts

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

    def _envoy(self, name: str, envoy_bin: str, config: Path, admin_port: int) -> Process:
        return Process(
            name,
            [
                envoy_bin,
                "-c",
                str(config),
                "--use-dynamic-base-id",
                "--concurrency",
                str(self._envoy_concurrency),
                "--log-level",
                "warn",
            ],
            self._log(name),
            lambda: http_ok(f"http://{HOST}:{admin_port}/ready"),
        )

    def _redis(self) -> Process:
        workdir = self.run_dir / "redis"
        workdir.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError("redis-server not found (scripts/install-deps installs it)")
        launch = redis_launch(binary, self.ports.redis, workdir)
        return Process("redis", launch.argv, self._log("redis"), launch.ready)

    def _postgres(self) -> Process:
        """PostgreSQL for the audit trail (``postgres``): a cluster made once with a
        generated password (``<run-dir>/postgres.password``, mode 0600), authz's URL in
        ``<run-dir>/audit-url`` (0600, AUTHZ_AUDIT_URL_FILE). As root the cluster lives in
        the temporary directory, where the unprivileged account it runs as can reach it."""
        try:
            bin_dir = find_postgres_bin()
        except LaunchError as exc:
            raise StackError(str(exc)) from None
        if os.geteuid() == 0:
            datadir = Path(tempfile.gettempdir()) / f"authz-stack-postgres-{self.ports.postgres}"
        else:
            datadir = self.run_dir / "postgres"
        password_file = self.run_dir / "postgres.password"
        if not (datadir / "PG_VERSION").is_file():
            shutil.rmtree(datadir, ignore_errors=True)  # a half-made cluster from a failed start
            _write_private(password_file, secrets.token_urlsafe(24))
            try:
                postgres_init(bin_dir, datadir, "authz", password_file.read_text().strip())
            except LaunchError as exc:
                raise StackError(str(exc)) from None
        elif not password_file.is_file():
            raise StackError(f"{password_file} is missing: remove {datadir} to start anew")
        password = password_file.read_text(encoding="utf-8").strip()
        url = f"postgresql://authz:{password}@{HOST}:{self.ports.postgres}/postgres"
        _write_private(self.run_dir / "audit-url", url)
        launch = postgres_launch(bin_dir, datadir, self.ports.postgres, url)
        return Process("postgres", launch.argv, self._log("postgres"), launch.ready)

    def _egress_services(self) -> dict[str, Any]:
        try:
            return dict(specs(read_services(self.root / EGRESS_SERVICES)))
        except ServicesError as exc:
            raise StackError(str(exc)) from exc

    def _standin(self, services_hosts: list[str]) -> Process:
        p = self.ports
        files = tls.ensure_certificates(self.tls.directory, services_hosts)
        args = [
            f"--port={p.standin}",
            "--name=standin",
            f"--tls-cert={files.cert}",
            f"--tls-key={files.key}",
        ]
        if self.secrets_file is not None:
            args += [
                f"--services={self.root / EGRESS_SERVICES}",
                f"--credentials={self.secrets_file}",
            ]
        return Process(
            "standin",
            [sys.executable, "-m", "authz.stack.upstream", *args],
            self._log("standin"),
            lambda: http_ok(f"https://{HOST}:{p.standin}/healthz", ca_file=files.ca),
            cwd=self.root,
        )

    def _define(self) -> list[Process]:
        p = self.ports
        opa_bin = find_binary("opa", "AUTHZ_OPA_BIN")
        envoy_bin = find_binary("envoy", "AUTHZ_ENVOY_BIN")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tls.ensure_pki(self.mtls_dir, STACK_LEAVES)
        gateway_yaml = self.run_dir / "envoy-gateway.yaml"
        gateway_yaml.write_text(
            envoy.render(
                self.root / "infra/envoy/envoy-gateway.yaml",
                admin_port=p.gateway_admin,
                listeners={"gateway": p.gateway},
                clusters={"authz": (HOST, p.authz_grpc), "upstream_api": (HOST, p.upstream)},
                tls_dir=self.mtls_dir,
                tls_listeners=["gateway"] if self.tls_listeners else [],
                body_routes=self._gateway_body_routes,
            ),
            encoding="utf-8",
        )
        services = self._egress_services()
        try:
            hosts = sorted(
                {
                    egress_envoy.parse_base_url(n, s.get("base_url")).host
                    for n, s in services.items()
                }
            )
            egress_config = egress_envoy.generate(
                services,
                listen_port=p.egress,
                admin_port=p.egress_admin,
                authz_address=(HOST, p.authz_grpc),
                ca_file=str(self.tls.ca),
                overrides={host: (HOST, p.standin) for host in hosts},
                tunnel_max_duration_s=self._tunnel_max_duration_s,
            )
        except (ValueError, AttributeError) as exc:
            raise StackError(f"bad egress services in {EGRESS_SERVICES}: {exc}") from exc
        # The egress CA (sandboxes trust it: self.egress_ca) and a certificate per
        # intercepted host, where relocate_tls moves the generator's paths.
        intercepted = egress_envoy.intercepted_hosts(
            list(read_services(self.root / EGRESS_SERVICES).values())
        )
        tls.ensure_pki(
            self.intercept_dir, {host: tls.Leaf("server", (host,)) for host in intercepted}
        )
        envoy.secure_listeners(egress_config, ["egress"] if self.tls_listeners else [])
        envoy.relocate_tls(egress_config, self.mtls_dir)
        egress_yaml = self.run_dir / "envoy-egress.yaml"
        egress_yaml.write_text(yaml.safe_dump(egress_config, sort_keys=False), encoding="utf-8")
        secrets_env: dict[str, str] = {}
        if self.secrets_file is not None:
            secrets_env["AUTHZ_SECRETS_FILE"] = str(self.secrets_file)
        redis: list[Process] = []
        if self.redis:
            redis = [self._redis()]
            secrets_env["AUTHZ_RATE_LIMIT_BACKEND"] = "redis"
            secrets_env["AUTHZ_REDIS_URL"] = f"redis://{HOST}:{p.redis}/0"
        postgres: list[Process] = []
        if self.postgres:
            postgres = [self._postgres()]
            secrets_env["AUTHZ_AUDIT_URL_FILE"] = str(self.run_dir / "audit-url")
        # authz reaches OPA over a unix socket (no TCP stack per decision); OPA keeps its
        # TCP port for everything else (tools, tests, the operator's curl).
        opa_socket = self.opa_socket
        opa_url = f"unix://{opa_socket}" if opa_socket is not None else f"http://{HOST}:{p.opa}"
        authz = Process(
            "authz",
            [sys.executable, "-m", "authz", "serve"],
            self._log("authz"),
            lambda: http_ok(f"http://{HOST}:{p.authz_admin}/readyz"),
            env={
                "AUTHZ_GRPC_ADDR": f"{HOST}:{p.authz_grpc}",
                "AUTHZ_ADMIN_ADDR": f"{HOST}:{p.authz_admin}",
                "AUTHZ_OPA_URL": opa_url,
                "AUTHZ_AUDIT_DB": str(self.run_dir / "audit.db"),
                "AUTHZ_OVERRIDES_FILE": str(self.run_dir / "overrides.json"),
                # mTLS: only a client with Envoy's certificate gets an answer.
                "AUTHZ_GRPC_TLS_CERT": str(self.mtls["authz"].cert),
                "AUTHZ_GRPC_TLS_KEY": str(self.mtls["authz"].key),
                "AUTHZ_GRPC_TLS_CLIENT_CA": str(self.mtls["authz"].ca),
                **secrets_env,
                **self._authz_env,
            },
            cwd=self.root,
        )
        opa = opa_launch(
            opa_bin,
            p.opa,
            f"--config-file={self.root / 'infra/opa/opa-local.yaml'}",
            f"--set=services.bundles.url=http://{HOST}:{p.bundles}/bundles",
            "--log-format=json",
            *([f"--addr=unix://{opa_socket}"] if opa_socket is not None else []),
            ready_path="/health?bundles",
        )
        processes = [
            self._python(
                "bundles",
                "authz.stack.bundles",
                f"--dir={self.bundle_dir}",
                f"--port={p.bundles}",
                ready=f"http://{HOST}:{p.bundles}/healthz",
            ),
            Process("opa", opa.argv, self._log("opa"), opa.ready),
            self._python(
                "upstream",
                "authz.stack.upstream",
                f"--port={p.upstream}",
                ready=f"http://{HOST}:{p.upstream}/healthz",
            ),
            self._standin(hosts),
            *redis,
            *postgres,
            authz,
            self._envoy("envoy-gateway", envoy_bin, gateway_yaml, p.gateway_admin),
            self._envoy("envoy-egress", envoy_bin, egress_yaml, p.egress_admin),
        ]
        return processes if self._wrap is None else [self._wrap(proc) for proc in processes]

    @property
    def opa_socket(self) -> Path | None:
        """The unix socket OPA listens on besides its TCP port, and authz's
        ``AUTHZ_OPA_URL`` (``unix://<it>``): ``<run_dir>/opa.sock``. None (authz uses the
        TCP port) when OPA does not run as a local process (``wrap``: a container does
        not share the run directory's socket) or the path is longer than a unix socket
        path may be (107 bytes, unix(7))."""
        path = self.run_dir.resolve() / "opa.sock"
        if self._wrap is not None or len(str(path).encode()) > _MAX_UNIX_PATH:
            return None
        return path

    # -- lifecycle -------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> None:
        """Start every process in order, each ready before the next starts (within
        ``timeout_s`` seconds), then restart any that exits (``restart``). On failure,
        stop what was started and raise StackError."""
        self._supervisor.start(self._define(), timeout_s)

    def stop(self) -> None:
        """Stop every process, last started first; no restart happens after this."""
        self._supervisor.stop()

    def __getitem__(self, name: str) -> Process:
        return self.processes[name]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    @contextlib.contextmanager
    def stopped(self, name: str, timeout_s: float = 30.0) -> Iterator[Process]:
        """Stop ``name`` for the duration of the block (it is not restarted meanwhile),
        then start it again and wait until it is ready (for outage tests)."""
        with self._supervisor.paused(name, timeout_s) as process:
            yield process


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, mode 0600 (a password, a URL holding one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(text + "\n")
