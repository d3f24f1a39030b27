"""End-to-end fixtures: the ``e2e`` session fixture, one running stack for the session
(builders in :mod:`tests.helpers.e2e`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from authz.stack.supervisor import free_port
from tests.helpers.e2e import Env, running_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def e2e(
    repo_root: Path, tmp_path_factory: pytest.TempPathFactory, opa_bin: str, envoy_bin: str
) -> Iterator[Env]:
    """The whole gateway stack (:func:`running_env`), started once for the session; the
    gateway and egress clients keep every response (:meth:`Env.record`)."""
    # egress tunnels: the port of the local HTTPS server that plays the allowed host.
    with running_env(
        repo_root, tmp_path_factory.mktemp("e2e"), tunnel_test_port=free_port()
    ) as env:
        for client in (env.gateway, env.egress):
            client.event_hooks["response"] = [env.record]
        yield env
