"""A null ext_authz server in Python: every Check answers OK, nothing is decided.

``python -m bench.null_server --impl aio|grpclib|h2 --addr 127.0.0.1:9191`` serves
Envoy's ``envoy.service.auth.v3.Authorization/Check``
(https://www.envoyproxy.io/docs/envoy/latest/api-v3/service/auth/v3/external_auth.proto)
in plaintext, parsing each CheckRequest (as any server must) and answering one prebuilt
CheckResponse (status OK, an empty OkHttpResponse), on uvloop as authz runs:

- ``aio``: grpc.aio, the server authz uses (C-core under Cython; its I/O on grpc's own
  threads, each call handed to the event loop);
- ``grpclib``: grpclib (https://github.com/vmagamedov/grpclib), a pure-asyncio gRPC
  server on the ``h2`` library;
- ``h2``: the least an asyncio server can do: gRPC's framing
  (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md) by hand over the
  ``h2`` library's HTTP/2 state machine, no deadlines, no limits, no TLS. A yardstick
  only: not a server anyone should run.

``bench.server_floor`` runs each behind the gateway Envoy to measure what a Python gRPC
server costs per Check before any decision is made (``docs/performance.md``). Prints
``serving <addr>`` once it listens; the ``grpclib`` and ``h2`` servers need the
``bench`` extra (``pip install -e .[bench]``, which ``scripts/bench`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import struct
from collections.abc import Mapping
from typing import Any, Final

import uvloop
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import status_pb2

__all__ = ["IMPLEMENTATIONS", "OK", "main"]

SERVICE: Final = "envoy.service.auth.v3.Authorization"
# The one answer, built once.
OK: Final = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=0), ok_response=external_auth_pb2.OkHttpResponse()
)
IMPLEMENTATIONS: Final = ("aio", "grpclib", "h2")


async def _serve_aio(host: str, port: int) -> None:
    import grpc

    async def check(request: Any, context: Any) -> external_auth_pb2.CheckResponse:
        return OK

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        check,
        request_deserializer=external_auth_pb2.CheckRequest.FromString,
        response_serializer=external_auth_pb2.CheckResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Check": handler}),)
    )
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"serving {host}:{port}", flush=True)
    await server.wait_for_termination()


async def _serve_grpclib(host: str, port: int) -> None:
    from grpclib.const import Cardinality, Handler
    from grpclib.server import Server, Stream

    class Authorization:
        async def check(self, stream: Stream[Any, Any]) -> None:
            await stream.recv_message()
            await stream.send_message(OK)

        def __mapping__(self) -> Mapping[str, Handler]:
            return {
                f"/{SERVICE}/Check": Handler(
                    self.check,
                    Cardinality.UNARY_UNARY,
                    external_auth_pb2.CheckRequest,
                    external_auth_pb2.CheckResponse,
                )
            }

    server = Server([Authorization()])
    await server.start(host, port)
    print(f"serving {host}:{port}", flush=True)
    await server.wait_closed()


async def _serve_h2(host: str, port: int) -> None:
    import h2.config
    import h2.connection
    import h2.events

    config = h2.config.H2Configuration(client_side=False, header_encoding=None)
    headers = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    trailers = [(b"grpc-status", b"0")]
    answer = OK.SerializeToString()
    message = struct.pack(">BI", 0, len(answer)) + answer

    class Connection(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport
            self.conn = h2.connection.H2Connection(config)
            self.conn.initiate_connection()
            self.bodies: dict[int, bytearray] = {}
            transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]

        def data_received(self, data: bytes) -> None:
            conn = self.conn
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    self.bodies[event.stream_id] = bytearray()
                elif isinstance(event, h2.events.DataReceived):
                    self.bodies[event.stream_id] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    body = self.bodies.pop(event.stream_id, bytearray())
                    external_auth_pb2.CheckRequest.FromString(bytes(body[5:]))
                    conn.send_headers(event.stream_id, headers)
                    conn.send_data(event.stream_id, message)
                    conn.send_headers(event.stream_id, trailers, end_stream=True)
            out = conn.data_to_send()
            if out:
                self.transport.write(out)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Connection, host, port)
    print(f"serving {host}:{port}", flush=True)
    await server.serve_forever()


def main() -> None:
    """Serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, default="aio")
    parser.add_argument("--addr", default="127.0.0.1:9191", help="host:port")
    args = parser.parse_args()
    host, _, port = args.addr.rpartition(":")
    serve = {"aio": _serve_aio, "grpclib": _serve_grpclib, "h2": _serve_h2}[args.impl]
    uvloop.run(serve(host, int(port)))


if __name__ == "__main__":
    main()
