"""The Kubernetes data volume is sized from the audit store's byte bound: the ``emptyDir``
holding ``AUTHZ_AUDIT_DB`` has ``sizeLimit`` equal to
:func:`authz.runtime.audit.volume_bytes` of ``AUTHZ_AUDIT_MAX_BYTES`` as the pod gets it
(the manifest's env, else the image's ``ENV``, else the default), so the two cannot drift
and the store can never fill the volume (the kubelet evicts a pod whose emptyDir outgrows
it).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml

from authz.runtime import audit, config
from tests.helpers.infra import ROOT

MANIFEST = ROOT / "infra/k8s/base/authz.yaml"
DOCKERFILE = ROOT / "Dockerfile"
# Kubernetes resource quantities (binary and decimal suffixes), as a sizeLimit uses them.
_SUFFIXES = {
    "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4,
    "k": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "": 1,
}  # fmt: skip
_QUANTITY = re.compile(r"^([0-9]+)(Ki|Mi|Gi|Ti|k|M|G|T|)$")


def _quantity(text: str) -> int:
    match = _QUANTITY.fullmatch(str(text))
    assert match, f"sizeLimit {text!r} is not a whole quantity"
    return int(match.group(1)) * _SUFFIXES[match.group(2)]


def _deployment() -> dict[str, Any]:
    documents = yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8"))
    return next(d for d in documents if d and d["kind"] == "Deployment")


def _image_env(name: str) -> str | None:
    match = re.search(rf"\b{name}=(\S+)", DOCKERFILE.read_text(encoding="utf-8"))
    return match.group(1).strip("\"'") if match else None


def _volume_problem(deployment: dict[str, Any]) -> str | None:
    """Why the audit database's volume is not sized from the store's bound, or None."""
    spec = deployment["spec"]["template"]["spec"]
    authz = next(c for c in spec["containers"] if c["name"] == "authz")
    env = {e["name"]: e.get("value") for e in authz.get("env", ())}
    db = env.get("AUTHZ_AUDIT_DB") or _image_env("AUTHZ_AUDIT_DB")
    assert db, "the pod has no AUTHZ_AUDIT_DB"
    mount = max(
        (m for m in authz["volumeMounts"] if db.startswith(m["mountPath"].rstrip("/") + "/")),
        key=lambda m: len(m["mountPath"]),
    )
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    if "emptyDir" not in volume:
        return None  # a PersistentVolumeClaim is sized where it is claimed
    limit = volume["emptyDir"].get("sizeLimit")
    if limit is None:
        return f"volume {volume['name']!r} has no sizeLimit"
    raw = env.get("AUTHZ_AUDIT_MAX_BYTES") or _image_env("AUTHZ_AUDIT_MAX_BYTES")
    max_bytes = int(raw) if raw else config.DEFAULT_AUDIT_MAX_BYTES
    needed = audit.volume_bytes(max_bytes)
    if _quantity(limit) != needed:
        return (
            f"volume {volume['name']!r} sizeLimit {limit} is {_quantity(limit)} bytes; "
            f"AUTHZ_AUDIT_MAX_BYTES={max_bytes} needs exactly {needed} "
            f"({needed // 1024**2}Mi, authz.runtime.audit.volume_bytes)"
        )
    return None


def test_audit_volume_is_sized_from_the_store_bound() -> None:
    assert _volume_problem(_deployment()) is None


def _with(size_limit: str | None, max_bytes: str | None) -> dict[str, Any]:
    deployment = copy.deepcopy(_deployment())
    spec = deployment["spec"]["template"]["spec"]
    data = next(v for v in spec["volumes"] if v["name"] == "data")
    if size_limit is None:
        data["emptyDir"].pop("sizeLimit", None)
    else:
        data["emptyDir"]["sizeLimit"] = size_limit
    if max_bytes is not None:
        authz = next(c for c in spec["containers"] if c["name"] == "authz")
        authz["env"].append({"name": "AUTHZ_AUDIT_MAX_BYTES", "value": max_bytes})
    return deployment


@pytest.mark.parametrize(
    ("size_limit", "max_bytes"),
    [
        ("512Mi", None),
        (None, None),
        ("1Gi", str(2 * config.DEFAULT_AUDIT_MAX_BYTES)),
        ("4Gi", None),
    ],
    ids=["volume-too-small", "no-size-limit", "bound-raised-alone", "volume-oversized"],
)
def test_a_drifted_audit_volume_is_caught(size_limit: str | None, max_bytes: str | None) -> None:
    assert _volume_problem(_with(size_limit, max_bytes)) is not None
