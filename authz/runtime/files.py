"""Durable, private file replacement for the small state files authz writes (the
overrides file, the egress secrets file), and the bounded read of the files it reads.

:func:`write_private` follows the POSIX recipe for an atomic, durable replace: write a
temporary file in the same directory, ``fsync`` it, ``rename`` it over the target
(atomic within one file system, POSIX ``rename(2)``), then ``fsync`` the directory so the
rename itself survives a crash. A reader (or authz after a crash) sees the old file or
the new one, never a torn mix.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from authz.core.errors import ConfigError

__all__ = ["read_at_most", "read_capped", "write_private"]


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably, mode 0600 (whatever the
    umask or an earlier file's mode). Raises OSError; when it does before the rename,
    ``path`` is unchanged and no temporary file is left behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_at_most(path: Path, limit: int) -> bytes:
    """The first ``limit + 1`` bytes of ``path`` at most: a result longer than ``limit``
    means the file is over the cap (the caller refuses it), and the rest is never read.
    Raises OSError."""
    with path.open("rb") as handle:
        return handle.read(limit + 1)


def read_capped(path: Path, limit: int, where: str, *, unreadable: str = "") -> bytes:
    """The whole of ``path``, at most ``limit`` bytes (:func:`read_at_most`: the rest of
    a larger file is never read). Raises ConfigError ``"<where>: <unreadable><reason>"``
    when it cannot be read, ``"<where>: larger than <limit> bytes"`` when it is over the
    cap; ``where`` names the file or the setting, never its content."""
    try:
        data = read_at_most(path, limit)
    except OSError as exc:
        raise ConfigError(f"{where}: {unreadable}{exc.strerror}") from None
    if len(data) > limit:
        raise ConfigError(f"{where}: larger than {limit} bytes")
    return data
