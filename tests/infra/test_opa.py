"""OPA's deployment configuration, run for real: signed bundles, API lockdown, probes.

OPA starts with the exact command line of ``infra/compose/docker-compose.yaml`` (and of
the Kubernetes sidecar), container paths mapped to the repository's files and addresses
to free loopback ports, against a local bundle server. Keys are generated per session.
"""

from __future__ import annotations

import functools
import http.client
import io
import json
import os
import re
import socket
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.stack.supervisor import Process, free_port, http_ok
from authz.tools import deploy
from authz.tools.keys import digest
from tests.helpers.infra import (
    ROOT,
    KeyPair,
    build_bundle,
    compose_command,
    deployment_tls,
    http_get,
    nginx_binary,
    nginx_bundle_server,
    nginx_config,
    wait_for,
    write_key_pair,
)

pytestmark = pytest.mark.e2e

DEMO_KEY = "ak_demo_admin_0001"  # public demo key (README), only in the demo overlay
GATEWAY_DECISION = "/v1/data/authz/gateway/decision"


def _publish(source: Path, served: Path) -> None:
    """Atomically replace the served bundle (as build-policy-bundle does)."""
    tmp = served.with_name(f".{served.name}.tmp")
    tmp.write_bytes(source.read_bytes())
    tmp.replace(served)


def _tamper(signed: Path, out: Path) -> None:
    """``signed`` with its data changed after signing (the admin key gets role viewer),
    keeping the original .signatures.json."""
    with tarfile.open(signed, "r:gz") as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if data is not None and member.name.lstrip("/") == "data.json":
                data = data.replace(b'"role":"admin"', b'"role":"viewer"')
                assert b'"role":"viewer"' in data
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)


def _map_args(args: list[str], paths: dict[str, str], api: int, diag: int) -> list[str]:
    mapped = []
    for arg in args:
        for container_path, local in paths.items():
            arg = arg.replace(container_path, local)
        arg = re.sub(
            r"=(https?://)?(0\.0\.0\.0|127\.0\.0\.1):8181$", rf"=\g<1>127.0.0.1:{api}", arg
        )
        arg = re.sub(r"=(https?://)?0\.0\.0\.0:8282$", rf"=\g<1>127.0.0.1:{diag}", arg)
        mapped.append(arg)
    return mapped


class _UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 over the unix socket ``path`` (what authz's ``AUTHZ_OPA_URL=unix://``
    does)."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(str(self.path))
        self.sock = sock


def _socket_decision(path: Path, key: str, token: str | None) -> tuple[int, dict[str, Any]]:
    """(status, body) of the gateway decision for an admin-only path with ``key``, asked
    over the unix socket ``path`` with ``token`` as bearer (none: no header)."""
    body = {
        "input": {
            "attributes": {"request": {"http": {"method": "GET", "path": "/api/v1/admin/users"}}},
            "parsed_path": ["api", "v1", "admin", "users"],
            "credentials": {"x-api-key": digest(key)},
        }
    }
    connection = _UnixConnection(path)
    try:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        connection.request(
            "POST", f"{GATEWAY_DECISION}?provenance", json.dumps(body).encode(), headers
        )
        response = connection.getresponse()
        answer: dict[str, Any] = json.loads(response.read() or b"{}")
        return response.status, answer
    finally:
        connection.close()


def _unix_socket(args: list[str]) -> tuple[Path, int]:
    """The socket OPA listens on (its one ``--addr=unix://``) and the mode it asks for
    (``--unix-socket-perm``, octal), from OPA's argument list."""
    (path,) = [a.removeprefix("--addr=unix://") for a in args if a.startswith("--addr=unix://")]
    (perm,) = [a.partition("=")[2] for a in args if a.startswith("--unix-socket-perm=")]
    return Path(path), int(perm, 8)


