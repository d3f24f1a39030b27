"""Differential test: authz against opa-envoy-plugin (the reference it promises to be
compatible with, docs/contract.md), both running the same bundle
(tests/differential/policy/diff.rego) and sent the same CheckRequests over gRPC.

- Requests (tests/differential/corpus/requests*.json): the policy echoes the input
  document; the two documents are compared field by field, modulo the documented
  credential transformation.
- Decisions (tests/differential/corpus/decisions.json): the policy returns each decision
  object; the two CheckResponses are compared field by field (``decision_id`` values
  aside, which are random on both sides).

Each test prints a summary and fails on any difference that is not in
tests/differential/allowlist.json, whose every kind docs/contract.md documents
("Differences from opa-envoy-plugin"). Skipped, with one reason, when the plugin binary
is not available (./scripts/test builds it and exports AUTHZ_PEER_BIN)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz.tools.launch import LaunchError, free_port, opa_launch, started
from tests.helpers import ROOT
from tests.helpers.differential import (
    PEER_SKIP_REASON,
    AllowEntry,
    Difference,
    authz_launch,
    build_bundle,
    call,
    channel,
    check_request,
    compare_inputs,
    compare_responses,
    decision_request,
    find_peer,
    load_allowlist,
    load_decisions,
    load_requests,
    peer_launch,
    summary,
)

# Plugin tests every request of which the corpus must transcribe (the list).
PLUGIN_TESTS = {
    "envoyauth/request_test.go": (
        "TestGetParsedBody",
        "TestGetParsedBodygRPC",
        "TestParsedPathAndQuery",
        "TestSourcePeerAttributes",
    ),
    # One test per request constant the file defines (most constants serve many tests).
    "internal/internal_test.go": (
        "TestCheckAllow",
        "TestCheckTrigger",
        "TestCheckAllowParsedBody",
        "TestCheckDeny",
        "TestCheckDenyParsedBody",
        "TestCheckAllowWithSpiffeDecision",
        "TestCheckDenyWithSpiffeDecision",
        "TestCheckAllowWithLoggerNDBCache",
        "TestCheckDenyDecisionTruncatedBodyWithLogger",
        "TestCheckAllowDecisionWithSkipRequestBodyParse",
        "TestCheckDecisionTruncatedBodyWithLogger",
        "TestCheckIllegalDecisionWithLogger",
    ),
}
START_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, opa_bin: str) -> Iterator[tuple[str, str]]:
    """(plugin address, authz address), both serving the differential bundle."""
    peer_bin = find_peer()
    if peer_bin is None:
        pytest.skip(PEER_SKIP_REASON)
    work = tmp_path_factory.mktemp("differential")
    bundle = build_bundle(work / "bundle.tar.gz", load_decisions())
    # OPA at its default settings (gzip from 1 KiB and all): what a deployment runs.
    opa = opa_launch(opa_bin, free_port(), "--bundle", str(bundle), ready_path="/health?bundles")
    peer = peer_launch(peer_bin, bundle, (free_port(), free_port(), free_port()))
    authz = authz_launch(opa.url, free_port(), free_port())
    with ExitStack() as stack:
        try:
            for launch in (opa, peer, authz):
                stack.enter_context(started(launch, work / f"{launch.name}.log", START_TIMEOUT_S))
        except LaunchError as exc:
            pytest.fail(f"a server of the differential test did not start: {exc}")
        yield peer.url, authz.url


def _judge(
    title: str,
    compared: int,
    differences: list[Difference],
    corpus: str,
    out: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    allow: list[AllowEntry] = [e for e in load_allowlist() if e.corpus == corpus]
    text, unlisted = summary(title, compared, differences, allow)
    # The full list, for whoever shrinks the allow-list: every difference with both values.
    rows = [_row(d) for d in differences]
    (out / f"differences-{corpus}.json").write_text(json.dumps(rows, indent=1, default=repr))
    with capsys.disabled():  # the summary is the test's output: shown on every run
        print(f"\n{text}\n(all differences: {out / f'differences-{corpus}.json'})")
    assert not unlisted, f"differences not in tests/differential/allowlist.json:\n{text}"


def _row(difference: Difference) -> dict[str, object]:
    return {
        "case": difference.case,
        "path": difference.path,
        "peer": difference.peer,
        "authz": difference.authz,
    }


def test_corpus_transcribes_every_plugin_test_request_and_meets_its_size() -> None:
    requests, decisions = load_requests(), load_decisions()
    sources = {case["source"] for case in requests}
    missing = [
        f"{file} {test}"
        for file, tests in PLUGIN_TESTS.items()
        for test in tests
        if not any(source.startswith(f"{file} {test}/") for source in sources)
    ]
    assert not missing, f"plugin tests with no transcribed request: {missing}"
    assert len(requests) >= 250
    assert len(decisions) >= 120
    ids = [case["id"] for case in [*requests, *decisions]]
    assert len(ids) == len(set(ids)), "case ids must be unique"


def test_every_allowed_difference_kind_is_documented() -> None:
    contract = (ROOT / "docs" / "contract.md").read_text(encoding="utf-8")
    section = contract.split("## Differences from opa-envoy-plugin", 1)
    assert len(section) == 2, "docs/contract.md lacks 'Differences from opa-envoy-plugin'"
    undocumented = [e.kind for e in load_allowlist() if f"`{e.kind}`" not in section[1]]
    assert not undocumented, f"allow-list kinds docs/contract.md does not name: {undocumented}"


def test_input_documents_match_the_plugin_except_documented_differences(
    servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer_address, authz_address = servers
    requests = load_requests()
    differences: list[Difference] = []
    with channel(peer_address) as peer_channel, channel(authz_address) as authz_channel:
        peer = external_auth_pb2_grpc.AuthorizationStub(peer_channel)
        authz = external_auth_pb2_grpc.AuthorizationStub(authz_channel)
        for case in requests:
            request = check_request(case)
            differences += compare_inputs(case["id"], call(peer, request), call(authz, request))
    _judge("requests", len(requests), differences, "requests", tmp_path, capsys)


def test_check_responses_match_the_plugin_except_documented_differences(
    servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer_address, authz_address = servers
    decisions = load_decisions()
    differences: list[Difference] = []
    with channel(peer_address) as peer_channel, channel(authz_address) as authz_channel:
        peer = external_auth_pb2_grpc.AuthorizationStub(peer_channel)
        authz = external_auth_pb2_grpc.AuthorizationStub(authz_channel)
        for case in decisions:
            request = decision_request(case["id"])
            differences += compare_responses(case["id"], call(peer, request), call(authz, request))
    _judge("decisions", len(decisions), differences, "decisions", tmp_path, capsys)
