"""One decision through authz and the same input for OPA's own decision log: the shared
setup of the integration tests that hold authz's decision log (console and upload) up
against OPA's (https://www.openpolicyagent.org/docs/management-decision-logs)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from authz.core.authorizer import Authorizer
from authz.core.decision import json_type
from authz.core.headers import CREDENTIAL_HEADERS
from authz.core.opa import OpaClient
from authz.core.record import DecisionRecord
from tests.helpers.fakes import check_request

__all__ = [
    "PATH",
    "POLICY",
    "TOKEN",
    "authz_record",
    "build_policy_bundle",
    "post_with_metadata",
    "shape",
]

POLICY = """\
package authz.gateway

default decision := {"allowed": false, "reason": "denied", "http_status": 403}

decision := {"allowed": true, "reason": "allowed"} if {
\tinput.attributes.request.http.method == "GET"
}
"""
PATH = "authz/gateway/decision"
TOKEN = "opaque-token-0123456789abcdef"


def build_policy_bundle(opa_bin: str, base: Path, *args: str) -> Path:
    """``opa build`` of :data:`POLICY` (written under ``base/policy``) with ``args`` (e.g.
    ``--revision r``) into ``base/bundle.tar.gz``; returns that path."""
    (base / "policy").mkdir()
    (base / "policy" / "policy.rego").write_text(POLICY, encoding="utf-8")
    bundle = base / "bundle.tar.gz"
    subprocess.run(
        [opa_bin, "build", "-b", str(base / "policy"), *args, "-o", str(bundle)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return bundle


async def authz_record(url: str) -> DecisionRecord:
    """authz's record of one GET with a bearer :data:`TOKEN`, through the real Authorizer
    and OpaClient at OPA ``url``; the fields only the authorizer's caller knows
    (``opa_result``, ``revisions``, ``peer``) filled from the same query. The record's
    ``document`` is the input OPA was sent (credentials already digests)."""
    request = check_request(headers={"authorization": f"Bearer {TOKEN}", "x-request-id": "r-1"})
    client = OpaClient(url)
    try:
        outcome = await Authorizer(
            client,
            default_decision_path=PATH,
            credential_headers=CREDENTIAL_HEADERS,
            timeout_s=5.0,
        ).check(request)
        assert outcome.record.document is not None
        evaluation = await client.evaluate(PATH, dict(outcome.record.document), 5.0)
    finally:
        await client.close()
    return dataclasses.replace(
        outcome.record,
        opa_result=evaluation.result,
        revisions=evaluation.revisions,
        peer="ipv4:127.0.0.1:50000",
    )


def post_with_metadata(url: str, document: dict[str, Any]) -> None:
    """OPA's own decision for ``document`` at :data:`PATH`, asked for with request
    metadata so OPA's event carries ``custom`` as authz's does (OPA's CHANGELOG, "Data API
    Request/Response Metadata")."""
    request = urllib.request.Request(
        f"{url}/v1/data/{PATH}",
        data=json.dumps({"input": document, "authz.example/metadata": {"caller": "test"}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.status == 200


def shape(event: dict[str, Any]) -> dict[str, str]:
    """Each top-level key of a decision-log event with its JSON type name."""
    return {key: json_type(value) for key, value in event.items()}
