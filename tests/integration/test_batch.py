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
import contextlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from envoy.service.auth.v3 import external_auth_pb2

from authz.core.batch import Coalescer
from authz.core.errors import OpaResponseError, PolicyError, RequestError, UndefinedDecision
from authz.core.headers import CREDENTIAL_HEADERS
from authz.core.input import build_input
from authz.core.opa import BatchEvaluation, Evaluation, OpaClient
from authz.runtime.audit import connect, read_entries
from authz.runtime.config import load
from authz.runtime.server import Runtime, build_runtime
from authz.stack.supervisor import free_port
from authz.tools.batch_rule import DEFAULT_PATHS, render
from authz.tools.keys import digest, generate_key
from authz.v1 import decisions_pb2
from tests.helpers import differential
from tests.helpers.fakes import check_request
from tests.helpers.opa_server import running_opa

KEYS = {  # name -> data.gateway.api_keys entry (the digest is added)
    "admin": {"id": "key-admin", "enabled": True, "role": "admin", "rate_limit_tier": "premium"},
    "user": {"id": "key-user", "enabled": True, "role": "user", "rate_limit_tier": "unlimited"},
    "limited": {"id": "key-limited", "enabled": True, "role": "user", "rate_limit_tier": "default"},
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


# --- BatchCheck end to end: the real runtime, the shipped bundle, the audit trail -------


@pytest.fixture(scope="module")
def bundle_opa_url(
    opa_bin: str,
    repo_root: Path,
    secrets_: Mapping[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A real OPA serving the shipped policy tree as a bundle at revision ``rev-e2e``
    (so every decision names it), with this test's keys."""
    base = tmp_path_factory.mktemp("batch-bundle")
    source = base / "src"
    shutil.copytree(repo_root / "policy", source, ignore=shutil.ignore_patterns("*_test.rego"))
    keys = source / "gateway/api_keys/data.json"
    keys.parent.mkdir(parents=True)
    keys.write_text(
        json.dumps({digest(secrets_[n]): entry for n, entry in KEYS.items()}), encoding="utf-8"
    )
    bundle = base / "bundle.tar.gz"
    subprocess.run(
        [opa_bin, "build", "-b", str(source), "--revision", "rev-e2e", "-o", str(bundle)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with running_opa(
        opa_bin, "--bundle", str(bundle), log_path=base / "opa.log", ready_path="/health?bundles"
    ) as url:
        yield url


@contextlib.asynccontextmanager
async def running_authz(opa_url: str, tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """authz as ``serve`` builds it (build_runtime), in this process, over ``opa_url``;
    yields its gRPC address and its audit database."""
    async with running_runtime(opa_url, tmp_path) as (runtime, audit_db):
        yield f"127.0.0.1:{runtime.grpc.port}", audit_db


@contextlib.asynccontextmanager
async def running_runtime(opa_url: str, tmp_path: Path) -> AsyncIterator[tuple[Runtime, Path]]:
    """:func:`running_authz`, yielding the Runtime itself (its ports and metrics)."""
    audit_db = tmp_path / "audit.db"
    settings = load(
        {
            "AUTHZ_GRPC_ADDR": f"127.0.0.1:{free_port()}",
            "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
            "AUTHZ_OPA_URL": opa_url,
            "AUTHZ_AUDIT_DB": str(audit_db),
            "AUTHZ_OVERRIDES_FILE": str(tmp_path / "overrides.json"),
            "AUTHZ_DECISION_LOG": "false",
            "AUTHZ_DECISION_TIMEOUT_MS": "5000",
            "AUTHZ_BATCH_CHECK_MAX_ACTIONS": "25",
            "AUTHZ_BATCH_CHECK_MAX_BYTES": "65536",
        }
    )
    async with contextlib.AsyncExitStack() as stack:
        runtime = await build_runtime(settings, stack)
        yield runtime, audit_db


async def batch_check(
    address: str, request: decisions_pb2.BatchCheckRequest | bytes
) -> decisions_pb2.BatchCheckResponse:
    """One BatchCheck call (raw bytes are sent as they are: for malformed requests)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            "/authz.v1.Decisions/BatchCheck",
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=decisions_pb2.BatchCheckResponse.FromString,
        )
        response: decisions_pb2.BatchCheckResponse = await call(request, timeout=10)
        return response


def planning_request(secret: str, count: int = 20) -> decisions_pb2.BatchCheckRequest:
    """A planning agent's 20 actions for one key: reads and deletes of its items, an
    admin path, and paths no rule names."""
    actions = []
    for i in range(count):
        method, path = [
            ("GET", f"/api/v1/items/{i}"),
            ("DELETE", f"/api/v1/items/{i}"),
            ("POST", "/api/v1/admin/users"),
            ("GET", f"/other/{i}"),
        ][i % 4]
        actions.append(
            decisions_pb2.Action(id=f"step-{i}", method=method, path=path, host="api.example")
        )
    return decisions_pb2.BatchCheckRequest(
        principal=decisions_pb2.Principal(headers={"x-api-key": secret}), actions=actions
    )


@pytest.mark.usefixtures("bundle_opa_url")
async def test_batch_check_answers_a_plan_of_20_from_one_revision_with_audited_ids(
    bundle_opa_url: str, secrets_: Mapping[str, str], tmp_path: Path
) -> None:
    """A user's plan of 20 actions: 20 results in order, each with the decision a
    Check of that request gets (asked of the same authz), one revision, and one audit
    row per action with its decision id and no key in clear."""
    async with running_authz(bundle_opa_url, tmp_path) as (address, audit_db):
        response = await batch_check(address, planning_request(secrets_["user"]))
        assert response.revision == "rev-e2e"
        assert [r.id for r in response.results] == [f"step-{i}" for i in range(20)]
        assert [r.allowed for r in response.results] == [i % 4 < 2 for i in range(20)]
        assert all(r.http_status == (200 if r.allowed else 403) for r in response.results)
        assert all(r.reason for r in response.results)
        ids = [r.decision_id for r in response.results]
        assert len(set(ids)) == 20
        # The same requests as single Checks get the same decisions.
        async with grpc.aio.insecure_channel(address) as channel:
            check = channel.unary_unary(
                "/envoy.service.auth.v3.Authorization/Check",
                request_serializer=external_auth_pb2.CheckRequest.SerializeToString,
                response_deserializer=external_auth_pb2.CheckResponse.FromString,
            )
            for action, result in zip(
                planning_request(secrets_["user"]).actions, response.results, strict=True
            ):
                single = await check(
                    check_request(
                        method=action.method,
                        path=action.path,
                        headers={"x-api-key": secrets_["user"], ":authority": action.host},
                    ),
                    timeout=10,
                )
                assert single.HasField("ok_response") is result.allowed, action.path
                if not result.allowed:
                    body = json.loads(single.denied_response.body)
                    assert body["error"] == result.reason
    # The audit writer has flushed on close: one decision row per action, by id.
    with contextlib.closing(connect(audit_db)) as conn:
        rows = {e.decision_id: e for e in read_entries(conn, kind="decision")}
    assert set(ids) <= set(rows)
    for result in response.results:
        body = rows[result.decision_id].body
        assert body["result"] == ("allow" if result.allowed else "deny"), sorted(body)
        assert body["revision"] == "rev-e2e"
    audited = json.dumps([rows[i].body for i in ids])
    assert secrets_["user"] not in audited


async def test_batch_check_actions_count_against_the_rate_limit_like_checks(
    bundle_opa_url: str, secrets_: Mapping[str, str], tmp_path: Path
) -> None:
    """A key on the default tier (60 a minute, 10 s of burst: 10 at once): of 20 allowed
    reads in one BatchCheck, the first 10 are allowed and the rest denied 429
    rate_limited, as 20 Checks would be."""
    plan = decisions_pb2.BatchCheckRequest(
        principal=decisions_pb2.Principal(headers={"x-api-key": secrets_["limited"]}),
        actions=[
            decisions_pb2.Action(id=str(i), method="GET", path=f"/api/v1/items/{i}")
            for i in range(20)
        ],
    )
    async with running_authz(bundle_opa_url, tmp_path) as (address, _):
        response = await batch_check(address, plan)
    assert [r.allowed for r in response.results] == [True] * 10 + [False] * 10
    assert {(r.http_status, r.reason) for r in response.results[10:]} == {(429, "rate_limited")}


async def test_batch_check_is_counted_and_its_batch_sized_in_metrics(
    bundle_opa_url: str, secrets_: Mapping[str, str], tmp_path: Path
) -> None:
    """One answered BatchCheck of 20 and one refused: authz_batch_checks_total by result,
    authz_batch_check_actions, one batch query of 20 in authz_opa_batch_size, and the 20
    decisions in authz_decisions_total on the default path."""
    async with running_runtime(bundle_opa_url, tmp_path) as (runtime, _):
        address = f"127.0.0.1:{runtime.grpc.port}"
        await batch_check(address, planning_request(secrets_["user"]))
        with pytest.raises(grpc.aio.AioRpcError):
            await batch_check(address, decisions_pb2.BatchCheckRequest())
        registry = runtime.metrics.registry
        value = registry.get_sample_value
        assert value("authz_batch_checks_total", {"result": "ok"}) == 1
        assert value("authz_batch_checks_total", {"result": "INVALID_ARGUMENT"}) == 1
        assert value("authz_batch_check_actions_count") == 1
        assert value("authz_batch_check_actions_sum") == 20
        assert value("authz_opa_batch_size_count", {"outcome": "decided"}) == 1
        assert value("authz_opa_batch_size_sum", {"outcome": "decided"}) == 20
        decided = sum(
            s.value
            for m in registry.collect()
            if m.name == "authz_decisions"
            for s in m.samples
            if s.name == "authz_decisions_total"
        )
        assert decided == 20


@pytest.mark.parametrize(
    ("request_", "code", "detail"),
    [
        (decisions_pb2.BatchCheckRequest(), grpc.StatusCode.INVALID_ARGUMENT, "no actions"),
        (
            decisions_pb2.BatchCheckRequest(
                actions=[decisions_pb2.Action(method="GET", path="/a")] * 26
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "26 actions",
        ),
        (
            decisions_pb2.BatchCheckRequest(
                actions=[decisions_pb2.Action(method="GET", path="/" + "a" * 8000)] * 9
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "bytes",
        ),
        (b"\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "not a BatchCheckRequest"),
        (
            decisions_pb2.BatchCheckRequest(
                principal=decisions_pb2.Principal(headers={"x-api-key": "ak_secret_in_both"}),
                actions=[
                    decisions_pb2.Action(
                        method="GET", path="/a", headers={"x-api-key": "ak_secret_in_both"}
                    )
                ],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "principal",
        ),
        (
            decisions_pb2.BatchCheckRequest(
                actions=[
                    decisions_pb2.Action(
                        method="GET", path="/a", context_extensions={"decision_path": "x/y"}
                    )
                ]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "decision_path",
        ),
    ],
    ids=["empty", "too-many-actions", "too-large", "not-protobuf", "credential-twice", "path"],
)
async def test_batch_check_refuses_a_bad_request_precisely_and_decides_nothing(
    bundle_opa_url: str,
    tmp_path: Path,
    request_: decisions_pb2.BatchCheckRequest | bytes,
    code: grpc.StatusCode,
    detail: str,
) -> None:
    async with running_authz(bundle_opa_url, tmp_path) as (address, audit_db):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await batch_check(address, request_)
    assert refused.value.code() == code
    assert detail in (refused.value.details() or "")
    assert "ak_secret_in_both" not in (refused.value.details() or "")
    with contextlib.closing(connect(audit_db)) as conn:
        assert list(read_entries(conn, kind="decision")) == []


@pytest.mark.parametrize("status", [401, 403, 500])
async def test_a_batch_query_refused_by_opas_api_authorization_means_no_batch_rule(
    status: int,
) -> None:
    """401/403 from OPA's API authorization (a policy that does not list the batch
    rule): "no batch rule", decide one by one; any other failure stays an error."""

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"code": "unauthorized", "message": "no"}, status=status)

    app = web.Application()
    app.router.add_post("/v1/data/authz/batch/result", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = OpaClient(f"http://127.0.0.1:{port}")
    try:
        if status == 500:
            with pytest.raises(OpaResponseError):
                await client.query_batch("authz/gateway/decision", [{}], 5.0)
        else:
            answer = await client.query_batch("authz/gateway/decision", [{}], 5.0)
            assert answer.results is None
    finally:
        await client.close()
        await runner.cleanup()
