"""Demo API keys and sandbox tokens of the local stack (public: printed by ``scripts/up``
and the README).

Their digests exist only in ``infra/demo/bundle-data``, which ``scripts/up`` overlays on
the policy bundle it builds for the local stack. The default bundle
(``scripts/build-policy-bundle`` without ``--data``) holds no keys or sandboxes at all, so
a deployment never accepts these. The demo egress credentials are in
``infra/demo/egress.env``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = ["DEMO_JWTS", "DEMO_KEYS", "DEMO_SANDBOXES", "EXAMPLES", "Example"]

# name -> (plaintext key, key id, role, rate-limit tier, enabled, expires_at)
DEMO_KEYS: Final = {
    "admin": ("ak_demo_admin_0001", "key-demo-admin", "admin", "premium", True, None),
    "user": ("ak_demo_user_0001", "key-demo-user", "user", "standard", True, None),
    "viewer": ("ak_demo_viewer_0001", "key-demo-viewer", "viewer", "default", True, None),
    "disabled": ("ak_demo_disabled_0001", "key-demo-disabled", "user", "default", False, None),
    "expired": (
        "ak_demo_expired_0001",
        "key-demo-expired",
        "user",
        "default",
        True,
        "2024-01-01T00:00:00Z",
    ),
}

# sandbox id -> (plaintext token, tier, enabled)
DEMO_SANDBOXES: Final = {
    "sb-demo-default": ("sbt_demo_default_0001", "default", True),
    "sb-demo-restricted": ("sbt_demo_restricted_0001", "restricted", True),
    "sb-demo-standard": ("sbt_demo_standard_0001", "standard", True),
    "sb-demo-premium": ("sbt_demo_premium_0001", "premium", True),
    "sb-demo-admin": ("sbt_demo_admin_0001", "admin", True),
    "sb-demo-disabled": ("sbt_demo_disabled_0001", "standard", False),
}

# The JWT example's demo tokens (policy/jwt_example, the gateway's /people route): ES256,
# valid 2025-01-01 to 2100-01-01, signed by a key that was thrown away after signing them;
# its public JWKS is in infra/demo/bundle-data/gateway/jwt_example. role -> token.
DEMO_JWTS: Final = {
    "guest": (
        "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImRlbW8ifQ."
        "eyJuYmYiOjE3MzU2ODk2MDAsImV4cCI6NDEwMjQ0NDgwMCwicm9sZSI6Imd1ZXN0Iiwic3ViIjoiWW05aSJ9."
        "BZyW8gBKWVBLZ8L0WUfr3jYCMnBg2TsIBKFvkrv4jgAoi3OXKDJC2DPsoTYbo1Z3IxisvaSmG5waDYYy2-7L1g"
    ),
    "admin": (
        "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImRlbW8ifQ."
        "eyJuYmYiOjE3MzU2ODk2MDAsImV4cCI6NDEwMjQ0NDgwMCwicm9sZSI6ImFkbWluIiwic3ViIjoiWVd4cFkyVT0ifQ."
        "GO_CpWEWsFJ6ln8O2GsP0o4cxVEz8eLLwDLNc-eA17knydNbSqeiYhi7gfmQpNh614Z2AwWEA2bfrEKqEy4zdw"
    ),
}


@dataclass(frozen=True, slots=True)
class Example:
    """One documented request against the local stack and what it must answer.

    ``proxy`` is which Envoy listener; ``status`` the HTTP status; ``error`` the ``error``
    code of the JSON deny body (None for an allow). ``scripts/up`` prints these as curl
    commands and an end-to-end test sends each one.
    """

    proxy: Literal["gateway", "egress"]
    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    status: int = 200
    error: str | None = None

    def curl(self, base_url: str) -> str:
        """The example as a curl command line against ``base_url``."""
        parts = ["curl -i"]
        if self.method != "GET":
            parts.append(f"-X {self.method}")
        parts += [f"-H '{name}: {value}'" for name, value in self.headers]
        parts.append(f"{base_url}{self.path}")
        return " ".join(parts)


def _key(name: str) -> tuple[tuple[str, str], ...]:
    return (("X-API-Key", DEMO_KEYS[name][0]),)


def _jwt(role: str) -> tuple[tuple[str, str], ...]:
    return (("Authorization", f"Bearer {DEMO_JWTS[role]}"),)


def _sandbox(
    service: str, sandbox: str | None, token: str | None = None
) -> tuple[tuple[str, str], ...]:
    headers = [("Host", service)]
    if sandbox is not None:
        headers.append(("X-Sandbox-Id", sandbox))
        headers.append(("X-Sandbox-Token", token or DEMO_SANDBOXES[sandbox][0]))
    return tuple(headers)


EXAMPLES: Final = (
    Example("gateway", "GET", "/api/v1/status", (), 401, "missing_api_key"),
    Example("gateway", "GET", "/api/v1/status", (("X-API-Key", "wrong"),), 401, "invalid_api_key"),
    Example("gateway", "GET", "/api/v1/status", _key("viewer")),
    Example(
        "gateway", "GET", "/api/v1/items", (("Authorization", f"Bearer {DEMO_KEYS['user'][0]}"),)
    ),
    Example("gateway", "POST", "/api/v1/items", _key("viewer"), 403, "role_not_allowed"),
    Example("gateway", "GET", "/api/v1/admin/users", _key("user"), 403, "role_not_allowed"),
    Example("gateway", "GET", "/api/v1/admin/users", _key("admin")),
    Example("gateway", "GET", "/internal", _key("admin"), 403, "path_not_allowed"),
    Example("gateway", "GET", "/api/v1/status", _key("disabled"), 401, "disabled_api_key"),
    Example("gateway", "GET", "/api/v1/status", _key("expired"), 401, "expired_api_key"),
    Example("gateway", "GET", "/people", _jwt("guest")),
    Example("gateway", "POST", "/people", _jwt("guest"), 403, "denied"),
    Example("gateway", "GET", "/people", (), 403, "denied"),
    Example("egress", "GET", "/v1/models", _sandbox("openai", None), 401, "missing_sandbox_id"),
    Example(
        "egress",
        "GET",
        "/v1/models",
        _sandbox("openai", "sb-demo-standard", "wrong"),
        401,
        "invalid_sandbox_token",
    ),
    Example("egress", "GET", "/v1/models", _sandbox("openai", "sb-demo-standard")),
    Example("egress", "POST", "/v1/messages", _sandbox("anthropic", "sb-demo-standard")),
    Example(
        "egress",
        "POST",
        "/api/chat.postMessage",
        _sandbox("slack", "sb-demo-standard"),
        403,
        "service_not_allowed",
    ),
    Example("egress", "POST", "/api/chat.postMessage", _sandbox("slack", "sb-demo-premium")),
    Example(
        "egress",
        "DELETE",
        "/v1/models/x",
        _sandbox("openai", "sb-demo-standard"),
        403,
        "method_not_allowed",
    ),
    Example(
        "egress",
        "GET",
        "/v1/files",
        _sandbox("openai", "sb-demo-standard"),
        403,
        "path_not_allowed",
    ),
    Example("egress", "GET", "/get", _sandbox("httpbin", "sb-demo-restricted")),
    Example(
        "egress",
        "GET",
        "/v1/models",
        _sandbox("openai", "sb-demo-default"),
        403,
        "service_not_allowed",
    ),
    Example(
        "egress",
        "GET",
        "/v1/models",
        _sandbox("openai", "sb-demo-disabled"),
        401,
        "sandbox_disabled",
    ),
)
