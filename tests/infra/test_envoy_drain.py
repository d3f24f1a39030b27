"""The shipped Envoys drain their listeners before they stop.

Envoy closes its listeners at once on SIGTERM; a graceful drain must be asked of its admin
API first (https://www.envoyproxy.io/docs/envoy/latest/intro/arch_overview/operations/draining).
Compose runs Envoy under ``infra/compose/envoy/drain-on-term.sh`` (SIGTERM -> drain ->
stop), Kubernetes asks in a preStop hook. Both are run here against a real Envoy with the
deployment config: while draining, every response says ``Connection: close`` (clients
move to another proxy), and Envoy stops only after the drain time.
"""

from __future__ import annotations

import http.client
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.stack.supervisor import http_ok
from tests.helpers.infra import ROOT, DeployEnvoy, deployment_tls, render_deploy_envoy, wait_for

WRAPPER = ROOT / "infra/compose/envoy/drain-on-term.sh"
ENVOYS = ("envoy-gateway", "envoy-egress")


def _connection_header(proxy: DeployEnvoy) -> str | None:
    """The ``Connection`` header of one answer from the gateway listener (TLS)."""
    context = ssl.create_default_context(cafile=str(proxy.ca))
    connection = http.client.HTTPSConnection(
        "localhost", proxy.listener, context=context, timeout=10
    )
    try:
        connection.request("GET", "/api/v1/status")
        response = connection.getresponse()
        response.read()
        return response.getheader("connection")
    finally:
        connection.close()


def _load(path: Path) -> Any:
    return list(yaml.safe_load_all(path.read_text(encoding="utf-8")))


@pytest.fixture
def gateway_config(tmp_path: Path) -> tuple[Path, DeployEnvoy, int]:
    return render_deploy_envoy("gateway", tmp_path, deployment_tls(tmp_path / "tls"))


def _start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


@pytest.fixture
def stopper() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_compose_wrapper_drains_on_sigterm_then_stops(
    envoy_bin: str,
    gateway_config: tuple[Path, DeployEnvoy, int],
    tmp_path: Path,
    stopper: list[subprocess.Popen[bytes]],
) -> None:
    config, proxy, internal = gateway_config
    env = {
        **os.environ,
        "PATH": f"{Path(envoy_bin).parent}:{os.environ['PATH']}",
        "ENVOY_LAUNCHER": "",
        "ENVOY_DRAIN_S": "3",
        "ENVOY_DRAIN_ADMIN_PORT": str(internal),
    }
    argv = ["bash", str(WRAPPER), "-c", str(config), "--use-dynamic-base-id", "--concurrency", "1"]
    process = _start(argv, tmp_path / "envoy.log", env)
    stopper.append(process)
    wait_for(lambda: http_ok(f"http://127.0.0.1:{proxy.admin}/ready"), 30)
    assert _connection_header(proxy) != "close"  # not draining: keep-alive
    process.send_signal(signal.SIGTERM)
    wait_for(lambda: _connection_header(proxy) == "close", 5)
    time.sleep(1)
    assert process.poll() is None, "Envoy stopped before the drain time"
    assert _connection_header(proxy) == "close"
    assert process.wait(15) == 0


def test_kubernetes_prestop_hook_drains_a_running_envoy(
    envoy_bin: str,
    gateway_config: tuple[Path, DeployEnvoy, int],
    tmp_path: Path,
    stopper: list[subprocess.Popen[bytes]],
) -> None:
    """The preStop command exactly as shipped (its admin port and sleep shortened for the
    test): after it, Envoy answers with ``Connection: close``."""
    config, proxy, internal = gateway_config
    (deployment,) = [
        d for d in _load(ROOT / "infra/k8s/base/gateway.yaml") if d["kind"] == "Deployment"
    ]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    drain = args[args.index("--drain-strategy") + 1]
    process = _start(
        [
            envoy_bin,
            "-c",
            str(config),
            "--use-dynamic-base-id",
            "--concurrency",
            "1",
            "--drain-time-s",
            "30",
            "--drain-strategy",
            drain,
        ],
        tmp_path / "envoy.log",
        dict(os.environ),
    )
    stopper.append(process)
    wait_for(lambda: http_ok(f"http://127.0.0.1:{proxy.admin}/ready"), 30)
    assert _connection_header(proxy) != "close"
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    script = (
        command[2]
        .replace("/127.0.0.1/9900", f"/127.0.0.1/{internal}")
        .replace("sleep 15", "sleep 0")
    )
    assert script != command[2]
    subprocess.run([*command[:2], script], check=True, timeout=20)
    assert _connection_header(proxy) == "close"


@pytest.mark.parametrize("manifest", ["gateway", "egress"])
def test_kubernetes_envoys_drain_within_the_grace_period(manifest: str) -> None:
    """preStop drains for as long as Envoy's --drain-time-s, and the pod's grace period
    leaves time for it; the hook posts to the pod-local admin API only."""
    (deployment,) = [
        d for d in _load(ROOT / f"infra/k8s/base/{manifest}.yaml") if d["kind"] == "Deployment"
    ]
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = container["args"]
    drain_time = int(args[args.index("--drain-time-s") + 1])
    assert args[args.index("--drain-strategy") + 1] == "immediate"
    script = container["lifecycle"]["preStop"]["exec"]["command"][2]
    assert "/dev/tcp/127.0.0.1/9900" in script
    assert "POST /drain_listeners?graceful " in script
    assert f"sleep {drain_time}" in script
    assert spec["terminationGracePeriodSeconds"] > drain_time


@pytest.mark.parametrize("service", ENVOYS)
def test_compose_envoys_run_under_the_drain_wrapper(service: str) -> None:
    compose = yaml.safe_load((ROOT / "infra/compose/docker-compose.yaml").read_text())
    definition = compose["services"][service]
    assert definition["entrypoint"] == ["bash", "/etc/envoy/drain-on-term.sh"]
    assert "./envoy/drain-on-term.sh:/etc/envoy/drain-on-term.sh:ro" in definition["volumes"]
    grace = int(definition["stop_grace_period"].removesuffix("s"))
    default_drain = next(
        int(line.split(":-")[1].split("}")[0])
        for line in WRAPPER.read_text().splitlines()
        if line.startswith("drain_s=")
    )
    assert grace > default_drain
