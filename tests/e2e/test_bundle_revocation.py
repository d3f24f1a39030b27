"""Revoking an API key by publishing a bundle, as in the Kubernetes layout: two replicas,
each an authz with its own OPA sidecar (the sidecar's args and generated config from
``infra/k8s/base``, signature verification on), polling one bundle server (nginx with the
shipped bundle server config) for bundles built and signed by
``scripts/build-policy-bundle``. A key removed from the published bundle is refused by
every replica within OPA's polling interval plus one second (authz's revision probe,
which also empties its decision cache), with no process restarted; the other key keeps
working. The polling interval is shortened (1-2 s) with ``--set``, as an operator could.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from authz.stack.supervisor import Process, free_port, http_ok
from authz.tools import deploy
from authz.tools.keys import digest, generate_key
from tests.helpers.e2e import check_all
from tests.helpers.infra import (
    ROOT,
    KeyPair,
    http_get,
    nginx_bundle_server,
    wait_for,
    write_key_pair,
)

pytestmark = pytest.mark.e2e

# OPA polls every MIN..MAX seconds; authz probes OPA's revision every second.
POLL_MIN_S, POLL_MAX_S = 1, 2
AUTHZ_PROBE_S = 1.0
REPLICAS = 2


@dataclass
class Replica:
    """One pod of the Kubernetes layout: authz and its OPA sidecar."""

    name: str
    opa: Process
    authz: Process
    grpc_port: int
    admin_port: int
    opa_diag_port: int

    def status(self, key: str) -> int:
        """The HTTP status authz answers a gateway Check with ``key``."""
        (status,) = check_all([self.grpc_port], key, 1)
        return status

    def failed_loads(self) -> int:
        """OPA's bundle_failed_load_counter (bundles it refused), summed."""
        _, raw = http_get(f"http://127.0.0.1:{self.opa_diag_port}/metrics")
        return sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in raw.decode().splitlines()
            if line.startswith("bundle_failed_load_counter{")
        )

    def readyz(self) -> str:
        """authz's /readyz body (it names the active bundle: ``revision <r>``)."""
        return http_get(f"http://127.0.0.1:{self.admin_port}/readyz")[1].decode()


def _sidecar_args() -> list[str]:
    deployment = next(
        d
        for d in yaml.safe_load_all((ROOT / "infra/k8s/base/authz.yaml").read_text())
        if d["kind"] == "Deployment"
    )
    containers = deployment["spec"]["template"]["spec"]["containers"]
    (opa,) = [c for c in containers if c["name"] == "opa"]
    args: list[str] = opa["args"]
    return args


def _overlay(directory: Path, keys: dict[str, str]) -> Path:
    """A keys overlay (README "Adding an API key") with ``keys`` (name -> key)."""
    entries = {
        digest(key): {
            "id": f"key-{name}",
            "enabled": True,
            "role": "user",
            "rate_limit_tier": "premium",
        }
        for name, key in keys.items()
    }
    target = directory / "gateway/api_keys/data.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(entries), encoding="utf-8")
    return directory


