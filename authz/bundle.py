"""Follow the bundle OPA is serving: its revision and the policy's operational warnings.

:class:`BundleWatcher` polls ``data.authz.meta.warnings`` (a set of strings the policies
define, e.g. "egress sandbox identity is header-only") with provenance every few seconds.
When the revision changes (including the first time OPA answers) it logs
``bundle activated`` with the revision and then each warning at WARNING level, so an
insecure setting in bundle data is loud at startup and at every activation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from authz.errors import PolicyError
from authz.policy import PolicyEngine

__all__ = ["WARNINGS_PATH", "BundleWatcher"]

WARNINGS_PATH: Final = "authz/meta/warnings"

log = logging.getLogger(__name__)


class BundleWatcher:
    """Polls ``engine`` for the active bundle revision and the policy's warnings.

    ``revision`` is None until OPA has answered once with a bundle; ``warnings`` are the
    strings from the last answer. ``interval_s`` and ``timeout_s`` are seconds.
    ``on_activation(revision)`` is called on every revision change (metrics).
    """

    def __init__(
        self,
        engine: PolicyEngine,
        *,
        path: str = WARNINGS_PATH,
        interval_s: float = 5.0,
        timeout_s: float = 1.0,
        on_activation: Callable[[str], None] | None = None,
    ) -> None:
        self._engine = engine
        self._path = path
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self.revision: str | None = None
        self.warnings: tuple[str, ...] = ()
        self._last_error: str | None = None
        self._on_activation = on_activation

    async def poll_once(self) -> bool:
        """Ask OPA once. Returns True when the revision changed. Never raises for OPA
        failures (they are logged once per distinct error)."""
        try:
            evaluation = await self._engine.evaluate(self._path, {}, self._timeout_s)
        except PolicyError as exc:
            if exc.code != self._last_error:
                self._last_error = exc.code
                log.warning("cannot read bundle status from OPA", extra={"code": exc.code})
            return False
        self._last_error = None
        result = evaluation.result
        warnings = tuple(sorted(str(w) for w in result)) if isinstance(result, list) else ()
        revision = evaluation.revision
        if revision == self.revision:
            self.warnings = warnings
            return False
        self.revision, self.warnings = revision, warnings
        log.info("bundle activated", extra={"revision": revision})
        for warning in warnings:
            log.warning("policy warning: %s", warning, extra={"revision": revision})
        if self._on_activation is not None:
            self._on_activation(revision)
        return True

    async def run(self) -> None:
        """Poll every ``interval_s`` seconds until cancelled."""
        while True:
            await self.poll_once()
            await asyncio.sleep(self._interval_s)
