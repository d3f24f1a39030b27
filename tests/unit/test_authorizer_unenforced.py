"""Authorizer: allows no policy decided, and late answers (found in review)."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2

from authz.core.authorizer import Authorizer
from authz.core.errors import OpaUnavailable
from authz.core.headers import UNENFORCED_REMOVALS
from authz.core.mode import Control, Mode
from tests.unit.fakes import FakeEngine, ManualClock, check_request

PATH = "authz/gateway/decision"
EGRESS = "authz/egress/decision"
CREDENTIAL_HEADERS = ("x-api-key", "authorization", "proxy-authorization", "x-sandbox-token")
DENY = {"allowed": False, "http_status": 401, "reason": "invalid_api_key"}


def make(engine: Any, **kwargs: Any) -> Authorizer:
    options: dict[str, Any] = {
        "default_decision_path": PATH,
        "credential_headers": CREDENTIAL_HEADERS,
        "timeout_s": 0.3,
    }
    options.update(kwargs)
    return Authorizer(engine, **options)


def upstream_sees(
    response: external_auth_pb2.CheckResponse, sent: dict[str, str]
) -> dict[str, str]:
    """The request headers the upstream receives: what the client sent, minus
    headers_to_remove, with the OkHttpResponse headers set on top."""
    assert response.HasField("ok_response")
    ok = response.ok_response
    removed = set(ok.headers_to_remove)
    seen = {k: v for k, v in sent.items() if k not in removed}
    seen.update({o.header.key: o.header.value for o in ok.headers})
    return seen


FORGED = {
    "x-api-key": "wrong",
    "x-authz-key-id": "key-demo-admin",
    "x-authz-role": "admin",
    "x-authz-tier": "unlimited",
}


@pytest.mark.parametrize(
    ("control", "fail_open_paths", "answer"),
    [
        (Control(Mode.DRY_RUN), (), DENY),
        (Control(), (PATH,), OpaUnavailable("down")),
        (Control(Mode.BYPASS, allow_bypass=True), (), DENY),
    ],
    ids=["dry-run", "fail-open", "bypass"],
)
async def test_unenforced_allows_never_forward_forged_identity_headers(
    control: Control, fail_open_paths: tuple[str, ...], answer: Any
) -> None:
    # README (Gateway): "client-sent values of these [x-authz-key-id, -role, -tier], and
    # any other x-authz-* header, are overwritten or removed". An allow that no policy
    # decided (dry-run suppressing a deny, fail-open, bypass) only strips the credential
    # headers, so an unauthenticated client's forged x-authz-role: admin reaches an
    # upstream that trusts it.
    authorizer = make(FakeEngine(answer), control=control, fail_open_paths=fail_open_paths)
    outcome = await authorizer.check(check_request(headers=FORGED))
    seen = upstream_sees(outcome.response, {**FORGED})
    forged = {k: v for k, v in seen.items() if k in FORGED and k != "x-api-key"}
    assert forged == {}, f"forged identity headers reach the upstream: {forged}"


async def test_bypass_never_forwards_the_client_credentials() -> None:
    # dry-run and fail-open remove the credential headers ("for authz, never for the
    # upstream"); bypass forwards X-API-Key / Authorization / X-Sandbox-Token as sent,
    # so on egress a sandbox token goes to the third-party API, on the gateway the API
    # key goes to the upstream (README: the key is stripped before the upstream).
    control = Control(Mode.BYPASS, allow_bypass=True)
    sent = {"x-api-key": "ak_live_secret", "x-sandbox-token": "sbt_secret"}
    outcome = await make(FakeEngine(DENY), control=control).check(check_request(headers=sent))
    seen = upstream_sees(outcome.response, {**sent})
    assert "x-api-key" not in seen
    assert "x-sandbox-token" not in seen


class _SlowDeny(FakeEngine):
    """OPA answers a deny, 0.35 s after being asked (budget: 0.3 s)."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(DENY)
        self._clock = clock

    async def evaluate(self, path: str, document: Any, timeout_s: float) -> Any:
        self._clock.now += 0.35
        return await super().evaluate(path, document, timeout_s)


async def test_a_late_policy_deny_never_fails_open() -> None:
    # OPA answered: this sandbox/key is denied. The answer came in just past the budget
    # (a busy OPA, or an attacker loading it), so step 5 raises DeadlineExceeded, whose
    # code is in FAIL_OPEN_CODES: on a fail-open path the known deny becomes an allow.
    # README: fail-open is for "OPA unreachable, slow, or answering an error"; a decision
    # OPA actually gave must be enforced.
    clock = ManualClock()
    authorizer = make(_SlowDeny(clock), fail_open_paths=(PATH,), clock=clock)
    outcome = await authorizer.check(check_request(headers={"x-api-key": "wrong"}))
    assert outcome.record.policy_allowed is False
    assert not outcome.response.HasField("ok_response"), (
        f"policy deny turned into a fail-open allow ({outcome.record.reason})"
    )


# Finding 7 (issue #13): what every header an enforced allow strips, sent by a client.
HOSTILE = {
    **{name: "client-value" for name in UNENFORCED_REMOVALS},
    "x-my-credential": "configured-credential",
    "x-authz-anything": "forged",
}
UNENFORCED = [
    (Control(Mode.DRY_RUN), (), DENY),
    (Control(), (EGRESS,), OpaUnavailable("down")),
    (Control(Mode.BYPASS, allow_bypass=True), (), DENY),
]
UNENFORCED_IDS = ["dry-run", "fail-open", "bypass"]


@pytest.mark.parametrize(("control", "fail_open_paths", "answer"), UNENFORCED, ids=UNENFORCED_IDS)
async def test_unenforced_allows_strip_what_enforced_ones_strip(
    control: Control, fail_open_paths: tuple[str, ...], answer: Any
) -> None:
    # Dry-run, bypass and fail-open egress allows forwarded x-sandbox-id, cookie and
    # api-key (and x-forwarded-for, x-http-method-override) to the third party.
    authorizer = make(
        FakeEngine(answer),
        control=control,
        fail_open_paths=fail_open_paths,
        credential_headers=(*CREDENTIAL_HEADERS, "x-my-credential"),
    )
    request = check_request(headers=HOSTILE, context_extensions={"decision_path": EGRESS})
    outcome = await authorizer.check(request)
    seen = upstream_sees(outcome.response, {**HOSTILE})
    leaked = sorted(name for name in HOSTILE if seen.get(name) == HOSTILE[name])
    assert leaked == [], f"an unenforced allow forwards {leaked}"


@pytest.mark.parametrize(("control", "fail_open_paths", "answer"), UNENFORCED, ids=UNENFORCED_IDS)
async def test_unenforced_allows_strip_raw_header_map_names_too(
    control: Control, fail_open_paths: tuple[str, ...], answer: Any
) -> None:
    # With encode_raw_headers, Envoy sends the headers only in header_map (any case).
    request = check_request(context_extensions={"decision_path": EGRESS})
    request.attributes.request.http.headers.clear()
    request.attributes.request.http.header_map.CopyFrom(
        base_pb2.HeaderMap(
            headers=[
                base_pb2.HeaderValue(key="X-Authz-Role", raw_value=b"admin"),
                base_pb2.HeaderValue(key="x-sandbox-id", raw_value=b"sb-1"),
            ]
        )
    )
    authorizer = make(FakeEngine(answer), control=control, fail_open_paths=fail_open_paths)
    outcome = await authorizer.check(request)
    removed = set(outcome.response.ok_response.headers_to_remove)
    assert {"x-authz-role", "x-sandbox-id"} <= removed
