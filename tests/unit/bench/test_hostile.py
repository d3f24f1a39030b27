"""The hostile traffic (tests/helpers/hostile.py) and the benchmark's hostile step
(bench/hostile.py): shapes, sizes within Envoy's limits, reproducibility, vegeta targets,
ratios and the summary line."""

from __future__ import annotations

import email.parser
import email.policy
import random
import re
import socket
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.hostile import allowed, format_hostile, hostile_ratios, write_hostile_targets
from bench.report import ratios, render
from tests.helpers import hostile
from tests.helpers.bench_results import RESULTS
from tests.helpers.hostile import (
    BODY_LIMIT,
    HEADERS_COUNT_LIMIT,
    HEADERS_LIMIT,
    HostileRequest,
    Outcome,
    Tally,
)


def _rng() -> random.Random:
    return random.Random(7)  # noqa: S311 (reproducible test data)


@pytest.mark.parametrize("make", hostile.BOMBS, ids=lambda make: make.__name__)
def test_every_body_bomb_fits_the_gateways_body_buffer(
    make: Callable[..., HostileRequest],
) -> None:
    # Envoy sends authz at most BODY_LIMIT bytes (infra/envoy/envoy-gateway.yaml): a
    # bigger bomb would be cut, a partial body, which authz does not parse.
    request = make()
    assert 0 < len(request.body) <= BODY_LIMIT
    assert request.method == "POST"
    assert not any(name in ("x-api-key", "authorization") for name, _ in request.headers)


@pytest.mark.parametrize(
    "make",
    [hostile.multipart_params_bomb, hostile.multipart_parts_bomb, hostile.json_wide_bomb],
    ids=lambda make: make.__name__,
)
def test_size_bombs_use_most_of_the_body_buffer(make: Callable[..., HostileRequest]) -> None:
    assert len(make().body) >= 0.95 * BODY_LIMIT
    assert len(make(8192).body) <= 8192


def _multipart(request: HostileRequest) -> Any:
    content_type = dict(request.headers)["content-type"]
    document = f"Content-Type: {content_type}\r\n\r\n".encode() + request.body
    # compat32: fast, and enough to see the structure.
    return email.parser.BytesParser(policy=email.policy.compat32).parsebytes(document)


def test_multipart_bombs_are_well_formed_multipart() -> None:
    params = _multipart(hostile.multipart_params_bomb())
    (part,) = params.get_payload()
    assert part["Content-Type"].count(";p") > 5000
    parts = _multipart(hostile.multipart_parts_bomb()).get_payload()
    assert len(parts) > 1000
    assert {p.get_param("name", header="content-disposition") for p in parts[:2]} == {"f0", "f1"}
    lines = _multipart(hostile.multipart_boundary_lines())
    (part,) = lines.get_payload()
    assert lines.get_boundary() == "B" * 70
    assert part.get_payload().count("--" + "B" * 70 + "X") > 500
    nested = hostile.multipart_nested_comments(50)
    assert b"(" * 50 + b")" * 50 in nested.body


def test_json_and_form_bombs() -> None:
    depth = hostile.json_depth_bomb(1000).body
    assert depth == b"[" * 500 + b"]" * 500
    wide = hostile.json_wide_bomb(1000).body
    assert wide.startswith(b'{"k0":[0],"k1":[0]')
    assert wide.endswith(b"}")
    form = hostile.form_pairs_bomb(100).body
    assert form.split(b"&")[:2] == [b"a0=%41", b"a1=%41"]
    assert len(form) <= 100


def test_header_flood_stays_just_inside_envoys_limits() -> None:
    request = hostile.header_flood(_rng())
    assert HEADERS_COUNT_LIMIT - 15 <= len(request.headers) < HEADERS_COUNT_LIMIT
    assert HEADERS_LIMIT - 4096 <= request.header_bytes <= HEADERS_LIMIT
    assert len({name for name, _ in request.headers}) == len(request.headers)


@pytest.mark.parametrize(
    ("size", "kind", "headers"),
    [
        (None, "huge_header", 1),
        (HEADERS_LIMIT + 4096, "huge_header_over_limit", 2),
    ],
    ids=["under", "over"],
)
def test_huge_header_on_either_side_of_envoys_limit(
    size: int | None, kind: str, headers: int
) -> None:
    request = hostile.huge_header(_rng()) if size is None else hostile.huge_header(_rng(), size)
    assert request.kind == kind
    assert len(request.headers) == headers
    values = sum(len(value) for _, value in request.headers)
    if size is None:
        assert HEADERS_LIMIT - 4096 <= request.header_bytes <= HEADERS_LIMIT
    else:
        assert values == size
    # One line each, shorter than a 64 KiB line buffer (vegeta's).
    assert all(len(name) + 2 + len(value) < 64 * 1024 for name, value in request.headers)


def test_distinct_keyless_requests_never_repeat_and_carry_no_credential() -> None:
    rng = _rng()
    requests = [hostile.distinct_keyless(rng) for _ in range(20)]
    assert len({r.headers for r in requests}) == 20
    for request in requests:
        assert 40 * 1024 <= request.header_bytes <= 48 * 1024
        assert not {"x-api-key", "authorization"} & {name for name, _ in request.headers}


