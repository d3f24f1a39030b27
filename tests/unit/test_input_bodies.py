"""Input building: bodies that must be a 400, never an escape (found in review)."""

from __future__ import annotations

import pytest

from authz.authorizer import Authorizer
from authz.control import Control, Mode
from authz.policy import OpaClient
from tests.unit.fakes import ListSink, check_request

PATH = "authz/gateway/decision"


@pytest.mark.parametrize(
    "body",
    ["[" * 300 + "]" * 300, "[" * 5000 + "]" * 5000, '{"a": "\\ud800"}'],
    ids=["orjson-depth-limit", "json-recursion", "lone-surrogate"],
)
@pytest.mark.parametrize("mode", [Mode.ENFORCE, Mode.DRY_RUN], ids=["enforce", "dry-run"])
async def test_unserializable_json_body_is_an_invalid_request_decision(
    body: str, mode: Mode
) -> None:
    # README: "invalid_request 400: path/query/body of the request cannot be parsed".
    # A JSON body nested deeper than orjson's 255 levels (or json's recursion limit), or
    # holding a lone surrogate escape (json.loads accepts it, orjson.dumps refuses it),
    # raises JSONEncodeError / RecursionError, which are not AuthzError: Authorizer.check
    # raises, the servicer answers a bare 500 internal_error, and no decision record
    # (decision log, metrics, audit trail) is written. In dry-run the request is blocked.
    sink = ListSink()
    # The real client; nothing listens on port 1, but it never gets that far.
    engine = OpaClient("http://127.0.0.1:1")
    authorizer = Authorizer(
        engine,
        default_decision_path=PATH,
        credential_headers=("x-api-key",),
        timeout_s=5.0,
        control=Control(mode),
        sinks=[sink],
    )
    request = check_request(
        method="POST", path="/api/v1/items", body=body, headers={"content-type": "application/json"}
    )
    try:
        outcome = await authorizer.check(request)
    finally:
        await engine.close()
    assert len(sink.records) == 1
    if mode is Mode.ENFORCE:
        assert outcome.record.reason == "invalid_request"
    else:  # dry-run: nothing is blocked
        assert outcome.response.HasField("ok_response")