def _check_socket(args: list[str], token: str) -> str:
    """OPA started with ``args`` listens on its unix socket with the mode they give, and
    answers the decision there with ``token`` only; returns the active revision."""
    path, mode = _unix_socket(args)
    info = path.stat()
    assert stat.S_ISSOCK(info.st_mode), path
    assert stat.S_IMODE(info.st_mode) == mode == 0o770
    status, answer = _socket_decision(path, DEMO_KEY, token)
    assert status == 200, answer
    for wrong in (None, "tok_" + "0" * 48):  # OPA's token check covers the socket too
        denied, body = _socket_decision(path, DEMO_KEY, wrong)
        assert denied == 401, body
    revision: str = answer["provenance"]["bundles"]["authz"]["revision"]
    return revision


@dataclass
class Opa:
    """A running OPA: REST API (TLS, certificate from ``ca``) and diagnostic ports, its
    token and process; ``args`` its argument list; ``socket`` the unix socket it listens
    on (the volume "opa-socket" of Compose), if any."""

    api: int
    diag: int
    token: str
    process: Process
    ca: Path
    args: list[str] | None = None
    socket: Path | None = None

    @property
    def base(self) -> str:
        """The REST API's URL (https: Compose's OPA speaks TLS only)."""
        return f"https://127.0.0.1:{self.api}"

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def decide(self, key: str) -> dict[str, Any]:
        """The gateway decision for an admin-only path with ``key``, and the revision."""
        body = {
            "input": {
                "attributes": {
                    "request": {"http": {"method": "GET", "path": "/api/v1/admin/users"}}
                },
                "parsed_path": ["api", "v1", "admin", "users"],
                "credentials": {"x-api-key": digest(key)},
            }
        }
        status, raw = http_get(
            f"{self.base}{GATEWAY_DECISION}?provenance",
            self.headers(),
            method="POST",
            body=json.dumps(body).encode(),
            ca_file=self.ca,
        )
        assert status == 200, raw
        answer: dict[str, Any] = json.loads(raw)
        return answer

    def revision(self) -> str:
        revision: str = self.decide(DEMO_KEY)["provenance"]["bundles"]["authz"]["revision"]
        return revision

    def failed_loads(self) -> int:
        _, raw = http_get(f"http://127.0.0.1:{self.diag}/metrics")
        return sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in raw.decode().splitlines()
            if line.startswith("bundle_failed_load_counter{")
        )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory, signing_keys: KeyPair) -> dict[str, KeyPair]:
    return {
        "good": signing_keys,
        "other": write_key_pair(tmp_path_factory.mktemp("other-key"), "other"),
    }


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, KeyPair]) -> dict[str, Path]:
    """r1/r5 signed, r2 unsigned, r3 signed then tampered, r4 signed with another key."""
    base = tmp_path_factory.mktemp("bundles")
    good, other = str(keys["good"].private), str(keys["other"].private)
    variants = {
        "r1": ("--sign", good, "--verify", str(keys["good"].public)),
        "r2": (),
        "r3": ("--sign", good),
        "r4": ("--sign", other),
        "r5": ("--sign", good),
    }
    with ThreadPoolExecutor(max_workers=len(variants)) as pool:
        results = {
            revision: pool.submit(build_bundle, base / revision, revision, *args)
            for revision, args in variants.items()
        }
    built = {}
    for revision, future in results.items():
        result = future.result()
        assert result.returncode == 0, result.stderr
        built[revision] = base / revision / "authz.tar.gz"
    _tamper(built["r3"], base / "r3-tampered.tar.gz")
    built["r3"] = base / "r3-tampered.tar.gz"
    return built


