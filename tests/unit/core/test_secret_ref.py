"""authz.core.secret.is_secret_ref: the one syntax of a secret's name, shared by the egress
secrets file and a decision's credential.ref (a ref one side accepts, the other must too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from authz.core.decision import parse_decision
from authz.core.errors import ConfigError, InvalidDecision
from authz.core.secret import is_secret_ref
from authz.runtime.secrets import SecretStore

REFS = [
    ("openai", True),
    ("github.app-1", True),
    ("A_b", True),
    ("0", True),
    ("a" * 128, True),
    ("a" * 129, False),
    ("", False),
    ("-lead", False),
    (".lead", False),
    ("has space", False),
    ("a/b", False),
    ("a:b", False),
    ("caf\u00e9", False),
    ("a\n", False),
]
IDS = [repr(r[0][:12]) + f"-{len(r[0])}" for r in REFS]


@pytest.mark.parametrize(("ref", "valid"), REFS, ids=IDS)
def test_secret_ref_syntax(ref: str, valid: bool) -> None:
    assert is_secret_ref(ref) is valid


@pytest.mark.parametrize(("ref", "valid"), REFS, ids=IDS)
def test_secrets_file_and_decision_agree_on_secret_refs(
    tmp_path: Path, ref: str, valid: bool
) -> None:
    decision = {
        "allowed": True,
        "authz": {
            "credential": {"ref": ref, "header": "authorization", "format": "Bearer {secret}"}
        },
    }
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({"version": 1, "credentials": {ref: "s3cret"}}))
    path.chmod(0o600)
    if valid:
        assert parse_decision(decision).credential is not None
        SecretStore.open(path)
    else:
        with pytest.raises(InvalidDecision):
            parse_decision(decision)
        with pytest.raises(ConfigError, match="not a valid reference"):
            SecretStore.open(path)
