"""Builders for the key-health and expiry tests: API-key entries, bundles holding them,
audit stores recording their use."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from authz.core.record import DecisionRecord
from authz.runtime.audit import AuditTrail

__all__ = ["NOW", "decision", "digest", "entry", "iso", "write_audit", "write_bundle"]


# 2026-01-01T00:00:00Z: the fixed "now" of the key-health tests (Unix seconds).
NOW = 1_767_225_600.0


def digest(key_id: str) -> str:
    """The SHA-256 hex digest the bundle keys ``key_id``'s API key ``ak_<key_id>`` by."""
    return hashlib.sha256(f"ak_{key_id}".encode()).hexdigest()


def iso(when: float) -> str:
    """``when`` (Unix seconds) as an RFC 3339 UTC timestamp, whole seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def entry(key_id: str = "key-a", **fields: Any) -> dict[str, Any]:
    """An enabled ``user`` API-key entry for ``key_id``, with ``fields`` on top."""
    return {"id": key_id, "enabled": True, "role": "user", **fields}


def write_bundle(path: Path, files: Mapping[str, Any], *, manifest: bool = True) -> Path:
    """A gzip tar like ``opa build`` writes: members named ``/<dir>/data.json``."""
    with tarfile.open(path, "w:gz") as bundle:
        members = dict(files)
        if manifest:
            members["/.manifest"] = {"revision": "test", "roots": [""]}
        for name, value in members.items():
            raw = value if isinstance(value, bytes) else json.dumps(value).encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            bundle.addfile(info, io.BytesIO(raw))
        bundle.addfile(tarfile.TarInfo("/gateway/gateway.rego"), io.BytesIO(b""))
    return path


def decision(key_id: str | None, when: float, *, allowed: bool = True) -> DecisionRecord:
    """A gateway decision by ``key_id`` (None: no identity) at ``when`` (Unix seconds)."""
    return DecisionRecord(
        decision_id=f"d-{key_id}-{when}",
        timestamp=when,
        decision_path="authz/gateway/decision",
        allowed=allowed,
        reason="allowed" if allowed else "role_not_allowed",
        http_status=200 if allowed else 403,
        identity={"key_id": key_id} if key_id else {},
    )


def write_audit(path: Path, records: list[DecisionRecord], admin: bool = False) -> Path:
    """An audit store at ``path`` holding ``records`` (and, if ``admin``, an admin entry
    naming a key that made no decision)."""
    trail = AuditTrail(path, retention_days=None, max_records=None)
    for rec in records:
        trail.record(rec)
    if admin:  # an admin entry naming a key is not a decision by it
        trail.admin("override_added", {"key_id": "key-admin-only"}, entry_id="o-1")
    trail.close()
    return path
