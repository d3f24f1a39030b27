"""authz.core.opa.Evaluation: ``revision``, one log string from OPA's provenance bundles.

The OPA HTTP client against real and stand-in servers: tests/integration/test_opa_client.py
and tests/integration/test_policy.py."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from authz.core.opa import Evaluation


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
