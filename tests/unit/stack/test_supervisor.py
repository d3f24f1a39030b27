"""stack.supervisor: the restart delays of a crashed child (Backoff) and how the stack's
processes are defined (no process started)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from authz.stack.supervisor import DEFAULT_BACKOFF, Backoff, Ports, Stack


@pytest.mark.parametrize(
    ("uptimes_s", "delays_s"),
    [
        ([0.1] * 8, [0.5, 1, 2, 4, 8, 10, 10, 10]),
        ([0.1, 0.1, 0.1, 10.0, 0.1], [0.5, 1, 2, 0.5, 1]),
        ([9.9, 9.9, 9.9], [0.5, 1, 2]),
        ([60.0, 60.0, 60.0], [0.5, 0.5, 0.5]),
    ],
    ids=["crash-loop-doubles-to-the-cap", "stable-run-resets", "just-short-of-stable", "rare"],
)
def test_default_backoff_doubles_to_its_cap_and_resets_after_a_stable_run(
    uptimes_s: list[float], delays_s: list[float]
) -> None:
    """Each crash (after the child ran ``uptime`` seconds) waits the next delay: 0.5 s
    doubling to 10 s; a child that ran 10 s or more starts over at 0.5 s."""
    attempt, seen = 0, []
    for uptime in uptimes_s:
        attempt = DEFAULT_BACKOFF.next_attempt(attempt, uptime)
        seen.append(DEFAULT_BACKOFF.delay_s(attempt))
    assert seen == delays_s


def test_backoff_delay_never_exceeds_the_cap_however_many_attempts() -> None:
    backoff = Backoff(initial_s=0.1, factor=3.0, cap_s=2.0)
    assert [backoff.delay_s(n) for n in (1, 2, 3, 4, 10_000)] == pytest.approx(
        [0.1, 0.3, 0.9, 2.0, 2.0]
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"initial_s": 0.0}, "initial_s"),
        ({"factor": 0.5}, "factor"),
        ({"initial_s": 2.0, "cap_s": 1.0}, "cap_s"),
        ({"stable_s": -1.0}, "stable_s"),
    ],
    ids=["zero-initial", "shrinking", "cap-below-initial", "negative-stable"],
)
def test_backoff_refuses_a_policy_that_would_spin_or_shrink(
    kwargs: dict[str, float], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        Backoff(**kwargs)


# -- authz reaches OPA over a unix socket --------------------------------------------


def test_authz_reaches_the_stacks_opa_over_a_unix_socket(
    tmp_path: Path, repo_root: Path, opa_bin: str, envoy_bin: str
) -> None:
    """No process is started: the definitions say OPA also listens on
    ``<run_dir>/opa.sock`` and authz's AUTHZ_OPA_URL is that socket."""
    stack = Stack(repo_root, tmp_path / "run", tmp_path / "bundles", Ports.free())
    socket = tmp_path.resolve() / "run" / "opa.sock"
    assert stack.opa_socket == socket
    processes = {process.name: process for process in stack._define()}
    assert f"--addr=unix://{socket}" in processes["opa"].argv
    assert any(arg.startswith("--addr=127.0.0.1:") for arg in processes["opa"].argv)
    assert processes["authz"].env["AUTHZ_OPA_URL"] == f"unix://{socket}"


@pytest.mark.parametrize(
    ("run_dir", "wrap"),
    [("r" * 120, None), ("run", lambda process: process)],
    ids=["path-too-long-for-a-socket", "opa-in-a-container"],
)
def test_authz_falls_back_to_opas_tcp_port_where_a_socket_cannot_serve(
    tmp_path: Path, run_dir: str, wrap: Any
) -> None:
    stack = Stack(tmp_path, tmp_path / run_dir, tmp_path / "bundles", wrap=wrap)
    assert stack.opa_socket is None
