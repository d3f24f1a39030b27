"""Benchmark keys, their bundle data, Zipf and distinct key streams, vegeta targets."""

from __future__ import annotations

import json
import random
import re
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from authz.tools.keys import digest, lint_data
from bench.workload import (
    BENCH_ROLE,
    BENCH_TIER,
    USER_AGENTS,
    DistinctStream,
    RealisticStream,
    Request,
    ZipfSampler,
    bench_key,
    keys_data,
    requests_text,
    targets_text,
    write_keys_overlay,
    zipf_sequence,
    zipf_weights,
)
from tests.helpers import ROOT


def test_keys_are_stable_and_distinct() -> None:
    assert bench_key(7) == bench_key(7)
    assert bench_key(7) != bench_key(8)
    assert bench_key(7, seed="other") != bench_key(7)
    assert len({bench_key(i) for i in range(1000)}) == 1000


def test_smaller_bundles_hold_a_prefix_of_larger_ones() -> None:
    small, large = keys_data(10), keys_data(100)
    assert small.items() <= large.items()


def test_keys_data_stores_digests_on_the_unlimited_tier() -> None:
    data = keys_data(3)
    assert list(data) == [digest(bench_key(i)) for i in range(3)]
    assert all(entry["rate_limit_tier"] == BENCH_TIER for entry in data.values())
    assert all(entry["enabled"] is True for entry in data.values())
    # What scripts/build-policy-bundle checks before building.
    assert lint_data({"gateway": {"api_keys": data}}) == []


def test_overlay_layout(tmp_path: Path) -> None:
    write_keys_overlay(tmp_path, 5)
    written = json.loads((tmp_path / "gateway/api_keys/data.json").read_text())
    assert written == keys_data(5)


@pytest.mark.parametrize(
    ("n", "exponent", "expected"),
    [
        (1, 1.0, [1.0]),
        (3, 1.0, [1.0, 0.5, 1 / 3]),
        (3, 0.0, [1.0, 1.0, 1.0]),
        (2, 2.0, [1.0, 0.25]),
    ],
    ids=["one", "harmonic", "uniform", "square"],
)
def test_zipf_weights(n: int, exponent: float, expected: list[float]) -> None:
    assert zipf_weights(n, exponent) == pytest.approx(expected)


