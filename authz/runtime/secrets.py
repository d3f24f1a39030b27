"""Secret values and the egress secrets file.

:class:`Secret` follows Starlette's ``datastructures.Secret``: the value is only reachable
through :meth:`Secret.reveal`, so a secret that ends up in a log line, an exception message
or a ``repr`` prints as ``'**********'``.

:class:`SecretStore` holds the credentials authz injects on egress. The secrets file is
JSON, never part of a bundle, never sent to OPA::

    {"version": 1, "credentials": {"<ref>": "<secret>", ...}}

``<ref>`` is what a decision's ``credential.ref`` names (the service name). The file is
read at startup (a missing or malformed file is a :class:`~authz.core.errors.ConfigError`),
then re-read every reload interval and re-parsed whenever its content changes (compared by
SHA-256: a same-size rewrite within one file-system timestamp tick keeps the mtime, size
and inode). A file over :data:`MAX_FILE_BYTES` is malformed. At runtime a file that
disappears, is not UTF-8 or stops parsing (or any other failure of the re-read) makes every
credential unavailable (each affected request is denied 503 ``credential_unavailable``,
and readiness is red) until a good file is back: fail closed, never a stale or missing
credential forwarded. The watcher itself never stops on an exception. An entry that is
not a non-empty string makes only that reference unavailable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from authz.core.errors import ConfigError, CredentialError
from authz.core.headers import is_safe_field_value
from authz.core.secret import MASK, Secret, is_secret_ref
from authz.runtime.files import read_at_most, write_private

__all__ = [
    "ENV_PREFIX",
    "MASK",
    "MAX_FILE_BYTES",
    "SECRETS_FILE_VERSION",
    "Secret",
    "SecretStore",
    "collect_credentials",
    "env_name",
    "write_secrets_file",
]

# A secrets file holds a few credentials; anything larger is a mistake, refused unread.
MAX_FILE_BYTES: Final = 1024 * 1024
SECRETS_FILE_VERSION: Final = 1
ENV_PREFIX: Final = "EGRESS_SECRET_"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Loaded:
    secrets: Mapping[str, Secret]
    invalid: frozenset[str]


def _parse(text: str, where: str) -> _Loaded:
    """Parse the secrets file text; errors name the file and the key, never a value."""
    try:
        document = json.loads(text)
    except ValueError as exc:
        # json's message has the position only (line/column), no content.
        raise ConfigError(f"secrets file {where}: not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"secrets file {where}: expected a JSON object at top level")
    version = document.get("version")
    if version != SECRETS_FILE_VERSION:
        raise ConfigError(f"secrets file {where}: version={version!r}, expected 1")
    credentials = document.get("credentials")
    if not isinstance(credentials, dict):
        raise ConfigError(f"secrets file {where}: 'credentials' must be an object")
    secrets: dict[str, Secret] = {}
    invalid: set[str] = set()
    for ref, value in credentials.items():
        if not is_secret_ref(ref):
            raise ConfigError(f"secrets file {where}: {ref[:64]!r} is not a valid reference")
        if isinstance(value, str) and value and is_safe_field_value(value):
            secrets[ref] = Secret(value)
        else:
            invalid.add(ref)
            log.error(
                "secrets file entry is not a usable string; its service is denied 503",
                extra={"secrets_file": where, "ref": ref},
            )
    return _Loaded(secrets, frozenset(invalid))


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, at most ``MAX_FILE_BYTES + 1`` of them. Raises OSError."""
    return read_at_most(path, MAX_FILE_BYTES)


def _load(data: bytes, where: str) -> _Loaded:
    """Parse the secrets file's bytes. Raises ConfigError naming the file for anything
    wrong with its content (never quoting it: it holds secrets); anything else that
    raises is not the content's fault."""
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"secrets file {where}: larger than {MAX_FILE_BYTES} bytes")
    try:
        return _parse(data.decode("utf-8"), where)
    except UnicodeDecodeError as exc:
        # The position only: the exception carries the file's bytes.
        raise ConfigError(f"secrets file {where}: not UTF-8 (byte {exc.start})") from None
    except RecursionError:  # json's recursive parser on deeply nested arrays or objects
        raise ConfigError(f"secrets file {where}: nested too deeply") from None


