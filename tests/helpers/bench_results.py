"""A benchmark results document (the shape bench/run.py writes) for the report tests."""

from __future__ import annotations

from typing import Any

__all__ = ["RESULTS", "WORKLOAD_RESULTS"]


def _fixed(p50: float, p99: float, cpu: dict[str, float], errors: int = 0) -> dict[str, Any]:
    return {
        "step": {
            "latency_ms": {"p50": p50, "p90": p50 * 1.5, "p99": p99, "p99.9": p99 * 2},
            "errors": errors,
        },
        "cpu_per_1k": cpu,
    }


def _scale(p50: float, p99: float, rss: dict[str, int]) -> dict[str, Any]:
    return {
        "step": {"latency_ms": {"p50": p50, "p99": p99}},
        "memory": {role: {"rss_kb": kb, "hwm_kb": kb} for role, kb in rss.items()},
    }


def _search(best: int, cpu: dict[str, float]) -> dict[str, Any]:
    failed = {"rate": best + 100, "sustained": False, "cpu_per_1k": {k: 9.0 for k in cpu}}
    return {
        "max_rps": best,
        "steps": [{"rate": best, "sustained": True, "cpu_per_1k": cpu}, failed],
    }


RESULTS: dict[str, Any] = {
    "setups": {
        "limit": {
            "fixed": {
                "500": _fixed(0.4, 1.0, {"envoy": 0.05}),
                "1000": _fixed(0.5, 1.5, {"envoy": 0.05}),
            },
            "search": {"skewed": _search(8000, {"envoy": 0.05})},
            "memory": {"envoy": {"hwm_kb": 40 * 1024}},
        },
        "peer": {
            "fixed": {
                "500": _fixed(1.0, 2.0, {"envoy": 0.1, "peer": 0.3}),
                "1000": _fixed(1.2, 4.0, {"envoy": 0.1, "peer": 0.3}),
            },
            "search": {
                "skewed": _search(4000, {"envoy": 0.1, "peer": 0.3}),
                "distinct": {"max_rps": 3000},
            },
            "memory": {"peer": {"hwm_kb": 80 * 1024}},
        },
        "authz": {
            "fixed": {
                "500": _fixed(2.0, 5.0, {"envoy": 0.1, "authz": 0.6, "opa": 0.3}),
                "1000": _fixed(3.0, 12.0, {"envoy": 0.1, "authz": 0.6, "opa": 0.3}, errors=2),
            },
            "search": {
                "skewed": _search(1000, {"envoy": 0.1, "authz": 0.6, "opa": 0.3}),
                "distinct": {"max_rps": 900},
            },
            "memory": {"authz": {"hwm_kb": 60 * 1024}, "opa": {"hwm_kb": 70 * 1024}},
        },
    },
    "scale": {
        "peer": {
            "100": _scale(1.0, 2.0, {"peer": 50 * 1024}),
            "100000": _scale(1.1, 2.5, {"peer": 200 * 1024}),
        },
        "authz": {
            "100": _scale(2.0, 5.0, {"authz": 60 * 1024, "opa": 50 * 1024}),
            "100000": _scale(2.2, 6.0, {"authz": 60 * 1024, "opa": 150 * 1024}),
        },
    },
}


def _workload(
    best: int, cpu: dict[str, float], p99_1000: float, cache: tuple[int, int] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(search, workload record) of one setup on one workload."""
    record: dict[str, Any] = {
        "fixed": {
            "500": _fixed(1.0, p99_1000 / 2, cpu),
            "1000": _fixed(2.0, p99_1000, cpu),
        }
    }
    if cache is not None:
        hits, misses = cache
        record["cache"] = {"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses)}
    return _search(best, cpu), record


def _setup(**workloads: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    return {
        "search": {name: search for name, (search, _) in workloads.items()},
        "workloads": {name: record for name, (_, record) in workloads.items()},
    }


# Five setups on three workloads, as bench/run.py writes them (the ceiling without a
# distinct run, authz-bare on realistic only).
WORKLOAD_RESULTS: dict[str, Any] = {
    "setups": {
        "limit": _setup(skewed=_workload(9000, {"envoy": 0.05}, 2.0)),
        "ceiling": _setup(
            skewed=_workload(4000, {"envoy": 0.2, "ceiling": 0.1}, 3.0),
            realistic=_workload(3200, {"envoy": 0.25, "ceiling": 0.1}, 4.0),
        ),
        "peer": _setup(
            skewed=_workload(1000, {"envoy": 0.5, "peer": 1.0}, 400.0),
            realistic=_workload(800, {"envoy": 0.5, "peer": 1.2}, 300.0),
            distinct=_workload(1200, {"envoy": 0.5, "peer": 0.8}, 200.0),
        ),
        "authz": _setup(
            skewed=_workload(1400, {"envoy": 0.5, "authz": 0.6, "opa": 0.1}, 100.0, (950, 50)),
            realistic=_workload(640, {"envoy": 0.5, "authz": 1.0, "opa": 0.5}, 600.0, (1, 3)),
            distinct=_workload(600, {"envoy": 0.5, "authz": 1.2, "opa": 0.8}, 500.0, (0, 10)),
        ),
        "authz-bare": _setup(
            realistic=_workload(800, {"envoy": 0.5, "authz": 0.8, "opa": 0.5}, 300.0, (1, 1)),
        ),
    },
    "options": {"rates": [500, 1000]},
}
