"""authz.tools.generated: the one write and the one staleness check of the committed
generated files (egress Envoy config, Compose and Kubernetes configs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz.tools.generated import is_stale, write_generated


@pytest.mark.parametrize(
    ("current", "stale"),
    [(None, True), ("a: 1\n", False), ("a: 2\n", True), ("a: 1", True), ("", True)],
    ids=["missing", "same", "different", "newline-dropped", "empty"],
)
def test_generated_file_is_stale_unless_it_holds_exactly_the_text(
    tmp_path: Path, current: str | None, stale: bool
) -> None:
    path = tmp_path / "out.yaml"
    if current is not None:
        path.write_text(current, encoding="utf-8")
    assert is_stale(path, "a: 1\n") is stale


def test_generated_file_write_creates_its_directory_and_leaves_no_temporary(
    tmp_path: Path,
) -> None:
    path = tmp_path / "infra" / "envoy" / "out.yaml"
    write_generated(path, "a: 1\n")
    write_generated(path, "a: 2\n")
    assert path.read_text(encoding="utf-8") == "a: 2\n"
    assert not is_stale(path, "a: 2\n")
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.yaml"]
