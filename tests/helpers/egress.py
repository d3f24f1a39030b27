"""Egress service specs for the egress Envoy generator tests."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from authz.stack.tls import Leaf, ensure_certificates, ensure_pki
from authz.tools.egress_envoy import ENVOY_TLS_DIR, INTERCEPT_TLS_DIR, intercepted_hosts
from authz.tools.services import parse_service
from tests.helpers import ROOT

__all__ = [
    "SERVICES_FILE",
    "ProxyAnswer",
    "basic",
    "http11",
    "intercept_certificates",
    "proxy_connect",
    "real_services",
    "svc",
    "tls_client",
    "tls_echo_server",
]

SERVICES_FILE = ROOT / "policy/egress/data.json"


def real_services() -> dict[str, Any]:
    """The services of the shipped egress data (policy/egress/data.json)."""
    services: dict[str, Any] = json.loads(SERVICES_FILE.read_text(encoding="utf-8"))["services"]
    return services


def svc(base_url: object, *, credential: bool = True) -> dict[str, Any]:
    """A service spec; an http one has no credential (the generator refuses that)."""
    spec: dict[str, Any] = {"base_url": base_url}
    if credential:
        spec["credential"] = {"header": "authorization", "format": "{secret}"}
    return spec


def intercept_certificates(tls_dir: Path, services: dict[str, Any]) -> Path:
    """Issue the interception certificates a generated egress config names, under
    ``tls_dir`` (the directory ``relocate_tls`` moves the config's TLS files to): one
    leaf per intercepted host, signed by a new egress CA. Returns that CA's certificate."""
    parsed = [parse_service(name, spec) for name, spec in services.items()]
    directory = tls_dir / Path(INTERCEPT_TLS_DIR).relative_to(ENVOY_TLS_DIR)
    hosts = intercepted_hosts(parsed)
    ensure_pki(directory, {host: Leaf("server", (host,)) for host in hosts})
    return directory / "ca.crt"


# -- egress as a proxy (issue 18): raw CONNECT, a TLS echo server -------------------------


@dataclass
class ProxyAnswer:
    """What the egress proxy answered to a CONNECT: ``status``, lowercase ``headers``,
    ``body``, and the open ``sock`` (the tunnel when status is 200; close it)."""

    status: int
    headers: dict[str, str]
    body: bytes
    sock: socket.socket

    def error(self) -> str:
        """The ``error`` of a JSON deny body."""
        return str(json.loads(self.body)["error"])


def basic(user: str, password: str) -> str:
    """A ``Proxy-Authorization`` value (RFC 7617 Basic)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def proxy_connect(
    port: int, authority: str, authorization: str | None, *, timeout_s: float = 10.0
) -> ProxyAnswer:
    """Send ``CONNECT authority HTTP/1.1`` to the egress proxy on 127.0.0.1:``port`` with
    ``Proxy-Authorization: authorization`` (none when None) and read the answer's head
    and (for a non-200, by content-length) body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    head = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if authorization is not None:
        head.append(f"Proxy-Authorization: {authorization}")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    raw_head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(status_line.split()[1])
    body = rest
    if status != 200:
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(4096)
            if not chunk:
                break
            body += chunk
    return ProxyAnswer(status, headers, body, sock)


def tls_client(sock: socket.socket, server_name: str, cafile: Path) -> ssl.SSLSocket:
    """``sock`` (an open tunnel) wrapped in TLS to ``server_name``, verified against
    ``cafile`` only, HTTP/1.1."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(["http/1.1"])
    return context.wrap_socket(sock, server_hostname=server_name)


def http11(
    sock: ssl.SSLSocket, method: str, host: str, path: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on ``sock`` (keep-alive); returns (status, headers, body),
    the body read by content-length."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Content-Length: 0"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the answer's head")
        data += chunk
    raw_head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines_in = raw_head.decode("latin-1").split("\r\n")
    answer = {}
    for line in lines_in:
        name, _, value = line.partition(":")
        answer[name.strip().lower()] = value.strip()
    length = int(answer.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), answer, body


@contextmanager
def tls_echo_server(port: int, directory: Path, name: str) -> Iterator[Path]:
    """A TLS server on 127.0.0.1:``port`` with its own CA and a certificate for ``name``
    (files in ``directory``) that echoes every byte it receives; yields its CA file.
    Stopped (and its threads joined) on exit."""
    files = ensure_certificates(directory, [name])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert, files.key)
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(0.2)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(10)
                    while chunk := tls.recv(65536):
                        tls.sendall(chunk)
            except (OSError, ssl.SSLError):
                return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=serve, args=(conn,), daemon=True)
            thread.start()
            threads.append(thread)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield files.ca
    finally:
        stop.set()
        acceptor.join(5)
        listener.close()
        for thread in threads:
            thread.join(5)
