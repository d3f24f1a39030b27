"""Parsing vegeta's per-request results, percentiles, step summaries and verdicts."""

from __future__ import annotations

import io

import pytest

from bench.stats import Record, Step, parse_csv, percentile, summarize, sustained

# Two rows as `vegeta encode --to csv` writes them (body and headers base64, then the
# attack name, sequence, method and URL), the second a transport error with a comma.
CSV = (
    "1795313745386095448,200,1032213,0,12,,eyJvayI6dHJ1ZX0K,peer-x,0,GET,"
    "http://127.0.0.1:1/a,Q29udGVudC1MZW5ndGg6IDEy\n"
    '1795313745396499617,0,5000000000,0,0,"Get ""http://127.0.0.1:1/a"": timeout, retry",'
    ",peer-x,1,GET,http://127.0.0.1:1/a,\n"
)


def test_parse_csv() -> None:
    records = parse_csv(io.StringIO(CSV))
    assert records == [
        Record(1795313745386095448, 200, 1032213, ""),
        Record(1795313745396499617, 0, 5_000_000_000, 'Get "http://127.0.0.1:1/a": timeout, retry'),
    ]
    assert [r.ok for r in records] == [True, False]


def test_parse_csv_rejects_short_rows() -> None:
    with pytest.raises(ValueError, match="fields"):
        parse_csv(io.StringIO("1,200,3\n"))


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0], 50, 1.0),
        ([1.0, 2.0], 50, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 75, 3.0),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        ([float(i) for i in range(1, 1001)], 99, 990.0),
        ([float(i) for i in range(1, 1001)], 99.9, 999.0),
        ([float(i) for i in range(1, 101)], 99.9, 100.0),
    ],
    ids=["single", "pair-median", "four-median", "p75", "p100", "p99", "p99.9", "p99.9-small"],
)
def test_percentile_nearest_rank(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == expected


@pytest.mark.parametrize(("values", "q"), [([], 50), ([1.0], 0), ([1.0], 101)])
def test_percentile_rejects(values: list[float], q: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        percentile(values, q)


def _records(
    rate: int, seconds: int, latency_ms: float, codes: dict[int, int] | None = None
) -> list[Record]:
    """``rate * seconds`` requests evenly spaced from t=0, each answered after
    ``latency_ms``; ``codes`` overrides the status of the first requests."""
    out: list[Record] = []
    overrides = [code for code, n in (codes or {}).items() for _ in range(n)]
    for i in range(rate * seconds):
        code = overrides[i] if i < len(overrides) else 200
        out.append(Record(int(i * 1e9 / rate), code, int(latency_ms * 1e6)))
    return out


def test_summarize_a_steady_step() -> None:
    step = summarize("s", 100, 10, _records(100, 10, 2.0))
    assert step.requests == 1000
    assert step.ok == 1000
    assert step.errors == 0
    assert step.sent_rps == pytest.approx(100, rel=0.001)
    assert step.throughput == pytest.approx(100, rel=0.01)
    assert step.latency_ms["p50"] == 2.0
    assert step.latency_ms["p99.9"] == 2.0
    assert step.codes == {"200": 1000}


def test_summarize_counts_errors_and_codes() -> None:
    step = summarize("s", 100, 1, _records(100, 1, 1.0, {503: 3, 0: 1}))
    assert step.errors == 4
    assert step.codes == {"0": 1, "200": 96, "503": 3}


def test_summarize_nothing() -> None:
    step = summarize("s", 100, 1, [])
    assert step.requests == 0
    assert sustained(step, 100) == (False, "no requests")


def _step(**changes: object) -> Step:
    base = {
        "name": "s",
        "rate": 1000,
        "duration_s": 5.0,
        "requests": 5000,
        "ok": 5000,
        "errors": 0,
        "sent_rps": 1000.0,
        "throughput": 990.0,
        "latency_ms": {"p50": 1.0, "p99": 5.0},
    }
    base.update(changes)
    return Step(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "ok", "reason"),
    [
        ({}, True, "ok"),
        ({"errors": 2, "ok": 4998, "codes": {"503": 2}}, False, "2 errors"),
        ({"sent_rps": 900.0}, False, "sent only 900 rps"),
        ({"throughput": 800.0}, False, "answered only 800 rps"),
        ({"latency_ms": {"p50": 1.0, "p99": 150.0}}, False, "p99 150.0 ms > 100 ms"),
        ({"rate": 0, "sent_rps": 10.0, "throughput": 10.0}, True, "ok"),
    ],
    ids=["ok", "errors", "sender-behind", "backlog", "queueing", "closed-loop"],
)
def test_sustained(changes: dict[str, object], ok: bool, reason: str) -> None:
    verdict, why = sustained(_step(**changes), max_p99_ms=100)
    assert verdict is ok
    assert why.startswith(reason)


def test_attack_argv_open_and_closed_loop() -> None:
    from pathlib import Path

    from bench.load import OPEN_LOOP_MAX_WORKERS, Attack, attack_argv

    open_loop = attack_argv("vegeta", Attack("a", 500, 10, Path("t.txt")), Path("r.bin"))
    assert open_loop[:2] == ["vegeta", "attack"]
    assert "-rate=500/1s" in open_loop
    assert f"-max-workers={OPEN_LOOP_MAX_WORKERS}" in open_loop
    assert "-duration=10s" in open_loop
    assert "-targets=t.txt" in open_loop
    closed = attack_argv("vegeta", Attack("b", 0, 2.5, Path("t.txt"), workers=32), Path("r.bin"))
    assert "-rate=0" in closed
    assert "-workers=32" in closed
    assert "-max-workers=32" in closed
    assert "-duration=2.5s" in closed
