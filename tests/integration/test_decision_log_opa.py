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

import io
import json
import time
from pathlib import Path
from typing import Any

import pytest

from authz.core.decision import json_type
from authz.runtime.logs import OPA_EVENT_TYPE, DecisionLog
from tests.helpers.opa_decision import (
    TOKEN,
    authz_record,
    build_policy_bundle,
    post_with_metadata,
    shape,
)
from tests.helpers.opa_server import running_opa

REVISION = "rev-7"


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


@pytest.fixture(scope="module")
def opa(opa_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("opa-decision-log")
    bundle = build_policy_bundle(opa_bin, base, "--revision", REVISION)
    log = base / "opa.log"
    args = ("--log-level=info", "--set=decision_logs.console=true", "--bundle", str(bundle))
    with running_opa(opa_bin, *args, log_path=log, ready_path="/health?bundles") as url:
        yield url, log


async def test_opa_format_line_has_the_keys_and_types_of_opas_own_line(opa: Any) -> None:
    url, log = opa
    before = len(_opa_lines(log))
    # authz's decision, through the real pipeline and OPA client; the document it sent
    # OPA (credentials already digests).
    record = await authz_record(url)
    assert record.document is not None
    document = dict(record.document)
    stream = io.StringIO()
    DecisionLog(stream, format="opa").record(record)
    [text] = stream.getvalue().splitlines()
    ours = json.loads(text)
    # OPA's own line for the same input, asked for with request metadata (see above).
    post_with_metadata(url, document)
    theirs = _wait_for_lines(log, before + 3)[-1]

    assert shape(ours) == shape(theirs)
    for key in ("bundles", "labels", "metrics"):
        assert {json_type(v) for v in ours[key].values()} <= {
            json_type(v) for v in theirs[key].values()
        }, key
    assert {"id", "version"} <= set(ours["labels"])
    assert "timer_server_handler_ns" in ours["metrics"]
    # The same decision: path, input (credentials were already digests), result, bundles.
    for key in ("path", "input", "result"):
        assert ours[key] == theirs[key], key
    assert ours["bundles"] == theirs["bundles"]
    assert ours["bundles"][next(iter(ours["bundles"]))] == {"revision": REVISION}
    assert TOKEN not in text
