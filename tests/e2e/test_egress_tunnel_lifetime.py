"""Access ends when policy says so (issue 18): a tunnel, intercepted or not, ends at the
configured maximum duration however busy it is, and the next CONNECT is decided again.
Its own stack (a 2-second maximum; the session's stack keeps the shipped 300 s)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from authz.stack.supervisor import free_port
from tests.helpers.e2e import TUNNEL_TEST_HOST, Env, running_env
from tests.helpers.egress import basic, http11, proxy_connect, tls_client, tls_echo_server

pytestmark = pytest.mark.e2e

MAX_S = 2


@pytest.fixture(scope="module")
def short(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A stack whose tunnels live at most MAX_S seconds, with the allowed host running
    (its CA: ``<base>/allowed-host/ca.pem``, :func:`allowed_ca`)."""
    base = tmp_path_factory.mktemp("tunnel-lifetime")
    port = free_port()
    with (
        running_env(repo_root, base, tunnel_test_port=port, tunnel_max_duration_s=MAX_S) as env,
        tls_echo_server(port, base / "allowed-host", TUNNEL_TEST_HOST),
    ):
        yield env


def allowed_ca(env: Env) -> Path:
    """The CA of the allowed host's server (tls_echo_server's files under the base)."""
    return env.stack.run_dir.parent / "allowed-host" / "ca.pem"


def _open_for(seconds: float, send: Callable[[], object], recv: Callable[[], object]) -> float:
    """Exchange until the tunnel ends (or ``seconds`` pass); how long it lasted."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            send()
            if not recv():
                break
        except OSError:
            break
        time.sleep(0.2)
    return time.monotonic() - started


def test_a_plain_tunnel_ends_at_the_maximum_duration(short: Env) -> None:
    answer = proxy_connect(
        short.stack.ports.egress,
        f"{TUNNEL_TEST_HOST}:443",
        basic("sb-standard", short.tokens["sb-standard"]),
    )
    assert answer.status == 200, answer.body
    ca = allowed_ca(short)
    with tls_client(answer.sock, TUNNEL_TEST_HOST, ca) as tls:
        tls.settimeout(5)
        lasted = _open_for(MAX_S * 5, lambda: tls.sendall(b"ping"), lambda: tls.recv(64))
    assert MAX_S - 0.5 <= lasted < MAX_S * 5, lasted


def test_an_intercepted_tunnel_ends_at_the_maximum_duration(short: Env) -> None:
    answer = proxy_connect(
        short.stack.ports.egress,
        "api.openai.com:443",
        basic("sb-standard", short.tokens["sb-standard"]),
    )
    assert answer.status == 200, answer.body
    with tls_client(answer.sock, "api.openai.com", short.stack.egress_ca) as tls:
        tls.settimeout(5)
        statuses: list[int] = []

        def send() -> None:
            status, _, body = http11(tls, "GET", "api.openai.com", "/v1/models", {})
            short.seen.append(body.decode(errors="replace"))
            statuses.append(status)
            assert json.loads(body)["credential_ok"] is True

        lasted = _open_for(MAX_S * 5, send, lambda: True)
    assert statuses
    assert set(statuses) == {200}
    assert MAX_S - 0.5 <= lasted < MAX_S * 5, lasted
    # The next CONNECT is decided again (and allowed: nothing was revoked).
    again = proxy_connect(
        short.stack.ports.egress,
        "api.openai.com:443",
        basic("sb-standard", short.tokens["sb-standard"]),
    )
    again.sock.close()
    assert again.status == 200
