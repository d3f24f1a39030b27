"""Readiness checks: what ``GET /readyz`` (:mod:`authz.runtime.admin`) asks before it
answers 200.

A check is a plain async callable (:data:`ReadinessCheck`) returning ``(ok, detail)``:
``ok`` False makes the pod not ready (Kubernetes stops routing to it); ``detail`` is a
short human string for the probe's body, never a secret. Each factory below closes over
the component it watches; the server composes them (:func:`authz.runtime.server.build_runtime`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from authz.core.errors import PolicyError
from authz.core.opa import OpaClient
from authz.core.ratelimit import RedisLimiter
from authz.runtime.bundle_watch import BundleWatcher
from authz.runtime.circuit import OPEN, CircuitBreaker
from authz.runtime.secrets import SecretStore

__all__ = [
    "ReadinessCheck",
    "bundle_check",
    "opa_bundles_check",
    "opa_check",
    "redis_check",
    "secrets_check",
    "serving_check",
]

# A check returns (ok, detail); detail is a short human string, never a secret.
ReadinessCheck = Callable[[], Awaitable[tuple[bool, str]]]
_CHECK_TIMEOUT_S: Final = 1.0


def serving_check(stopping: Callable[[], bool]) -> ReadinessCheck:
    """Ready until ``stopping()`` is true: on SIGTERM the pod leaves the endpoints
    while in-flight calls drain."""

    async def check() -> tuple[bool, str]:
        if stopping():
            return False, "shutting down"
        return True, "serving"

    return check


def opa_bundles_check(client: OpaClient) -> ReadinessCheck:
    """Ready when OPA answers ``GET /health?bundles`` with 200 within 1 s: reachable,
    and every configured bundle activated at least once (OPA's health API,
    https://www.openpolicyagent.org/docs/rest-api#health-api). Not ready with the
    failure code (``opa_unavailable``, ``opa_timeout``, ...) or OPA's status and error."""

    async def check() -> tuple[bool, str]:
        try:
            status, body = await client.get("/health?bundles", _CHECK_TIMEOUT_S)
        except PolicyError as exc:
            return False, exc.code
        if status == 200:
            return True, "bundles activated"
        error = body.get("error", "") if isinstance(body, dict) else ""
        return False, f"OPA health HTTP {status} {error}".strip()

    return check


def opa_check(health: ReadinessCheck, breaker: CircuitBreaker) -> ReadinessCheck:
    """``health`` (usually :func:`opa_bundles_check`), but not ready while ``breaker``
    is open (every Check is then denied ``opa_circuit_open`` without asking OPA); the
    detail names the breaker's state."""

    async def check() -> tuple[bool, str]:
        if breaker.state == OPEN:
            return False, "circuit open"
        ok, detail = await health()
        return ok, f"{detail}; circuit {breaker.state}"

    return check


def bundle_check(watcher: BundleWatcher) -> ReadinessCheck:
    """Ready once ``watcher`` has seen a bundle revision; the detail names it."""

    async def check() -> tuple[bool, str]:
        if watcher.revision is None:
            return False, "no bundle revision seen yet"
        return True, f"revision {watcher.revision}"

    return check


def redis_check(limiter: RedisLimiter, mode: str) -> ReadinessCheck:
    """The Redis rate-limit backend. ``mode`` is ``AUTHZ_REDIS_FAILURE_MODE``: with
    ``deny`` an unreachable Redis makes the pod not ready (every limited check is
    denied); with ``fallback`` it only degrades the limit, so the pod stays ready."""

    async def check() -> tuple[bool, str]:
        if limiter.available:
            return True, "redis"
        return mode != "deny", f"redis unreachable ({mode})"

    return check


def secrets_check(secrets: SecretStore) -> ReadinessCheck:
    """Ready while the secrets file is loaded; the detail counts its credentials (never
    names or values)."""

    async def check() -> tuple[bool, str]:
        if secrets.loaded:
            return True, f"{len(secrets.references)} credentials"
        return False, "secrets file missing or malformed"

    return check
