"""Runtime control: the enforcement mode, switchable without a restart.

Modes (``AUTHZ_MODE``, the admin API ``POST /v1/mode``, or SIGHUP re-reading the
settings):

- ``enforce`` (default): decisions are enforced.
- ``dry-run``: every request is evaluated and logged with what would have happened, but
  allowed; a suppressed deny is marked on the response (``x-authz-dry-run`` header) and
  in the decision log and metrics. For rolling out a policy safely.
- ``bypass``: nothing is evaluated, everything is allowed. For local debugging only: it is
  refused unless authz was started with ``AUTHZ_ALLOW_BYPASS=true``, and it is logged at
  ERROR level when entered and on every metrics scrape while active.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum

from authz.core.errors import ConfigError

__all__ = ["Control", "Mode", "parse_mode"]

log = logging.getLogger(__name__)


class Mode(StrEnum):
    """Enforcement mode; the values appear in logs, metrics and the admin API."""

    ENFORCE = "enforce"
    DRY_RUN = "dry-run"
    BYPASS = "bypass"


def parse_mode(key: str, value: object) -> Mode:
    """``value`` as a Mode; ConfigError naming ``key`` and the value otherwise."""
    text = str(value).strip().lower().replace("_", "-")
    try:
        return Mode(text)
    except ValueError:
        raise ConfigError(
            f"{key}={value!r}: expected one of {', '.join(m.value for m in Mode)}"
        ) from None


class Control:
    """The mutable runtime state shared by the authorizer and the admin API.

    ``allow_bypass`` is fixed at startup: without it, :meth:`set_mode` refuses bypass.
    ``on_change(mode)`` is called after every change (metrics).
    """

    def __init__(
        self,
        mode: Mode = Mode.ENFORCE,
        *,
        allow_bypass: bool = False,
        on_change: Callable[[Mode], None] | None = None,
    ) -> None:
        self._allow_bypass = allow_bypass
        self._on_change = on_change
        self._mode = Mode.ENFORCE
        self.set_mode(mode, actor="startup", reason="configured")

    @property
    def mode(self) -> Mode:
        """The active mode."""
        return self._mode

    def set_mode(self, mode: Mode, *, actor: str, reason: str) -> Mode:
        """Switch to ``mode``; returns the previous mode. Raises ConfigError for bypass
        when it was not allowed at startup. ``actor`` and ``reason`` go to the log."""
        if mode is Mode.BYPASS and not self._allow_bypass:
            raise ConfigError(
                "mode 'bypass' refused: start authz with AUTHZ_ALLOW_BYPASS=true to permit it"
            )
        previous, self._mode = self._mode, mode
        if mode is Mode.BYPASS:
            log.error(
                "BYPASS MODE: every request is allowed without evaluation",
                extra={"actor": actor, "reason": reason, "previous": previous.value},
            )
        elif mode is not previous or actor == "startup":
            level = logging.WARNING if mode is Mode.DRY_RUN else logging.INFO
            log.log(
                level,
                "enforcement mode set",
                extra={
                    "mode": mode.value,
                    "previous": previous.value,
                    "actor": actor,
                    "reason": reason,
                },
            )
        if self._on_change is not None:
            self._on_change(mode)
        return previous

    def warn_if_bypass(self) -> None:
        """Log the bypass warning again (called on every metrics scrape)."""
        if self._mode is Mode.BYPASS:
            log.error("BYPASS MODE is active: every request is allowed without evaluation")
