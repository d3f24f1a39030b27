"""Demo API keys of the local stack (public: printed by ``scripts/up`` and the README).

They exist only in ``infra/demo/bundle-data``, which ``scripts/up`` overlays on the policy
bundle it builds for the local stack. The default bundle (``scripts/build-policy-bundle``
without ``--data``) holds no keys at all, so a deployment never accepts these.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DEMO_KEYS"]

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
