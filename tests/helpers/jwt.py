"""JWT builders for the tests of the OPA Envoy tutorial's JWT example: an ES256 key pair,
its public JWKS (RFC 7517) and tokens signed with it (JWS compact serialization,
RFC 7515 section 7.1; ES256 per RFC 7518 section 3.4: the signature is r || s, 32 bytes
each). Keys are generated at test time, never committed."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

__all__ = ["SigningKey", "b64url"]


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _coordinate(value: int) -> str:
    return b64url(value.to_bytes(32, "big"))


@dataclass(frozen=True)
class SigningKey:
    """A fresh P-256 key with id ``kid``."""

    private: ec.EllipticCurvePrivateKey
    kid: str

    @classmethod
    def generate(cls, kid: str = "test") -> SigningKey:
        """A new key pair."""
        return cls(ec.generate_private_key(ec.SECP256R1()), kid)

    def jwks(self) -> dict[str, Any]:
        """The public JWKS: ``{"keys": [{"kty": "EC", "crv": "P-256", "x", "y", ...}]}``."""
        numbers = self.private.public_key().public_numbers()
        key = {
            "kty": "EC",
            "crv": "P-256",
            "x": _coordinate(numbers.x),
            "y": _coordinate(numbers.y),
            "kid": self.kid,
            "alg": "ES256",
            "use": "sig",
        }
        return {"keys": [key]}

    def token(self, claims: dict[str, Any], *, lifetime_s: int = 3600) -> str:
        """An ES256 JWT of ``claims`` plus ``nbf`` (a minute ago) and ``exp`` (in
        ``lifetime_s`` seconds; negative for an expired token) unless given."""
        now = int(time.time())
        body = {"nbf": now - 60, "exp": now + lifetime_s, **claims}
        header = {"alg": "ES256", "typ": "JWT", "kid": self.kid}
        signing_input = ".".join(
            b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, body)
        )
        der = self.private.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
