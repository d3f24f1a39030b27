"""The local stack: OPA, authz, Envoy and a demo upstream as supervised processes.

Used by ``./scripts/up`` (fixed, documented ports) and by the end-to-end tests (free
ports, a temporary directory). Nothing here runs in production; it only starts the real
binaries the production stack uses, on 127.0.0.1.
"""