@pytest.fixture(scope="module")
def production(
    opa_bin: str,
    tmp_path_factory: pytest.TempPathFactory,
    keys: dict[str, KeyPair],
    bundles: dict[str, Path],
) -> Iterator[tuple[Opa, Path]]:
    """Bundle server (nginx) + OPA as in docker-compose.yaml (signed bundles, token auth,
    system.authz), serving r1. Yields OPA and the served bundle's path."""
    base = tmp_path_factory.mktemp("opa")
    tls_dir = deployment_tls(base / "tls")  # what tls-init writes to the volume "tls"
    served_dir = base / "served"
    served_dir.mkdir()
    served = served_dir / "authz.tar.gz"
    _publish(bundles["r1"], served)
    api, diag = free_port(), free_port()
    (base / "run").mkdir()  # the volume "opa-socket" (/run/opa)
    args = _map_args(
        compose_command("opa"),
        {
            "/run/opa/": f"{base}/run/",
            # First: the repository's own path may contain "/tls/" (a worktree).
            "/tls/": f"{tls_dir}/",
            "/config/opa.yaml": str(ROOT / "infra/opa/opa.yaml"),
            "/policy/system": str(ROOT / "infra/opa/system"),
            "/keys/bundle-signing.pub.pem": str(keys["good"].public),
        },
        api,
        diag,
    )
    token = "tok_" + os.urandom(24).hex()
    # The production bundle server: nginx with infra/compose/nginx/bundles.conf.
    with nginx_bundle_server(base / "nginx", served_dir) as bundle_port:
        opa = Process(
            "opa",
            [
                opa_bin,
                *args,
                f"--set=services.bundles.url=http://127.0.0.1:{bundle_port}/bundles",
                "--set=bundles.authz.polling.min_delay_seconds=1",
                "--set=bundles.authz.polling.max_delay_seconds=1",
            ],
            base / "opa.log",
            lambda: http_ok(f"http://127.0.0.1:{diag}/health?bundles"),
            env={"AUTHZ_OPA_TOKEN": token},
        )
        opa.start()
        try:
            opa.wait_ready(20)
            socket_path, _ = _unix_socket(args)
            yield Opa(api, diag, token, opa, tls_dir / "ca.crt", args, socket_path), served
        finally:
            opa.stop()


@pytest.fixture(scope="module")
def authz_process(
    production: tuple[Opa, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Process, int]]:
    """authz against the locked-down OPA with its token over its unix socket (what
    Compose runs)."""
    opa, _ = production
    assert opa.socket is not None
    grpc_port, admin_port = free_port(), free_port()
    process = Process(
        "authz",
        [sys.executable, "-m", "authz", "serve"],
        tmp_path_factory.mktemp("authz") / "authz.log",
        lambda: http_ok(f"http://127.0.0.1:{admin_port}/readyz"),
        env={
            "AUTHZ_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
            "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{admin_port}",
            # As in Compose: OPA's unix socket on the shared volume.
            "AUTHZ_OPA_URL": f"unix://{opa.socket}",
            "SSL_CERT_FILE": str(opa.ca),
            "AUTHZ_OPA_TOKEN": opa.token,
            "AUTHZ_BUNDLE_POLL_INTERVAL_S": "0.2",
            "AUTHZ_UVLOOP": "false",
        },
        cwd=ROOT,
    )
    process.start()
    try:
        process.wait_ready(20)
        yield process, admin_port
    finally:
        process.stop()


def _readyz(admin_port: int) -> tuple[int, str]:
    status, raw = http_get(f"http://127.0.0.1:{admin_port}/readyz")
    return status, raw.decode()


def _more_failed_loads(opa: Opa, before: int) -> bool:
    return opa.failed_loads() > before


def test_signed_bundle_lifecycle(
    production: tuple[Opa, Path],
    authz_process: tuple[Process, int],
    bundles: dict[str, Path],
) -> None:
    """A signed bundle is activated; an unsigned one, a tampered one and one signed with
    another key are refused while the previous revision keeps serving (OPA's decisions
    and authz's /readyz both name it); the next good signed bundle is activated."""
    opa, served = production
    _, admin_port = authz_process
    assert opa.revision() == "r1"
    assert opa.decide(DEMO_KEY)["result"]["allowed"] is True
    wait_for(lambda: "revision r1" in _readyz(admin_port)[1], what="authz to report r1")

    for bad, reason in (
        ("r2", "missing .signatures.json"),
        ("r3", "digest mismatch"),
        ("r4", "verification error"),
    ):
        before = opa.failed_loads()
        _publish(bundles[bad], served)
        wait_for(functools.partial(_more_failed_loads, opa, before), what=f"{bad} refused")
        assert reason in opa.process.log_tail(200), bad
        assert opa.revision() == "r1", bad
        # The tampered bundle would demote the admin key; the decision is unchanged.
        assert opa.decide(DEMO_KEY)["result"]["allowed"] is True
        status, body = _readyz(admin_port)
        assert status == 200, body
        assert "revision r1" in body

    _publish(bundles["r5"], served)
    wait_for(lambda: opa.revision() == "r5", what="r5 activated")
    wait_for(lambda: "revision r5" in _readyz(admin_port)[1], what="authz to report r5")
    _, metrics = http_get(f"http://127.0.0.1:{admin_port}/metrics")
    assert b'authz_bundle_info{revision="r5"} 1.0' in metrics


