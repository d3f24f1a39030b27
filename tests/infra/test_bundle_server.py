"""The Compose bundle server (nginx, infra/compose/nginx/bundles.conf), in a real nginx:
serves bundle archives with ETags and 304s (OPA re-downloads only a changed bundle), and
nothing else: not the unpacked bundle tree beside the archive, not a directory listing,
no method but GET/HEAD. test_opa.py runs OPA's bundle polling against it."""

from __future__ import annotations

import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz.stack.supervisor import free_port
from tests.helpers.infra import ROOT, http_get, nginx_binary, nginx_bundle_server, nginx_config


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    base = tmp_path_factory.mktemp("nginx")
    bundles = base / "bundles"
    (bundles / "authz").mkdir(parents=True)
    (bundles / "authz.tar.gz").write_bytes(b"\x1f\x8b bundle v1")
    (bundles / "authz/.manifest").write_text('{"revision": "x"}')
    with nginx_bundle_server(base / "server", bundles) as port:
        yield port, bundles


def test_serves_bundles_with_etags(served: tuple[int, Path]) -> None:
    port, bundles = served
    url = f"http://127.0.0.1:{port}/bundles/authz.tar.gz"
    status, body = http_get(url)
    assert (status, body) == (200, b"\x1f\x8b bundle v1")
    with urllib.request.urlopen(url, timeout=5) as response:
        headers = dict(response.headers)
    etag = headers["ETag"]
    assert http_get(url, {"If-None-Match": etag})[0] == 304
    (bundles / "authz.tar.gz").write_bytes(b"\x1f\x8b bundle v2, longer")
    assert http_get(url, {"If-None-Match": etag}) == (200, b"\x1f\x8b bundle v2, longer")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/bundles/authz/.manifest", 404),
        ("GET", "/bundles/", 404),
        ("GET", "/bundles/../nginx.conf", 404),
        ("GET", "/", 404),
        ("POST", "/bundles/authz.tar.gz", 403),
        ("PUT", "/bundles/authz.tar.gz", 403),
        ("GET", "/healthz", 200),
    ],
)
def test_serves_nothing_else(served: tuple[int, Path], method: str, path: str, status: int) -> None:
    port, _ = served
    assert http_get(f"http://127.0.0.1:{port}{path}", method=method, body=None)[0] == status


def _nginx_t(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [nginx_binary(), "-t", "-p", str(config.parent), "-c", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def test_config_checks(tmp_path: Path) -> None:
    result = _nginx_t(nginx_config(tmp_path, free_port(), tmp_path))
    assert result.returncode == 0, result.stderr


def test_broken_config_is_rejected(tmp_path: Path) -> None:
    """The check can fail: a typo in a directive is refused by nginx -t."""
    site = (ROOT / "infra/compose/nginx/bundles.conf").read_text().replace("alias ", "alais ")
    result = _nginx_t(nginx_config(tmp_path, free_port(), tmp_path, site))
    assert result.returncode != 0
    assert "alais" in result.stderr