def test_generators_are_reproducible_from_the_seed() -> None:
    def draw() -> list[HostileRequest]:
        return list(hostile.gateway_mix(_rng(), 30))

    assert draw() == draw()


def test_egress_bogus_sandbox_uses_known_ids_with_random_tokens() -> None:
    rng = _rng()
    requests = [
        hostile.egress_bogus_sandbox(rng, ["openai", "github"], ["sb-admin"]) for _ in range(40)
    ]
    ids = Counter(dict(r.headers)["x-sandbox-id"] == "sb-admin" for r in requests)
    assert ids[True] > 5
    assert ids[False] > 5
    assert {r.host for r in requests} == {"openai", "github"}
    assert {r.proxy for r in requests} == {"egress"}
    assert len({dict(r.headers)["x-sandbox-token"] for r in requests}) == 40


def test_fillers_and_mix_proportions() -> None:
    fill = Counter(r.kind for r in hostile.fillers(_rng(), 30))
    assert fill == {
        "distinct_keyless": 15,
        "malformed_query": 3,
        "bogus_api_key": 6,
        "header_flood": 3,
        "huge_header": 2,
        "huge_header_over_limit": 1,
    }
    mix = list(hostile.gateway_mix(_rng(), 70))
    bombs = [r.kind for r in mix[::5]]
    assert bombs == [b.kind for b in hostile.bombs()] * 2
    assert not {r.kind for r in mix[1::5]} & set(bombs)


@pytest.mark.parametrize(
    ("status", "headers", "origin", "allowed_", "server_error"),
    [
        (200, {}, "upstream", True, False),
        (401, {"x-authz-decision-id": "d"}, "authz", False, False),
        (500, {"x-authz-decision-id": "d"}, "authz", False, True),
        (431, {}, "envoy", False, False),
        (503, {}, "envoy", False, True),
    ],
    ids=["allowed", "authz-deny", "authz-5xx", "envoy-431", "envoy-503"],
)
def test_classify_names_who_answered(
    status: int, headers: dict[str, str], origin: str, allowed_: bool, server_error: bool
) -> None:
    outcome = hostile.classify("k", status, headers)
    assert (outcome.origin, outcome.allowed, outcome.server_error) == (
        origin,
        allowed_,
        server_error,
    )


def test_tally_counts_and_selects() -> None:
    tally = Tally()
    for outcome in [Outcome("a", 401, "authz")] * 3 + [Outcome("b", 503, "envoy")]:
        tally.add(outcome)
    assert tally.total == 4
    assert tally.matching(lambda o: o.server_error) == {"b 503 envoy": 1}
    assert tally.table().splitlines() == ["  a 401 authz: 3", "  b 503 envoy: 1"]


def test_slow_client_reads_the_answer_it_waited_for() -> None:
    server, client = socket.socketpair()
    with server, client:
        server.sendall(b"HTTP/1.1 401 Unauthorized\r\nX-Authz-Decision-Id: d1\r\n\r\n{}")
        outcome = hostile._read_answer(client)
    assert outcome == Outcome("slowloris", 401, "authz")
    request = hostile.Slowloris("127.0.0.1", 1, 1, Tally()).request_bytes()
    assert request.startswith(b"GET /api/v1/admin/users HTTP/1.1\r\n")
    assert request.endswith(b"\r\n\r\n")


def test_vegeta_targets_name_bodies_by_file(tmp_path: Path) -> None:
    bomb = hostile.json_depth_bomb(10)
    egress = HostileRequest("e", "GET", "/v1/models", (("x-sandbox-id", "sb"),), host="openai")
    text = hostile.vegeta_targets([bomb, bomb, egress], "http://127.0.0.1:1", tmp_path)
    (body,) = tmp_path.iterdir()
    assert body.read_bytes() == b"[[[[[]]]]]"
    assert text == (
        f"POST http://127.0.0.1:1/api/v1/admin/users\ncontent-type: application/json\n@{body}\n\n"
        f"POST http://127.0.0.1:1/api/v1/admin/users\ncontent-type: application/json\n@{body}\n\n"
        "GET http://127.0.0.1:1/v1/models\nHost: openai\nx-sandbox-id: sb\n\n"
    )


def test_write_hostile_targets_is_the_seeded_mix(tmp_path: Path) -> None:
    path = write_hostile_targets(tmp_path / "t.txt", "http://h:1", 12)
    targets = re.findall(r"^(GET|POST) http://h:1(\S+)$", path.read_text(), re.MULTILINE)
    assert len(targets) == 12
    assert targets[0] == ("POST", "/api/v1/admin/users")  # the mix opens with a bomb
    assert (tmp_path / "bodies").is_dir()


def _step(throughput: float, p99: float) -> dict[str, Any]:
    return {"throughput": throughput, "latency_ms": {"p99": p99}}


