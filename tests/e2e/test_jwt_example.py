"""The OPA Envoy tutorial's JWT example end to end: Envoy's /people route asks authz with
decision_path authz/jwt_example/decision; the bearer JWT reaches the policy in clear
(io.jwt.decode_verify checks it against the deployment's JWKS) and reaches no log line,
no audit row and no upstream."""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.e2e import Env
from tests.helpers.jwt import SigningKey, b64url

ALICE = b64url(b"alice")  # the tutorial's admin token has sub base64url("alice")


@pytest.fixture(scope="module")
def signer(e2e: Env, repo_root: Path) -> SigningKey:
    """A fresh signing key whose JWKS the stack's bundle carries (deployment data, as
    README "JWT example" says), active in OPA before the first test."""
    key = SigningKey.generate()
    target = e2e.overlay / "gateway/jwt_example/data.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"jwks": key.jwks()}), encoding="utf-8")
    e2e.build_bundle(repo_root)
    token = key.token({"role": "guest", "sub": ALICE})
    deadline = time.monotonic() + 15
    while _get(e2e, token).status_code != 200:
        assert time.monotonic() < deadline, "the bundle with the JWKS never became active"
        time.sleep(0.2)
    return key


def _get(e2e: Env, token: str | None, path: str = "/people") -> httpx.Response:
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    return e2e.gateway.get(path, headers=headers)


def _post(e2e: Env, token: str, firstname: str) -> httpx.Response:
    return e2e.gateway.post(
        "/people",
        headers={"authorization": f"Bearer {token}"},
        json={"firstname": firstname, "lastname": "Example"},
    )


@pytest.mark.parametrize(
    ("role", "method", "firstname", "status"),
    [
        ("guest", "GET", None, 200),
        ("admin", "GET", None, 200),
        ("admin", "POST", "Charlie", 200),
        ("admin", "POST", "Alice", 403),  # an admin may not create a person of their name
        ("guest", "POST", "Charlie", 403),
        ("intruder", "GET", None, 403),
    ],
    ids=["guest-get", "admin-get", "admin-post", "admin-post-own-name", "guest-post", "no-role"],
)
def test_role_claim_decides_like_the_tutorial(
    e2e: Env, signer: SigningKey, role: str, method: str, firstname: str | None, status: int
) -> None:
    token = signer.token({"role": role, "sub": ALICE})
    resp = _get(e2e, token) if method == "GET" else _post(e2e, token, firstname or "")
    assert resp.status_code == status, resp.text
    if status == 200:
        # The token is a credential: the upstream never sees it.
        assert "authorization" not in resp.json()["headers"]


@pytest.mark.parametrize(
    "case", ["none", "opaque", "expired", "other-key", "other-path"], ids=lambda case: case
)
def test_a_request_without_a_valid_token_is_denied(e2e: Env, signer: SigningKey, case: str) -> None:
    claims = {"role": "admin", "sub": ALICE}
    token: str | None = {
        "none": None,
        "opaque": "opaque-token-0123456789",
        "expired": signer.token(claims, lifetime_s=-10),
        "other-key": SigningKey.generate().token(claims),
        "other-path": signer.token(claims),
    }[case]
    resp = _get(e2e, token, "/people/1" if case == "other-path" else "/people")
    assert resp.status_code == 403, resp.text


def _audit_bodies(e2e: Env) -> str:
    time.sleep(0.5)  # the audit writer flushes every 0.2 s
    conn = sqlite3.connect(f"file:{e2e.stack.run_dir / 'audit.db'}?mode=ro", uri=True)
    try:
        return "\n".join(str(row[0]) for row in conn.execute("SELECT body FROM audit"))
    finally:
        conn.close()


def test_no_raw_jwt_in_any_log_or_the_audit_trail(e2e: Env, signer: SigningKey) -> None:
    token = signer.token({"role": "admin", "sub": ALICE})
    allowed = _get(e2e, token)
    denied = _post(e2e, token, "Alice")
    assert (allowed.status_code, denied.status_code) == (200, 403)
    decision_id = allowed.json()["headers"]["x-authz-decision-id"]
    signature = token.rsplit(".", 1)[1]  # unique to this token
    needles = [signature, base64.b64encode(f"Bearer {token}".encode()).decode()[:40]]
    audit = _audit_bodies(e2e)
    assert decision_id in audit  # the decision is in the audit trail, its token is not
    logs = sorted((e2e.stack.run_dir / "logs").glob("*"))
    assert any(path.name.startswith("authz") for path in logs)
    for where, text in [("audit", audit), *((p.name, p.read_text(errors="replace")) for p in logs)]:
        for needle in needles:
            assert needle not in text, f"a raw JWT in {where}"
