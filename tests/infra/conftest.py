"""Fixtures for the deployment-file tests: the pinned validation tools, signing keys, and
Envoy processes started from the deployment configs (builders: tests/helpers/infra.py).

Tool paths come from ``AUTHZ_PROMTOOL_BIN`` / ``AUTHZ_COMPOSECHECK_BIN`` or, unset, from
``scripts/lib.sh`` (the one place their versions are pinned); ``scripts/install-tools``
(run by ``scripts/install-deps``) builds them.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Iterator

import pytest
import yaml

from authz.stack import envoy
from authz.stack.supervisor import Process, free_port, http_ok
from tests.helpers.infra import ROOT, DeployEnvoy, KeyPair, deployment_tls, write_key_pair


def _lib_sh(variable: str) -> str:
    result = subprocess.run(
        ["bash", "-c", f'source "{ROOT}/scripts/lib.sh"; printf %s "${variable}"'],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def _tool(env_var: str, lib_variable: str) -> str:
    path = os.environ.get(env_var) or _lib_sh(lib_variable)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} missing: run ./scripts/install-deps (scripts/install-tools)")
    return path


@pytest.fixture(scope="session")
def promtool_bin() -> str:
    """The pinned promtool."""
    return _tool("AUTHZ_PROMTOOL_BIN", "PROMTOOL_BIN")


@pytest.fixture(scope="session")
def composecheck_bin() -> str:
    """scripts/tools/composecheck (compose-go), built by scripts/install-tools."""
    return _tool("AUTHZ_COMPOSECHECK_BIN", "COMPOSECHECK_BIN")


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """The bundle signing key pair for this session."""
    return write_key_pair(tmp_path_factory.mktemp("keys"), "bundle-signing")


@pytest.fixture(scope="session")
def deploy_envoys(
    envoy_bin: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, DeployEnvoy]]:
    """infra/compose/envoy/envoy-{gateway,egress}.yaml running, each on free ports (same
    file; only ports, the internal admin port and loopback listeners changed). Their DNS
    upstreams do not resolve here, so requests get ext_authz errors (503): enough for
    every stat to exist. Their TLS files are issued for the test (:func:`deployment_tls`)."""
    base = tmp_path_factory.mktemp("deploy-envoy")
    tls_dir = deployment_tls(base / "tls")
    running: dict[str, DeployEnvoy] = {}
    processes: list[Process] = []
    for name, listener_name in (("gateway", "gateway"), ("egress", "egress")):
        listener, admin, internal = free_port(), free_port(), free_port()
        config = base / f"envoy-{name}.yaml"
        rendered = yaml.safe_load(
            envoy.render(
                ROOT / f"infra/compose/envoy/envoy-{name}.yaml",
                admin_port=internal,
                listeners={listener_name: listener, "admin_read_only": admin},
                clusters={"admin": ("127.0.0.1", internal)},
                tls_dir=tls_dir,
            )
        )
        for item in rendered["static_resources"]["listeners"]:  # loopback only in tests
            if "address" in item:  # (not the egress interception's internal listener)
                item["address"]["socket_address"]["address"] = "127.0.0.1"
        config.write_text(yaml.safe_dump(rendered, sort_keys=False), encoding="utf-8")
        process = Process(
            f"envoy-{name}",
            [envoy_bin, "-c", str(config), "--use-dynamic-base-id", "--concurrency", "1"],
            base / f"envoy-{name}.log",
            functools.partial(http_ok, f"http://127.0.0.1:{admin}/ready"),
        )
        processes.append(process)
        process.start()
        process.wait_ready(30)
        running[name] = DeployEnvoy(name, listener, admin, tls_dir / "ca.crt")
    try:
        yield running
    finally:
        for process in processes:
            process.stop()
