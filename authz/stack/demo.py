"""Demo API keys of the local stack (public: printed by ``scripts/up`` and the README).

They exist only in ``infra/demo/bundle-data``, which ``scripts/up`` overlays on the policy
bundle it builds for the local stack. The default bundle (``scripts/build-policy-bundle``
without ``--data``) holds no keys at all, so a deployment never accepts these.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DEMO_EGRESS_SECRETS", "DEMO_KEYS", "DEMO_SANDBOXES"]

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

# service -> demo credential the local stand-in API expects (fake values, local only).
DEMO_EGRESS_SECRETS: Final = {
    "httpbin": "demo-httpbin-credential",
    "openai": "demo-openai-credential",
    "anthropic": "demo-anthropic-credential",
    "github": "demo-github-credential",
    "slack": "demo-slack-credential",
}
