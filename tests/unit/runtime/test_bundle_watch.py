"""authz.runtime.bundle_watch.BundleWatcher: revision changes and policy warnings are
logged once per activation."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pytest

from authz.core.cache import KeyDeclaration
from authz.core.errors import OpaUnavailable, UndefinedDecision
from authz.core.opa import Evaluation
from authz.runtime.bundle_watch import CACHE_KEYS_PATH, PROBE_PATH, WARNINGS_PATH, BundleWatcher


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


def ev(revision: str, result: Any = True) -> Evaluation:
    return Evaluation(result, {"authz": revision})


async def test_probes_the_revision_and_reads_warnings_once_per_activation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = Scripted(
        ev("r1"),
        ev("r1", ["insecure thing"]),  # activation: probe, then warnings
        ev("r1"),  # same revision: the probe only
        ev("r2"),
        ev("r2", []),
    )
    confirmed: list[str] = []
    activated: list[str] = []
    watcher = BundleWatcher(engine, on_revision=confirmed.append, on_activation=activated.append)
    with caplog.at_level(logging.INFO, logger="authz.runtime.bundle_watch"):
        assert await watcher.poll_once() is True
        assert await watcher.poll_once() is False
        assert watcher.revision == "r1"
        assert watcher.warnings == ("insecure thing",)
        assert await watcher.poll_once() is True
    assert engine.paths == [PROBE_PATH, WARNINGS_PATH, PROBE_PATH, PROBE_PATH, WARNINGS_PATH]
    assert confirmed == ["r1", "r1", "r2"]
    assert activated == ["r1", "r2"]
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
    engine = Scripted(OpaUnavailable("x"), OpaUnavailable("x"), ev("r1"), ev("r1", []))
    confirmed: list[str] = []
    watcher = BundleWatcher(engine, on_revision=confirmed.append)
    with caplog.at_level(logging.WARNING, logger="authz.runtime.bundle_watch"):
        assert await watcher.poll_once() is False
        assert await watcher.poll_once() is False
    assert len(caplog.records) == 1
    assert watcher.revision is None
    assert confirmed == []  # nothing confirmed while OPA does not answer
    assert await watcher.poll_once() is True
    assert confirmed == ["r1"]
    assert watcher.revision == "r1"


async def test_unreadable_warnings_still_activate_the_revision(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = Scripted(ev("r1"), OpaUnavailable("x"))
    watcher = BundleWatcher(engine)
    with caplog.at_level(logging.INFO, logger="authz.runtime.bundle_watch"):
        assert await watcher.poll_once() is True
    assert watcher.revision == "r1"
    assert watcher.warnings == ()
    assert [r.getMessage() for r in caplog.records] == [
        "cannot read bundle status from OPA",
        "bundle activated",
    ]


async def test_a_bundle_without_the_probe_is_probed_through_its_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = Scripted(
        UndefinedDecision("no live"),
        ev("old", ["w"]),  # the probe falls back to the warnings query
        ev("old", ["w"]),  # activation reads the warnings
        UndefinedDecision("no live"),
        ev("old", ["w"]),
    )
    confirmed: list[str] = []
    watcher = BundleWatcher(engine, on_revision=confirmed.append)
    with caplog.at_level(logging.WARNING, logger="authz.runtime.bundle_watch"):
        assert await watcher.poll_once() is True
        assert await watcher.poll_once() is False
    assert confirmed == ["old", "old"]
    assert watcher.warnings == ("w",)
    assert engine.paths == [PROBE_PATH, WARNINGS_PATH, WARNINGS_PATH, PROBE_PATH, WARNINGS_PATH]
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "does not define the revision probe" in m]) == 1


GATEWAY_DECLARATION = {"input": [["credentials"], ["parsed_path"]], "header_prefixes": ["x-a-"]}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            ev("r1", {"authz/gateway/decision": GATEWAY_DECLARATION}),
            (
                "r1",
                {
                    "authz/gateway/decision": KeyDeclaration(
                        (("credentials",), ("parsed_path",)), ("x-a-",)
                    )
                },
            ),
        ),
        (UndefinedDecision("none"), ("r1", {})),
        (
            ev("r1", {"authz/gateway/decision": GATEWAY_DECLARATION, "bad": {"input": []}}),
            (
                "r1",
                {
                    "authz/gateway/decision": KeyDeclaration(
                        (("credentials",), ("parsed_path",)), ("x-a-",)
                    )
                },
            ),
        ),
    ],
    ids=["declared", "bundle-without-declarations", "bad-entry-left-out"],
)
async def test_cache_key_declarations_are_read_once_per_activation_with_their_revision(
    answer: Evaluation | Exception, expected: tuple[str, dict[str, KeyDeclaration]]
) -> None:
    engine = Scripted(ev("r1"), ev("r1", []), answer, ev("r1"))
    delivered: list[tuple[str, dict[str, KeyDeclaration]]] = []
    watcher = BundleWatcher(engine, on_cache_keys=lambda r, d: delivered.append((r, d)))
    assert await watcher.poll_once() is True
    assert await watcher.poll_once() is False
    assert engine.paths == [PROBE_PATH, WARNINGS_PATH, CACHE_KEYS_PATH, PROBE_PATH]
    assert delivered == [expected]


async def test_declared_paths_are_logged_at_activation(caplog: pytest.LogCaptureFixture) -> None:
    engine = Scripted(
        ev("r1"), ev("r1", []), ev("r1", {"authz/gateway/decision": GATEWAY_DECLARATION})
    )
    watcher = BundleWatcher(engine, on_cache_keys=lambda r, d: None)
    with caplog.at_level(logging.INFO, logger="authz.runtime.bundle_watch"):
        await watcher.poll_once()
    (line,) = [r for r in caplog.records if r.getMessage().startswith("decision cache keyed")]
    assert line.__dict__["decision_paths"] == ["authz/gateway/decision"]


async def test_unreadable_cache_key_declarations_deliver_nothing() -> None:
    engine = Scripted(ev("r1"), ev("r1", []), OpaUnavailable("down"))
    delivered: list[tuple[str, dict[str, KeyDeclaration]]] = []
    watcher = BundleWatcher(engine, on_cache_keys=lambda r, d: delivered.append((r, d)))
    assert await watcher.poll_once() is True
    assert delivered == []  # the cache keeps exact-input keys for r1
