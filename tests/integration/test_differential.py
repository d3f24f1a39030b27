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

import hashlib
import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from authz.tools.launch import LaunchError, free_port, opa_launch, started
from tests.helpers import ROOT
from tests.helpers.differential import (
    PEER_SKIP_REASON,
    AllowEntry,
    Difference,
    Outcome,
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
    with channel(peer_address) as peer, channel(authz_address) as authz:
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
    with channel(peer_address) as peer, channel(authz_address) as authz:
        for case in decisions:
            request = decision_request(case["id"])
            differences += compare_responses(case["id"], call(peer, request), call(authz, request))
    _judge("decisions", len(decisions), differences, "decisions", tmp_path, capsys)


# --- the comparison itself (no server): it must be able to fail ------------------------


def _echo_outcome(document: dict[str, object]) -> Outcome:
    text = json.dumps(document)
    return Outcome(response={"dynamic_metadata": {"diff_input": text, "diff_raw": {}}})


def _with_authorization(value: str, **extra: object) -> dict[str, object]:
    headers = {"authorization": value}
    return {"attributes": {"request": {"http": {"headers": headers}}}, **extra}


_TOKEN_DIGEST = hashlib.sha256(b"tok").hexdigest()


@pytest.mark.parametrize(
    ("authz_header", "credentials", "expected_paths"),
    [
        (f"Bearer sha256:{_TOKEN_DIGEST}", {"authorization": _TOKEN_DIGEST}, []),
        (
            f"Bearer sha256:{'0' * 64}",
            {"authorization": _TOKEN_DIGEST},
            ["input.attributes.request.http.headers.authorization"],
        ),
        (
            f"Bearer sha256:{_TOKEN_DIGEST}",
            {"authorization": "0" * 64},
            ["input.credentials"],
        ),
        # Passed through unhashed (e.g. a JWT): the plugin's own input, no difference.
        ("Bearer tok", None, []),
    ],
    ids=["documented-form", "wrong-header-digest", "wrong-credentials-digest", "as-the-plugin"],
)
def test_credential_normalisation_forgives_only_the_documented_digest(
    authz_header: str, credentials: dict[str, str] | None, expected_paths: list[str]
) -> None:
    peer = _echo_outcome(_with_authorization("Bearer tok"))
    extra = {} if credentials is None else {"credentials": credentials}
    authz = _echo_outcome(_with_authorization(authz_header, **extra))
    paths = [d.path for d in compare_inputs("c", peer, authz)]
    assert paths == expected_paths


def test_decision_id_header_is_an_addition_only_with_the_responses_decision_id() -> None:
    decision_id = "0b0e8f4e-8f43-4d6f-9d0e-3f1b6c1d2a10"
    other_id = "1b0e8f4e-8f43-4d6f-9d0e-3f1b6c1d2a10"

    def authz(header_value: str) -> Outcome:
        header = {"header": {"key": "x-authz-decision-id", "value": header_value}}
        return Outcome(
            response={
                "dynamic_metadata": {"decision_id": decision_id},
                "ok_response": {"headers": [header]},
            }
        )

    peer = Outcome(response={"dynamic_metadata": {"decision_id": other_id}})
    same = [d.path for d in compare_responses("c", peer, authz(decision_id))]
    forged = [d.path for d in compare_responses("c", peer, authz("forged"))]
    assert same == ["addition.decision_id_header", "addition.ok_response"]
    assert forged == ["response.ok_response"]


def test_summary_reports_a_difference_no_entry_covers() -> None:
    entry = AllowEntry(
        kind="k",
        corpus="requests",
        cases=frozenset({"a"}),
        paths=("input.x",),
        reason="r",
        fix=True,
    )
    differences = [
        Difference("a", "input.x.y", 1, 2),  # covered: the entry's case, under its path
        Difference("a", "input.xy", 1, 2),  # another field with the same prefix text
        Difference("b", "input.x", 1, 2),  # another case
    ]
    _, unlisted = summary("requests", 3, differences, [entry])
    assert [(d.case, d.path) for d in unlisted] == [("a", "input.xy"), ("b", "input.x")]
