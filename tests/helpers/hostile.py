"""Hostile traffic for the attack suite (tests/e2e/test_attack_suite.py) and the hostile
benchmark step (bench/hostile.py): what a caller without any credential can send.

Requests are plain data (:class:`HostileRequest`), built by seeded generators so a run is
reproducible, and sent either by :func:`send` (httpx, in the tests) or written as a vegeta
``http`` targets file by :func:`vegeta_targets` (the benchmark). Sizes stay inside what
the repository's Envoy configs let through to authz, so the bytes reach authz rather than
being refused by Envoy, except the ``*_over_limit`` kinds, which probe Envoy's own limits:

- bodies: a gateway route that asks for the body gets up to 65,536 bytes of it
  (``with_request_body.max_request_bytes``: the gateway filter's own setting before
  issue #13, the per-route setting the README's "Request bodies" shows since; the attack
  suite's body route uses it); the egress sends authz none (``authz/tools/egress_envoy.py``);
- headers: Envoy's HTTP connection manager accepts at most 60 KiB of request headers
  (``max_request_headers_kb``) and 100 headers (``max_headers_count``) by default, and
  answers 431 above either (Envoy's ``HttpConnectionManager`` and ``HttpProtocolOptions``
  API reference); neither file changes these defaults.

Every :class:`HostileRequest` carries no valid credential: a 2xx answer to one is a bypass.
:class:`Slowloris` holds connections that send their request a byte at a time.

Pure functions of their arguments, except :func:`send`, :func:`vegeta_targets` (writes
body files) and :class:`Slowloris` (sockets, a thread).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import random
import socket
import string
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import httpx

__all__ = [
    "ADMIN_PATH",
    "BODY_LIMIT",
    "BOMBS",
    "DECISION_ID_HEADER",
    "HEADERS_COUNT_LIMIT",
    "HEADERS_LIMIT",
    "HostileRequest",
    "Outcome",
    "Slowloris",
    "Tally",
    "bogus_api_key",
    "bombs",
    "distinct_keyless",
    "egress_bogus_sandbox",
    "fillers",
    "for_egress",
    "form_pairs_bomb",
    "gateway_mix",
    "header_flood",
    "huge_header",
    "hunt_deadline",
    "json_depth_bomb",
    "json_wide_bomb",
    "malformed_query",
    "multipart_boundary_lines",
    "multipart_nested_comments",
    "multipart_params_bomb",
    "multipart_parts_bomb",
    "send",
    "vegeta_targets",
]

# Body bytes Envoy buffers and sends authz on a gateway route that asks for the body.
BODY_LIMIT: Final = 65_536
# Envoy's default max_request_headers_kb (60 KiB) and max_headers_count (100).
HEADERS_LIMIT: Final = 60 * 1024
HEADERS_COUNT_LIMIT: Final = 100
# Room kept under HEADERS_LIMIT for the request line, Host, Content-Type and what the
# client library adds (user-agent, accept, content-length, ...).
_HEADROOM: Final = 2 * 1024
# authz sets it on every deny it answers (authz/core/response.py); Envoy's own answers (431,
# 413, 503 after an ext_authz timeout) lack it.
DECISION_ID_HEADER: Final = "x-authz-decision-id"
# A gateway path only an admin key may use (policy/gateway/data.json): the target an
# attacker would aim a bypass at.
ADMIN_PATH: Final = "/api/v1/admin/users"
_TOKEN_CHARS: Final = string.ascii_letters + string.digits
# Longest header value in one line.
_MAX_LINE: Final = HEADERS_LIMIT - _HEADROOM
_MULTIPART: Final = "multipart/form-data; boundary="


@dataclass(frozen=True, slots=True)
class HostileRequest:
    """One request without a valid credential. ``kind`` names the generator (for per-kind
    counts); ``headers`` are sent in order, ``host`` (None: the client's) picks an egress
    service; ``body`` is sent as is (with the Content-Length the client computes);
    ``proxy`` is the listener it is for: ``gateway`` or ``egress``."""

    kind: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    host: str | None = None
    proxy: str = "gateway"

    @property
    def header_bytes(self) -> int:
        """Bytes of the headers as sent on HTTP/1.1 (``name: value\\r\\n`` each)."""
        return sum(len(name) + len(value) + 4 for name, value in self.headers)


def _token(rng: random.Random, length: int) -> str:
    return "".join(rng.choices(_TOKEN_CHARS, k=length))


def _random_headers(rng: random.Random, total: int, per_header: int) -> list[tuple[str, str]]:
    """Distinct random ``x-h-<token>`` headers of ``per_header`` value bytes, about
    ``total`` bytes in all."""
    count = max(1, total // (per_header + 16))
    return [(f"x-h-{_token(rng, 8).lower()}", _token(rng, per_header)) for _ in range(count)]


# -- body bombs (gateway: Envoy sends the body to authz) ---------------------------------


def _multipart(boundary: str, parts: Iterable[bytes]) -> bytes:
    """RFC 7578 multipart/form-data: each part (its headers, a blank line, its content)
    after a ``--boundary`` line, then the closing ``--boundary--``."""
    delimiter = f"--{boundary}\r\n".encode()
    return b"".join(delimiter + part + b"\r\n" for part in parts) + f"--{boundary}--\r\n".encode()


def _as_many_as_fit(
    item: Callable[[int], bytes], room: int, *, used: int = 0, cost: int = 0, reserve: int = 0
) -> list[bytes]:
    """``item(0)``, ``item(1)``, ... for as long as they fit in ``room`` bytes: each takes
    its length plus ``cost`` (its separator), ``used`` bytes are taken before the first,
    and ``reserve`` more must stay free after the last."""
    items: list[bytes] = []
    while len(next_item := item(len(items))) + cost + reserve <= room - used:
        items.append(next_item)
        used += len(next_item) + cost
    return items


def _post(kind: str, content_type: str, body: bytes, path: str) -> HostileRequest:
    return HostileRequest(kind, "POST", path, (("content-type", content_type),), body)


def multipart_params_bomb(size: int = BODY_LIMIT, path: str = ADMIN_PATH) -> HostileRequest:
    """One form-data part whose Content-Type carries thousands of parameters
    (``;p0=v;p1=v...``) up to ``size`` bytes: the costliest header grammar for a MIME
    parser to walk (RFC 2045 parameters), a few bytes per parameter."""
    head = b'Content-Disposition: form-data; name="a"\r\nContent-Type: text/plain'
    tail = b"\r\n\r\nv"
    room = size - len(head) - len(tail) - 64
    params = b"".join(_as_many_as_fit(lambda i: b";p%d=v" % i, room))
    return _post(
        "multipart_params", _MULTIPART + "b", _multipart("b", [head + params + tail]), path
    )


def multipart_parts_bomb(size: int = BODY_LIMIT, path: str = ADMIN_PATH) -> HostileRequest:
    """Thousands of tiny form-data parts up to ``size`` bytes (a parser's per-part cost
    times the part count)."""
    parts = _as_many_as_fit(
        lambda i: b'Content-Disposition: form-data; name="f%d"\r\n\r\nv' % i,
        size,
        used=16,
        cost=7,
        reserve=1,
    )
    return _post("multipart_parts", _MULTIPART + "b", _multipart("b", parts), path)


def multipart_boundary_lines(size: int = BODY_LIMIT, path: str = ADMIN_PATH) -> HostileRequest:
    """One part whose content is line after line that starts like the 70-character
    boundary (RFC 2046's longest) but is not it: every line makes a boundary scanner
    compare the whole boundary before moving on."""
    boundary = "B" * 70
    near = f"--{boundary}X\r\n".encode()
    head = b'Content-Disposition: form-data; name="a"\r\n\r\n'
    count = (size - len(head) - 2 * len(boundary) - 16) // len(near)
    body = _multipart(boundary, [head + near * max(count, 1)])
    return _post("multipart_boundary_lines", _MULTIPART + boundary, body, path)


def multipart_nested_comments(depth: int = 2_000, path: str = ADMIN_PATH) -> HostileRequest:
    """A Content-Disposition with ``depth`` nested RFC 5322 comments (``((...))``): a
    recursive-descent header parser recurses once per level."""
    head = b'Content-Disposition: form-data; name="a" ' + b"(" * depth + b")" * depth
    return _post(
        "multipart_nested_comments", _MULTIPART + "b", _multipart("b", [head + b"\r\n\r\nv"]), path
    )


def json_depth_bomb(size: int = BODY_LIMIT, path: str = ADMIN_PATH) -> HostileRequest:
    """``[[[...]]]`` nested ``size // 2`` deep."""
    depth = size // 2
    return _post("json_depth", "application/json", b"[" * depth + b"]" * depth, path)


def json_wide_bomb(size: int = BODY_LIMIT, path: str = ADMIN_PATH) -> HostileRequest:
    """One JSON object with as many short keys as fit in ``size`` bytes."""
    members = _as_many_as_fit(lambda i: b'"k%d":[0]' % i, size, used=2, cost=1)
    return _post("json_wide", "application/json", b"{" + b",".join(members) + b"}", path)


def form_pairs_bomb(size: int = BODY_LIMIT, path: str = ADMIN_PATH) -> HostileRequest:
    """application/x-www-form-urlencoded with as many percent-encoded pairs
    (``a<i>=%41``) as fit in ``size`` bytes."""
    pairs = _as_many_as_fit(lambda i: b"a%d=%%41" % i, size, cost=1)
    return _post("form_pairs", "application/x-www-form-urlencoded", b"&".join(pairs), path)


# -- header floods --------------------------------------------------------------------


def header_flood(
    rng: random.Random, count: int = HEADERS_COUNT_LIMIT - 10, path: str = ADMIN_PATH
) -> HostileRequest:
    """``count`` distinct headers (default: 10 under Envoy's 100-header limit) filling
    the header budget."""
    per = (HEADERS_LIMIT - _HEADROOM) // count - 16
    headers = tuple((f"x-f{i}-{_token(rng, 4).lower()}", _token(rng, per)) for i in range(count))
    return HostileRequest("header_flood", "GET", path, headers)


def huge_header(
    rng: random.Random, size: int = HEADERS_LIMIT - _HEADROOM, path: str = ADMIN_PATH
) -> HostileRequest:
    """Header values of ``size`` random bytes in all (default: just under Envoy's 60 KiB;
    above it Envoy answers 431: kind ``huge_header_over_limit``), in one header up to
    ``_MAX_LINE`` bytes and in as few as needed above (some clients, vegeta among them,
    read a header line into a 64 KiB buffer)."""
    kind = "huge_header" if size <= HEADERS_LIMIT - _HEADROOM else "huge_header_over_limit"
    chunks = [_token(rng, min(_MAX_LINE, size - at)) for at in range(0, size, _MAX_LINE)]
    names = ["x-huge", *(f"x-huge-{i}" for i in range(2, len(chunks) + 1))]
    return HostileRequest(kind, "GET", path, tuple(zip(names, chunks, strict=True)))


# -- cache and store fillers ----------------------------------------------------------


def distinct_keyless(
    rng: random.Random, header_bytes: int = 48 * 1024, path: str = ADMIN_PATH
) -> HostileRequest:
    """No credential; about ``header_bytes`` of distinct random headers, so no two such
    requests share a cache entry (12 headers of 4 KB by default)."""
    return HostileRequest(
        "distinct_keyless", "GET", path, tuple(_random_headers(rng, header_bytes, 4096))
    )


def malformed_query(
    rng: random.Random, header_bytes: int = 48 * 1024, path: str = ADMIN_PATH
) -> HostileRequest:
    """No credential, a query with a bad percent-escape (``%zz``: RFC 3986 section 2.1
    wants two hex digits), so authz refuses it before any policy (400 invalid_request),
    and distinct random headers as :func:`distinct_keyless`: the error path's cost and
    what it keeps."""
    headers = tuple(_random_headers(rng, header_bytes, 4096))
    return HostileRequest("malformed_query", "GET", f"{path}?q=%zz{_token(rng, 8)}", headers)


def bogus_api_key(
    rng: random.Random, header_bytes: int = 16 * 1024, path: str = ADMIN_PATH
) -> HostileRequest:
    """An unknown API key (a fresh random one each time) with distinct random headers."""
    headers = [("x-api-key", f"ak_{_token(rng, 32)}"), *_random_headers(rng, header_bytes, 2048)]
    return HostileRequest("bogus_api_key", "GET", path, tuple(headers))


def _bogus_identity(rng: random.Random, known_sandboxes: Sequence[str]) -> list[tuple[str, str]]:
    """A sandbox identity that is not one: a random id, or (half the time, when
    ``known_sandboxes`` is given) a real id; a random token either way."""
    sandbox = (
        rng.choice(known_sandboxes)
        if known_sandboxes and rng.random() < 0.5
        else f"sb-{_token(rng, 12).lower()}"
    )
    return [("x-sandbox-id", sandbox), ("x-sandbox-token", f"sbt_{_token(rng, 32)}")]


def egress_bogus_sandbox(
    rng: random.Random,
    services: Sequence[str],
    known_sandboxes: Sequence[str] = (),
    header_bytes: int = 32 * 1024,
) -> HostileRequest:
    """An egress call to one of ``services`` with a bogus sandbox identity
    (:func:`_bogus_identity`) and distinct random headers."""
    headers = [*_bogus_identity(rng, known_sandboxes), *_random_headers(rng, header_bytes, 2048)]
    return HostileRequest(
        "egress_bogus_sandbox",
        "GET",
        "/v1/models",
        tuple(headers),
        host=rng.choice(services),
        proxy="egress",
    )


def egress_bogus_proxy_authorization(
    rng: random.Random,
    services: Sequence[str],
    known_sandboxes: Sequence[str] = (),
) -> HostileRequest:
    """An egress call to one of ``services`` identified only by a hostile
    ``Proxy-Authorization`` (issue 18), in turn: Basic with a real or random id and a
    random token, Basic of 32 KiB of base64, Basic that is not base64, Basic without a
    colon, another scheme, and Basic carrying CR/LF and NUL once decoded."""
    sandbox = rng.choice(known_sandboxes) if known_sandboxes else f"sb-{_token(rng, 12).lower()}"
    variants = (
        f"{sandbox}:sbt_{_token(rng, 32)}".encode(),
        _token(rng, 24 * 1024).encode(),
        None,
        _token(rng, 40).encode(),
        b"",
        f"{sandbox}:sbt_{_token(rng, 8)}\r\nx-sandbox-id: sb-admin\x00".encode(),
    )
    choice = rng.randrange(len(variants))
    raw = variants[choice]
    if raw is None:
        value = "Basic " + _token(rng, 64) + "!!"
    elif not raw:
        value = f"Bearer {_token(rng, 40)}"
    else:
        value = "Basic " + base64.b64encode(raw).decode()
    return HostileRequest(
        "egress_bogus_proxy_authorization",
        "GET",
        "/v1/models",
        (("proxy-authorization", value),),
        host=rng.choice(services),
        proxy="egress",
    )


def for_egress(
    request: HostileRequest,
    rng: random.Random,
    services: Sequence[str],
    known_sandboxes: Sequence[str] = (),
) -> HostileRequest:
    """``request`` sent to the egress instead: to one of ``services`` (an allowed path of
    the shipped OpenAI service for a POST, ``/v1/models`` otherwise; its query kept), with
    a bogus sandbox identity before its own headers; kind ``egress_<kind>``."""
    return dataclasses.replace(
        request,
        kind=f"egress_{request.kind}",
        path=("/v1/chat/completions" if request.method == "POST" else "/v1/models")
        + request.path[len(request.path.split("?", 1)[0]) :],
        headers=(*_bogus_identity(rng, known_sandboxes), *request.headers),
        host=rng.choice(services),
        proxy="egress",
    )


# -- mixes ----------------------------------------------------------------------------

# Body bombs: built once per run (they do not vary), cycled.
BOMBS: Final[tuple[Callable[..., HostileRequest], ...]] = (
    multipart_params_bomb,
    multipart_parts_bomb,
    multipart_boundary_lines,
    multipart_nested_comments,
    json_depth_bomb,
    json_wide_bomb,
    form_pairs_bomb,
)


def bombs(path: str = ADMIN_PATH) -> list[HostileRequest]:
    """One of each body bomb, aimed at ``path``."""
    return [make(path=path) for make in BOMBS]


def fillers(rng: random.Random, count: int, path: str = ADMIN_PATH) -> Iterator[HostileRequest]:
    """``count`` gateway requests that fill caches and stores: in every ten, five distinct
    keyless, one malformed query, two bogus keys, one header flood and one huge header
    (every third of those just over Envoy's limit)."""
    for i in range(count):
        slot = i % 10
        if slot < 5:
            yield distinct_keyless(rng, path=path)
        elif slot == 5:
            yield malformed_query(rng, path=path)
        elif slot < 8:
            yield bogus_api_key(rng, path=path)
        elif slot == 8:
            yield header_flood(rng, path=path)
        else:
            over = (i // 10) % 3 == 2
            yield huge_header(rng, HEADERS_LIMIT + 4096, path) if over else huge_header(rng)


def gateway_mix(rng: random.Random, count: int, path: str = ADMIN_PATH) -> Iterator[HostileRequest]:
    """``count`` gateway requests: one in five a body bomb (each bomb in turn), the rest
    :func:`fillers`, so the mix both burns parsing and fills caches."""
    fixed = bombs(path)
    fill = fillers(rng, count, path)
    for i in range(count):
        yield fixed[(i // 5) % len(fixed)] if i % 5 == 0 else next(fill)


# -- sending --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one hostile request ended: ``status`` (0: no HTTP answer, ``error`` says why)
    and ``origin``: ``authz`` when the answer carries authz's decision id, ``envoy`` for
    Envoy's own answers (431, 413, 503 after an ext_authz timeout, ...), ``upstream`` for
    an allowed request (2xx), ``none`` without an answer."""

    kind: str
    status: int
    origin: str
    error: str = ""

    @property
    def allowed(self) -> bool:
        """A 2xx answer: the request got through authz."""
        return 200 <= self.status < 300

    @property
    def server_error(self) -> bool:
        """A 5xx answer, from authz or from Envoy."""
        return self.status >= 500


def classify(kind: str, status: int, headers: httpx.Headers | dict[str, str]) -> Outcome:
    """The :class:`Outcome` of an answer ``status`` with response ``headers``."""
    if 200 <= status < 300:
        origin = "upstream"
    else:
        origin = "authz" if DECISION_ID_HEADER in headers else "envoy"
    return Outcome(kind, status, origin)


def send(client: httpx.Client, request: HostileRequest, timeout_s: float = 10.0) -> Outcome:
    """Send ``request`` with ``client`` (its base URL is the gateway or egress); a transport
    error or timeout is an :class:`Outcome` with status 0, never an exception."""
    headers = list(request.headers)
    if request.host is not None:
        headers.append(("host", request.host))
    try:
        response = client.request(
            request.method,
            request.path,
            headers=headers,
            content=request.body or None,
            timeout=timeout_s,
        )
    except httpx.HTTPError as exc:
        return Outcome(request.kind, 0, "none", type(exc).__name__)
    return classify(request.kind, response.status_code, response.headers)


@dataclass
class Tally:
    """Outcomes counted by (kind, status, origin); thread-safe :meth:`add`."""

    counts: Counter[tuple[str, int, str]] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, outcome: Outcome) -> None:
        """Count ``outcome``."""
        with self._lock:
            self.counts[(outcome.kind, outcome.status, outcome.origin)] += 1

    @property
    def total(self) -> int:
        """Outcomes counted."""
        return sum(self.counts.values())

    def matching(self, predicate: Callable[[Outcome], bool]) -> dict[str, int]:
        """``"kind status origin" -> count`` of the outcomes ``predicate`` selects."""
        return {
            f"{kind} {status} {origin}": n
            for (kind, status, origin), n in sorted(self.counts.items())
            if predicate(Outcome(kind, status, origin))
        }

    def table(self) -> str:
        """Every count, one ``kind status origin: n`` per line (for failure messages)."""
        return "\n".join(f"  {k}: {n}" for k, n in self.matching(lambda _: True).items())


def hunt_deadline(
    client: httpx.Client,
    seconds: float,
    tally: Tally,
    *,
    start: int = 16 * 1024,
    path: str = ADMIN_PATH,
    kind: str = "hunted multipart_params",
) -> int:
    """For ``seconds``, send :func:`multipart_params_bomb` one at a time, resizing it as
    an attacker would to find the window where authz answers after its own decision
    budget ran out but before Envoy gives up on it: grow by 15% after an answer from
    authz (cheap enough to decide), shrink by 10% after one from Envoy (authz took too
    long), keep the size after an allow. Counts every outcome in ``tally`` as ``kind``;
    returns the last size."""
    size = start
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        outcome = send(client, dataclasses.replace(multipart_params_bomb(size, path), kind=kind))
        tally.add(outcome)
        if outcome.origin == "authz":
            size = min(BODY_LIMIT, int(size * 1.15))
        elif outcome.origin != "upstream":
            size = max(1024, int(size / 1.1))
    return size


# -- vegeta ---------------------------------------------------------------------------


def vegeta_targets(requests: Iterable[HostileRequest], url: str, body_dir: Path) -> str:
    """vegeta ``-format=http`` targets for ``requests`` against base ``url``; each body is
    written once to ``body_dir/<sha-prefix>.bin`` and named with vegeta's ``@<file>``
    line. Header values are single-line tokens here, as that format needs."""
    body_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for request in requests:
        lines.append(f"{request.method} {url}{request.path}")
        if request.host is not None:
            lines.append(f"Host: {request.host}")
        lines.extend(f"{name}: {value}" for name, value in request.headers)
        if request.body:
            path = body_dir / f"{hashlib.sha256(request.body).hexdigest()[:16]}.bin"
            if not path.exists():
                path.write_bytes(request.body)
            lines.append(f"@{path}")
        lines.append("")
    return "\n".join(lines) + "\n"


# -- slow clients ---------------------------------------------------------------------


@dataclass
class Slowloris:
    """``connections`` sockets to ``(host, port)``, each sending a keyless request
    (``request_bytes``, default a GET of ``path`` with one ``x-slow`` header) one byte
    every ``interval_s``, from one background thread. When a request has been sent in
    full, its answer's status is counted in ``tally`` as kind ``slowloris``; a
    connection the server closes first counts as status 0 (``closed``). Use as a context
    manager: :meth:`__exit__` stops the thread and closes what is left open."""

    host: str
    port: int
    connections: int
    tally: Tally
    interval_s: float = 0.2
    path: str = ADMIN_PATH
    extra: bytes = b""
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    opened: int = 0

    def request_bytes(self) -> bytes:
        """The bytes each connection dribbles."""
        return (
            f"GET {self.path} HTTP/1.1\r\nHost: slow\r\nx-slow: ".encode()
            + b"s" * 24
            + b"\r\n"
            + self.extra
            + b"\r\n"
        )

    def __enter__(self) -> Slowloris:
        self._thread = threading.Thread(target=self._run, name="slowloris", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        payload = self.request_bytes()
        socks: dict[socket.socket, int] = {}
        for _ in range(self.connections):
            try:
                sock = socket.create_connection((self.host, self.port), timeout=2)
            except OSError:
                self.tally.add(Outcome("slowloris", 0, "none", "connect"))
                continue
            sock.settimeout(5)
            socks[sock] = 0
            self.opened += 1
        try:
            while socks and not self._stop.wait(self.interval_s):
                for sock in list(socks):
                    sent = socks[sock]
                    try:
                        sock.sendall(payload[sent : sent + 1])
                    except OSError:
                        self.tally.add(Outcome("slowloris", 0, "none", "closed"))
                        sock.close()
                        del socks[sock]
                        continue
                    socks[sock] = sent + 1
                    if sent + 1 == len(payload):
                        self.tally.add(_read_answer(sock))
                        sock.close()
                        del socks[sock]
        finally:
            for sock in socks:
                sock.close()


def _read_answer(sock: socket.socket) -> Outcome:
    """Read one HTTP/1.1 response head from ``sock``: its status and origin."""
    data = b""
    deadline = time.monotonic() + 5
    try:
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        return Outcome("slowloris", 0, "none", type(exc).__name__)
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = head.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return Outcome("slowloris", 0, "none", "no answer")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:])
    }
    return classify("slowloris", int(parts[1]), headers)
