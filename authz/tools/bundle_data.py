"""Bundle data as OPA would load it, for the offline tools: the data tree of a bundle
``.tar.gz``, a bundle/source directory or one ``data.json`` (:func:`load_data`), and the
gateway's API keys in it (:func:`load_api_keys`). Bounded: no data file larger than
64 MiB is read, and a bundle is never read whole into memory.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Final

from authz.core.decision import json_type
from authz.core.errors import DataFileError

__all__ = ["API_KEYS_PATH", "load_api_keys", "load_data"]

# Where the gateway policy reads its keys: data.gateway.api_keys.
API_KEYS_PATH: Final = ("gateway", "api_keys")
# Per data file, far above any real key list; a bundle is never read whole into memory.
_MAX_DATA_BYTES: Final = 64 * 1024 * 1024


def load_data(path: Path) -> dict[str, Any]:
    """The data tree of ``path`` as OPA would load it (Rego files ignored):

    - a bundle ``.tar.gz`` (``opa build`` output): every ``data.json`` member placed at
      its directory (``/gateway/api_keys/data.json`` is ``data.gateway.api_keys``);
    - a directory (a bundle source tree, an unpacked bundle, an overlay such as
      ``infra/demo/bundle-data``): every ``**/data.json`` the same way;
    - a ``.json`` file: the data root itself.

    Raises DataFileError naming the file: missing, unreadable, not gzip/tar, invalid JSON,
    or two files that set the same leaf differently.
    """
    if not path.exists():
        raise DataFileError(f"{path}: no such file or directory")
    root: dict[str, Any] = {}
    if path.is_dir():
        for file in sorted(path.rglob("data.json")):
            relative = file.relative_to(path).parent.parts
            _merge_at(root, relative, _read_json(_capped(file), str(file)), str(file))
    elif path.name.endswith((".tar.gz", ".tgz")):
        for name, value in _bundle_members(path):
            parts = PurePosixPath(name.lstrip("/")).parent.parts
            _merge_at(root, parts, value, f"{path}:{name}")
    else:
        _merge_at(root, (), _read_json(_capped(path), str(path)), str(path))
    return root


def load_api_keys(path: Path) -> Mapping[str, Any]:
    """``data.gateway.api_keys`` from ``path`` (see :func:`load_data` for what ``path``
    may be). Raises DataFileError naming the file when it cannot be read or holds no
    ``data.gateway.api_keys`` (a bundle built without key data)."""
    node: Any = load_data(path)
    for part in API_KEYS_PATH:
        if not isinstance(node, dict) or part not in node:
            raise DataFileError(
                f"{path}: no data.{'.'.join(API_KEYS_PATH)} (a bundle built without key "
                "data? scripts/build-policy-bundle --data DIR adds it)"
            )
        node = node[part]
    if not isinstance(node, dict):
        raise DataFileError(
            f"{path}: data.{'.'.join(API_KEYS_PATH)} is {json_type(node)}, not an object"
        )
    return node


def _bundle_members(path: Path) -> Iterator[tuple[str, Any]]:
    """``(member name, decoded JSON)`` of every regular ``data.json`` member."""
    try:
        with tarfile.open(path, mode="r:gz") as bundle:
            for member in bundle:
                if not member.isfile() or PurePosixPath(member.name).name != "data.json":
                    continue
                if member.size > _MAX_DATA_BYTES:
                    raise DataFileError(
                        f"{path}:{member.name}: larger than {_MAX_DATA_BYTES} bytes"
                    )
                handle = bundle.extractfile(member)
                if handle is None:
                    continue
                with handle:
                    yield member.name, _read_json(handle.read, f"{path}:{member.name}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataFileError(f"{path}: not a readable bundle (.tar.gz): {exc}") from None


def _capped(file: Path) -> Callable[[], bytes]:
    """A reader of ``file`` that refuses more than _MAX_DATA_BYTES (as for bundle members)."""

    def read() -> bytes:
        with file.open("rb") as handle:
            raw = handle.read(_MAX_DATA_BYTES + 1)
        if len(raw) > _MAX_DATA_BYTES:
            raise DataFileError(f"{file}: larger than {_MAX_DATA_BYTES} bytes")
        return raw

    return read


def _read_json(read: Callable[[], bytes], where: str) -> Any:
    try:
        raw = read()
        return json.load(io.BytesIO(raw)) if raw.strip() else {}
    except OSError as exc:
        raise DataFileError(f"{where}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise DataFileError(f"{where}: invalid JSON: {exc}") from None
    except RecursionError:  # json's recursive parser on deeply nested arrays or objects
        raise DataFileError(f"{where}: invalid JSON: nested too deeply") from None


def _merge_at(root: dict[str, Any], parts: Iterable[str], value: Any, where: str) -> None:
    """Place ``value`` at ``root[parts...]``, merging objects like OPA does."""
    node = root
    path = tuple(parts)
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise DataFileError(f"{where}: data.{'.'.join(path)} conflicts with another file")
        node = child
    if not path:
        if not isinstance(value, dict):
            raise DataFileError(f"{where}: the data root must be an object")
        _merge(root, value, where, ())
    elif isinstance(node.get(path[-1]), dict) and isinstance(value, dict):
        _merge(node[path[-1]], value, where, path)
    elif path[-1] in node:
        raise DataFileError(f"{where}: data.{'.'.join(path)} conflicts with another file")
    else:
        node[path[-1]] = value


def _merge(into: dict[str, Any], other: Mapping[str, Any], where: str, at: tuple[str, ...]) -> None:
    for name, value in other.items():
        if isinstance(into.get(name), dict) and isinstance(value, dict):
            _merge(into[name], value, where, (*at, name))
        elif name in into:
            raise DataFileError(
                f"{where}: data.{'.'.join((*at, name))} conflicts with another file"
            )
        else:
            into[name] = value
