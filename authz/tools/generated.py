"""Generated files committed to the repository (the egress Envoy config, the Compose and
Kubernetes configs): write one, or tell whether the committed copy is stale, for the
generators' ``--check`` (run by the tests, so a hand edit or a forgotten regeneration
fails).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["add_check", "is_stale", "sync", "write_generated"]


def is_stale(path: Path, text: str) -> bool:
    """True when ``path`` does not hold exactly ``text`` (UTF-8), or cannot be read (a
    missing file is stale)."""
    try:
        return path.read_text(encoding="utf-8") != text
    except OSError:
        return True


def write_generated(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8), creating its directory: written beside it
    then renamed over it (POSIX ``rename(2)``, atomic), so a reader never sees half a
    file. Keeps the umask's mode (generated files are public). Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def add_check(parser: argparse.ArgumentParser, help: str) -> None:
    """Add the generators' ``--check`` flag (``args.check``: write nothing, report drift) to
    ``parser``, with ``help`` saying what drift exits 1."""
    parser.add_argument("--check", action="store_true", help=help)


def sync(
    root: Path, files: Mapping[str, str], *, check: bool, say: Callable[[str], None]
) -> list[str]:
    """Write each of ``files`` (name relative to ``root`` -> UTF-8 text) with
    :func:`write_generated`, saying ``wrote <name>`` for each; or with ``check``, write
    nothing and return the names whose file :func:`is_stale` (always ``[]`` when writing).
    Raises OSError when a file cannot be written."""
    stale = []
    for name, text in files.items():
        path = root / name
        if check:
            if is_stale(path, text):
                stale.append(name)
        else:
            write_generated(path, text)
            say(f"wrote {name}")
    return stale
