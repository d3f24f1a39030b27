"""A throwaway redis-server for the tests that need a real Redis."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from authz.tools.launch import redis_launch, started

__all__ = ["RedisServer"]


class RedisServer:
    """A throwaway redis-server on 127.0.0.1 (:func:`authz.tools.launch.redis_launch`: no
    persistence) that can be stopped and started again on the same port, for outage
    tests."""

    def __init__(self, binary: str, port: int, workdir: Path) -> None:
        self.launch = redis_launch(binary, port, workdir)
        self.port, self.url = port, self.launch.url
        self._log = workdir / "redis.log"
        self._running: ExitStack | None = None

    def start(self) -> None:
        with ExitStack() as stack:
            stack.enter_context(started(self.launch, self._log, timeout_s=10))
            self._running = stack.pop_all()

    def stop(self) -> None:
        if self._running is not None:
            self._running.close()
        self._running = None