@pytest.mark.parametrize(("n", "exponent"), [(0, 1.0), (3, -1.0)], ids=["no-keys", "negative"])
def test_zipf_weights_rejects(n: int, exponent: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        zipf_weights(n, exponent)


def test_zipf_sequence_is_skewed_by_rank() -> None:
    keys = [40, 30, 20, 10]  # rank 1 is keys[0], whatever its value
    counts = Counter(zipf_sequence(keys, 20_000, exponent=1.0, seed=3))
    assert set(counts) == set(keys)
    assert counts[40] > counts[30] > counts[20] > counts[10]
    # Weights 1 : 1/2 : 1/3 : 1/4 of a total 25/12: rank 1 draws 48%.
    assert counts[40] / 20_000 == pytest.approx(0.48, abs=0.02)
    assert counts[40] / counts[20] == pytest.approx(3.0, rel=0.1)


def test_zipf_sequence_is_deterministic_per_seed() -> None:
    keys = list(range(1000))
    assert zipf_sequence(keys, 500, seed=1) == zipf_sequence(keys, 500, seed=1)
    assert zipf_sequence(keys, 500, seed=1) != zipf_sequence(keys, 500, seed=2)


def test_zipf_over_1000_keys_concentrates_on_the_head() -> None:
    draws = zipf_sequence(list(range(1000)), 20_000, exponent=1.0, seed=1)
    counts = Counter(draws)
    head = sum(counts[k] for k in range(10))
    # H(10)/H(1000) = 2.93/7.49: the 10 most popular keys take ~39% of requests.
    assert head / len(draws) == pytest.approx(0.39, abs=0.03)
    assert len(counts) > 900  # and the tail is still visited


def test_distinct_stream_never_repeats_before_wrapping() -> None:
    stream = DistinctStream(1000, seed=5)
    first = stream.take(600) + stream.take(400)
    assert sorted(first) == list(range(1000))
    assert stream.wraps == 1
    assert stream.used == 1000
    again = stream.take(10)
    assert again == first[:10]  # the same permutation, second time round
    assert stream.used == 1010


def test_distinct_stream_take_across_the_end() -> None:
    stream = DistinctStream(5, seed=1)
    assert len(stream.take(12)) == 12
    assert stream.wraps == 2
    assert stream.cursor == 2


def test_distinct_stream_rejects_empty() -> None:
    with pytest.raises(ValueError, match="n must be"):
        DistinctStream(0)


def test_targets_text_is_vegeta_http_format() -> None:
    text = targets_text("http://127.0.0.1:1/api/v1/items/1", [2, 0])
    assert text == (
        f"GET http://127.0.0.1:1/api/v1/items/1\nX-API-Key: {bench_key(2)}\n\n"
        f"GET http://127.0.0.1:1/api/v1/items/1\nX-API-Key: {bench_key(0)}\n\n"
    )


# -- the realistic workload ----------------------------------------------------------


def _realistic(count: int = 20_000, **kwargs: Any) -> list[Request]:
    return RealisticStream(hot=1000, **kwargs).take(count)


def test_zipf_sampler_draws_ranks_in_proportion_to_their_weight() -> None:
    sampler, rng = ZipfSampler(4, 1.0), random.Random(7)  # noqa: S311 (load shape, not security)
    counts = Counter(sampler.draw(rng) for _ in range(40_000))
    # Weights 1 : 1/2 : 1/3 : 1/4 of 25/12.
    for rank, share in enumerate((0.48, 0.24, 0.16, 0.12)):
        assert counts[rank] / 40_000 == pytest.approx(share, abs=0.015)


def test_realistic_keys_follow_zipf_over_the_hot_keys() -> None:
    keys = Counter(r.header("X-API-Key") for r in _realistic())
    ranked = [bench_key(i) for i in range(1000)]
    assert set(keys) <= set(ranked)
    head = sum(keys[k] for k in ranked[:10])
    # H(10)/H(1000) as for the skewed workload: the 10 most popular keys take ~39%.
    assert head / 20_000 == pytest.approx(0.39, abs=0.03)
    assert keys[ranked[0]] > keys[ranked[1]] > keys[ranked[9]]
    assert len(keys) > 900  # the tail is visited too


def test_realistic_request_and_trace_ids_are_never_repeated() -> None:
    stream = RealisticStream(hot=1000)
    requests = stream.take(15_000) + stream.take(5_000)  # unique across takes too
    ids = [r.header("x-request-id") for r in requests]
    traces = [r.header("traceparent") for r in requests]
    assert len(set(ids)) == len(set(traces)) == 20_000
    for text in ids[:1000]:
        parsed = uuid.UUID(str(text))
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert str(parsed) == text
    # W3C trace context: version 00, 32 hex trace id, 16 hex parent id, flags.
    assert all(re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", str(t)) for t in traces)
    assert stream.issued == 20_000


def test_realistic_paths_vary_with_ids_in_segments_and_query_strings() -> None:
    requests = _realistic()
    targets = Counter(r.target for r in requests)
    paths = {t.split("?")[0] for t in targets}
    assert len(targets) > 5_000  # ids, pages, terms: many distinct targets
    assert sum(1 for t in targets if "?" in t) > 100
    assert any(re.fullmatch(r"/api/v1/items/\d+", p) for p in paths)
    assert any(re.fullmatch(r"/api/v1/orders/[0-9a-f-]{36}", p) for p in paths)
    # ids are Zipf too: item 1 is the most requested item.
    items = Counter(
        int(t.split("/")[4]) for t in targets.elements() if t.startswith("/api/v1/items/")
    )
    assert items.most_common(1)[0][0] == 1
    assert {r.method for r in requests} == {"GET", "HEAD", "DELETE"}
    agents = Counter(r.header("user-agent") for r in requests)
    assert set(agents) == set(USER_AGENTS)
    assert agents.most_common(1)[0][0] == USER_AGENTS[0]


def test_realistic_requests_are_allowed_for_the_bench_role() -> None:
    # Every method and path the stream sends is one policy/gateway/data.json allows role
    # "user": a denied request would be an error in every step.
    rules = json.loads((ROOT / "policy/gateway/data.json").read_text())["path_rules"]
    for request in _realistic(2_000):
        path = request.target.split("?")[0]
        first = next(
            r
            for r in rules
            if re.fullmatch(re.escape(r["pattern"]).replace(r"/\*\*", "(/.*)?"), path)
            and (request.method in r["methods"] or "*" in r["methods"])
        )
        assert BENCH_ROLE in first["roles"] or "*" in first["roles"], (request, first)


def test_realistic_stream_is_deterministic_per_seed() -> None:
    assert _realistic(300, seed=4) == _realistic(300, seed=4)
    assert _realistic(300, seed=4) != _realistic(300, seed=5)


def test_realistic_stream_rejects_no_keys() -> None:
    with pytest.raises(ValueError, match="hot must be"):
        RealisticStream(hot=0)


def test_requests_text_is_vegeta_http_format() -> None:
    request = Request("HEAD", "/api/v1/items/3?x=1", (("X-API-Key", "k"), ("traceparent", "t")))
    assert requests_text("http://127.0.0.1:1", [request]) == (
        "HEAD http://127.0.0.1:1/api/v1/items/3?x=1\nX-API-Key: k\ntraceparent: t\n\n"
    )
    assert request.header("X-Api-Key") == "k"
    assert request.header("user-agent") is None
