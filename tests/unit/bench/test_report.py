"""The benchmark's tables, ratios and plot, from a results document."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.report import (
    RATIO_NAMES,
    cpu_at_max,
    fmt_ms,
    fmt_ratio,
    format_ratios,
    format_scale_table,
    format_setup_table,
    format_table,
    ratios,
    render,
)
from tests.helpers.bench_results import RESULTS


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "n/a"), (0.4123, "0.412"), (3.4123, "3.41"), (41.23, "41.2"), (412.3, "412")],
)
def test_fmt_ms(value: float | None, text: str) -> None:
    assert fmt_ms(value) == text


def test_fmt_ratio() -> None:
    assert fmt_ratio(None) == "n/a"
    assert fmt_ratio(0.256) == "0.26"


def test_format_table_aligns_columns() -> None:
    text = format_table(["setup", "rps"], [["limit", "10"], ["authz", "1,000"]])
    assert text.splitlines() == [
        "setup |   rps",
        "------+------",
        "limit |    10",
        "authz | 1,000",
    ]


def test_format_table_rejects_ragged_rows() -> None:
    with pytest.raises(ValueError, match="cells"):
        format_table(["a", "b"], [["1"]])


def test_ratios() -> None:
    values = ratios(RESULTS)
    assert values["authz/peer throughput"] == pytest.approx(0.25)
    assert values["authz/peer p99 at 1000 rps"] == pytest.approx(3.0)
    assert values["authz/limit throughput"] == pytest.approx(0.125)
    assert values["distinct authz/peer throughput"] == pytest.approx(0.3)
    assert values["authz p50 100,000/100 keys"] == pytest.approx(1.1)
    # peer 0.4 ms of CPU per request, authz 1.0 (0.6 + 0.3 + Envoy 0.1).
    assert values["authz/peer requests per CPU-second"] == pytest.approx(0.4)


def test_cpu_at_max_reads_the_sustained_step() -> None:
    assert cpu_at_max(RESULTS["setups"]["peer"]) == {"envoy": 0.1, "peer": 0.3}
    assert cpu_at_max(RESULTS["setups"]["peer"], "distinct") is None
    assert cpu_at_max({}) is None


def test_ratios_without_a_peer_are_not_available() -> None:
    results = {"setups": {k: v for k, v in RESULTS["setups"].items() if k != "peer"}}
    values = ratios(results)
    assert values["authz/peer throughput"] is None
    assert values["authz/limit throughput"] == pytest.approx(0.125)


def test_final_ratio_line() -> None:
    line = format_ratios(ratios(RESULTS), RATIO_NAMES)
    assert line == (
        "ratios: authz/peer throughput 0.25 | authz/peer p99 at 1000 rps 3.00 | "
        "authz/limit throughput 0.12"
    )
    assert format_ratios({}, RATIO_NAMES).count("n/a") == 3


def test_setup_table() -> None:
    lines = format_setup_table(RESULTS, [500, 1000]).splitlines()
    assert lines[0].split(" | ")[0].strip() == "setup"
    assert "p50/p99/p99.9 ms @1000" in lines[0]
    limit, peer, authz = lines[2:]
    assert limit.split(" | ")[:2] == ["limit", "  8,000"]
    assert "0.500 / 1.50 / 3.00" in limit
    assert limit.split(" | ")[5].strip() == "- + 0.050"  # no decider for Envoy alone
    assert "n/a" in limit  # no distinct-key run
    assert "3,000" in peer
    assert "3.00 / 12.0 / 24.0 (2 err)" in authz
    assert "0.900 + 0.100" in authz  # decider CPU = authz 0.6 + opa 0.3, then Envoy
    assert "authz 60, opa 70" in authz


def test_scale_table() -> None:
    lines = format_scale_table(RESULTS).splitlines()
    assert "peer p50/p99 ms" in lines[0]
    assert lines[2].startswith("100     |")
    assert lines[3].startswith("100,000 |")
    assert "authz 60, opa 150" in lines[3]


def test_render_ends_with_the_ratio_line() -> None:
    lines = render(RESULTS).splitlines()
    assert lines[-1].startswith("ratios: authz/peer throughput 0.25 |")
    assert lines[-2].startswith("more ratios: distinct authz/peer throughput 0.30")
    assert lines[-3].startswith("note: at 1000 rps some requests failed (authz 2 errors)")


def test_plot_writes_a_png(tmp_path: Path) -> None:
    from bench.report import plot

    path = plot(RESULTS, [500, 1000], tmp_path / "latency.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_max_without_a_measured_ceiling_is_a_lower_bound() -> None:
    results = {
        "setups": {"limit": {"search": {"skewed": {"max_rps": 4890, "ceiling_measured": False}}}}
    }
    row = format_setup_table(results, [500]).splitlines()[2]
    assert row.split(" | ")[1].strip() == ">=4,890"
