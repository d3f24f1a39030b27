"""Replay recorded decisions against another bundle: what would change?

``authz audit replay --bundle OTHER.tar.gz`` starts a throwaway OPA serving that bundle
on 127.0.0.1, re-evaluates every recorded input (the same masked input the live OPA saw)
at its recorded decision path, and compares the policy decision with the recorded one:
allowed and reason. It prints a summary and each changed decision. Rate limits, modes
and overrides are not replayed: this compares policies.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from authz.core.decision import parse_decision
from authz.core.errors import DataFileError, PolicyError
from authz.core.opa import PolicyEngine
from authz.runtime.audit import AuditEntry
from authz.tools.launch import opa_launch, started

__all__ = ["ReplayChange", "ReplayReport", "describe", "opa_serving", "replay"]


@dataclass(frozen=True, slots=True)
class ReplayChange:
    """One decision whose outcome differs under the other bundle."""

    seq: int
    decision_id: str
    time: str
    decision_path: str
    identity: Mapping[str, str]
    before: str
    after: str


@dataclass(slots=True)
class ReplayReport:
    """Counts, and the changed decisions in log order. ``skipped``: entries without an
    input (bypass, admin) or without a recorded policy decision to compare with."""

    evaluated: int = 0
    unchanged: int = 0
    skipped: int = 0
    errors: int = 0
    changed: list[ReplayChange] = field(default_factory=list)

    def summary(self) -> str:
        """One line: ``evaluated N: unchanged U, changed C (allow->deny a, deny->allow b,
        reason only r), errors E, skipped S``."""
        to_deny = sum(
            1 for c in self.changed if c.before.startswith("allow") and c.after.startswith("deny")
        )
        to_allow = sum(
            1 for c in self.changed if c.before.startswith("deny") and c.after.startswith("allow")
        )
        reason_only = len(self.changed) - to_deny - to_allow
        return (
            f"evaluated {self.evaluated}: unchanged {self.unchanged}, changed "
            f"{len(self.changed)} (allow->deny {to_deny}, deny->allow {to_allow}, reason only "
            f"{reason_only}), errors {self.errors}, skipped {self.skipped}"
        )


def _recorded(entry: AuditEntry) -> tuple[str, str]:
    """``(decision path, outcome)`` a decision entry recorded. Raises DataFileError naming
    the entry when the row is not what authz writes (a hand-edited or foreign trail)."""
    body, where = entry.body, f"audit entry {entry.seq}"
    path = body.get("decision_path")
    if not isinstance(path, str):
        raise DataFileError(f"{where}: decision_path: expected a string, got {path!r:.64}")
    policy = body.get("policy")
    reason = policy.get("reason") if isinstance(policy, Mapping) else None
    if (
        not isinstance(policy, Mapping)
        or "allowed" not in policy
        or not (reason is None or isinstance(reason, str))
    ):
        raise DataFileError(
            f"{where}: policy: expected an object with allowed and a string reason, "
            f"got {policy!r:.64}"
        )
    return path, _outcome(bool(policy["allowed"]), reason)


def _outcome(allowed: bool, reason: str | None) -> str:
    return f"{'allow' if allowed else 'deny'} ({reason or ('allowed' if allowed else 'denied')})"


async def replay(
    entries: Iterable[AuditEntry], engine: PolicyEngine, timeout_s: float = 5.0
) -> ReplayReport:
    """Re-evaluate each decision entry's input with ``engine``; compare with its recorded
    policy decision. Raises DataFileError naming the first entry whose recorded decision
    path or policy decision is malformed."""
    report = ReplayReport()
    for entry in entries:
        body = entry.body
        policy = body.get("policy")
        document = body.get("input")
        if entry.kind != "decision" or not isinstance(document, dict) or not policy:
            report.skipped += 1
            continue
        decision_path, before = _recorded(entry)
        report.evaluated += 1
        try:
            evaluation = await engine.evaluate(decision_path, document, timeout_s)
            decision = parse_decision(evaluation.result)
        except PolicyError as exc:
            report.errors += 1
            report.changed.append(_change(entry, before, f"error ({exc.code})"))
            continue
        after = _outcome(decision.allowed, decision.reason_code)
        if before == after:
            report.unchanged += 1
        else:
            report.changed.append(_change(entry, before, after))
    return report


def _change(entry: AuditEntry, before: str, after: str) -> ReplayChange:
    body = entry.body
    identity = {k: str(body[k]) for k in ("key_id", "role", "sandbox_id", "service") if k in body}
    return ReplayChange(
        entry.seq,
        entry.decision_id,
        str(body.get("time", "")),
        str(body["decision_path"]),
        identity,
        before,
        after,
    )


@contextlib.contextmanager
def opa_serving(bundle: Path, opa_bin: str, port: int, timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``opa run --server`` with ``bundle`` on 127.0.0.1:``port`` until the block ends
    (:func:`authz.tools.launch.opa_launch`); yields its URL once the bundle is active.
    Raises LaunchError (a RuntimeError) if OPA does not come up: ``"OPA exited early"``
    or ``"OPA not ready after Ns"``, the message ending with OPA's output."""
    launch = opa_launch(opa_bin, port, "--bundle", str(bundle), ready_path="/health?bundles")
    with tempfile.TemporaryDirectory() as tmp, started(launch, Path(tmp) / "opa.log", timeout_s):
        yield launch.url


def describe(change: ReplayChange) -> str:
    """One human line for a changed decision."""
    who = " ".join(f"{k}={v}" for k, v in change.identity.items())
    return (
        f"#{change.seq} {change.time} {change.decision_id} {change.decision_path} {who}: "
        f"{change.before} -> {change.after}"
    ).replace("  ", " ")
