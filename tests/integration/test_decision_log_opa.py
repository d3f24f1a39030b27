"""The decision log in OPA's schema against OPA's own decision log.

A real OPA (the pinned binary) runs a tiny bundle with ``decision_logs.console=true`` and
answers one query; authz's ``opa``-format line for the same decision must have the same
top-level keys as OPA's own line, each of the same JSON type (and ``bundles``,
``labels``, ``metrics`` shaped alike), so a tool that reads OPA's decision logs reads
authz's (https://www.openpolicyagent.org/docs/management-decision-logs).

OPA writes ``req_id`` and ``requested_by`` only at log level info or above (the table in
that page), so OPA runs at info here, as it does by default. OPA writes ``custom`` only
when a caller attaches request metadata (OPA's CHANGELOG, "Data API Request/Response
Metadata"); authz always attaches its own fields there, so OPA's line is asked for with
metadata too.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from authz.core.authorizer import Authorizer
from authz.core.headers import CREDENTIAL_HEADERS
from authz.core.opa import OpaClient
from authz.runtime.logs import OPA_EVENT_TYPE, DecisionLog
from tests.helpers.fakes import check_request
from tests.helpers.opa_server import running_opa

POLICY = """\
package authz.gateway

default decision := {"allowed": false, "reason": "denied", "http_status": 403}

decision := {"allowed": true, "reason": "allowed"} if {
\tinput.attributes.request.http.method == "GET"
}
"""
PATH = "authz/gateway/decision"
REVISION = "rev-7"
TOKEN = "opaque-token-0123456789abcdef"


def _opa_lines(log: Path) -> list[dict[str, Any]]:
    """OPA's decision-log lines so far (its log holds other lines too)."""
    found = []
    for text in log.read_text(encoding="utf-8").splitlines():
        line = json.loads(text) if text.startswith("{") else {}
        if line.get("type") == OPA_EVENT_TYPE:
            found.append(line)
    return found


def _wait_for_lines(log: Path, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = _opa_lines(log)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    pytest.fail(f"OPA wrote {len(_opa_lines(log))} decision-log lines, expected {count}")


def _post(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        f"{url}/v1/data/{PATH}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.status == 200


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "number" if isinstance(value, int | float) else "null"
    )


def _shape(line: dict[str, Any]) -> dict[str, str]:
    return {key: _json_type(value) for key, value in line.items()}


@pytest.fixture(scope="module")
def opa(opa_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("opa-decision-log")
    (base / "policy").mkdir()
    (base / "policy" / "policy.rego").write_text(POLICY, encoding="utf-8")
    bundle = base / "bundle.tar.gz"
    subprocess.run(
        [opa_bin, "build", "-b", str(base / "policy"), "--revision", REVISION, "-o", str(bundle)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    log = base / "opa.log"
    args = ("--log-level=info", "--set=decision_logs.console=true", "--bundle", str(bundle))
    with running_opa(opa_bin, *args, log_path=log, ready_path="/health?bundles") as url:
        yield url, log


async def test_opa_format_line_has_the_keys_and_types_of_opas_own_line(opa: Any) -> None:
    url, log = opa
    request = check_request(headers={"authorization": f"Bearer {TOKEN}", "x-request-id": "r-1"})
    before = len(_opa_lines(log))
    # authz's decision, through the real pipeline and OPA client.
    client = OpaClient(url)
    try:
        outcome = await Authorizer(
            client,
            default_decision_path=PATH,
            credential_headers=CREDENTIAL_HEADERS,
            timeout_s=5.0,
        ).check(request)
        # The document the authorizer sent OPA (credentials already digests).
        assert outcome.record.document is not None
        document = dict(outcome.record.document)
        evaluation = await client.evaluate(PATH, document, 5.0)
    finally:
        await client.close()
    # The fields only the authorizer's caller knows (the record documents them): filled
    # here from the same query in case the authorizer leaves them empty.
    record = dataclasses.replace(
        outcome.record,
        opa_result=evaluation.result,
        revisions=evaluation.revisions,
        peer="ipv4:127.0.0.1:50000",
    )
    stream = io.StringIO()
    DecisionLog(stream, format="opa").record(record)
    [text] = stream.getvalue().splitlines()
    ours = json.loads(text)
    # OPA's own line for the same input, asked for with request metadata (see above).
    _post(url, {"input": document, "authz.example/metadata": {"caller": "test"}})
    theirs = _wait_for_lines(log, before + 3)[-1]

    assert _shape(ours) == _shape(theirs)
    for key in ("bundles", "labels", "metrics"):
        assert {_json_type(v) for v in ours[key].values()} <= {
            _json_type(v) for v in theirs[key].values()
        }, key
    assert {"id", "version"} <= set(ours["labels"])
    assert "timer_server_handler_ns" in ours["metrics"]
    # The same decision: path, input (credentials were already digests), result, bundles.
    for key in ("path", "input", "result"):
        assert ours[key] == theirs[key], key
    assert ours["bundles"] == theirs["bundles"]
    assert ours["bundles"][next(iter(ours["bundles"]))] == {"revision": REVISION}
    assert TOKEN not in text