RESULT: dict[str, Any] = {
    "legit_rate": 100,
    "hostile_rate": 10,
    "quiet": {"step": _step(100.0, 4.0)},
    "loaded": {"step": _step(97.0, 5.6)},
    "hostile": {"requests": 110, "codes": {"200": 1, "401": 100, "431": 9}},
    "slow": {"opened": 20, "answers": {}},
    "memory_before": {"authz": {"rss_kb": 64 * 1024}},
    "memory_after": {"authz": {"rss_kb": 66 * 1024 + 100}},
}


def test_hostile_ratios_are_loaded_over_quiet() -> None:
    values = hostile_ratios(RESULT["quiet"]["step"], RESULT["loaded"]["step"])
    assert values["hostile/quiet throughput"] == pytest.approx(0.97)
    assert values["hostile/quiet p99"] == pytest.approx(1.4)
    assert hostile_ratios(None, RESULT["loaded"]["step"]) == {
        "hostile/quiet throughput": None,
        "hostile/quiet p99": None,
    }
    assert hostile_ratios(_step(0.0, 0.0), _step(1.0, 1.0))["hostile/quiet p99"] is None


def test_allowed_counts_2xx_hostile_answers() -> None:
    assert allowed(RESULT["hostile"]) == 1
    assert allowed({"codes": {"0": 3, "503": 2}}) == 0
    assert allowed(None) == 0


def test_hostile_line() -> None:
    assert format_hostile(RESULT) == (
        "hostile/quiet throughput 0.97, p99 1.4x (legitimate 100 rps, hostile 10 rps: 110 "
        "sent, 1 allowed, codes {'200': 1, '401': 100, '431': 9}; 20 slow clients; "
        "authz RSS 64 -> 66 MB)"
    )
    assert format_hostile({}).startswith("hostile/quiet throughput n/a, p99 n/a")


def test_report_of_the_hostile_step_alone_ends_with_its_line() -> None:
    lines = render({"setups": {}, "hostile": RESULT, "errors": []}).splitlines()
    assert lines[-1].startswith("hostile/quiet throughput 0.97, p99 1.4x")
    assert ratios({"hostile": RESULT})["hostile/quiet throughput"] == pytest.approx(0.97)


def test_full_report_keeps_the_headline_ratios_last_and_shows_the_hostile_line() -> None:
    lines = render({**RESULTS, "hostile": RESULT}).splitlines()
    assert lines[-1].startswith("ratios: authz/peer throughput")
    assert "hostile/quiet throughput 0.97" in lines[-2]  # in "more ratios"
    assert any(line.startswith("hostile/quiet throughput 0.97, p99 1.4x (") for line in lines)


@pytest.mark.parametrize(
    ("argv", "only", "sizes"),
    [
        (["--only", "hostile", "--keys", "1000"], ("hostile",), [1000]),
        (["--keys", "1000"], (), [100, 1000, 10_000, 100_000]),
    ],
    ids=["hostile-alone", "full-run"],
)
def test_only_hostile_builds_one_bundle(
    argv: list[str], only: tuple[str, ...], sizes: list[int]
) -> None:
    from bench.__main__ import options, parse_args

    opts = options(parse_args(argv))
    assert opts.only == only
    assert opts.bundle_sizes() == sizes


def test_hostile_step_options_from_the_command_line() -> None:
    from bench.__main__ import options, parse_args

    opts = options(
        parse_args(["--hostile-rate", "5", "--hostile-legit-rate", "50", "--hostile-step-s", "3"])
    )
    assert (opts.hostile_rate, opts.hostile_legit_rate, opts.hostile_step_s) == (5, 50, 3.0)
    with pytest.raises(SystemExit):
        parse_args(["--only", "search"])


def test_for_egress_keeps_the_attack_and_adds_a_bogus_identity() -> None:
    rng = _rng()
    bomb = hostile.multipart_params_bomb(4096)
    moved = hostile.for_egress(bomb, rng, ["openai"], ["sb-admin"])
    assert (moved.kind, moved.proxy, moved.host) == ("egress_multipart_params", "egress", "openai")
    assert (moved.method, moved.path, moved.body) == ("POST", "/v1/chat/completions", bomb.body)
    assert [name for name, _ in moved.headers[:2]] == ["x-sandbox-id", "x-sandbox-token"]
    assert moved.headers[2:] == bomb.headers
    flood = hostile.for_egress(hostile.header_flood(rng), rng, ["openai"])
    assert flood.path == "/v1/models"
    assert len(flood.headers) < HEADERS_COUNT_LIMIT


def test_malformed_query_has_a_bad_escape_and_distinct_headers() -> None:
    rng = _rng()
    first, second = hostile.malformed_query(rng), hostile.malformed_query(rng)
    assert first.path.startswith("/api/v1/admin/users?q=%zz")
    assert first.path != second.path
    assert first.headers != second.headers
    assert 40 * 1024 <= first.header_bytes <= 48 * 1024


def test_for_egress_keeps_the_query() -> None:
    rng = _rng()
    moved = hostile.for_egress(hostile.malformed_query(rng), rng, ["openai"])
    assert moved.path.startswith("/v1/models?q=%zz")