def test_compose_opa_serves_authz_on_its_socket_with_the_given_permissions(
    production: tuple[Opa, Path], authz_process: tuple[Process, int]
) -> None:
    """OPA started with exactly Compose's argument list (docker-compose.yaml) listens on
    the unix socket with the mode ``--unix-socket-perm`` gives (0770: OPA's group, which
    authz joins, and nobody else), answers the decision there with authz's token and
    refuses it without (401), and authz (AUTHZ_OPA_URL=unix://..., as Compose sets it) is
    ready through it."""
    opa, _ = production
    assert opa.args is not None
    revision = _check_socket(opa.args, opa.token)
    assert revision == opa.revision()  # the socket serves the same OPA as the TLS port
    _, admin_port = authz_process
    status, body = _readyz(admin_port)
    assert status == 200, body
    assert "revision r" in body


def test_api_is_locked_down(production: tuple[Opa, Path]) -> None:
    """Only authz's token queries decisions and writes overrides; nobody dumps data or
    policies, or writes elsewhere; probes and metrics need no token."""
    opa, _ = production
    base, ca = opa.base, opa.ca
    token = opa.headers()
    assert http_get(f"{base}/health?bundles", ca_file=ca)[0] == 200
    assert http_get(f"{base}/metrics", ca_file=ca)[0] == 200
    assert http_get(f"http://127.0.0.1:{opa.diag}/health")[0] == 200
    # The REST API speaks TLS only: plaintext (where decision inputs would be in clear)
    # is refused.
    assert http_get(f"http://127.0.0.1:{opa.api}/health")[0] == 400
    denied = [
        ("GET", "/v1/data", token),
        ("GET", "/v1/data/gateway/api_keys", token),
        ("POST", "/v1/data", token),
        ("GET", "/v1/policies", token),
        ("POST", "/v1/query", token),
        ("GET", "/v1/config", token),
        ("PUT", "/v1/data/gateway/api_keys", token),
        ("PUT", "/v1/policies/evil", token),
        ("POST", GATEWAY_DECISION, {}),
        ("POST", GATEWAY_DECISION, opa.headers("tok_" + "0" * 48)),
        ("PUT", "/v1/data/overrides", {}),
    ]
    for method, path, headers in denied:
        status, _ = http_get(f"{base}{path}", headers, method=method, body=b"{}", ca_file=ca)
        assert status in (401, 403), (method, path, status)
    status, _ = http_get(f"{base}/v1/data/overrides", token, method="PUT", body=b"{}", ca_file=ca)
    assert status == 204
    status, raw = http_get(f"{base}/v1/data/overrides", token, ca_file=ca)
    assert status == 200
    assert json.loads(raw)["result"] == {}


def test_decision_log_is_on_console_and_masked(production: tuple[Opa, Path]) -> None:
    opa, _ = production
    marker = "prompt-" + os.urandom(8).hex()
    body = {
        "input": {
            "attributes": {
                "request": {
                    "http": {
                        "method": "POST",
                        "path": "/api/v1/items",
                        "body": marker,
                        "headers": {"cookie": marker, "x-request-id": marker + "-id"},
                    }
                }
            },
            "parsed_body": {"prompt": marker},
        }
    }
    status, _ = http_get(
        f"{opa.base}{GATEWAY_DECISION}",
        opa.headers(),
        method="POST",
        body=json.dumps(body).encode(),
        ca_file=opa.ca,
    )
    assert status == 200

    def logged() -> list[dict[str, Any]]:
        lines = opa.process.log_path.read_text().splitlines()
        entries = [json.loads(line) for line in lines if marker in line]
        return [entry for entry in entries if entry.get("msg") == "Decision Log"]

    wait_for(lambda: bool(logged()), what="the decision log line")
    (entry,) = logged()
    assert entry["input"]["attributes"]["request"]["http"]["headers"] == {
        "x-request-id": marker + "-id"
    }
    assert "body" not in entry["input"]["attributes"]["request"]["http"]
    assert "parsed_body" not in entry["input"]
    assert set(entry["erased"]) >= {
        "/input/attributes/request/http/body",
        "/input/parsed_body",
        "/input/attributes/request/http/headers/cookie",
    }


