"""Large decisions end to end with OPA at its default settings (issue #15).

OPA gzips an answer of 1 KiB or more (``server.encoding.gzip.min_length``, default 1024)
when the client accepts gzip. A real OPA with no configuration at all, a real authz
process and a real Envoy: a deny with a 4 KB HTML body reaches the client byte for byte,
and an allow with 8 KB of dynamic metadata reaches the upstream, and Envoy holds all of the
metadata (the route copies Envoy's ext_authz dynamic metadata to a request header).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from authz.stack.supervisor import Process, free_port, http_ok
from tests.helpers.envoy_rig import ext_authz_envoy_config, running_echo, running_envoy
from tests.helpers.opa_server import running_opa

pytestmark = pytest.mark.e2e

HTML = "<!doctype html><html><body>" + "<p>This page is not for you.</p>" * 130 + "</body></html>"
BLOB = "m" * 8192
PATH = "authz/large/decision"
POLICY = """\
package authz.large

import rego.v1

default decision := {"allowed": false, "http_status": 403}

decision := {
\t"allowed": false,
\t"http_status": 503,
\t"headers": {"content-type": "text/html; charset=utf-8"},
\t"body": data.large.html,
} if input.parsed_path[0] == "html-deny"

decision := {
\t"allowed": true,
\t"headers": {"x-large": "metadata"},
\t"dynamic_metadata": {"blob": data.large.blob, "size": count(data.large.blob)},
} if input.parsed_path[0] == "big-metadata"
"""


@dataclass(frozen=True)
class Rig:
    opa_url: str
    envoy: str


@pytest.fixture(scope="module")
def rig(opa_bin: str, envoy_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    base = tmp_path_factory.mktemp("large-decisions")
    policy = base / "policy"
    policy.mkdir()
    (policy / "large.rego").write_text(POLICY, encoding="utf-8")
    (policy / "data.json").write_text(json.dumps({"large": {"html": HTML, "blob": BLOB}}))
    grpc_port, admin_port, upstream, listen, envoy_admin = (free_port() for _ in range(5))
    config = ext_authz_envoy_config(listen, envoy_admin, grpc_port, upstream, forward_metadata=True)
    # OPA exactly as `opa run --server` starts: no config file, no --set.
    with running_opa(opa_bin, str(policy), log_path=base / "opa.log") as opa_url:
        authz = Process(
            "authz",
            [sys.executable, "-m", "authz", "serve"],
            base / "authz.log",
            lambda: http_ok(f"http://127.0.0.1:{admin_port}/healthz"),
            env={
                **os.environ,
                "AUTHZ_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
                "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{admin_port}",
                "AUTHZ_OPA_URL": opa_url,
                "AUTHZ_DEFAULT_DECISION_PATH": PATH,
                "AUTHZ_DECISION_LOG": "false",
                "AUTHZ_AUDIT_DB": str(base / "audit.db"),
                "AUTHZ_OVERRIDES_FILE": str(base / "overrides.json"),
            },
        )
        authz.start()
        try:
            authz.wait_ready(30)
            with running_echo(upstream), running_envoy(envoy_bin, config, base, envoy_admin):
                yield Rig(opa_url, f"http://127.0.0.1:{listen}")
        finally:
            authz.stop()


@pytest.mark.parametrize("case", ["html-deny", "big-metadata"])
def test_opa_at_its_defaults_gzips_these_answers_for_a_client_that_accepts_gzip(
    rig: Rig, case: str
) -> None:
    """The rig is the case the issue names: each answer is over OPA's 1 KiB threshold."""
    answer = httpx.post(
        f"{rig.opa_url}/v1/data/{PATH}",
        json={"input": {"parsed_path": [case]}},
        headers={"accept-encoding": "gzip"},
    )
    assert answer.headers["content-encoding"] == "gzip"
    assert len(answer.content) > 4096  # httpx inflated it


def test_deny_with_a_4kb_html_body_reaches_the_client_intact(rig: Rig) -> None:
    reply = httpx.get(f"{rig.envoy}/html-deny")
    assert reply.status_code == 503
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    assert reply.text == HTML
    assert len(reply.content) > 4000
    assert reply.headers["x-authz-decision-id"]


def test_allow_with_8kb_of_dynamic_metadata_reaches_upstream_and_envoy(rig: Rig) -> None:
    reply = httpx.get(f"{rig.envoy}/big-metadata")
    assert reply.status_code == 200
    seen = reply.json()
    assert seen["headers"]["x-large"] == "metadata"
    decision_id = seen["headers"]["x-authz-decision-id"]
    # The ext_authz dynamic metadata as Envoy holds it (the route copies it to a header).
    metadata = json.loads(seen["headers"]["x-ext-authz-metadata"])
    assert metadata["decision_id"] == decision_id
    assert metadata["blob"] == BLOB
    assert metadata["size"] == 8192
