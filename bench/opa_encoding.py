"""OPA answers with and without gzip: CPU per request of authz's OPA client and of OPA.

Not a test (numbers, no assertions); the numbers go to ``docs/performance.md``::

    python -m bench.opa_encoding [--requests 3000]

Starts a real OPA (``AUTHZ_OPA_BIN`` or ``opa`` on PATH) on a free 127.0.0.1 port with a
one-rule policy that echoes ``input.who`` in the decision, then sends ``--requests``
sequential evaluations per case from :class:`authz.core.opa.OpaClient`, once with
``Accept-Encoding: identity`` (what the client sends) and once with ``gzip`` (what aiohttp,
its client before, sends by default), for a small decision (about 100 bytes, below OPA's
1024-byte gzip threshold) and a 5 KB one. CPU is ``utime + stime`` of this process and of OPA
(``/proc/<pid>/stat``), per request, in microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from authz.core.opa import OpaClient
from authz.tools.launch import find_binary, free_port, opa_launch, started
from bench.procstat import read_cpu_seconds

POLICY = 'package bench\n\ndecision := {"allowed": true, "echo": input.who}\n'


async def _measure(url: str, opa_pid: int, encoding: str, who: str, requests: int) -> str:
    # The one knob compared: what the request's Accept-Encoding says.
    client = OpaClient(url, accept_encoding=encoding)
    try:
        for _ in range(200):  # warm up the pool and OPA's query cache
            await client.evaluate("bench/decision", {"who": who}, 5.0)
        own, opa = time.process_time(), read_cpu_seconds(opa_pid)
        started = time.perf_counter()
        for _ in range(requests):
            await client.evaluate("bench/decision", {"who": who}, 5.0)
        wall = time.perf_counter() - started
        own, opa = time.process_time() - own, read_cpu_seconds(opa_pid) - opa
    finally:
        await client.close()
    per = 1e6 / requests
    return (
        f"| {len(who) + 40} B | {encoding} | {own * per:.0f} | {opa * per:.0f} | {wall * per:.0f} |"
    )


def main() -> None:
    """Run the cases and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    opa_bin = find_binary("opa", "AUTHZ_OPA_BIN")
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "bench.rego"
        policy.write_text(POLICY, encoding="utf-8")
        port = free_port()
        launch = opa_launch(opa_bin, port, str(policy))
        with started(launch, Path(tmp) / "opa.log") as opa:
            print(
                "| answer | Accept-Encoding | authz client CPU µs/req | OPA CPU µs/req "
                "| wall µs/req |"
            )
            print("|---|---|---|---|---|")
            for who in ("w" * 60, "w" * 5000):
                for encoding in ("identity", "gzip", "identity", "gzip"):
                    print(
                        asyncio.run(
                            _measure(
                                f"http://127.0.0.1:{port}", opa.pid, encoding, who, args.requests
                            )
                        )
                    )


if __name__ == "__main__":
    main()
