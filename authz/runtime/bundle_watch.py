"""Follow the bundle OPA is serving: its revision and the policy's operational warnings.

:class:`BundleWatcher` probes ``data.authz.meta.live`` (a constant: the cheapest query
there is) with provenance every second, for the active bundle revision. Each answer
confirms the revision to ``on_revision`` (the decision cache reuses decisions only while
the revision is confirmed, and drops them all when it changes). When the revision changes
(including the first time OPA answers) it reads ``data.authz.meta.warnings`` once (a set
of strings the policies define, e.g. "egress sandbox identity is header-only"; it walks
every key, so it is not polled), logs ``bundle activated`` with the revision and then
each warning at WARNING level, so an insecure setting in bundle data is loud at startup
and at every activation. It also reads ``data.authz.meta.cache_keys`` once per activation
(the policies' declared cache keys, ``docs/contract.md``) and hands the valid ones, with
the revision that answered, to ``on_cache_keys`` (the decision cache); a bundle without
it declares nothing, and a declaration authz cannot use is logged and left out (that
decision path keeps the exact-input key).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from authz.core.cache import KeyDeclaration, parse_declarations
from authz.core.errors import PolicyError, UndefinedDecision
from authz.core.opa import Evaluation, PolicyEngine

__all__ = ["CACHE_KEYS_PATH", "PROBE_PATH", "WARNINGS_PATH", "BundleWatcher"]

PROBE_PATH: Final = "authz/meta/live"
WARNINGS_PATH: Final = "authz/meta/warnings"
CACHE_KEYS_PATH: Final = "authz/meta/cache_keys"

log = logging.getLogger(__name__)


class BundleWatcher:
    """Polls ``engine`` for the active bundle revision; reads the policy's warnings on
    every activation.

    ``revision`` is None until OPA has answered once with a bundle; ``warnings`` are the
    strings read at the last activation. ``interval_s`` and ``timeout_s`` are seconds.
    ``on_revision(revision)`` is called on every answer (the revision is confirmed: the
    decision cache), ``on_activation(revision)`` on every change (metrics),
    ``on_cache_keys(revision, declarations)`` on every change with the declarations read
    from ``cache_keys_path`` (decision path -> KeyDeclaration; the revision is the one
    OPA answered them from).
    """

    def __init__(
        self,
        engine: PolicyEngine,
        *,
        probe_path: str = PROBE_PATH,
        warnings_path: str = WARNINGS_PATH,
        interval_s: float = 1.0,
        timeout_s: float = 1.0,
        on_revision: Callable[[str], None] | None = None,
        on_activation: Callable[[str], None] | None = None,
        cache_keys_path: str = CACHE_KEYS_PATH,
        on_cache_keys: Callable[[str, dict[str, KeyDeclaration]], None] | None = None,
    ) -> None:
        self._engine = engine
        self._probe_path = probe_path
        self._warnings_path = warnings_path
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self.revision: str | None = None
        self.warnings: tuple[str, ...] = ()
        self._last_error: str | None = None
        self._on_revision = on_revision
        self._probe_missing = False
        self._on_activation = on_activation
        self._cache_keys_path = cache_keys_path
        self._on_cache_keys = on_cache_keys

    async def poll_once(self) -> bool:
        """Ask OPA once. Returns True when the revision changed. Never raises for OPA
        failures (they are logged once per distinct error)."""
        try:
            evaluation = await self._probe()
        except PolicyError as exc:
            self._failed(exc)
            return False
        self._last_error = None
        revision = evaluation.revision
        if self._on_revision is not None:
            self._on_revision(revision)
        if revision == self.revision:
            return False
        self.revision, self.warnings = revision, await self._read_warnings()
        log.info("bundle activated", extra={"revision": revision})
        for warning in self.warnings:
            log.warning("policy warning: %s", warning, extra={"revision": revision})
        if self._on_cache_keys is not None:
            await self._read_cache_keys(self._on_cache_keys)
        if self._on_activation is not None:
            self._on_activation(revision)
        return True

    async def _read_cache_keys(
        self, deliver: Callable[[str, dict[str, KeyDeclaration]], None]
    ) -> None:
        """The declared cache keys of the bundle just activated, to ``deliver``; a bundle
        that defines none declares nothing, and an OPA failure delivers nothing (the
        cache keeps exact-input keys for the new revision until a later activation)."""
        try:
            evaluation = await self._engine.evaluate(self._cache_keys_path, {}, self._timeout_s)
        except UndefinedDecision:
            evaluation = None
        except PolicyError as exc:
            self._failed(exc)
            return
        if evaluation is None:
            deliver(self.revision or "", {})
            return
        declarations, problems = parse_declarations(evaluation.result)
        for problem in problems:
            log.warning(
                "cache key declaration refused (exact-input key kept): %s",
                problem,
                extra={"revision": evaluation.revision},
            )
        if declarations:
            log.info(
                "decision cache keyed on declared input fields",
                extra={"revision": evaluation.revision, "decision_paths": sorted(declarations)},
            )
        deliver(evaluation.revision, declarations)

    async def _probe(self) -> Evaluation:
        """The probe's answer; a bundle built before ``data.authz.meta.live`` existed is
        probed through the warnings query instead (slower, but it carries the revision
        too), with one warning to rebuild it."""
        try:
            return await self._engine.evaluate(self._probe_path, {}, self._timeout_s)
        except UndefinedDecision:
            if not self._probe_missing:
                self._probe_missing = True
                log.warning(
                    "the bundle does not define the revision probe; probing the policy "
                    "warnings instead (slower): rebuild it with scripts/build-policy-bundle",
                    extra={"probe": self._probe_path},
                )
            return await self._engine.evaluate(self._warnings_path, {}, self._timeout_s)

    async def _read_warnings(self) -> tuple[str, ...]:
        """The warnings of the bundle just activated (none when OPA cannot say)."""
        try:
            evaluation = await self._engine.evaluate(self._warnings_path, {}, self._timeout_s)
        except PolicyError as exc:
            self._failed(exc)
            return ()
        result = evaluation.result
        return tuple(sorted(str(w) for w in result)) if isinstance(result, list) else ()

    def _failed(self, exc: PolicyError) -> None:
        if exc.code != self._last_error:
            self._last_error = exc.code
            log.warning("cannot read bundle status from OPA", extra={"code": exc.code})

    async def run(self) -> None:
        """Poll every ``interval_s`` seconds until cancelled."""
        while True:
            await self.poll_once()
            await asyncio.sleep(self._interval_s)
