"""authz.core.mode.Control: the enforcement mode and the bypass guard."""

from __future__ import annotations

import logging

import pytest

from authz.core.errors import ConfigError
from authz.core.mode import Control, Mode, parse_mode


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ("enforce", Mode.ENFORCE),
        ("dry-run", Mode.DRY_RUN),
        ("DRY_RUN", Mode.DRY_RUN),
        (" bypass ", Mode.BYPASS),
    ],
    ids=["enforce", "dry-run", "underscore-upper", "spaces"],
)
def test_parse_mode(value: str, mode: Mode) -> None:
    assert parse_mode("AUTHZ_MODE", value) is mode


def test_parse_mode_error_names_key_and_value() -> None:
    with pytest.raises(ConfigError, match="AUTHZ_MODE='audit'"):
        parse_mode("AUTHZ_MODE", "audit")


def test_bypass_refused_unless_allowed() -> None:
    with pytest.raises(ConfigError, match="AUTHZ_ALLOW_BYPASS"):
        Control(Mode.BYPASS)
    control = Control()
    with pytest.raises(ConfigError):
        control.set_mode(Mode.BYPASS, actor="admin", reason="x")
    assert control.mode is Mode.ENFORCE


def test_changes_are_reported_and_bypass_is_loud(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Mode] = []
    control = Control(allow_bypass=True, on_change=seen.append)
    with caplog.at_level(logging.INFO, logger="authz.core.mode"):
        assert control.set_mode(Mode.BYPASS, actor="admin", reason="debug") is Mode.ENFORCE
        control.warn_if_bypass()
        control.set_mode(Mode.ENFORCE, actor="admin", reason="done")
        control.warn_if_bypass()
    assert seen == [Mode.ENFORCE, Mode.BYPASS, Mode.ENFORCE]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert all("BYPASS" in r.getMessage() for r in errors)