def test_batch_query_is_allowed_for_authz_and_each_input_masked_in_the_log(
    production: tuple[Opa, Path],
) -> None:
    """authz's token may POST the batch rule (data.authz.batch.result), nobody else may;
    its decision-log line masks every input of the batch as a single decision's input is
    masked (bodies, cookies, the bearer JWT, credential query parameters)."""
    opa, _ = production
    marker = "prompt-" + os.urandom(8).hex()
    jwt = f"eyJhbGciOiJIUzI1NiJ9.eyJ{marker}In0.c2ln"

    def document(n: int) -> dict[str, Any]:
        return {
            "attributes": {
                "request": {
                    "http": {
                        "method": "POST",
                        "path": f"/api/v1/items/{n}?api_key={marker}",
                        "body": marker,
                        "headers": {
                            "cookie": marker,
                            "authorization": f"Bearer {jwt}",
                            "x-request-id": f"{marker}-id-{n}",
                        },
                    }
                }
            },
            "parsed_body": {"prompt": marker},
            "parsed_query": {"api_key": [marker]},
        }

    body = json.dumps(
        {"input": {"path": "authz/gateway/decision", "inputs": [document(0), document(1)]}}
    ).encode()
    batch = f"{opa.base}/v1/data/authz/batch/result"
    status, _ = http_get(batch, {}, method="POST", body=body, ca_file=opa.ca)
    assert status in (401, 403)
    status, raw = http_get(batch, opa.headers(), method="POST", body=body, ca_file=opa.ca)
    assert status == 200, raw
    assert set(json.loads(raw)["result"]["decisions"]) == {"0", "1"}

    def logged() -> list[dict[str, Any]]:
        lines = opa.process.log_path.read_text().splitlines()
        return [
            entry
            for entry in (json.loads(line) for line in lines if f"{marker}-id" in line)
            if entry.get("msg") == "Decision Log"
        ]

    wait_for(lambda: bool(logged()), what="the batch query's decision log line")
    (entry,) = logged()
    line = json.dumps(entry)
    assert line.count(marker) == 2  # the two x-request-id values, nothing else
    for n, logged_input in enumerate(entry["input"]["inputs"]):
        http = logged_input["attributes"]["request"]["http"]
        assert http["headers"] == {"x-request-id": f"{marker}-id-{n}"}
        assert "body" not in http
        assert "path" not in http
        assert "parsed_body" not in logged_input


def test_compose_opa_healthcheck_command(opa_bin: str, production: tuple[Opa, Path]) -> None:
    """docker-compose.yaml's OPA healthcheck (``/opa eval`` with http.send: the static image
    has no shell) passes against a ready OPA and fails against a closed port."""
    opa, _ = production
    compose = yaml.safe_load((ROOT / "infra/compose/docker-compose.yaml").read_text())
    test = compose["services"]["opa"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "/opa"]
    command = [opa_bin, *test[2:]]
    healthy = [arg.replace("127.0.0.1:8282", f"127.0.0.1:{opa.diag}") for arg in command]
    assert healthy != command
    assert subprocess.run(healthy, capture_output=True, check=False, timeout=30).returncode == 0
    closed = [arg.replace("127.0.0.1:8282", f"127.0.0.1:{free_port()}") for arg in command]
    assert subprocess.run(closed, capture_output=True, check=False, timeout=30).returncode != 0


