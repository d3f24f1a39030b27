"""Builders for the differential test against opa-envoy-plugin
(tests/integration/test_differential.py): the corpus, the bundle both servers run, how to
start each server, and the field-by-field comparison.

The comparison reports every difference as ``(case id, field path, plugin value, authz
value)``; only the documented credential transformation (docs/contract.md, "Input
document": credential headers replaced by their SHA-256 digests and ``input.credentials``
added) and the random ``decision_id`` values are normalised away here, each by code that
checks the transformation exactly (a wrong digest stays a difference). Everything else is
reported and judged against the allow-list (tests/differential/allowlist.json)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format

from authz.core.headers import CREDENTIAL_HEADERS
from authz.core.input import parse_proxy_basic
from authz.tools.launch import HOST, Launch, http_ok
from tests.helpers import ROOT

__all__ = [
    "DECISION_HEADER",
    "DIFF_DIR",
    "PEER_SKIP_REASON",
    "AllowEntry",
    "Difference",
    "Outcome",
    "authz_launch",
    "build_bundle",
    "call",
    "channel",
    "check_request",
    "compare_inputs",
    "compare_responses",
    "decision_request",
    "diff_values",
    "find_peer",
    "load_allowlist",
    "load_decisions",
    "load_requests",
    "peer_launch",
    "summary",
]

DIFF_DIR: Final = ROOT / "tests" / "differential"
CORPUS_DIR: Final = DIFF_DIR / "corpus"
# The decision path both servers evaluate (tests/differential/policy/diff.rego).
DECISION_PATH: Final = "diff/main"
# The request header that selects a decision-corpus case (diff.rego).
DECISION_HEADER: Final = "x-diff-case"
# Said once, as the skip reason, when the plugin binary is neither given nor built.
PEER_SKIP_REASON: Final = (
    "opa-envoy-plugin not available: AUTHZ_PEER_BIN is unset and scripts/install-tools "
    "could not build it (no Go toolchain, or no plugin source: see its warning)"
)
# Per-call deadline: loopback servers answer in milliseconds; this only bounds a hang.
CALL_TIMEOUT_S: Final = 10.0
# authz's decision deadline here (its default, 300 ms, suits Envoy, not a loaded CI box).
DECISION_TIMEOUT_MS: Final = 5_000
# gRPC message cap on the client: the echo of a 10,000-parameter query is ~1 MB.
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
_UUID: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def find_peer() -> str | None:
    """The opa-envoy-plugin binary: ``$AUTHZ_PEER_BIN`` when it is an executable file
    (./scripts/test exports it after building the plugin), else None."""
    path = os.environ.get("AUTHZ_PEER_BIN", "")
    return path if path and os.access(path, os.X_OK) else None


# --- corpus -------------------------------------------------------------------------


def _load(name: str) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads((CORPUS_DIR / name).read_text(encoding="utf-8"))
    return cases


def load_requests() -> list[dict[str, Any]]:
    """The request corpus (corpus/requests*.json, in file order): objects ``{"id",
    "source", "request"}``; ``request`` is an Envoy CheckRequest in protobuf JSON
    (https://protobuf.dev/programming-guides/json/), ``source`` names where it comes from
    (the plugin's test file and test, or the edge it probes)."""
    cases: list[dict[str, Any]] = []
    for path in sorted(CORPUS_DIR.glob("requests*.json")):
        cases.extend(_load(path.name))
    return cases


def load_decisions() -> list[dict[str, Any]]:
    """The decision corpus (corpus/decisions.json): objects ``{"id", "source",
    "decision"}``; ``decision`` is what the policy returns (a boolean or an object in the
    plugin's decision format, https://www.openpolicyagent.org/docs/envoy/)."""
    return _load("decisions.json")


# Field numbers on the way to AttributeContext.HttpRequest (envoy/service/auth/v3/
# external_auth.proto, attribute_context.proto): CheckRequest.attributes = 1,
# AttributeContext.request = 4, Request.http = 2; then HttpRequest's string fields.
_HTTP_PATH: Final = (1, 4, 2)
_HTTP_STRING_FIELDS: Final = {"method": 2, "path": 4, "host": 5, "scheme": 6, "body": 11}
_HTTP_HEADERS: Final = 3


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def check_request(case: Mapping[str, Any]) -> external_auth_pb2.CheckRequest | bytes:
    """The CheckRequest of a request-corpus case: a message, or its wire bytes when the
    case has ``wire`` entries, strings no protobuf library will encode (not UTF-8),
    each ``{"field": <HttpRequest string field>, "base64": ...}`` or ``{"header": <name>,
    "base64": <value>}``. They are appended as a second ``attributes`` message, which a
    parser merges into the first (https://protobuf.dev/programming-guides/encoding/#last-one-wins):
    the field's value is replaced, a header is added."""
    message = json_format.ParseDict(case["request"], external_auth_pb2.CheckRequest())
    if "wire" not in case:
        return message
    http = b""
    for entry in case["wire"]:
        raw = base64.b64decode(entry["base64"])
        if "header" in entry:
            pair = _length_delimited(1, entry["header"].encode()) + _length_delimited(2, raw)
            http += _length_delimited(_HTTP_HEADERS, pair)
        else:
            http += _length_delimited(_HTTP_STRING_FIELDS[entry["field"]], raw)
    for number in reversed(_HTTP_PATH):
        http = _length_delimited(number, http)
    return bytes(message.SerializeToString()) + http


def decision_request(case_id: str) -> external_auth_pb2.CheckRequest:
    """The one request every decision case is sent with: a plain GET, selecting the case
    by the ``x-diff-case`` header."""
    return json_format.ParseDict(
        {
            "attributes": {
                "request": {
                    "http": {
                        "id": "1",
                        "method": "GET",
                        "path": "/diff",
                        "host": "diff.local",
                        "scheme": "http",
                        "protocol": "HTTP/1.1",
                        "headers": {
                            ":authority": "diff.local",
                            ":method": "GET",
                            ":path": "/diff",
                            DECISION_HEADER: case_id,
                        },
                    }
                }
            }
        },
        external_auth_pb2.CheckRequest(),
    )


def build_bundle(out: Path, decisions: Sequence[Mapping[str, Any]]) -> Path:
    """Write the bundle both servers run to ``out`` (a .tar.gz): diff.rego and
    ``data.diffcases`` (decision id -> decision), revision ``diff``. Returns ``out``."""
    work = out.parent / "bundle-src"
    shutil.rmtree(work, ignore_errors=True)
    (work / "diffcases").mkdir(parents=True)
    shutil.copy(DIFF_DIR / "policy" / "diff.rego", work / "diff.rego")
    cases = {case["id"]: case["decision"] for case in decisions}
    (work / "diffcases" / "data.json").write_text(json.dumps(cases), encoding="utf-8")
    manifest = {"revision": "diff", "roots": ["diff", "diffcases"]}
    (work / ".manifest").write_text(json.dumps(manifest), encoding="utf-8")
    with tarfile.open(out, "w:gz") as tar:
        for name in ("diff.rego", "diffcases/data.json", ".manifest"):
            tar.add(work / name, arcname=name)
    return out


# --- servers -------------------------------------------------------------------------


def peer_launch(binary: str, bundle: Path, ports: tuple[int, int, int]) -> Launch:
    """opa-envoy-plugin on 127.0.0.1 (REST ``ports[0]``, diagnostics ``ports[1]``,
    ext_authz gRPC ``ports[2]``) running ``bundle`` at DECISION_PATH; its address is
    ``127.0.0.1:<ports[2]>``. It serves no gRPC health service: ready once
    ``GET /health?plugins`` on the diagnostic address answers 200 (its README)."""
    rest, diag, grpc_port = ports
    argv = (
        binary,
        "run",
        "--server",
        f"--addr={HOST}:{rest}",
        f"--diagnostic-addr={HOST}:{diag}",
        "--skip-version-check",
        "--log-level=error",
        f"--set=plugins.envoy_ext_authz_grpc.addr={HOST}:{grpc_port}",
        f"--set=plugins.envoy_ext_authz_grpc.path={DECISION_PATH}",
        "--bundle",
        str(bundle),
    )
    return Launch(
        "opa-envoy-plugin",
        argv,
        f"{HOST}:{grpc_port}",
        lambda: http_ok(f"http://{HOST}:{diag}/health?plugins&bundles"),
    )


def authz_launch(opa_url: str, grpc_port: int, admin_port: int) -> Launch:
    """``python -m authz serve`` on 127.0.0.1 (plaintext gRPC on loopback) against the OPA
    at ``opa_url``, with the plugin's settings where authz has a choice: every decision at
    DECISION_PATH, bodies parsed wherever Envoy sent one (``AUTHZ_PARSE_BODY=always``);
    no audit database, no overrides file, a generous decision deadline. Ready once
    ``/healthz`` answers 200: not ``/readyz``, which waits for authz's own bundle probe
    (``authz/meta/*``) that a plugin policy does not define (the test's OPA is ready
    before authz starts)."""
    env = {
        "AUTHZ_GRPC_ADDR": f"{HOST}:{grpc_port}",
        "AUTHZ_ADMIN_ADDR": f"{HOST}:{admin_port}",
        "AUTHZ_OPA_URL": opa_url,
        "AUTHZ_DEFAULT_DECISION_PATH": DECISION_PATH,
        "AUTHZ_PARSE_BODY": "always",
        "AUTHZ_AUDIT_DB": "",
        "AUTHZ_OVERRIDES_FILE": "",
        "AUTHZ_DECISION_LOG": "false",
        # The plugin has no deadline; a loaded test machine must not turn a slow echo of
        # a 10,000-field input into a difference.
        "AUTHZ_DECISION_TIMEOUT_MS": str(DECISION_TIMEOUT_MS),
    }
    argv = ("env", *(f"{k}={v}" for k, v in env.items()), sys.executable, "-m", "authz", "serve")
    return Launch(
        "authz", argv, f"{HOST}:{grpc_port}", lambda: http_ok(f"http://{HOST}:{admin_port}/healthz")
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one server did with one CheckRequest: ``response`` (the CheckResponse as a
    dict in protobuf field names) or ``error`` (the gRPC status code's name)."""

    response: dict[str, Any] | None = None
    error: str | None = None

    @property
    def kind(self) -> str:
        """``"grpc_error:<CODE>"``, or ``"status:<code>"`` with the CheckResponse's
        ``status.code`` (0 OK, 7 PERMISSION_DENIED, ...)."""
        if self.response is None:
            return f"grpc_error:{self.error}"
        return f"status:{self.response.get('status', {}).get('code', 0)}"


def channel(address: str) -> grpc.Channel:
    """A plaintext channel to ``address`` that accepts answers up to MAX_MESSAGE_BYTES."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    return grpc.insecure_channel(address, options=options)


_CHECK_METHOD: Final = "/envoy.service.auth.v3.Authorization/Check"


def call(channel: grpc.Channel, request: external_auth_pb2.CheckRequest | bytes) -> Outcome:
    """Send ``request`` (a message, or wire bytes sent as they are) to Authorization/Check;
    the answer as an Outcome (a gRPC error is an outcome too)."""
    check = channel.unary_unary(
        _CHECK_METHOD,
        request_serializer=lambda r: r if isinstance(r, bytes) else r.SerializeToString(),
        response_deserializer=external_auth_pb2.CheckResponse.FromString,
    )
    try:
        response = check(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        return Outcome(error=exc.code().name)
    return Outcome(response=json_format.MessageToDict(response, preserving_proto_field_name=True))


# --- comparison ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Difference:
    """One field that differs: ``case`` id, ``path`` (dotted, e.g.
    ``input.parsed_body.a`` or ``response.denied_response.status.code``), the plugin's
    and authz's values (``<absent>`` when a side lacks the field)."""

    case: str
    path: str
    peer: Any
    authz: Any


ABSENT: Final = "<absent>"


def diff_values(prefix: str, peer: Any, authz: Any) -> Iterator[tuple[str, Any, Any]]:
    """Every leaf where ``peer`` and ``authz`` (JSON values) differ, as ``(path, peer,
    authz)``; objects are compared key by key, lists element by element."""
    if isinstance(peer, dict) and isinstance(authz, dict):
        for key in sorted(peer.keys() | authz.keys()):
            yield from diff_values(f"{prefix}.{key}", peer.get(key, ABSENT), authz.get(key, ABSENT))
    elif isinstance(peer, list) and isinstance(authz, list) and len(peer) == len(authz):
        for index, (left, right) in enumerate(zip(peer, authz, strict=True)):
            yield from diff_values(f"{prefix}[{index}]", left, right)
    elif type(peer) is not type(authz) or peer != authz:
        yield prefix, peer, authz


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def credential_view(headers: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """What docs/contract.md ("Input document") says authz shows a policy for the
    credential headers among ``headers`` (the plugin's view, raw values): ``(headers,
    credentials)``: each credential header's value replaced by ``sha256:<hex>`` (for a
    schemed ``authorization``/``proxy-authorization``, ``<Scheme> sha256:<hex>`` of the
    credentials after the scheme), and ``input.credentials`` (name -> hex). Only RFC 9110
    optional whitespace (SP, HTAB) is trimmed before hashing. Written from the document,
    not from authz's code, so a wrong digest is a difference."""
    shown: dict[str, str] = {}
    credentials: dict[str, str] = {}
    for name, value in headers.items():
        if name not in CREDENTIAL_HEADERS or not isinstance(value, str):
            continue
        trimmed = value.strip(" \t")
        scheme = re.match(r"^([!#$%&'*+.^_`|~0-9A-Za-z-]+) +([^ \t].*)$", trimmed, re.DOTALL)
        if name in ("authorization", "proxy-authorization") and scheme:
            hexdigest = _digest(scheme.group(2).strip(" \t"))
            shown[name] = f"{scheme.group(1)} sha256:{hexdigest}"
        else:
            hexdigest = _digest(trimmed)
            shown[name] = f"sha256:{hexdigest}"
        credentials[name] = hexdigest
    return shown, credentials


def _echo(outcome: Outcome) -> tuple[dict[str, Any], dict[str, str]] | None:
    """The input document and raw-bytes map a server echoed (diff.rego), if it did."""
    metadata = (outcome.response or {}).get("dynamic_metadata", {})
    if "diff_input" not in metadata:
        return None
    return _loads_deep(metadata["diff_input"]), dict(metadata.get("diff_raw", {}))


def _loads_deep(text: str) -> Any:
    """json.loads for the corpus's deepest documents (1,000 levels: past Python's default
    recursion limit), with the limit raised for this call only."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))
    try:
        return json.loads(text)
    finally:
        sys.setrecursionlimit(limit)


def _normalise_credentials(
    peer: dict[str, Any], authz: dict[str, Any], peer_raw: dict[str, str], authz_raw: dict[str, str]
) -> None:
    """Undo the documented credential transformation on authz's side, in place, where
    authz applied it exactly as documented; otherwise leave it (a difference)."""
    headers = peer.get("attributes", {}).get("request", {}).get("http", {}).get("headers", {})
    shown, credentials = credential_view(headers)
    authz_headers = (
        authz.get("attributes", {}).get("request", {}).get("http", {}).get("headers", {})
    )
    for name, value in shown.items():
        if authz_headers.get(name) == value:
            authz_headers[name] = headers[name]
            path = json.dumps(["attributes", "request", "http", "headers", name])
            path = path.replace(", ", ",")
            if path in authz_raw and path in peer_raw:
                authz_raw[path] = peer_raw[path]
    if authz.get("credentials") == credentials or (not credentials and "credentials" not in authz):
        authz.pop("credentials", None)
    # egress (issue 18): a Basic Proxy-Authorization's user-id and password digest.
    basic = headers.get("proxy-authorization")
    if basic is not None and authz.get("proxy_authorization") == parse_proxy_basic(basic):
        authz.pop("proxy_authorization", None)
        for key in [k for k in authz_raw if k.startswith('["proxy_authorization"')]:
            del authz_raw[key]
    # The digests themselves are strings in the input: their raw-bytes entries go too.
    for key in [k for k in authz_raw if k.startswith('["credentials"')]:
        if "credentials" not in authz:
            del authz_raw[key]


def compare_inputs(case: str, peer: Outcome, authz: Outcome) -> list[Difference]:
    """The differences between the input documents the two servers built for one request
    (``input.*`` and ``raw.<json path>`` for the raw bytes of a string), or one
    ``outcome`` difference when a server did not evaluate the policy (an error or a
    deny before evaluation) and the other did, or both did not the same way."""
    peer_echo, authz_echo = _echo(peer), _echo(authz)
    if peer_echo is None or authz_echo is None:
        if peer_echo is None and authz_echo is None and peer.kind == authz.kind:
            return []
        return [Difference(case, "outcome", _describe(peer), _describe(authz))]
    peer_input, peer_raw = peer_echo
    authz_input, authz_raw = authz_echo
    _normalise_credentials(peer_input, authz_input, peer_raw, authz_raw)
    found = [Difference(case, *d) for d in diff_values("input", peer_input, authz_input)]
    # Raw bytes: reported only where the JSON view agreed (else it is the same difference).
    for path, peer_b64, authz_b64 in diff_values("raw", peer_raw, authz_raw):
        if peer_b64 is ABSENT or authz_b64 is ABSENT:
            continue
        found.append(Difference(case, path, _bytes(peer_b64), _bytes(authz_b64)))
    return found


def _bytes(b64: Any) -> str:
    return repr(base64.b64decode(b64)) if isinstance(b64, str) else repr(b64)


def _describe(outcome: Outcome) -> str:
    if outcome.response is None:
        return outcome.kind
    denied = outcome.response.get("denied_response", {})
    status = denied.get("status", {}).get("code")
    body = denied.get("body", "")
    return f"{outcome.kind} http={status} body={body[:120]!r}" if denied else outcome.kind


def _normalise_response(response: dict[str, Any]) -> dict[str, Any]:
    """``response`` with every ``decision_id`` value (a random UUID, on both sides)
    replaced by ``<uuid>`` after checking its shape, and every header and query-parameter
    list stably sorted by name: the plugin emits a decision's ``{name: value}`` map in Go
    map order, which is random, so only the order of entries of one name is behaviour."""
    metadata = response.get("dynamic_metadata", {})
    value = metadata.get("decision_id")
    if isinstance(value, str) and _UUID.match(value):
        metadata["decision_id"] = "<uuid>"
    for outer in ("ok_response", "denied_response"):
        for inner, entries in response.get(outer, {}).items():
            if inner in ("headers", "response_headers_to_add"):
                entries.sort(key=lambda entry: str(entry["header"]["key"]))
            elif inner == "query_parameters_to_set":
                entries.sort(key=lambda entry: str(entry["key"]))
    return response


# Where a CheckResponse carries header lists (HeaderValueOption), in protobuf field names.
_HEADER_LISTS: Final = (
    ("ok_response", "headers"),
    ("ok_response", "response_headers_to_add"),
    ("denied_response", "headers"),
)


def _extract_additions(peer: dict[str, Any], authz: dict[str, Any]) -> list[tuple[str, Any]]:
    """Take authz's documented additions (docs/contract.md, "Differences from
    opa-envoy-plugin") out of ``authz``, in place, each only in its exact documented form,
    and return them as ``(addition.<name>, value)`` so they are still reported:

    - ``addition.decision_id_header``: an ``x-authz-decision-id`` header whose value is
      the response's ``decision_id``;
    - ``addition.append_action``: ``append_action: OVERWRITE_IF_EXISTS_OR_ADD`` on a
      header the plugin sends without one;
    - ``addition.reason_metadata``: ``reason`` in ``dynamic_metadata`` where the plugin's
      has none;
    - ``addition.deny_body``: on a deny the plugin sends without a body, authz's JSON body
      ``{"error", "decision_id", ...}`` and its ``content-type: application/json``;
    - ``addition.ok_response``: an ``ok_response`` left empty by the above where the
      plugin sends none (a boolean ``true``)."""
    found: list[tuple[str, Any]] = []
    decision_id = authz.get("dynamic_metadata", {}).get("decision_id")
    peer_denied = peer.get("denied_response", {})
    authz_denied = authz.get("denied_response", {})
    if authz_denied and "body" not in peer_denied and "body" in authz_denied:
        try:
            body = json.loads(authz_denied["body"])
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("decision_id") == decision_id and "error" in body:
            found.append(("addition.deny_body", authz_denied.pop("body")))
            headers = authz_denied.get("headers", [])
            peer_names = {h["header"]["key"] for h in peer_denied.get("headers", [])}
            if "content-type" not in peer_names:
                authz_denied["headers"] = [
                    h for h in headers if h["header"]["key"] != "content-type"
                ]
    for outer, inner in _HEADER_LISTS:
        entries = authz.get(outer, {}).get(inner)
        if entries is None:
            continue
        peer_entries = peer.get(outer, {}).get(inner, [])
        kept = []
        for entry in entries:
            if (
                entry["header"]["key"] == "x-authz-decision-id"
                and entry["header"].get("value") == decision_id
            ):
                found.append(("addition.decision_id_header", decision_id))
                continue
            if entry.get("append_action") == "OVERWRITE_IF_EXISTS_OR_ADD" and not any(
                "append_action" in e for e in peer_entries
            ):
                entry = {k: v for k, v in entry.items() if k != "append_action"}
                found.append(("addition.append_action", "OVERWRITE_IF_EXISTS_OR_ADD"))
            kept.append(entry)
        if kept:
            authz[outer][inner] = kept
        else:
            del authz[outer][inner]
    metadata = authz.get("dynamic_metadata", {})
    if "reason" in metadata and "reason" not in peer.get("dynamic_metadata", {}):
        found.append(("addition.reason_metadata", metadata.pop("reason")))
    if authz.get("ok_response") == {} and "ok_response" not in peer:
        del authz["ok_response"]
        found.append(("addition.ok_response", {}))
    # One report per kind of addition per response.
    return list(dict((path, value) for path, value in found).items())


def compare_responses(case: str, peer: Outcome, authz: Outcome) -> list[Difference]:
    """The differences between the two servers' answers to one decision case: the
    outcome kind, authz's documented additions (``addition.*``), then every other
    CheckResponse field (``response.*``)."""
    if peer.response is None or authz.response is None:
        if peer.kind == authz.kind:
            return []
        return [Difference(case, "outcome", _describe(peer), _describe(authz))]
    peer_response = _normalise_response(peer.response)
    authz_response = authz.response
    additions = _extract_additions(peer_response, authz_response)
    authz_response = _normalise_response(authz_response)
    found = [Difference(case, path, ABSENT, value) for path, value in additions]
    found += [Difference(case, *d) for d in diff_values("response", peer_response, authz_response)]
    return found


# --- allow-list ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AllowEntry:
    """One documented difference (tests/differential/allowlist.json): ``kind`` (the id
    docs/contract.md names it by), ``corpus`` (``requests`` or ``decisions``), ``cases``
    (ids; ``*`` for every case), ``paths`` (path prefixes the difference may touch),
    ``reason`` (why it differs), ``fix`` (true: a defect, to fix in #15)."""

    kind: str
    corpus: str
    cases: frozenset[str]
    paths: tuple[str, ...]
    reason: str
    fix: bool
    used: set[str] = field(default_factory=set, compare=False, hash=False)

    def covers(self, difference: Difference) -> bool:
        """True when ``difference`` is this documented difference."""
        if "*" not in self.cases and difference.case not in self.cases:
            return False
        return any(
            difference.path == p or difference.path.startswith((p + ".", p + "["))
            for p in self.paths
        )


def load_allowlist() -> list[AllowEntry]:
    """The allow-list (tests/differential/allowlist.json)."""
    raw = json.loads((DIFF_DIR / "allowlist.json").read_text(encoding="utf-8"))
    return [
        AllowEntry(
            kind=e["kind"],
            corpus=e["corpus"],
            cases=frozenset(e["cases"]),
            paths=tuple(e["paths"]),
            reason=e["reason"],
            fix=bool(e["fix"]),
        )
        for e in raw
    ]


def summary(
    title: str, compared: int, differences: Sequence[Difference], allow: Sequence[AllowEntry]
) -> tuple[str, list[Difference]]:
    """The printed summary of one corpus (cases compared / identical / different, each
    documented difference with its reason and case count, and any stale allow-list entry)
    and the differences no entry covers."""
    unlisted: list[Difference] = []
    for difference in differences:
        entry = next((e for e in allow if e.covers(difference)), None)
        if entry is None:
            unlisted.append(difference)
        else:
            entry.used.add(difference.case)
    different = {d.case for d in differences}
    # A case whose every difference is a documented addition or choice (not a defect).
    defects = {d.case for d in differences if any(e.fix and e.covers(d) for e in allow)}
    defects |= {d.case for d in unlisted}
    lines = [
        f"{title}: {compared} compared, {compared - len(different)} identical, "
        f"{len(different)} different ({len(different - defects)} only by documented "
        f"additions or choices, {len(defects)} by a defect to fix or a new difference)"
    ]
    for entry in allow:
        mark = " (to fix in #15)" if entry.fix else ""
        if entry.used:
            count = f"{len(entry.used)} case{'' if len(entry.used) == 1 else 's'}"
            lines.append(f"  - {entry.kind}{mark}: {count}: {entry.reason}")
        else:
            lines.append(f"  - {entry.kind}: no longer differs: remove it from the allow-list")
    for difference in unlisted[:40]:
        lines.append(
            f"  ! not allowed: {difference.case} {difference.path}: "
            f"plugin={_short(difference.peer)} authz={_short(difference.authz)}"
        )
    return "\n".join(lines), unlisted


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."
