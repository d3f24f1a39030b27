"""What a run measures: the setups, workloads and steps ``--only`` picks, and the
bundles they need (no process is started)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bench.rig import Binaries, Running
from bench.run import DEFAULT, SETUP_WORKLOADS, Bench, Options
from bench.workload import bench_key
from tests.helpers import ROOT


def _opts(*argv: str) -> Options:
    from bench.__main__ import options, parse_args

    return options(parse_args(list(argv)))


def test_a_full_run_measures_every_setup_on_its_workloads() -> None:
    opts = _opts()
    assert opts.plan() == {
        "limit": ("skewed",),
        "ceiling": ("skewed", "realistic"),
        "peer": ("skewed", "realistic", "distinct"),
        "authz": ("skewed", "realistic", "distinct"),
        "authz-bare": ("realistic",),
    }
    assert opts.scale_setups() == ["peer", "authz"]
    assert opts.runs("hostile")
    assert opts.bundle_sizes() == [100, 10_000, 100_000]


@pytest.mark.parametrize(
    ("only", "plan", "scale", "hostile"),
    [
        ("hostile", {}, [], True),
        ("scale", {}, ["peer", "authz"], False),
        (
            "realistic",
            {s: ("realistic",) for s in ("ceiling", "peer", "authz", "authz-bare")},
            [],
            False,
        ),
        ("authz", {"authz": SETUP_WORKLOADS["authz"]}, ["authz"], True),
        ("authz,peer,distinct", {"peer": ("distinct",), "authz": ("distinct",)}, [], False),
        # Both named: run even where the default plan leaves the pair out.
        ("ceiling,distinct", {"ceiling": ("distinct",)}, [], False),
        ("limit", {"limit": ("skewed",)}, [], False),
        ("authz-bare,realistic,hostile", {"authz-bare": ("realistic",)}, [], False),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_only_picks_setups_workloads_and_steps(
    only: str, plan: dict[str, tuple[str, ...]], scale: list[str], hostile: bool
) -> None:
    opts = _opts("--only", only)
    assert opts.plan() == plan
    assert opts.scale_setups() == scale
    assert opts.runs("hostile") is hostile


def test_setups_option_narrows_the_plan() -> None:
    opts = _opts("--setups", "ceiling,authz", "--only", "skewed,hostile")
    assert opts.plan() == {"ceiling": ("skewed",), "authz": ("skewed",)}
    assert opts.runs("hostile")
    assert opts.bundle_sizes() == [10_000]


@pytest.mark.parametrize(
    ("only", "sizes"),
    [("distinct", [100_000]), ("realistic", [10_000]), ("hostile", [10_000])],
    ids=["distinct", "realistic", "hostile"],
)
def test_only_builds_the_bundles_it_needs(only: str, sizes: list[int]) -> None:
    assert _opts("--only", only).bundle_sizes() == sizes


def test_only_rejects_unknown_names() -> None:
    with pytest.raises(SystemExit):
        _opts("--only", "authz,nosuch")
    with pytest.raises(ValueError, match="unknown names"):
        replace(DEFAULT, only=("nosuch",)).plan()


def test_authz_runs_as_shipped_by_default() -> None:
    # No AUTHZ_* override: the decision log and the audit trail are on, as shipped.
    assert _opts().authz_env == {}
    assert _opts("--quick").authz_env == {}
    assert _opts("--authz-env", "AUTHZ_DECISION_CACHE_TTL_S=5").authz_env == {
        "AUTHZ_DECISION_CACHE_TTL_S": "5"
    }


def test_authz_reaches_opa_over_the_shipped_unix_socket_by_default() -> None:
    # The stack and the deployments ship AUTHZ_OPA_URL=unix://...: so does the benchmark.
    assert DEFAULT.opa_socket is True
    assert _opts().opa_socket is True
    assert _opts("--quick").opa_socket is True
    assert _opts("--opa-socket").opa_socket is True
    assert _opts("--opa-tcp").opa_socket is False  # TCP stays measurable


def test_opa_transport_options_exclude_each_other() -> None:
    with pytest.raises(SystemExit):
        _opts("--opa-socket", "--opa-tcp")


def _bench(tmp_path: Path) -> Bench:
    binaries = Binaries(envoy="envoy", opa="opa", vegeta="vegeta")
    return Bench(ROOT, replace(DEFAULT, keys=1000, hot_keys=100), binaries, tmp_path, None)


def _sent(path: Path, header: str) -> list[str]:
    prefix = header.lower() + ": "
    return [
        line.split(": ", 1)[1]
        for line in path.read_text().splitlines()
        if line.lower().startswith(prefix)
    ]


def test_realistic_targets_of_one_session_never_repeat_a_request_id(tmp_path: Path) -> None:
    bench = _bench(tmp_path)
    targets_for = bench._workload_targets(Running("authz", "http://127.0.0.1:1"), "realistic")
    files = [targets_for("realistic-500", 300), targets_for("realistic-probe", 700)]
    ids = [i for f in files for i in _sent(f, "X-Request-Id")]
    assert len(ids) == len(set(ids)) == 1000
    # A new session (another setup) sends the same sequence from its start.
    again = bench._workload_targets(Running("peer", "http://127.0.0.1:2"), "realistic")
    assert _sent(again("realistic-500", 300), "X-Request-Id") == ids[:300]


def test_distinct_targets_of_one_session_never_repeat_a_key(tmp_path: Path) -> None:
    bench = _bench(tmp_path)
    targets_for = bench._workload_targets(Running("authz", "http://127.0.0.1:1"), "distinct")
    keys = [k for n in (400, 600) for k in _sent(targets_for(f"d-{n}", n), "X-API-Key")]
    assert len(keys) == len(set(keys)) == 1000


def test_skewed_targets_are_the_fixed_zipf_sequence(tmp_path: Path) -> None:
    bench = _bench(tmp_path)
    targets_for = bench._workload_targets(Running("authz", "http://127.0.0.1:1"), "skewed")
    keys = _sent(targets_for("skewed-500", 10), "X-API-Key")
    assert keys == [bench_key(i) for i in bench.skewed]  # whatever the count: vegeta cycles
