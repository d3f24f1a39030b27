"""authz.core.opa.Evaluation: ``revision``, one log string from OPA's provenance bundles.

The OPA HTTP client against real and stand-in servers: tests/integration/test_opa_client.py
and tests/integration/test_policy.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from authz.core.errors import OpaResponseError
from authz.core.opa import Evaluation, _batch_results


@pytest.mark.parametrize(
    ("revisions", "expected"),
    [
        ({}, ""),
        ({"bundle.tar.gz": "r1"}, "r1"),
        ({"only": ""}, ""),
        ({"b": "2", "a": "1"}, "a=1,b=2"),
        ({"a": "1", "b": "2", "c": "3"}, "a=1,b=2,c=3"),
    ],
    ids=["no-bundles", "one-bundle", "one-bundle-empty-revision", "two-bundles-sorted", "three"],
)
def test_revision(revisions: Mapping[str, str], expected: str) -> None:
    assert Evaluation(result=True, revisions=revisions).revision == expected


def test_defaults() -> None:
    evaluation = Evaluation(result={"allowed": True})
    assert (evaluation.revision, dict(evaluation.revisions), evaluation.duration_s) == ("", {}, 0.0)


# --- issue #19: the batch rule's answer ------------------------------------------------


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ({"decisions": {"0": True, "2": {"allowed": False}}}, [True, None, {"allowed": False}]),
        ({"decisions": {}}, [None, None, None]),
    ],
    ids=["some-undefined", "all-undefined"],
)
def test_batch_answer_gives_one_evaluation_per_input(result: Any, expected: list[Any]) -> None:
    answer = _batch_results(Evaluation(result, {"authz": "r1"}, 0.5), 3)
    assert answer.results is not None
    assert [None if e is None else e.result for e in answer.results] == expected
    assert answer.revision == "r1"
    assert all(e.revision == "r1" for e in answer.results if e is not None)


@pytest.mark.parametrize(
    "result",
    [
        True,
        {"decisions": []},
        {"decisions": {"3": True}},
        {"decisions": {"-1": True}},
        {"decisions": {"x": 1}},
    ],
    ids=["not-object", "list", "past-the-end", "negative", "not-an-index"],
)
def test_batch_answer_of_another_shape_is_a_response_error(result: Any) -> None:
    """Never a decision credited to the wrong input: the batch fails (and falls back)."""
    with pytest.raises(OpaResponseError):
        _batch_results(Evaluation(result), 3)
