"""The batch rule (``policy/batch/batch.rego``, ``authz generate batch-rule``) and the
coalescer (:mod:`authz.core.batch`) against a real OPA.

Equivalence: for every input of a corpus (the differential request corpus, built into
input documents as authz builds them, plus requests made from the shipped policies' own
data: every path rule and method with every kind of key, every egress service with every
sandbox) on each shipped decision path, the batch query gives exactly the decision a
single query gives, undefined where it is undefined. Fallback: a runtime error in one
input fails the whole batch query, and the coalescer then decides each input alone, so
only that input gets the error; a bundle without the batch rule is learnt once per
revision.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from authz.core.batch import Coalescer
from authz.core.errors import OpaResponseError, PolicyError, RequestError, UndefinedDecision
from authz.core.headers import CREDENTIAL_HEADERS
from authz.core.input import build_input
from authz.core.opa import BatchEvaluation, Evaluation, OpaClient
from authz.tools.batch_rule import DEFAULT_PATHS, render
from authz.tools.keys import digest, generate_key
from tests.helpers import differential
from tests.helpers.fakes import check_request
from tests.helpers.opa_server import running_opa

KEYS = {  # name -> data.gateway.api_keys entry (the digest is added)
    "admin": {"id": "key-admin", "enabled": True, "role": "admin", "rate_limit_tier": "premium"},
    "user": {"id": "key-user", "enabled": True, "role": "user", "rate_limit_tier": "default"},
    "viewer": {"id": "key-viewer", "enabled": True, "role": "viewer"},
    "disabled": {"id": "key-disabled", "enabled": False, "role": "user"},
    "expired": {
        "id": "key-expired",
        "enabled": True,
        "role": "user",
        "expires_at": "2024-01-01T00:00:00Z",
    },
}
SANDBOXES = {
    "sb-default": ("default", True),
    "sb-admin": ("admin", True),
    "sb-off": ("admin", False),
}
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


@pytest.fixture(scope="module")
def secrets_() -> dict[str, str]:
    """A fresh API key or sandbox token per name (never committed)."""
    return {name: generate_key() for name in (*KEYS, *SANDBOXES)}


@pytest.fixture(scope="module")
def opa_url(
    opa_bin: str,
    repo_root: Path,
    secrets_: Mapping[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A real OPA serving the shipped policy tree (batch rule included) with keys and
    sandboxes of this test's own."""
    base = tmp_path_factory.mktemp("batch-opa")
    overlay = {
        "gateway": {"api_keys": {digest(secrets_[n]): entry for n, entry in KEYS.items()}},
        "egress": {
            "sandboxes": {
                name: {"tier": tier, "enabled": on, "token_sha256": digest(secrets_[name])}
                for name, (tier, on) in SANDBOXES.items()
            }
        },
    }
    (base / "data.json").write_text(json.dumps(overlay), encoding="utf-8")
    with running_opa(
        opa_bin, str(repo_root / "policy"), str(base / "data.json"), log_path=base / "opa.log"
    ) as url:
        yield url


def _corpus(repo_root: Path, secrets_: Mapping[str, str]) -> list[dict[str, Any]]:
    """Input documents, as authz builds them, of the differential corpus and of requests
    made from the shipped policies' data."""
    requests = [
        message
        for case in differential.load_requests()
        if not isinstance(message := differential.check_request(case), bytes)
    ]
    rules = json.loads((repo_root / "policy/gateway/data.json").read_text(encoding="utf-8"))
    paths = {rule["pattern"].replace("**", "x/y") for rule in rules["path_rules"]}
    for path in sorted(paths | {"/", "/other", "/api/v1/status?q=1"}):
        for method in METHODS:
            requests.append(check_request(method=method, path=path))
            for name in KEYS:
                requests.append(
                    check_request(method=method, path=path, headers={"x-api-key": secrets_[name]})
                )
            requests.append(
                check_request(
                    method=method,
                    path=path,
                    headers={"authorization": f"Bearer {secrets_['user']}"},
                )
            )
    services = json.loads((repo_root / "policy/egress/data.json").read_text(encoding="utf-8"))
    for name, service in [*services["services"].items(), ("unknown.example", {})]:
        targets = [
            p.replace("**", "x/y").replace("*", "x") for p in service.get("allowed_paths", [])
        ]
        for path in [*targets, "/admin"]:
            for method in ("GET", "POST", "DELETE"):
                for sandbox in SANDBOXES:
                    for token in (secrets_[sandbox], "wrong"):
                        headers = {"x-sandbox-id": sandbox, "x-sandbox-token": token}
                        requests.append(
                            check_request(
                                method=method,
                                path=path,
                                headers=headers,
                                context_extensions={"service": name},
                            )
                        )
    documents = []
    for request in requests:
        try:
            documents.append(build_input(request, CREDENTIAL_HEADERS, parse_request_body=True))
        except RequestError:
            continue  # denied by authz before OPA is asked (docs/contract.md)
    return documents


async def _single(client: OpaClient, path: str, document: Mapping[str, Any]) -> Any:
    try:
        return (await client.evaluate(path, document, 10.0)).result
    except UndefinedDecision:
        return "<undefined>"


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def test_committed_batch_rule_is_generated_for_the_shipped_paths(repo_root: Path) -> None:
    """policy/batch/batch.rego is exactly what the generator writes (a hand edit or a new
    shipped path without regeneration fails here)."""
    committed = (repo_root / "policy/batch/batch.rego").read_text(encoding="utf-8")
    assert committed == render(DEFAULT_PATHS)