def test_k8s_sidecar_polls_signed_bundles_from_the_bundle_server(
    opa_bin: str,
    tmp_path: Path,
    keys: dict[str, KeyPair],
    bundles: dict[str, Path],
) -> None:
    """The Kubernetes sidecar's args and its generated config (infra/k8s/base/generated:
    opa.yaml and the system policy), the verification key at its mounted path, polling the
    Kubernetes bundle server's nginx config: a signed bundle is activated, an unsigned one
    is refused while the signed revision keeps serving (no restart)."""
    generated = ROOT / deploy.K8S_GENERATED
    (tmp_path / "config").mkdir()
    (tmp_path / "config/opa.yaml").write_text((generated / "opa.yaml").read_text())
    (tmp_path / "system").mkdir()
    for rego in generated.glob("system.*.rego"):
        (tmp_path / "system" / rego.name.removeprefix("system.")).write_text(rego.read_text())
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys/bundle-signing.pub.pem").write_bytes(keys["good"].public.read_bytes())
    deployment = next(
        d
        for d in yaml.safe_load_all((ROOT / "infra/k8s/base/authz.yaml").read_text())
        if d["kind"] == "Deployment"
    )
    (sidecar,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "opa"
    ]
    served_dir = tmp_path / "served"
    served_dir.mkdir()
    served = served_dir / "authz.tar.gz"
    _publish(bundles["r1"], served)
    api, diag = free_port(), free_port()
    (tmp_path / "run").mkdir()  # the emptyDir opa-socket (/run/opa)
    args = _map_args(
        sidecar["args"],
        {
            "/run/opa/": f"{tmp_path / 'run'}/",
            "/config/opa.yaml": str(tmp_path / "config/opa.yaml"),
            "/policy/system": str(tmp_path / "system"),
            "/keys/": f"{tmp_path / 'keys'}/",
        },
        api,
        diag,
    )
    site = (generated / "bundles.conf").read_text()
    server = tmp_path / "nginx"
    server.mkdir()
    config = nginx_config(server, free_port(), served_dir, site)
    listen = re.search(r"listen 127\.0\.0\.1:(\d+);", (server / "site.conf").read_text())
    assert listen is not None
    port = int(listen[1])
    nginx = Process(
        "nginx",
        [nginx_binary(), "-p", str(server), "-c", str(config), "-g", "daemon off;"],
        server / "nginx.log",
        lambda: http_ok(f"http://127.0.0.1:{port}/healthz"),
    )
    nginx.start()
    process = Process(
        "opa-sidecar",
        [
            opa_bin,
            *args,
            f"--set=services.bundles.url=http://127.0.0.1:{port}/bundles",
            "--set=bundles.authz.polling.min_delay_seconds=1",
            "--set=bundles.authz.polling.max_delay_seconds=1",
        ],
        tmp_path / "opa.log",
        lambda: http_ok(f"http://127.0.0.1:{diag}/health?bundles"),
        env={"AUTHZ_OPA_TOKEN": "tok_" + "1" * 48},
    )
    try:
        nginx.wait_ready(15)
        process.start()
        process.wait_ready(20)
        pid = process.pid
        opa = Opa(api, diag, "tok_" + "1" * 48, process, tmp_path)  # failed_loads only
        # authz's way in: the sidecar's socket on the emptyDir, mode 0770, token required.
        assert _check_socket(args, "tok_" + "1" * 48) == "r1"
        before = opa.failed_loads()
        _publish(bundles["r2"], served)
        wait_for(functools.partial(_more_failed_loads, opa, before), what="r2 refused")
        assert "bundle missing .signatures.json file" in process.log_tail(200)
        assert http_ok(f"http://127.0.0.1:{diag}/health?bundles")
        _publish(bundles["r5"], served)
        assert _sidecar_revision(api) == "r1"
        _publish(bundles["r5"], served)
        wait_for(lambda: _sidecar_revision(api) == "r5", what="r5 activated")
        assert process.pid == pid
        assert process.running
    finally:
        process.stop()
        nginx.stop()


