"""The processes of each benchmark setup, on 127.0.0.1 free ports.

Shared by every setup, started once:

- **upstream**: an Envoy answering every request ``200 {"ok":true}`` from a
  ``direct_response`` route (so the upstream is never what limits a setup; the demo
  upstream is Python);
- **bundles**: ``authz.stack.bundles`` serving the benchmark's bundles to OPA.

Per setup, in front of the upstream, the gateway Envoy from
``infra/envoy/envoy-gateway.yaml`` (rendered with ``authz.stack.envoy.render``) with its
access log removed (in every setup: a log line per request is not what is compared) and
vegeta's own request headers (``X-Vegeta-Seq``, ``X-Vegeta-Attack``: no real client sends
them) removed before any filter sees them:

- **limit**: the same config without the ext_authz filter;
- **ceiling**: ext_authz pointed at the null server of ``bench/ceiling`` (always OK): what
  any ext_authz server could do here;
- **peer**: ext_authz pointed at opa-envoy-plugin (OPA with the plugin, its gRPC server
  evaluating ``authz/gateway_peer/decision``, the shim in ``bench/peer``);
- **authz**: ext_authz pointed at ``python -m authz serve``, which queries an OPA, with
  the settings authz ships with (decision log on stdout, into its log file; audit trail
  in SQLite in its working directory) plus the rig's ``authz_env``;
- **authz-bare**: the same with the decision log and the audit trail off
  (:data:`BARE_ENV`), so their cost shows.

OPA and the plugin both load the same bundle from the bundle server with the polling
settings of ``infra/opa/opa-local.yaml`` (the local stack's). Every Envoy runs with the
same ``--concurrency``.
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from authz.stack import envoy, tls
from authz.stack.supervisor import STACK_LEAVES, Process, StackError
from authz.tools.launch import HOST, free_port, http_ok, opa_launch

__all__ = [
    "AUTHZ_SETUPS",
    "BARE_ENV",
    "HOST",
    "SETUPS",
    "VEGETA_HEADERS",
    "Binaries",
    "Rig",
    "Running",
    "gateway_config",
    "opa_config",
    "upstream_config",
]

SETUPS: Final = ("limit", "ceiling", "peer", "authz", "authz-bare")
# The setups running authz (with an admin port serving /metrics).
AUTHZ_SETUPS: Final = ("authz", "authz-bare")
# authz-bare: the decision log and the audit trail off (README "Configuration").
BARE_ENV: Final = {"AUTHZ_DECISION_LOG": "false", "AUTHZ_AUDIT_DB": ""}
# Headers vegeta adds to every request (its attack name and a sequence number).
VEGETA_HEADERS: Final = ("x-vegeta-attack", "x-vegeta-seq")
_EARLY_MUTATION: Final = "envoy.http.early_header_mutation.header_mutation"
PEER_DECISION_PATH: Final = "authz/gateway_peer/decision"
_HCM: Final = "envoy.filters.network.http_connection_manager"
_EXT_AUTHZ: Final = "envoy.filters.http.ext_authz"
_READY_TIMEOUT_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class Binaries:
    """Paths of the programs a run needs (``peer`` None: the peer setup is skipped)."""

    envoy: str
    opa: str
    vegeta: str
    peer: str | None = None
    python: str = sys.executable
    # The null ext_authz server (bench/ceiling); None: the ceiling setup is skipped.
    ceiling: str | None = None


def upstream_config(port: int, admin_port: int) -> dict[str, Any]:
    """An Envoy bootstrap answering every request on ``port`` with 200 and a small JSON
    body, straight from the route (no cluster)."""
    return {
        "admin": {"address": {"socket_address": {"address": HOST, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "upstream",
                    "address": {"socket_address": {"address": HOST, "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": _HCM,
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters"
                                        ".network.http_connection_manager.v3"
                                        ".HttpConnectionManager",
                                        "stat_prefix": "upstream",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "direct_response": {
                                                                "status": 200,
                                                                "body": {
                                                                    "inline_string": '{"ok":true}\n'
                                                                },
                                                            },
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy"
                                                    ".extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }


def gateway_config(
    source: Path,
    *,
    port: int,
    admin_port: int,
    upstream_port: int,
    authz_port: int | None,
    tls_dir: Path | None = None,
) -> dict[str, Any]:
    """The gateway Envoy config ``source`` on the given ports, without access logs;
    ``authz_port`` None removes ext_authz entirely (the filter and the per-route
    settings), else the ``authz`` cluster points there: over mTLS with the files under
    ``tls_dir`` (:func:`authz.stack.tls.ensure_pki`'s layout), as shipped, or plaintext
    when ``tls_dir`` is None (the peer, opa-envoy-plugin, and the ceiling serve plaintext
    gRPC). Every HTTP connection manager removes :data:`VEGETA_HEADERS` before its filters
    run (an early header mutation,
    https://www.envoyproxy.io/docs/envoy/latest/api-v3/extensions/http/early_header_mutation/header_mutation/v3/header_mutation.proto).
    Raises KeyError when the file does not have the ``gateway`` listener or the
    ``authz``/``upstream_api`` clusters."""
    config: dict[str, Any] = yaml.safe_load(
        envoy.render(
            source,
            admin_port=admin_port,
            listeners={"gateway": port},
            clusters={
                "authz": (HOST, authz_port or 1),
                "upstream_api": (HOST, upstream_port),
            },
            tls_dir=tls_dir,
        )
    )
    resources = config["static_resources"]
    if tls_dir is None:
        for cluster in resources["clusters"]:
            if cluster["name"] == "authz":
                cluster.pop("transport_socket", None)
    for listener in resources["listeners"]:
        for chain in listener["filter_chains"]:
            for item in chain["filters"]:
                if item["name"] != _HCM:
                    continue
                hcm = item["typed_config"]
                hcm.pop("access_log", None)
                hcm.setdefault("early_header_mutation_extensions", []).append(
                    _strip_vegeta_headers()
                )
                if authz_port is None:
                    hcm["http_filters"] = [
                        f for f in hcm["http_filters"] if f["name"] != _EXT_AUTHZ
                    ]
                    for host in hcm["route_config"]["virtual_hosts"]:
                        for route in host["routes"]:
                            route.get("typed_per_filter_config", {}).pop(_EXT_AUTHZ, None)
                            if not route.get("typed_per_filter_config", True):
                                del route["typed_per_filter_config"]
    if authz_port is None:
        resources["clusters"] = [c for c in resources["clusters"] if c["name"] != "authz"]
    return config


def _strip_vegeta_headers() -> dict[str, Any]:
    return {
        "name": _EARLY_MUTATION,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.http.early_header_mutation"
            ".header_mutation.v3.HeaderMutation",
            "mutations": [{"remove": name} for name in VEGETA_HEADERS],
        },
    }


def _tcp_ok(port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def opa_config(
    source: Path,
    *,
    bundles_url: str,
    resource: str,
    plugin_addr: str | None = None,
) -> dict[str, Any]:
    """OPA's config ``source`` (``infra/opa/opa-local.yaml``) polling ``resource`` from
    ``bundles_url``; with ``plugin_addr``, plus opa-envoy-plugin's gRPC server there
    evaluating the peer shim's decision."""
    config: dict[str, Any] = yaml.safe_load(source.read_text(encoding="utf-8"))
    config["services"]["bundles"]["url"] = bundles_url
    config["bundles"]["authz"]["resource"] = resource
    if plugin_addr is not None:
        config["plugins"] = {
            "envoy_ext_authz_grpc": {
                "addr": plugin_addr,
                "path": PEER_DECISION_PATH,
                "dry-run": False,
                "enable-reflection": False,
            }
        }
    return config


@dataclass
class Running:
    """A started setup: the gateway URL and its processes by role (``envoy``, and
    ``authz`` + ``opa``, ``peer`` or ``ceiling``); ``admin_url`` is authz's admin port
    (``/metrics``), None in setups without authz."""

    name: str
    url: str
    processes: dict[str, Process] = field(default_factory=dict)
    admin_url: str | None = None

    def pids(self) -> dict[str, int]:
        """Role -> pid of every running process."""
        return {role: p.pid for role, p in self.processes.items() if p.pid is not None}


# The longest unix socket path, in bytes (sun_path of sockaddr_un less its NUL; unix(7)).
MAX_UNIX_PATH: Final = 107


def opa_socket_path(run_dir: Path, tag: str, short_dir: Callable[[], Path]) -> Path:
    """The unix socket of setup ``tag``'s OPA: ``<run_dir>/<tag>-opa.sock`` (absolute),
    or the same name in ``short_dir()`` when that path is longer than a unix socket path
    may be (:data:`MAX_UNIX_PATH` bytes), so a deep run directory never silently
    measures TCP instead."""
    name = f"{tag}-opa.sock"
    path = run_dir.resolve() / name
    if len(str(path).encode()) <= MAX_UNIX_PATH:
        return path
    path = short_dir() / name
    if len(str(path).encode()) > MAX_UNIX_PATH:
        raise StackError(f"{path}: longer than a unix socket path may be ({MAX_UNIX_PATH} B)")
    return path


class Rig:
    """Starts the shared processes, then one setup at a time (:meth:`setup`).

    ``root`` is the repository; ``run_dir`` receives configs and ``logs/``;
    ``bundle_dir`` holds the bundles (``<name>.tar.gz``); ``authz_env`` adds to authz's
    environment in both authz setups (``PYTHONPATH`` runs another checkout of authz; none
    by default: authz runs as shipped); ``opa_socket`` (default True, the transport the
    stack and the deployments ship) serves OPA on a unix socket too and points authz
    there (``AUTHZ_OPA_URL=unix://...``; OPA's TCP port stays for its health check);
    False: authz queries OPA over loopback TCP.
    """

    def __init__(
        self,
        root: Path,
        run_dir: Path,
        bundle_dir: Path,
        binaries: Binaries,
        *,
        envoy_concurrency: int = 1,
        authz_env: Mapping[str, str] | None = None,
        opa_socket: bool = True,
    ) -> None:
        self.root = root
        self.run_dir = run_dir
        self.bundle_dir = bundle_dir
        self.bin = binaries
        self.envoy_concurrency = envoy_concurrency
        self.authz_env = dict(authz_env or {})
        self.opa_socket = opa_socket
        self._stack = ExitStack()
        self._short_dir: Path | None = None
        self._shared: list[Process] = []
        self.upstream_port = 0
        self.bundles_port = 0

    # -- shared ----------------------------------------------------------------
    def __enter__(self) -> Rig:
        try:
            self.upstream_port, admin = free_port(), free_port()
            self._start(self._envoy("upstream", upstream_config(self.upstream_port, admin), admin))
            self.bundles_port = free_port()
            bundles = self._start(
                Process(
                    "bundles",
                    [
                        self.bin.python,
                        "-m",
                        "authz.stack.bundles",
                        f"--dir={self.bundle_dir}",
                        f"--port={self.bundles_port}",
                    ],
                    self._log("bundles"),
                    lambda: http_ok(f"http://{HOST}:{self.bundles_port}/healthz"),
                    cwd=self.root,
                )
            )
            self._shared.append(bundles)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self._stack.close()

    def shared_pids(self) -> list[int]:
        """Pids of the shared processes (upstream Envoy, bundle server)."""
        return [p.pid for p in self._shared if p.pid is not None]

    def _socket_path(self, tag: str) -> Path:
        """Where setup ``tag``'s OPA listens (:func:`opa_socket_path`); a short directory
        is made (and removed with the rig) only when the run directory is too deep."""

        def short_dir() -> Path:
            if self._short_dir is None:
                self._short_dir = Path(tempfile.mkdtemp(prefix="authz-bench-"))
                self._stack.callback(shutil.rmtree, self._short_dir, True)
            return self._short_dir

        return opa_socket_path(self.run_dir, tag, short_dir)

    def _start(self, process: Process, stack: ExitStack | None = None) -> Process:
        (stack or self._stack).callback(process.stop)
        process.start()
        process.wait_ready(_READY_TIMEOUT_S)
        return process

    def _log(self, name: str) -> Path:
        return self.run_dir / "logs" / f"{name}.log"

    def _write(self, name: str, config: Mapping[str, Any]) -> Path:
        path = self.run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
        return path

    def _envoy(self, name: str, config: Mapping[str, Any], admin_port: int) -> Process:
        path = self._write(f"{name}-envoy.yaml", config)
        return Process(
            f"{name}-envoy",
            [
                self.bin.envoy,
                "-c",
                str(path),
                "--use-dynamic-base-id",
                "--concurrency",
                str(self.envoy_concurrency),
                "--log-level",
                "warn",
            ],
            self._log(f"{name}-envoy"),
            lambda: http_ok(f"http://{HOST}:{admin_port}/ready"),
        )

    def _opa(
        self,
        name: str,
        binary: str,
        bundle: str,
        plugin_addr: str | None,
        socket_path: Path | None = None,
    ) -> tuple[Process, int]:
        """OPA (or the plugin, which is OPA with one more plugin) and its REST port; with
        ``socket_path``, its REST API on that unix socket too."""
        port = free_port()
        config = opa_config(
            self.root / "infra/opa/opa-local.yaml",
            bundles_url=f"http://{HOST}:{self.bundles_port}/bundles",
            resource=f"{bundle}.tar.gz",
            plugin_addr=plugin_addr,
        )
        path = self._write(f"{name}-opa.yaml", config)
        launch = opa_launch(
            binary,
            port,
            *([f"--addr=unix://{socket_path}"] if socket_path else []),
            f"--config-file={path}",
            "--log-format=json",
            ready_path="/health?bundles" + ("&plugins" if plugin_addr else ""),
        )
        return Process(name, launch.argv, self._log(name), launch.ready), port

    # -- per setup ---------------------------------------------------------------
    @contextmanager
    def setup(self, name: str, bundle: str) -> Iterator[Running]:
        """Start setup ``name`` (one of :data:`SETUPS`) with bundle ``<bundle>.tar.gz``;
        stop it when the block exits. Raises StackError when a process does not become
        ready (the message ends with its log's tail)."""
        if name not in SETUPS:
            raise ValueError(f"unknown setup {name!r}")
        with ExitStack() as stack:
            running = Running(name, "")
            authz_port: int | None = None
            tag = f"{name}-{bundle}"
            if name == "peer":
                if self.bin.peer is None:
                    raise StackError("no opa-envoy-plugin binary")
                authz_port = free_port()
                peer, _ = self._opa(f"{tag}-peer", self.bin.peer, bundle, f"{HOST}:{authz_port}")
                running.processes["peer"] = self._start(peer, stack)
            elif name == "ceiling":
                if self.bin.ceiling is None:
                    raise StackError("no bench/ceiling binary")
                authz_port = free_port()
                ceiling_port = authz_port
                running.processes["ceiling"] = self._start(
                    Process(
                        f"{tag}-ceiling",
                        [self.bin.ceiling, f"-addr={HOST}:{ceiling_port}"],
                        self._log(f"{tag}-ceiling"),
                        lambda: _tcp_ok(ceiling_port),
                    ),
                    stack,
                )
            elif name in AUTHZ_SETUPS:
                socket_path = self._socket_path(tag) if self.opa_socket else None
                opa, opa_port = self._opa(f"{tag}-opa", self.bin.opa, bundle, None, socket_path)
                running.processes["opa"] = self._start(opa, stack)
                authz_port, admin_port = free_port(), free_port()
                running.admin_url = f"http://{HOST}:{admin_port}"
                opa_url = f"unix://{socket_path}" if socket_path else f"http://{HOST}:{opa_port}"
                # Envoy -> authz over mTLS, as shipped (the TLS cost is part of the setup).
                mtls_dir = self.run_dir / "mtls"
                server = tls.ensure_pki(mtls_dir, STACK_LEAVES)["authz"]
                workdir = self.run_dir / f"{tag}-authz"
                workdir.mkdir(parents=True, exist_ok=True)
                running.processes["authz"] = self._start(
                    Process(
                        f"{tag}-authz",
                        [self.bin.python, "-m", "authz", "serve"],
                        self._log(f"{tag}-authz"),
                        lambda: http_ok(f"http://{HOST}:{admin_port}/readyz"),
                        env={
                            "AUTHZ_GRPC_ADDR": f"{HOST}:{authz_port}",
                            "AUTHZ_ADMIN_ADDR": f"{HOST}:{admin_port}",
                            "AUTHZ_OPA_URL": opa_url,
                            "AUTHZ_GRPC_TLS_CERT": str(server.cert),
                            "AUTHZ_GRPC_TLS_KEY": str(server.key),
                            "AUTHZ_GRPC_TLS_CLIENT_CA": str(server.ca),
                            **self.authz_env,
                            **(BARE_ENV if name == "authz-bare" else {}),
                        },
                        # Files authz may write relative to its cwd stay in the run dir.
                        cwd=workdir,
                    ),
                    stack,
                )
            port, admin = free_port(), free_port()
            config = gateway_config(
                self.root / "infra/envoy/envoy-gateway.yaml",
                port=port,
                admin_port=admin,
                upstream_port=self.upstream_port,
                authz_port=authz_port,
                tls_dir=self.run_dir / "mtls" if name in AUTHZ_SETUPS else None,
            )
            running.processes["envoy"] = self._start(self._envoy(tag, config, admin), stack)
            running.url = f"http://{HOST}:{port}"
            yield running
