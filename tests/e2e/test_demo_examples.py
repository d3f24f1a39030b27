"""The documented examples (printed by scripts/up, listed in the README) answer as stated,
on a stack built exactly as scripts/up builds it: demo bundle data, demo egress secrets."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from authz.stack.__main__ import agent_example
from authz.stack.demo import EXAMPLES, Example
from authz.stack.supervisor import Ports, Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo_stack(
    repo_root: Path, tmp_path_factory: pytest.TempPathFactory, opa_bin: str, envoy_bin: str
) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("demo")
    for command in (
        [
            "scripts/build-policy-bundle",
            "--data",
            "infra/demo/bundle-data",
            "--out",
            str(base / "bundles"),
        ],
        [
            "scripts/generate-egress-secrets",
            "--env-file",
            "infra/demo/egress.env",
            "--out",
            str(base / "egress-secrets.json"),
            "--require-all",
        ],
    ):
        result = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
    stack = Stack(
        repo_root,
        base / "run",
        base / "bundles",
        Ports.free(),
        secrets_file=base / "egress-secrets.json",
    )
    with stack:
        yield stack


def test_readme_lists_every_example(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text()
    for example in EXAMPLES:
        assert example.path in readme
        if example.error:
            assert example.error in readme


@pytest.mark.parametrize(
    "example", EXAMPLES, ids=[f"{e.proxy}-{e.method}-{e.path}-{e.status}" for e in EXAMPLES]
)
def test_example(demo_stack: Stack, example: Example) -> None:
    port = demo_stack.ports.gateway if example.proxy == "gateway" else demo_stack.ports.egress
    resp = httpx.request(
        example.method,
        f"http://127.0.0.1:{port}{example.path}",
        headers=dict(example.headers),
        timeout=5.0,
    )
    assert resp.status_code == example.status, resp.text
    if example.error is None:
        if example.proxy == "egress":
            assert resp.json()["credential_ok"] is True
    else:
        assert resp.json()["error"] == example.error


def test_the_printed_agent_example_works(demo_stack: Stack) -> None:
    """egress (issue 18): scripts/up's "Use it from an agent" lines, run as printed in a
    shell with nothing else of authz's set: curl reaches the stand-in intercepted with the
    real credential, and a service the tier lacks is refused at the CONNECT (403)."""
    example = agent_example(demo_stack)
    exports = [line.strip() for line in example.splitlines() if line.strip().startswith("export")]
    commands = [line.strip() for line in example.splitlines() if line.strip().startswith("curl")]
    assert len(exports) == 4
    assert len(commands) == 2
    # A shell that already names a CA bundle for curl (as many do): the example's own
    # exports must win over it.
    env = {"PATH": "/usr/bin:/bin", "CURL_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt"}
    first = subprocess.run(
        ["bash", "-c", "\n".join([*exports, f"{commands[0]} -sS --max-time 10"])],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["credential_ok"] is True
    second = subprocess.run(
        ["bash", "-c", "\n".join([*exports, f"{commands[1]} --max-time 10"])],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.stdout.strip() == "403", second.stderr
