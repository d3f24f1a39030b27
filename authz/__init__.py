"""authz: an Envoy ext_authz (v3) policy-decision service backed by OPA.

Guards AI agents at both network edges: the API gateway (API keys, roles, tiers) and the
egress proxy (sandbox tiers, credential injection). Every decision comes from OPA.
The request path, by module: ``input`` -> ``policy`` -> ``decision`` -> ``response``,
orchestrated by ``authorizer`` and served by ``servicer``/``server``.
"""

from __future__ import annotations

from authz.core.errors import AuthzError

__all__ = ["AuthzError", "__version__"]

__version__ = "0.1.0"
