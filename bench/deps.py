"""Why authz uses the libraries it does, measured: ``scripts/bench-deps``.

Two choices against a library named for the job, each measured in one run as a ratio to
what authz uses (the numbers and the reasons are recorded in ``docs/decisions.md``):

- **The OPA query** (one small ``POST /v1/data/<path>`` per cache miss): authz's
  :class:`authz.core.opa.OpaClient` (:mod:`authz.core.http1`: kept-alive HTTP/1.1 with
  httptools' parser, orjson) against an aiohttp ``ClientSession`` (kept-alive, what the
  client used before), ``httpx.AsyncClient`` and ``opa-python-client``'s
  ``AsyncOpaClient.query_rule``, all
  against the same real OPA (``AUTHZ_OPA_BIN``) on 127.0.0.1 with a one-rule policy.
  Measured: client CPU seconds per query (``time.process_time``), rounds interleaved so
  a noisy machine slows every client alike.
- **Envoy's protobuf messages**: ``xds-protos`` (protobuf's upb runtime, the code Envoy's
  own ``.proto`` files compile to with grpcio-tools) against ``envoy-data-plane``
  (betterproto2 dataclasses): CPU per CheckRequest parse.

Run with the packages of the comparison installed (``scripts/bench-deps`` makes a venv of
its own for them; they are not dependencies of authz).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from authz.tools import launch as launcher

_POLICY = """package bench
import rego.v1
default decision := {"allowed": false}
decision := {"allowed": true, "headers": {"x-authz-key-id": input.key}} if {
	startswith(input.key, "k")
}
"""
_INPUT: dict[str, Any] = {
    "key": "key-123",
    "attributes": {
        "request": {
            "http": {
                "method": "GET",
                "path": "/api/v1/items?limit=10",
                "headers": {f"x-header-{i}": "v" * 24 for i in range(12)},
            }
        }
    },
}


async def _cpu_per_call(call: Callable[[], Awaitable[Any]], n: int) -> float:
    for _ in range(50):  # warm the pool and the caches
        await call()
    started = time.process_time()
    for _ in range(n):
        await call()
    return (time.process_time() - started) / n


async def _opa_clients(port: int, n: int, rounds: int) -> dict[str, float]:
    """Median client CPU seconds per query, by client."""
    import aiohttp
    import httpx
    import orjson
    from opa_client.opa_async import AsyncOpaClient

    from authz.core.opa import OpaClient

    url = f"http://127.0.0.1:{port}"
    authz_client = OpaClient(url, pool_size=8)
    httpx_client = httpx.AsyncClient(base_url=url)
    aiohttp_session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=8),
        headers={"Accept-Encoding": "identity"},
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )
    opa_py = AsyncOpaClient(host="127.0.0.1", port=port)
    await opa_py._init_session()  # what its __aenter__ does

    async def with_authz() -> Any:
        return (await authz_client.evaluate("bench/decision", _INPUT, 5.0)).result

    async def with_aiohttp() -> Any:
        async with aiohttp_session.post(
            f"{url}/v1/data/bench/decision?provenance",
            data=orjson.dumps({"input": _INPUT}),
            headers={"Content-Type": "application/json"},
        ) as resp:
            return orjson.loads(await resp.read())["result"]

    async def with_httpx() -> Any:
        resp = await httpx_client.post(
            "/v1/data/bench/decision",
            content=orjson.dumps({"input": _INPUT}),
            headers={"content-type": "application/json"},
        )
        return orjson.loads(resp.content)["result"]

    async def with_opa_python_client() -> Any:
        return (await opa_py.query_rule(_INPUT, "bench", "decision"))["result"]

    clients = {
        "authz OpaClient (http1: httptools + orjson)": with_authz,
        "aiohttp.ClientSession + orjson": with_aiohttp,
        "httpx.AsyncClient + orjson": with_httpx,
        "opa-python-client AsyncOpaClient": with_opa_python_client,
    }
    for call in clients.values():  # every client must get the same answer
        assert await call() == {"allowed": True, "headers": {"x-authz-key-id": "key-123"}}
    samples: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(rounds):
        for name, call in clients.items():
            samples[name].append(await _cpu_per_call(call, n))
    await authz_client.close()
    await httpx_client.aclose()
    await aiohttp_session.close()
    await opa_py.close_connection()
    return {name: statistics.median(values) for name, values in samples.items()}


def _protobuf_parsers(n: int, rounds: int) -> dict[str, float]:
    """Median CPU seconds per CheckRequest parse, by library."""
    from envoy.service.auth.v3 import external_auth_pb2
    from envoy_data_plane.envoy.service.auth.v3 import CheckRequest as DataPlaneCheckRequest

    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host = "GET", "/api/v1/items?limit=10", "api.example.com"
    for i in range(12):
        http.headers[f"x-header-{i}"] = "v" * 24
    http.headers["x-api-key"] = "k" * 40
    request.attributes.context_extensions["decision_path"] = "authz/gateway/decision"
    request.attributes.source.address.socket_address.address = "10.0.0.1"
    payload = request.SerializeToString()
    assert DataPlaneCheckRequest.parse(payload).attributes.request.http.headers["x-api-key"]

    parsers: dict[str, Callable[[], Any]] = {
        "xds-protos (protobuf upb)": lambda: external_auth_pb2.CheckRequest.FromString(payload),
        "envoy-data-plane (betterproto2)": lambda: DataPlaneCheckRequest.parse(payload),
    }
    samples: dict[str, list[float]] = {name: [] for name in parsers}
    for _ in range(rounds):
        for name, parse in parsers.items():
            started = time.process_time()
            for _ in range(n):
                parse()
            samples[name].append((time.process_time() - started) / n)
    return {name: statistics.median(values) for name, values in samples.items()}


def _print(title: str, results: dict[str, float]) -> None:
    baseline = next(iter(results.values()))
    print(f"\n{title}")
    for name, value in results.items():
        print(f"  {name:<40} {value * 1e6:9.1f} us CPU   x{value / baseline:5.2f}")


def main(argv: list[str] | None = None) -> int:
    """Run both comparisons and print CPU per operation with ratios to authz's choice."""
    parser = argparse.ArgumentParser(prog="bench-deps", description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=2000, help="OPA queries per round")
    parser.add_argument("--parses", type=int, default=20000, help="parses per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        opa_bin = launcher.find_binary("opa", "AUTHZ_OPA_BIN")
    except launcher.LaunchError as exc:
        raise SystemExit(f"bench-deps: {exc}") from None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "bench.rego").write_text(_POLICY, encoding="utf-8")
        port = launcher.free_port()
        launch = launcher.opa_launch(opa_bin, port, str(Path(tmp) / "bench.rego"))
        with launcher.started(launch, Path(tmp) / "opa.log", timeout_s=20):
            opa = asyncio.run(_opa_clients(port, args.queries, args.rounds))
    _print("OPA query, client CPU per call (ratio to authz's OpaClient)", opa)
    _print(
        "CheckRequest parse, CPU per call (ratio to xds-protos)",
        _protobuf_parsers(args.parses, args.rounds),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