class SecretStore:
    """Credentials from the secrets file at ``path``, reloaded when it changes.

    Use :meth:`open` at startup (raises ConfigError for a missing or malformed file),
    :meth:`get` per request (raises CredentialError), and run :meth:`watch` as a task.
    ``reloads`` and ``reload_failures`` count reload attempts for metrics.
    """

    def __init__(self, path: Path, loaded: _Loaded, digest: bytes) -> None:
        self.path = path
        # Called with True/False after every re-read (metrics); set by the server.
        self.on_reload: Callable[[bool], None] | None = None
        self._loaded: _Loaded | None = loaded
        # SHA-256 of the bytes last parsed: a change is seen whatever the mtime, size and
        # inode do (a same-size rewrite within one timestamp tick keeps all three).
        self._digest: bytes | None = digest
        self.reloads = 0
        self.reload_failures = 0

    @classmethod
    def open(cls, path: Path) -> SecretStore:
        """Read ``path`` now. Raises ConfigError naming the file when it is missing,
        unreadable or malformed. Warns when the file is readable by group or others."""
        try:
            info = path.stat()
            data = _read_bytes(path)
        except OSError as exc:
            raise ConfigError(f"secrets file {str(path)!r}: {exc.strerror}") from None
        try:
            loaded = _load(data, repr(str(path)))
        except ConfigError:
            raise
        except Exception as exc:  # the type only: a message may quote the file
            raise ConfigError(
                f"secrets file {str(path)!r}: cannot be read ({type(exc).__name__})"
            ) from None
        # Group read is allowed (Kubernetes mounts Secrets 0440 with fsGroup); anything
        # for others, or group write, is not.
        if info.st_mode & (stat.S_IRWXO | stat.S_IWGRP | stat.S_IXGRP):
            log.warning(
                "secrets file is accessible to others or group-writable; chmod 600 it",
                extra={"secrets_file": str(path), "mode": oct(stat.S_IMODE(info.st_mode))},
            )
        return cls(path, loaded, hashlib.sha256(data).digest())

    @property
    def loaded(self) -> bool:
        """True while the last read of the file succeeded."""
        return self._loaded is not None

    @property
    def references(self) -> frozenset[str]:
        """The references currently resolvable (names only)."""
        return frozenset(self._loaded.secrets) if self._loaded else frozenset()

    def get(self, ref: str) -> Secret:
        """The secret for ``ref``. Raises CredentialError when the file is not loaded,
        the reference is absent, or its entry is malformed."""
        if self._loaded is None:
            raise CredentialError(f"secrets file {str(self.path)!r} is missing or malformed")
        secret = self._loaded.secrets.get(ref)
        if secret is None:
            state = "malformed" if ref in self._loaded.invalid else "absent"
            raise CredentialError(f"credential {ref!r} is {state} in the secrets file")
        return secret

    def refresh(self) -> bool:
        """Re-read the file (at most ``MAX_FILE_BYTES + 1`` bytes) and re-parse it if its
        content changed. Returns True when it was re-parsed (successfully or not), or
        found missing. Never raises."""
        try:
            data = _read_bytes(self.path)
        except OSError:
            if self._loaded is None:
                return False  # already failed; nothing new to report
            self._fail("secrets file disappeared")
            return True
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            return False
        self._digest = digest
        self.reloads += 1
        try:
            self._loaded = _load(data, repr(str(self.path)))
        except ConfigError as exc:
            self._fail(str(exc), digest)  # not re-parsed until it changes again
            return True
        except Exception as exc:  # any failure fails closed, never kills the watcher
            # The type only: a message may quote the file. Not the content's fault (a bug,
            # MemoryError): retried at the next pass.
            self._fail(f"cannot be read ({type(exc).__name__})")
            return True
        self._report(True)
        log.info(
            "secrets file reloaded",
            extra={"secrets_file": str(self.path), "references": sorted(self.references)},
        )
        return True

    def _fail(self, reason: str, digest: bytes | None = None) -> None:
        # Unload first: whatever fails after this line, no stale secret is served.
        self._loaded = None
        self._digest = digest
        self.reload_failures += 1
        log.error(
            "secrets unavailable; egress requests needing a credential are denied",
            extra={"secrets_file": str(self.path), "error": reason},
        )
        self._report(False)

    def _report(self, ok: bool) -> None:
        if self.on_reload is None:
            return
        try:
            self.on_reload(ok)
        except Exception:  # a metrics hook must never stop the watcher
            log.exception("secrets on_reload hook failed")

    async def watch(self, interval_s: float) -> None:
        """Call :meth:`refresh` every ``interval_s`` seconds until cancelled. Never dies of
        an exception: an unexpected one unloads every credential (fail closed, readiness
        red through :attr:`loaded`) and the next pass re-reads the file."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.refresh()
            except Exception as exc:  # the watcher must outlive any bug
                self._fail(f"watcher error ({type(exc).__name__})")


def write_secrets_file(path: Path, credentials: Mapping[str, str]) -> None:
    """Write ``credentials`` (ref -> secret) as a secrets file at ``path`` with mode 0600,
    atomically and durably (:func:`~authz.runtime.files.write_private`). Raises ConfigError
    for a bad reference or an empty value (naming the reference, never the value)."""
    for ref, value in credentials.items():
        if not is_secret_ref(ref):
            raise ConfigError(f"{ref[:64]!r} is not a valid secret reference")
        if not value or not is_safe_field_value(value):
            raise ConfigError(f"the secret for {ref!r} is empty or contains CR, LF or NUL")
    document: dict[str, Any] = {
        "version": SECRETS_FILE_VERSION,
        "credentials": dict(sorted(credentials.items())),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, (json.dumps(document, indent=2) + "\n").encode("utf-8"))


def env_name(ref: str) -> str:
    """The environment variable holding the secret for ``ref``:
    ``EGRESS_SECRET_<REF>`` upper-cased, ``-`` and ``.`` as ``_`` (``openai`` ->
    ``EGRESS_SECRET_OPENAI``)."""
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", ref).upper()


def collect_credentials(
    refs: list[str], environ: Mapping[str, str]
) -> tuple[dict[str, str], list[str]]:
    """``(credentials, missing)``: the secret for each of ``refs`` found in ``environ``
    under :func:`env_name`, and the refs with no (or an empty) variable."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for ref in refs:
        value = environ.get(env_name(ref), "").strip()
        if value:
            found[ref] = value
        else:
            missing.append(ref)
    return found, missing
