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
    format_workload_ratios,
    format_workload_table,
    ratios,
    render,
    workload_ratios,
)
from tests.helpers.bench_results import RESULTS, WORKLOAD_RESULTS


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


# -- per workload: the ceiling, the realistic workload, hit rates --------------------


def _rows(text: str) -> dict[tuple[str, str], list[str]]:
    lines = text.splitlines()
    header = [cell.strip() for cell in lines[0].split(" | ")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.split(" | ")]
        rows[(cells[0], cells[1])] = cells
        assert len(cells) == len(header)
    return rows


def test_workload_table_has_a_row_per_setup_and_workload_run() -> None:
    rows = _rows(format_workload_table(WORKLOAD_RESULTS, [500, 1000]))
    assert list(rows) == [
        ("skewed", "limit"),
        ("skewed", "ceiling"),
        ("skewed", "peer"),
        ("skewed", "authz"),
        ("realistic", "ceiling"),
        ("realistic", "peer"),
        ("realistic", "authz"),
        ("realistic", "authz-bare"),
        ("distinct", "peer"),
        ("distinct", "authz"),
    ]


@pytest.mark.parametrize(
    ("row", "max_rps", "cpu", "hit_rate", "over_peer", "over_ceiling"),
    [
        (("skewed", "authz"), "1,400", "0.700 + 0.500", "95%", "1.40", "0.35"),
        (("skewed", "ceiling"), "4,000", "0.100 + 0.200", "n/a", "4.00", "1.00"),
        (("realistic", "authz"), "640", "1.50 + 0.500", "25%", "0.80", "0.20"),
        (("realistic", "authz-bare"), "800", "1.30 + 0.500", "50%", "1.00", "0.25"),
        (("realistic", "peer"), "800", "1.20 + 0.500", "n/a", "1.00", "0.25"),
        # No distinct run of the ceiling: its skewed max (4,000) is the yardstick.
        (("distinct", "authz"), "600", "2.00 + 0.500", "0%", "0.50", "0.15"),
        (("skewed", "limit"), "9,000", "- + 0.050", "n/a", "9.00", "2.25"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, tuple) else None,
)
def test_workload_table_row(
    row: tuple[str, str],
    max_rps: str,
    cpu: str,
    hit_rate: str,
    over_peer: str,
    over_ceiling: str,
) -> None:
    cells = _rows(format_workload_table(WORKLOAD_RESULTS, [500, 1000]))[row]
    assert cells[2] == max_rps
    assert cells[5:] == [cpu, hit_rate, over_peer, over_ceiling]


def test_workload_table_shows_latency_at_each_fixed_rate() -> None:
    cells = _rows(format_workload_table(WORKLOAD_RESULTS, [500, 1000]))[("realistic", "authz")]
    assert cells[3:5] == ["1.00 / 300", "2.00 / 600"]


def test_workload_ratios_against_peer_and_ceiling() -> None:
    values = workload_ratios(WORKLOAD_RESULTS)
    assert list(values) == ["skewed", "realistic", "distinct"]
    realistic = values["realistic"]
    assert realistic["authz/peer throughput"] == pytest.approx(0.8)
    assert realistic["authz/ceiling throughput"] == pytest.approx(0.2)
    assert realistic["authz/peer p99 at 1000 rps"] == pytest.approx(2.0)
    # authz + OPA 1.5 ms against the plugin's 1.2.
    assert realistic["authz/peer decider CPU per request"] == pytest.approx(1.25)
    assert realistic["authz hit rate"] == pytest.approx(0.25)
    assert realistic["authz-bare/peer throughput"] == pytest.approx(1.0)
    assert realistic["authz/authz-bare throughput"] == pytest.approx(0.8)
    assert realistic["peer/ceiling throughput"] == pytest.approx(0.25)
    assert values["skewed"]["authz/ceiling throughput"] == pytest.approx(0.35)
    assert "authz/authz-bare throughput" not in values["skewed"]  # no bare skewed run
    assert values["distinct"]["authz/ceiling throughput"] == pytest.approx(0.15)
    assert values["distinct"]["authz hit rate"] == 0.0


def test_workload_ratio_lines_print_hit_rates_in_percent() -> None:
    text = format_workload_ratios(workload_ratios(WORKLOAD_RESULTS))
    lines = text.splitlines()
    assert lines[1].startswith(
        "realistic: authz/peer throughput 0.80 | authz/ceiling throughput 0.20"
    )
    assert "authz hit rate 25%" in lines[1]
    assert "authz/authz-bare throughput 0.80" in lines[1]


def test_headline_ratios_include_authz_over_the_ceiling() -> None:
    values = ratios(WORKLOAD_RESULTS)
    assert values["authz/ceiling throughput"] == pytest.approx(0.35)
    assert values["authz/peer throughput"] == pytest.approx(1.4)
    assert "authz/ceiling throughput" not in ratios(RESULTS)  # a run without the ceiling


def test_render_prints_the_workload_table_and_keeps_the_ratio_line_last() -> None:
    text = render(WORKLOAD_RESULTS)
    assert "realistic | authz-bare" in text
    assert "realistic: authz/peer throughput 0.80" in text
    assert text.splitlines()[-1].startswith("ratios: authz/peer throughput 1.40 |")


def test_workload_table_reads_older_results_without_workloads() -> None:
    # Results saved before per-workload records: the skewed rates are the setup's "fixed".
    rows = _rows(format_workload_table(RESULTS, [500, 1000]))
    assert rows[("skewed", "authz")][3:5] == ["2.00 / 5.00", "3.00 / 12.0 (2 err)"]
    assert rows[("skewed", "authz")][6] == "n/a"  # no hit rate recorded
    assert rows[("distinct", "authz")][2] == "900"


def test_max_when_no_step_sustained_is_below_the_lowest_rate_tried() -> None:
    steps = [{"rate": 380, "sustained": False}, {"rate": 250, "sustained": False}]
    results = {"setups": {"authz": {"search": {"realistic": {"max_rps": None, "steps": steps}}}}}
    row = format_workload_table(results, [500]).splitlines()[2]
    assert row.split(" | ")[2].strip() == "<250"
    assert workload_ratios(results)["realistic"]["authz/peer throughput"] is None
