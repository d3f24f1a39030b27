"""What the decision sinks cost per decision on a cache hit, this tree against a git ref.

Not a test (numbers, no assertions); the numbers go to ``docs/performance.md`` ("The
records on a cache hit")::

    python -m bench.records [--ref REF] [--number 20000]

Times, with :mod:`timeit` (median of 3 runs of ``--number`` calls, microseconds per call),
each sink the shipped settings run for a decision the cache answered: the decision log
line in the ``authz`` format (:meth:`authz.runtime.logs.DecisionLog.line`), the whole
:meth:`~authz.runtime.logs.DecisionLog.record` to a stream that discards what it is given,
:meth:`authz.runtime.metrics.MetricsSink.record`, and the event loop's part of
:meth:`authz.runtime.audit.AuditTrail.record` (projection and copy; the queue put left
out, the writer thread not started), and the writer thread's part of an entry, the
row body (:meth:`authz.runtime.audit.projection._Projector.body` of the queued record;
it holds the GIL the event loop needs). The record is a gateway allow reused from the cache
with an identity of three fields and a typical input (seven headers). ``--ref``'s
``authz/`` (``git archive``) runs the same code in a child process, so both columns come
from one run on the same machine.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import timeit
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
# A gateway input as authz.core.input.build_input writes it (credentials as digests).
DOCUMENT: Final[dict[str, Any]] = {
    "attributes": {
        "source": {"address": {"socketAddress": {"address": "10.0.0.1", "portValue": 5555}}},
        "request": {
            "http": {
                "id": "42",
                "method": "GET",
                "headers": {
                    ":authority": "gateway",
                    ":method": "GET",
                    ":path": "/api/v1/items/1",
                    "x-api-key": "sha256:" + "0" * 64,
                    "user-agent": "curl/8.5.0",
                    "x-request-id": "f3a9c1d2-4b5e-4f60-8a71-92b3c4d5e6f7",
                    "accept": "*/*",
                },
                "path": "/api/v1/items/1",
                "host": "gateway",
                "scheme": "http",
                "protocol": "HTTP/1.1",
            }
        },
    },
    "version": {"ext_authz": "v3", "encoding": "protojson"},
    "parsed_path": ["api", "v1", "items", "1"],
    "parsed_query": {},
    "parsed_body": None,
    "truncated_body": False,
    "credentials": {"x-api-key": "0" * 64},
}


class _Discard(io.StringIO):
    def write(self, text: str) -> int:
        return len(text)


def measure(number: int) -> dict[str, float]:
    """Microseconds per call of each sink step, for the ``authz`` on ``sys.path``."""
    from authz.core.record import DecisionRecord
    from authz.runtime.audit import AuditTrail
    from authz.runtime.audit.store import _queued
    from authz.runtime.logs import DecisionLog
    from authz.runtime.metrics import Metrics, MetricsSink

    record = DecisionRecord(
        decision_id="0193a5b2-7c1e-7d3a-9f00-0123456789ab",
        timestamp=1_700_000_000.5,
        decision_path="authz/gateway/decision",
        allowed=True,
        reason="allowed",
        http_status=200,
        policy_allowed=True,
        policy_reason="allowed",
        tier="standard",
        cached_from="0193a5b2-7c1e-7d3a-9f00-0123456789aa",
        revision="1df535b8e2aa656b",
        identity={"key_id": "key-a", "role": "reader", "sandbox_id": "sbx-123"},
        request_id="f3a9c1d2-4b5e-4f60-8a71-92b3c4d5e6f7",
        method="GET",
        path="/api/v1/items/1",
        duration_s=0.000412,
        document=DOCUMENT,
        opa_result={"allowed": True},
    )
    log = DecisionLog(_Discard())
    metrics = MetricsSink(Metrics())
    with tempfile.TemporaryDirectory() as tmp:
        trail = AuditTrail(Path(tmp) / "audit.db")
        trail._put = lambda *_: None  # type: ignore[method-assign]  # the event loop's part only
        # The writer thread's part: the row body of the record as queued (slimmed input).
        projector = trail._projector
        queued = _queued(record, projector.slim(DOCUMENT))
        steps = {
            "decision log line (authz format)": lambda: log.line(record),
            "DecisionLog.record (discarding stream)": lambda: log.record(record),
            "MetricsSink.record": lambda: metrics.record(record),
            "AuditTrail.record, event-loop part": lambda: trail.record(record),
            "audit row body, writer thread": lambda: projector.body(queued),
        }
        result = {
            name: statistics.median(
                timeit.timeit(step, number=number) / number * 1e6 for _ in range(3)
            )
            for name, step in steps.items()
        }
        trail.close()
    return result


def measure_ref(ref: str, number: int) -> dict[str, float]:
    """:func:`measure` for ``ref``'s ``authz/``, in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", ref, "authz"], check=True, capture_output=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--number", str(number)],
            check=True,
            capture_output=True,
            text=True,
            env={"PYTHONPATH": tmp, "PATH": ""},
        ).stdout
    result: dict[str, float] = json.loads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", default="HEAD", help="the git ref to compare against")
    parser.add_argument("--number", type=int, default=20_000, help="calls per timing")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.number)))
        return
    before = measure_ref(args.ref, args.number)
    after = measure(args.number)
    print(f"{'step':42} {args.ref:>12} {'this tree':>12} {'ratio':>6}")
    for name, value in after.items():
        print(f"{name:42} {before[name]:10.2f} us {value:9.2f} us {value / before[name]:6.2f}")


if __name__ == "__main__":
    main()
