"""``authz generate batch-rule`` (:mod:`authz.tools.batch_rule`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz.core.errors import ConfigError
from authz.tools.batch_rule import DEFAULT_PATHS, render
from authz.tools.cli import main


def test_rule_names_each_path_literally_once() -> None:
    text = render(["b/decision", "a/x/decision", "b/decision"])
    assert 'paths := {"a/x/decision", "b/decision"}' in text
    assert text.count("with input as doc") == 2
    assert "d := data.a.x.decision with input as doc" in text


@pytest.mark.parametrize(
    "path", ["", "/authz/x", "authz//x", "authz/x-y", 'a"]; allow := true #'], ids=str
)
def test_a_path_that_is_not_an_opa_data_path_is_refused(path: str) -> None:
    """The path is written into Rego: only identifier segments, never Rego text."""
    with pytest.raises(ConfigError, match="--path"):
        render([path])


def test_no_path_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        render([])


def test_check_reports_drift_and_writing_fixes_it(tmp_path: Path) -> None:
    out = tmp_path / "batch.rego"
    assert main(["generate", "batch-rule", "--out", str(out), "--check"]) == 1
    assert main(["generate", "batch-rule", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render(DEFAULT_PATHS)
    assert main(["generate", "batch-rule", "--out", str(out), "--check"]) == 0
    assert main(["generate", "batch-rule", "--path", "x/y", "--out", str(out), "--check"]) == 1


def test_bad_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "batch-rule", "--path", "x y", "--out", str(tmp_path / "b")]) == 2
    assert "--path" in capsys.readouterr().err