@pytest.mark.parametrize("path", DEFAULT_PATHS, ids=lambda p: p.split("/")[1])
async def test_batch_rule_decides_every_corpus_input_as_a_single_query(
    opa_url: str, repo_root: Path, secrets_: Mapping[str, str], path: str
) -> None:
    """Each input's batch decision equals its single decision, undefined included, in
    batches of 1, 7 and 64 (so a batch mixes allows, denies and undefined)."""
    documents = _corpus(repo_root, secrets_)
    assert len(documents) > 300
    client = OpaClient(opa_url)
    try:
        singles = [await _single(client, path, d) for d in documents]
        kinds = {r.get("allowed") if isinstance(r, dict) else r for r in singles}
        # jwt_example allows signed JWTs only (none here): false for the rest.
        assert kinds >= ({False} if "jwt" in path else {True, False}), kinds
        for size in (1, 7, 64):
            batched: list[Any] = []
            for chunk in _chunks(documents, size):
                answer = await client.query_batch(path, chunk, 10.0)
                assert answer.results is not None
                batched.extend("<undefined>" if e is None else e.result for e in answer.results)
            pairs = enumerate(zip(singles, batched, strict=True))
            mismatched = [i for i, (a, b) in pairs if a != b]
            assert not mismatched, (size, mismatched[:5])
    finally:
        await client.close()


async def test_batch_rule_is_undefined_for_a_path_it_does_not_list(opa_url: str) -> None:
    """A decision path the package does not name: results None (decide one by one)."""
    client = OpaClient(opa_url)
    try:
        answer = await client.query_batch("authz/meta/live", [{}], 5.0)
    finally:
        await client.close()
    assert answer.results is None


# --- fallback, on a bundle of its own ----------------------------------------------------

FAULTY = """\
package authz.faulty

# Two values for one input: an eval_conflict_error for input.x == 1, which fails any
# query that evaluates it (the whole batch).
decision := {"allowed": true, "n": input.n} if input.x != 2

decision := {"allowed": false, "n": input.n} if input.x == 1
"""


def _bundle(opa_bin: str, base: Path, revision: str, *, batch: bool) -> Path:
    source = base / f"src-{revision}"
    source.mkdir()
    (source / "faulty.rego").write_text(FAULTY, encoding="utf-8")
    if batch:
        (source / "batch.rego").write_text(render(["authz/faulty/decision"]), encoding="utf-8")
    bundle = base / f"{revision}.tar.gz"
    subprocess.run(
        [opa_bin, "build", "-b", str(source), "--revision", revision, "-o", str(bundle)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return bundle


class CountingClient:
    """An OpaClient counting single and batch queries."""

    def __init__(self, client: OpaClient) -> None:
        self.client = client
        self.singles = 0
        self.batches: list[int] = []

    async def evaluate(
        self, path: str, document: Mapping[str, Any], timeout_s: float
    ) -> Evaluation:
        self.singles += 1
        return await self.client.evaluate(path, document, timeout_s)

    async def query_batch(
        self, path: str, documents: Sequence[Any], timeout_s: float
    ) -> BatchEvaluation:
        self.batches.append(len(documents))
        return await self.client.query_batch(path, documents, timeout_s)

    async def close(self) -> None:
        await self.client.close()


async def _decide_all(engine: Coalescer, inputs: Sequence[Mapping[str, Any]]) -> list[Any]:
    async def one(document: Mapping[str, Any]) -> Any:
        try:
            return (await engine.evaluate("authz/faulty/decision", document, 5.0)).result
        except PolicyError as exc:
            return type(exc)

    return list(await asyncio.gather(*(one(d) for d in inputs)))


@pytest.mark.parametrize("batch_rule", [True, False], ids=["with-batch-rule", "without"])
async def test_one_faulty_input_fails_only_itself(
    opa_bin: str, tmp_path: Path, batch_rule: bool
) -> None:
    """Ten concurrent decisions, one of them an evaluation error and one undefined: the
    error and the undefined decision reach only their own input (as single queries give
    them), every other input gets its own allow. Without the batch rule the bundle's
    lack of it is learnt once for its revision: later rounds send no batch query."""
    bundle = _bundle(opa_bin, tmp_path, "r1", batch=batch_rule)
    with running_opa(opa_bin, "--bundle", str(bundle), log_path=tmp_path / "opa.log") as url:
        counting = CountingClient(OpaClient(url))
        engine = Coalescer(counting, max_in_flight=1)
        try:
            inputs = [{"n": n, "x": 1 if n == 4 else 2 if n == 7 else 0} for n in range(10)]
            expected = [
                OpaResponseError
                if n == 4
                else UndefinedDecision
                if n == 7
                else {"allowed": True, "n": n}
                for n in range(10)
            ]
            assert await _decide_all(engine, inputs) == expected
            assert counting.batches == [9]  # the first went alone; the rest queued behind it
            assert await _decide_all(engine, inputs) == expected
            if batch_rule:
                assert counting.batches == [9, 9]
            else:
                assert counting.batches == [9]  # learnt for revision r1: no second try
        finally:
            await engine.close()