def _build(base: Path, revision: str, keys: dict[str, str], signing: KeyPair) -> Path:
    """scripts/build-policy-bundle --sign --verify; returns the signed archive."""
    out = base / revision
    result = subprocess.run(
        [
            str(ROOT / "scripts/build-policy-bundle"),
            "--data",
            str(_overlay(base / f"{revision}-data", keys)),
            "--out",
            str(out),
            "--revision",
            revision,
            "--skip-tests",
            "--sign",
            str(signing.private),
            "--verify",
            str(signing.public),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return out / "authz.tar.gz"


def _publish(archive: Path, served: Path) -> None:
    """Copy beside the served file, then rename over it (infra/README.md "Publishing a
    bundle": nginx never serves half a file)."""
    tmp = served.with_name(".authz.tar.gz.new")
    tmp.write_bytes(archive.read_bytes())
    tmp.replace(served)


def _start_replica(
    index: int, base: Path, bundle_port: int, public_key: Path, token: str
) -> Replica:
    api, diag, grpc_port, admin_port = free_port(), free_port(), free_port(), free_port()
    run = base / f"run-{index}"  # the emptyDir opa-socket (/run/opa)
    run.mkdir(exist_ok=True)
    paths = {
        "/run/opa/": f"{run}/",
        "/config/opa.yaml": str(ROOT / deploy.K8S_GENERATED / "opa.yaml"),
        "/keys/bundle-signing.pub.pem": str(public_key),
        "/policy/system": str(ROOT / deploy.OPA_SYSTEM_POLICY),
        "127.0.0.1:8181": f"127.0.0.1:{api}",
        "0.0.0.0:8282": f"127.0.0.1:{diag}",
    }
    args = []
    for arg in _sidecar_args():
        for container_path, local in paths.items():
            arg = arg.replace(container_path, local)
        args.append(arg)
    opa = Process(
        f"opa-{index}",
        [
            os.environ.get("AUTHZ_OPA_BIN", "opa"),
            *args,
            f"--set=services.bundles.url=http://127.0.0.1:{bundle_port}/bundles",
            f"--set=bundles.authz.polling.min_delay_seconds={POLL_MIN_S}",
            f"--set=bundles.authz.polling.max_delay_seconds={POLL_MAX_S}",
        ],
        base / f"opa-{index}.log",
        functools.partial(http_ok, f"http://127.0.0.1:{diag}/health?bundles"),
        env={"AUTHZ_OPA_TOKEN": token},
    )
    authz = Process(
        f"authz-{index}",
        [sys.executable, "-m", "authz", "serve"],
        base / f"authz-{index}.log",
        functools.partial(http_ok, f"http://127.0.0.1:{admin_port}/readyz"),
        env={
            **os.environ,
            "AUTHZ_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
            "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{admin_port}",
            # As the sidecar layout: the pod's own OPA on its unix socket, with the token.
            "AUTHZ_OPA_URL": f"unix://{run}/opa.sock",
            "AUTHZ_OPA_TOKEN": token,
            "AUTHZ_BUNDLE_POLL_INTERVAL_S": str(AUTHZ_PROBE_S),
            "AUTHZ_DECISION_LOG": "false",
            "AUTHZ_AUDIT_DB": str(base / f"audit-{index}.db"),
            "AUTHZ_OVERRIDES_FILE": str(base / f"overrides-{index}.json"),
        },
        cwd=ROOT,
    )
    return Replica(f"replica-{index}", opa, authz, grpc_port, admin_port, diag)


@pytest.fixture(scope="module")
def fleet(
    opa_bin: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[Replica], dict[str, Path], Path, dict[str, str]]]:
    """Two replicas polling one bundle server that serves r1 (both keys); yields the
    replicas, the built bundles (r1; r2 without the key "revoked"; r3 with it again but
    signed with another key, as by someone who may publish but holds no signing key),
    the served file and the keys."""
    os.environ.setdefault("AUTHZ_OPA_BIN", opa_bin)
    base = tmp_path_factory.mktemp("revocation")
    signing = write_key_pair(base / "keys", "bundle-signing")
    keys = {"kept": generate_key(), "revoked": generate_key()}
    other = write_key_pair(base / "other-key", "other")
    with ThreadPoolExecutor(max_workers=3) as pool:
        r1 = pool.submit(_build, base, "r1", keys, signing)
        r2 = pool.submit(_build, base, "r2", {"kept": keys["kept"]}, signing)
        r3 = pool.submit(_build, base, "r3", keys, other)
        bundles = {"r1": r1.result(), "r2": r2.result(), "r3": r3.result()}
    served_dir = base / "served"
    served_dir.mkdir()
    served = served_dir / "authz.tar.gz"
    _publish(bundles["r1"], served)
    token = "tok_" + os.urandom(24).hex()
    with nginx_bundle_server(base / "nginx", served_dir) as bundle_port:
        replicas = [
            _start_replica(i, base, bundle_port, signing.public, token) for i in range(REPLICAS)
        ]
        try:
            for replica in replicas:
                replica.opa.start()
            for replica in replicas:
                replica.opa.wait_ready(30)
                replica.authz.start()
            for replica in replicas:
                replica.authz.wait_ready(30)
            yield replicas, bundles, served, keys
        finally:
            for replica in replicas:
                replica.authz.stop()
                replica.opa.stop()


def _refused_more_than(replica: Replica, count: int) -> bool:
    return replica.failed_loads() > count


def _serves(replica: Replica, revision: str) -> bool:
    return f"revision {revision}" in replica.readyz()


def test_a_key_removed_from_the_published_bundle_is_refused_by_every_replica(
    fleet: tuple[list[Replica], dict[str, Path], Path, dict[str, str]],
) -> None:
    replicas, bundles, served, keys = fleet
    for replica in replicas:
        wait_for(functools.partial(_serves, replica, "r1"), what=f"{replica.name} to serve r1")
        # Twice: the second answer comes from authz's decision cache, which the new
        # revision must empty.
        for _ in range(2):
            assert replica.status(keys["revoked"]) == 200, replica.name
            assert replica.status(keys["kept"]) == 200, replica.name
    pids = [(replica.opa.pid, replica.authz.pid) for replica in replicas]

    published = time.monotonic()
    _publish(bundles["r2"], served)
    refused_after: dict[str, float] = {}
    deadline = published + 3 * (POLL_MAX_S + AUTHZ_PROBE_S)  # generous: a diagnosis, not the bound
    while len(refused_after) < len(replicas) and time.monotonic() < deadline:
        for replica in replicas:
            if replica.name not in refused_after and replica.status(keys["revoked"]) == 401:
                refused_after[replica.name] = time.monotonic() - published
        time.sleep(0.05)

    bound = POLL_MAX_S + AUTHZ_PROBE_S
    assert set(refused_after) == {r.name for r in replicas}, refused_after
    for name, elapsed in refused_after.items():
        assert elapsed <= bound, f"{name} refused the key after {elapsed:.2f}s > {bound}s"
    for replica in replicas:
        assert replica.status(keys["revoked"]) == 401, replica.name  # stays refused
        assert replica.status(keys["kept"]) == 200, replica.name
        assert "revision r2" in replica.readyz(), replica.name
    # No process restarted: the same processes, all still running.
    assert [(r.opa.pid, r.authz.pid) for r in replicas] == pids
    assert all(r.opa.running and r.authz.running for r in replicas)


def test_a_bundle_restoring_the_key_without_the_signing_key_is_refused_by_every_replica(
    fleet: tuple[list[Replica], dict[str, Path], Path, dict[str, str]],
) -> None:
    """Whoever may publish to the bundle server (infra/k8s/base/rbac.yaml) but holds no
    signing key cannot bring a revoked key back: every OPA refuses the bundle and keeps
    the revision that revoked it."""
    replicas, bundles, served, keys = fleet
    _publish(bundles["r2"], served)
    for replica in replicas:
        wait_for(functools.partial(_serves, replica, "r2"), what=f"{replica.name} to serve r2")
    before = [replica.failed_loads() for replica in replicas]
    _publish(bundles["r3"], served)
    for replica, count in zip(replicas, before, strict=True):
        wait_for(
            functools.partial(_refused_more_than, replica, count),
            what=f"{replica.name}'s OPA to refuse r3",
        )
        assert "verification error" in replica.opa.log_tail(200), replica.name
    for replica in replicas:
        assert replica.status(keys["revoked"]) == 401, replica.name
        assert replica.status(keys["kept"]) == 200, replica.name
        assert _serves(replica, "r2"), replica.name
