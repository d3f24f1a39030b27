"""The Python null ext_authz servers bench/server_floor.py measures: each really serves
Envoy's Check over gRPC and answers OK to any CheckRequest, so the floor it reports is
the cost of a working server, not of one that fails fast."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authz.tools.launch import free_port
from bench.null_server import IMPLEMENTATIONS, OK
from tests.helpers.fakes import check_request

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(params=IMPLEMENTATIONS)
def null_server(request: pytest.FixtureRequest) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.null_server",
            "--impl",
            request.param,
            "--addr",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"serving 127.0.0.1:{port}"
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_every_null_server_answers_ok_to_every_check(null_server: str) -> None:
    requests = [
        check_request(path="/api/v1/items/1", headers={"x-api-key": "ak_1"}),
        check_request(path="/x" * 500, headers={f"h{i}": "v" * 100 for i in range(50)}),
        external_auth_pb2.CheckRequest(),
    ]
    with grpc.insecure_channel(null_server) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        deadline = time.monotonic() + 10
        for request in requests:
            response = stub.Check(request, timeout=max(0.1, deadline - time.monotonic()))
            assert response == OK
            assert response.status.code == 0
            assert response.HasField("ok_response")
