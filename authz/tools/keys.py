"""API keys and sandbox tokens: generate, hash, and keep plaintext out of bundle data.

Bundle data stores credentials only as lowercase hex SHA-256 digests (the same digest
:func:`authz.core.input.mask_credential` puts in ``input.credentials``). :func:`lint_data`
is what ``scripts/build-policy-bundle`` runs to refuse data that holds a plaintext key.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from authz.core.errors import DataFileError

__all__ = [
    "KEY_PREFIX",
    "SANDBOX_TOKEN_PREFIX",
    "digest",
    "generate_key",
    "lint_data",
    "lint_file",
]

KEY_PREFIX: Final = "ak_"
SANDBOX_TOKEN_PREFIX: Final = "sbt_"  # noqa: S105 (a prefix, not a token)
_DIGEST: Final = re.compile(r"^[0-9a-f]{64}$")
# Object keys under which a credential-looking string must be a digest.
_CREDENTIAL_FIELDS: Final = frozenset(
    {"key", "api_key", "apikey", "token", "secret", "password", "credential", "plaintext"}
)
# Maps whose keys are credential digests.
_DIGEST_KEYED_MAPS: Final = frozenset({"api_keys"})
# Value prefixes of well-known credential formats (ours, OpenAI, GitHub, Slack, AWS).
_CREDENTIAL_PREFIXES: Final = (
    KEY_PREFIX,
    SANDBOX_TOKEN_PREFIX,
    "sk-",
    "ghp_",
    "gho_",
    "github_pat_",
    "xoxb-",
    "xoxp-",
    "AKIA",
)


def generate_key(prefix: str = KEY_PREFIX) -> str:
    """A new random key: ``prefix`` + 43 URL-safe characters (256 bits)."""
    return prefix + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    """Lowercase hex SHA-256 of ``key``, as stored in bundle data and as found in
    ``input.credentials``. Only SP and HTAB (RFC 9110 section 5.5, what the input trims)
    and line endings (a key read from a file or stdin) are stripped around it; other
    Unicode whitespace is part of the key, as it is in a request."""
    return hashlib.sha256(key.strip(" \t\r\n").encode("utf-8")).hexdigest()


def lint_data(data: Any, where: str = "data") -> list[str]:
    """Problems that mean ``data`` (a decoded bundle ``data.json``) holds plaintext
    credentials; empty when clean. Each problem names the JSON path, never the value:

    - a key of an ``api_keys`` map that is not a 64-hex-digit digest;
    - a string under a credential-named field (``token``, ``secret``, ...; or names
      ending ``_token``/``_secret``/``_key``) that is not a digest, unless the field name
      says it is a digest (``*_sha256``, ``*_digest``) or a reference (``*_ref``);
    - any string value starting with a known credential prefix (``ak_``, ``sk-``, ...).
    """
    return list(_lint(data, where))


def lint_file(path: Path) -> list[str]:
    """:func:`lint_data` of the JSON file at ``path``, its problems named from ``path``.
    Raises DataFileError naming the file when it cannot be read or is not JSON (RFC 8259)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise DataFileError(f"{path}: cannot read JSON: {exc}") from None
    except RecursionError:  # json's recursive parser on deeply nested arrays or objects
        raise DataFileError(f"{path}: cannot read JSON: nested too deeply") from None
    return lint_data(data, where=str(path))


def _credential_field(name: str) -> bool:
    lowered = name.lower()
    if lowered.endswith(("_sha256", "_digest", "_ref", "_header", "_format", "_id")):
        return False
    return lowered in _CREDENTIAL_FIELDS or lowered.endswith(("_token", "_secret", "_key"))


def _lint(node: Any, path: str) -> Iterator[str]:
    if isinstance(node, dict):
        digest_keyed = path.rsplit(".", 1)[-1] in _DIGEST_KEYED_MAPS
        for name, value in node.items():
            # A path never quotes a key that may itself be a plaintext credential.
            not_digest = digest_keyed and not _DIGEST.fullmatch(name)
            plaintext_key = not_digest or _looks_like(name)
            child = f"{path}.<redacted>" if plaintext_key else f"{path}.{name}"
            if not_digest:
                yield f"{path}: a key is not a SHA-256 hex digest (plaintext API key?)"
            elif plaintext_key:
                yield f"{path}: a key looks like a plaintext credential"
            if _credential_field(name) and any(
                isinstance(item, str) and not _DIGEST.fullmatch(item) for item in _strings(value)
            ):
                yield f"{child}: credential field holds a value that is not a SHA-256 digest"
            yield from _lint(value, child)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _lint(item, f"{path}[{index}]")
    elif isinstance(node, str) and _looks_like(node):
        yield f"{path}: value looks like a plaintext credential"


def _looks_like(text: str) -> bool:
    return text.startswith(_CREDENTIAL_PREFIXES)


def _strings(value: Any) -> Iterator[Any]:
    if isinstance(value, list):
        for item in value:
            yield from _strings(item)
    else:
        yield value
