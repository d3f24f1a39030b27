"""authz.runtime.files: the capped reader every operator file goes through, and the
private atomic writer."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from authz.core.errors import ConfigError
from authz.runtime.files import read_at_most, read_capped, write_private


@pytest.mark.parametrize(
    ("size", "ok"),
    [(0, True), (16, True), (17, False), (1 << 20, False)],
    ids=["empty", "at-the-cap", "one-over", "far-over"],
)
def test_read_capped_takes_a_file_up_to_its_cap_and_names_it_beyond(
    tmp_path: Path, size: int, ok: bool
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"s" * size)
    if ok:
        assert read_capped(path, 16, "the file") == b"s" * size
        return
    with pytest.raises(ConfigError) as caught:
        read_capped(path, 16, "the file")
    assert str(caught.value) == "the file: larger than 16 bytes"  # never its content


def test_read_at_most_stops_one_byte_past_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"x" * 1000)
    assert len(read_at_most(path, 10)) == 11


def test_read_capped_names_an_unreadable_file_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        read_capped(tmp_path / "missing", 16, "AUTHZ_X_FILE='m'", unreadable="cannot read: ")
    assert str(caught.value) == "AUTHZ_X_FILE='m': cannot read: No such file or directory"


def test_write_private_replaces_the_file_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"old")
    path.chmod(0o644)
    write_private(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