def _sidecar_revision(api: int) -> str:
    """The active bundle revision of the sidecar (plain HTTP on loopback, authz's token)."""
    status, raw = http_get(
        f"http://127.0.0.1:{api}{GATEWAY_DECISION}?provenance",
        {"Authorization": "Bearer tok_" + "1" * 48},
        method="POST",
        body=b'{"input": {}}',
    )
    assert status == 200, raw
    revision: str = json.loads(raw)["provenance"]["bundles"]["authz"]["revision"]
    return revision


def test_build_policy_bundle_signing(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    """--sign adds .signatures.json; --verify with the wrong key fails and leaves the
    previous bundle in place; without --sign the output has no signature."""
    out = tmp_path / "out"
    plain = build_bundle(out, "rev-plain")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() == "rev-plain"
    with tarfile.open(out / "authz.tar.gz") as archive:
        assert "/.signatures.json" not in archive.getnames()
    before = (out / "authz.tar.gz").read_bytes()
    wrong = build_bundle(
        out, "rev-bad", "--sign", str(keys["good"].private), "--verify", str(keys["other"].public)
    )
    assert wrong.returncode == 1
    assert "does not verify" in wrong.stderr
    assert (out / "authz.tar.gz").read_bytes() == before
    signed = build_bundle(
        out, "rev-signed", "--sign", str(keys["good"].private), "--verify", str(keys["good"].public)
    )
    assert signed.returncode == 0, signed.stderr
    with tarfile.open(out / "authz.tar.gz") as archive:
        assert "/.signatures.json" in archive.getnames()
    assert (out / "authz/.signatures.json").is_file()
    assert build_bundle(out, "r", "--verify", str(keys["good"].public)).returncode == 1


def test_opa_refuses_to_start_without_the_public_key(opa_bin: str, tmp_path: Path) -> None:
    """Fail closed: the production config without its verification key does not run."""
    args = _map_args(
        compose_command("opa"),
        {
            "/run/opa/": f"{tmp_path}/",  # the volume "opa-socket": not why it fails
            "/config/opa.yaml": str(ROOT / "infra/opa/opa.yaml"),
            "/policy/system": str(ROOT / "infra/opa/system"),
            "/keys/bundle-signing.pub.pem": str(tmp_path / "missing.pem"),
        },
        free_port(),
        free_port(),
    )
    result = subprocess.run(
        [opa_bin, *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode != 0


def test_system_policy_tests(opa_bin: str) -> None:
    """infra/opa/system's own Rego tests, strict check and formatting."""
    system, tests = str(ROOT / "infra/opa/system"), str(ROOT / "infra/opa/tests")
    for args in (["test", system, tests], ["check", "--strict", system, tests]):
        result = subprocess.run([opa_bin, *args], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    fmt = subprocess.run(
        [opa_bin, "fmt", "--list", system, tests], capture_output=True, text=True, check=False
    )
    assert fmt.stdout == ""


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("keyid: authz_bundle", "keyid: authz_bundle_typo"),
        ("algorithm: RS256", "algorithm: RS257"),
        ("min_delay_seconds: 10", "min_delay_seconds: 30"),  # above max_delay_seconds
    ],
    ids=["unknown key id", "bad algorithm", "bad polling"],
)
def test_broken_opa_config_is_rejected(
    opa_bin: str, tmp_path: Path, keys: dict[str, KeyPair], old: str, new: str
) -> None:
    """OPA's config validation can fail: each breakage of opa.yaml stops OPA at startup."""
    text = (ROOT / "infra/opa/opa.yaml").read_text()
    assert old in text
    broken = tmp_path / "opa.yaml"
    broken.write_text(text.replace(old, new, 1))
    args = _map_args(
        compose_command("opa"),
        {
            "/config/opa.yaml": str(broken),
            "/policy/system": str(ROOT / "infra/opa/system"),
            "/keys/bundle-signing.pub.pem": str(keys["good"].public),
        },
        free_port(),
        free_port(),
    )
    result = subprocess.run(
        [opa_bin, *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode != 0, result.stderr[-500:]


def test_build_refuses_data_failing_the_policy_data_checks(tmp_path: Path) -> None:
    # A key whose role no path rule knows: the shipped data checks (opa test on the merged
    # tree) fail and the build stops, printing the failing test once.
    overlay = tmp_path / "data/gateway/api_keys"
    overlay.mkdir(parents=True)
    entry = {"id": "key-x", "enabled": True, "role": "wizard", "rate_limit_tier": "default"}
    (overlay / "data.json").write_text(json.dumps({digest("ak_x"): entry}))
    result = subprocess.run(
        [
            str(ROOT / "scripts/build-policy-bundle"),
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode != 0
    assert "policy tests failed" in result.stderr
    assert result.stderr.count("test_shipped_keys_well_formed: FAIL") == 1
    assert not (tmp_path / "out/authz.tar.gz").exists()


@pytest.mark.parametrize(
    ("change", "starts"),
    [(None, True), (("type: http", "type: zipkin"), False)],
    ids=["as-shipped", "unknown-exporter-type"],
)
def test_traced_opa_config_starts_and_a_broken_one_is_refused(
    opa_bin: str,
    tmp_path: Path,
    keys: dict[str, KeyPair],
    change: tuple[str, str] | None,
    starts: bool,
) -> None:
    """The monitoring overlay's (and the Kubernetes tracing component's) OPA config,
    infra/opa/opa-traced.yaml, with Compose's command line: OPA starts (the collector
    being absent does not stop it: spans are dropped); an exporter type OPA does not
    know stops it at startup, so the check above could fail."""
    text = (ROOT / deploy.OPA_TRACED).read_text()
    if change is not None:
        assert change[0] in text
        text = text.replace(*change)
    config = tmp_path / "opa.yaml"
    config.write_text(text)
    api, diag = free_port(), free_port()
    (tmp_path / "run").mkdir()  # the volume "opa-socket" (/run/opa)
    args = _map_args(
        compose_command("opa"),
        {
            "/run/opa/": f"{tmp_path}/run/",
            "/tls/": f"{deployment_tls(tmp_path / 'tls')}/",
            "/config/opa.yaml": str(config),
            "/policy/system": str(ROOT / "infra/opa/system"),
            "/keys/bundle-signing.pub.pem": str(keys["good"].public),
        },
        api,
        diag,
    )
    process = Process(
        "opa-traced",
        [opa_bin, *args],
        tmp_path / "opa.log",
        lambda: http_ok(f"http://127.0.0.1:{diag}/health"),
        env={"AUTHZ_OPA_TOKEN": "tok_" + "1" * 48},
    )
    process.start()
    try:
        if starts:
            process.wait_ready(20)
            assert process.running
        else:
            wait_for(lambda: not process.running, what="OPA to refuse the config")
            assert "unknown distributed_tracing.type" in process.log_tail(20)
    finally:
        process.stop()


# --- the batch rule in the bundle (issue #19) ------------------------------------------


def _bundle_file(bundle: Path, name: str) -> str:
    with tarfile.open(bundle) as archive:
        member = archive.extractfile(name)
        assert member is not None, name
        return member.read().decode()


@pytest.mark.parametrize(
    ("args", "paths"),
    [
        ((), {"authz/egress/decision", "authz/gateway/decision", "authz/jwt_example/decision"}),
        (("--decision-path", "my/own/decision"), {"my/own/decision"}),
    ],
    ids=["shipped", "decision-path"],
)
def test_bundle_ships_the_batch_rule_for_its_decision_paths(
    tmp_path: Path, args: tuple[str, ...], paths: set[str]
) -> None:
    """scripts/build-policy-bundle ships policy/batch/batch.rego, or with --decision-path
    a batch rule generated for exactly those paths."""
    built = build_bundle(tmp_path, "rev-batch", *args)
    assert built.returncode == 0, built.stderr
    rule = _bundle_file(tmp_path / "authz.tar.gz", "/batch/batch.rego")
    listed = re.search(r"^paths := \{(.*)\}$", rule, re.MULTILINE)
    assert listed is not None
    assert {p.strip().strip('"') for p in listed.group(1).split(",")} == paths
