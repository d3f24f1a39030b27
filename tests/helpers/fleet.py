"""A fleet of authz replicas for end-to-end tests: each replica is an authz process with
its own OPA (the Kubernetes sidecar layout, both polling the session stack's bundle
server), the shared services come from the caller's environment (Redis today; the audit
database by adding ``AUTHZ_AUDIT_URL`` to ``env``), and one Envoy balances the
gateway's ext_authz calls over the replicas it was started with (round robin).

    with running_fleet(e2e, tmp_path, envoy_bin, opa_bin, env=shared, replicas=2) as fleet:
        a, b = fleet.replicas
        a.add_override("allow", {...}, reason="...")
        fleet.gateway.get("/api/v1/status", headers=...)
        late = fleet.add_replica({"AUTHZ_...": "..."})  # not behind Envoy

Every process binds 127.0.0.1 on a free port, logs under ``base`` and is stopped when
the block exits.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from authz.stack.supervisor import Process, free_port, http_ok
from authz.tools.launch import opa_launch
from tests.helpers.e2e import BURST_S, Env, OverridesAdmin, check_all
from tests.helpers.envoy_rig import ext_authz_envoy_config, running_echo, running_envoy

__all__ = ["Fleet", "Replica", "running_fleet"]

START_TIMEOUT_S = 30.0


@dataclass
class Replica(OverridesAdmin):
    """One authz replica and its OPA sidecar; ``admin`` is a client of its admin API
    (admin token and ``X-Authz-Actor`` set)."""

    name: str
    grpc_port: int
    admin_port: int
    opa_port: int
    opa: Process
    authz: Process
    admin: httpx.Client

    def check(self, api_key: str, path: str = "/api/v1/status", n: int = 1) -> list[int]:
        """``n`` gRPC Checks straight to this replica (not through Envoy); HTTP statuses."""
        return check_all([self.grpc_port], api_key, n, path=path)

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """A sample of this replica's ``/metrics`` (0 when absent)."""
        text = httpx.get(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5).text
        wanted = dict(labels or {})
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in wanted.items()
                ):
                    return float(sample.value)
        return 0.0

    def ready(self) -> httpx.Response:
        """``GET /readyz``."""
        return httpx.get(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=5)


@dataclass
class Fleet:
    """Running replicas, the Envoy in front of the first ones (``gateway``: a client of
    its listener) and how to add more."""

    e2e: Env
    base: Path
    opa_bin: str
    env: Mapping[str, str]
    replicas: list[Replica] = field(default_factory=list)
    gateway: httpx.Client | None = None
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def add_replica(self, env: Mapping[str, str] | None = None) -> Replica:
        """Start one more replica (OPA first, ready once its bundle is active, then
        authz, ready once ``/readyz`` passes) with the fleet's ``env`` plus ``env``;
        stopped with the fleet. Not behind the fleet's Envoy."""
        index = len(self.replicas)
        name = f"replica-{index}"
        opa_port, grpc_port, admin_port = free_port(), free_port(), free_port()
        launch = opa_launch(
            self.opa_bin,
            opa_port,
            f"--config-file={self.e2e.stack.root / 'infra/opa/opa-local.yaml'}",
            f"--set=services.bundles.url=http://127.0.0.1:{self.e2e.stack.ports.bundles}/bundles",
            ready_path="/health?bundles",
        )
        opa = Process(f"{name}-opa", launch.argv, self.base / f"{name}-opa.log", launch.ready)
        self._start(opa)
        authz = Process(
            name,
            [sys.executable, "-m", "authz", "serve"],
            self.base / f"{name}.log",
            functools.partial(http_ok, f"http://127.0.0.1:{admin_port}/readyz"),
            env={
                **os.environ,
                "AUTHZ_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
                "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{admin_port}",
                "AUTHZ_OPA_URL": f"http://127.0.0.1:{opa_port}",
                "AUTHZ_ADMIN_TOKEN": self.e2e.admin_token,
                "AUTHZ_RATE_LIMIT_BURST_S": BURST_S,
                "AUTHZ_DECISION_LOG": "false",
                "AUTHZ_AUDIT_DB": str(self.base / f"{name}-audit.db"),
                "AUTHZ_OVERRIDES_FILE": str(self.base / f"{name}-overrides.json"),
                **self.env,
                **(env or {}),
            },
        )
        self._start(authz)
        admin = httpx.Client(
            base_url=f"http://127.0.0.1:{admin_port}",
            headers={"authorization": f"Bearer {self.e2e.admin_token}", "x-authz-actor": name},
            timeout=5.0,
        )
        self._stack.callback(admin.close)
        replica = Replica(name, grpc_port, admin_port, opa_port, opa, authz, admin)
        self.replicas.append(replica)
        return replica

    def _start(self, process: Process) -> None:
        self._stack.callback(process.stop)
        process.start()
        process.wait_ready(START_TIMEOUT_S)


def _envoy_config(listen: int, admin: int, grpc_ports: Sequence[int], upstream: int) -> Any:
    """:func:`ext_authz_envoy_config` with every replica as an endpoint of the ext_authz
    cluster (Envoy's default round-robin load balancing)."""
    config = ext_authz_envoy_config(listen, admin, grpc_ports[0], upstream)
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == "authz"]
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
        for p in grpc_ports
    ]
    return config


@contextmanager
def running_fleet(
    e2e: Env,
    base: Path,
    envoy_bin: str,
    opa_bin: str,
    *,
    env: Mapping[str, str],
    replicas: int = 2,
    replica_env: Sequence[Mapping[str, str]] = (),
) -> Iterator[Fleet]:
    """``replicas`` replicas (each with the shared ``env`` plus its entry of
    ``replica_env``) behind one Envoy whose routes all go to an echo upstream; yields
    once everything is ready, stops everything on exit."""
    fleet = Fleet(e2e, base, opa_bin, env)
    with fleet._stack:
        for index in range(replicas):
            fleet.add_replica(replica_env[index] if index < len(replica_env) else None)
        upstream, listen, envoy_admin = free_port(), free_port(), free_port()
        fleet._stack.enter_context(running_echo(upstream))
        config = _envoy_config(listen, envoy_admin, [r.grpc_port for r in fleet.replicas], upstream)
        fleet._stack.enter_context(running_envoy(envoy_bin, config, base, envoy_admin))
        fleet.gateway = httpx.Client(base_url=f"http://127.0.0.1:{listen}", timeout=5.0)
        fleet._stack.callback(fleet.gateway.close)
        yield fleet
