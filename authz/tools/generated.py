"""Generated files committed to the repository (the egress Envoy config, the Compose and
Kubernetes configs): write one, or tell whether the committed copy is stale, for the
generators' ``--check`` (run by the tests, so a hand edit or a forgotten regeneration
fails).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["is_stale", "write_generated"]


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
