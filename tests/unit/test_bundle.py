"""BundleWatcher: revision changes and policy warnings are logged once per activation."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pytest

from authz.bundle import WARNINGS_PATH, BundleWatcher
from authz.errors import OpaUnavailable
from authz.policy import Evaluation


class Scripted:
    """Answers each evaluate() with the next item: an Evaluation or an error to raise."""

    def __init__(self, *answers: Evaluation | Exception) -> None:
        self.answers = list(answers)
        self.paths: list[str] = []

    async def evaluate(
        self, path: str, document: Mapping[str, Any], timeout_s: float
    ) -> Evaluation:
        self.paths.append(path)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def close(self) -> None:
        return None


def ev(revision: str, warnings: list[str]) -> Evaluation:
    return Evaluation(warnings, {"authz": revision})


async def test_logs_activation_and_warnings_once(caplog: pytest.LogCaptureFixture) -> None:
    engine = Scripted(ev("r1", ["insecure thing"]), ev("r1", ["insecure thing"]), ev("r2", []))
    watcher = BundleWatcher(engine)
    with caplog.at_level(logging.INFO, logger="authz.bundle"):
        assert await watcher.poll_once() is True
        assert await watcher.poll_once() is False
        assert watcher.revision == "r1"
        assert watcher.warnings == ("insecure thing",)
        assert await watcher.poll_once() is True
    assert engine.paths == [WARNINGS_PATH] * 3
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert messages == [
        ("INFO", "bundle activated"),
        ("WARNING", "policy warning: insecure thing"),
        ("INFO", "bundle activated"),
    ]
    assert watcher.revision == "r2"
    assert watcher.warnings == ()


async def test_opa_errors_are_logged_once_and_never_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = Scripted(OpaUnavailable("x"), OpaUnavailable("x"), ev("r1", []))
    watcher = BundleWatcher(engine)
    with caplog.at_level(logging.WARNING, logger="authz.bundle"):
        assert await watcher.poll_once() is False
        assert await watcher.poll_once() is False
    assert len(caplog.records) == 1
    assert watcher.revision is None
    assert await watcher.poll_once() is True
    assert watcher.revision == "r1"
