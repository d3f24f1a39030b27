"""Echo API for the local stack: the gateway's demo upstream and the egress stand-in.

Answers every request with JSON describing what it received, so a user (or a test) sees
exactly which headers survived the proxy: ``{"service", "method", "host", "path",
"query", "headers", "body_bytes"}``. ``GET /healthz`` answers ``{"status": "ok"}``.
The echo never contains a secret: the values of ``authorization``,
``proxy-authorization``, ``x-api-key``, ``cookie``, ``x-sandbox-token`` and of every
service's credential header are replaced by ``**********`` (names stay, so a test still
sees that a header arrived).

Egress stand-in mode (``--services`` + ``--credentials``), playing every external API at
once: the request's ``Host`` (the real host the egress Envoy rewrites to, e.g.
``api.openai.com``; a ``:port`` is ignored) picks the service whose ``base_url`` has that
host (421 ``{"error": "unknown_host"}`` if none). The service's ``credential.header``
must then hold exactly ``credential.format`` with ``{secret}`` replaced by the service's
secret from the credentials file (authz's egress secrets file, ``{"version": 1,
"credentials": {"<service>": "<secret>"}}``), else 401 ``{"error":
"invalid_credential"}`` as a real API would. The echo then says ``"service": <name>`` and
``"credential_ok": true``.

Real-API answers (stand-in mode), so the official SDKs parse what they get: on
``api.openai.com``, ``GET /v1/models``, ``GET /v1/models/{id}`` and ``POST
/v1/chat/completions`` answer in the OpenAI schema
(https://platform.openai.com/docs/api-reference/models,
https://platform.openai.com/docs/api-reference/chat/object); on ``api.anthropic.com``,
``POST /v1/messages``, ``POST /v1/messages/count_tokens``, ``GET /v1/models`` and ``GET
/v1/models/{id}`` in the Anthropic schema (https://docs.anthropic.com/en/api/messages,
https://docs.anthropic.com/en/api/models-list); on ``api.github.com``, ``GET /user`` as
GitHub's private user (https://docs.github.com/en/rest/users/users#get-the-authenticated-user).
Each answer also carries the echo's fields (``service``, ``credential_ok``, ``headers``,
...) as extra members, which the SDKs keep as extras and ignore, and the API's request-id
header. A wrong or missing credential on those hosts gets 401 in that API's error shape
(OpenAI ``{"error": {"message", "type", "param", "code": "invalid_api_key"}}``, Anthropic
``{"type": "error", "error": {"type": "authentication_error", "message"}}``, GitHub
``{"message": "Bad credentials", "documentation_url", "status": "401"}``), with
``"credential_ok": false`` added. The stand-in is strict about the credential and lenient
about the request, like a test double should be for a proxy's tests: a missing ``model``
gets a default, an empty body counts as ``{}``, any model id exists, and a missing
``anthropic-version`` is accepted; but a body over :data:`MAX_BODY_BYTES` is 413, a body
that is not a JSON object is 400 and an ``anthropic-version`` other than the documented
ones (https://docs.anthropic.com/en/api/versioning) is 400, each in the API's error shape.
``"stream": true`` on a chat completion or a message gets the answer as server-sent
events in that API's streaming format
(https://platform.openai.com/docs/api-reference/chat-streaming,
https://docs.anthropic.com/en/api/messages-streaming), the echo's members on the first
event.
Every other path echoes as above.

Run: ``python -m authz.stack.upstream --port 8090`` (demo upstream), or
``python -m authz.stack.upstream --port 9443 --tls-cert server.pem --tls-key
server-key.pem --services policy/egress/data.json --credentials secrets.json``.
"""

from __future__ import annotations

import argparse
import hmac
import json
import secrets
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from authz.core.headers import CREDENTIAL_HEADERS
from authz.tools.services import read_services, specs

__all__ = [
    "ANTHROPIC_VERSIONS",
    "API_BY_HOST",
    "MASK",
    "MASKED_HEADERS",
    "MAX_BODY_BYTES",
    "ServiceCredential",
    "create_app",
    "load_credentials",
    "load_services",
    "main",
]

MASK: Final = "**********"
# Masked in every echo, whatever the services say.
MASKED_HEADERS: Final = frozenset(CREDENTIAL_HEADERS)
CREDENTIALS_FILE_VERSION: Final = 1
# Request bodies are read whole, so bounded (aiohttp answers 413 above it).
MAX_BODY_BYTES: Final = 1 << 20
# The real host -> the API whose answers the stand-in gives there.
API_BY_HOST: Final[Mapping[str, str]] = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "api.github.com": "github",
}
# https://docs.anthropic.com/en/api/versioning
ANTHROPIC_VERSIONS: Final = frozenset({"2023-01-01", "2023-06-01"})


@dataclass(frozen=True, slots=True)
class ServiceCredential:
    """What the stand-in expects from one service's callers: ``header`` (lowercase name)
    equal to ``value`` (the formatted credential; ``None`` when the credentials file has
    no secret for the service, so every call is refused). A service without a credential
    (``header`` None, like a public API) expects none: a call carrying any credential
    header is refused, since one can only come from a leak."""

    service: str
    header: str | None
    value: str | None

    def __repr__(self) -> str:
        # Never print the expected credential.
        return f"ServiceCredential({self.service!r}, {self.header!r}, {MASK!r})"


_SERVICES: Final = web.AppKey[Mapping[str, ServiceCredential]]("services")
_NAME: Final = web.AppKey("name", str)
_MASKED: Final = web.AppKey[frozenset[str]]("masked")


def load_services(
    services: Mapping[str, Any], credentials: Mapping[str, str]
) -> dict[str, ServiceCredential]:
    """Map each service's ``base_url`` host (lowercase) to what its callers must send.

    ``services``: the egress services (``policy/egress/data.json`` -> ``.services``:
    name -> ``{"base_url", "credential": {"header", "format"}}``); ``credentials``:
    service name -> secret. Raises ValueError naming the service and field when
    ``base_url`` has no host, ``credential.header``/``format`` is not a non-empty string,
    or ``format`` lacks ``{secret}``.
    """
    by_host: dict[str, ServiceCredential] = {}
    for name, spec in services.items():
        if not isinstance(spec, Mapping):
            raise ValueError(f"service {name!r}: must be an object")
        host = urlsplit(str(spec.get("base_url", ""))).hostname
        if not host:
            raise ValueError(f"service {name!r}: base_url has no host")
        credential = spec.get("credential")
        if credential is None:
            by_host[host.lower()] = ServiceCredential(name, None, None)
            continue
        header = credential.get("header") if isinstance(credential, Mapping) else None
        template = credential.get("format") if isinstance(credential, Mapping) else None
        if not isinstance(header, str) or not header:
            raise ValueError(f"service {name!r}: credential.header must be a non-empty string")
        if not isinstance(template, str) or "{secret}" not in template:
            raise ValueError(f"service {name!r}: credential.format must contain '{{secret}}'")
        secret = credentials.get(name)
        value = template.replace("{secret}", secret) if secret else None
        by_host[host.lower()] = ServiceCredential(name, header.lower(), value)
    return by_host


def load_credentials(path: Path) -> dict[str, str]:
    """Read authz's egress secrets file ``{"version": 1, "credentials": {name: secret}}``.
    Raises ValueError (naming the file, never a secret) when it is not that shape, OSError
    when it cannot be read."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:  # its message quotes the file's bytes: secrets
        raise ValueError(f"{path}: not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno}") from None
    except RecursionError:  # json's recursive parser on deeply nested arrays or objects
        raise ValueError(f"{path}: nested too deeply") from None
    if not isinstance(data, dict) or data.get("version") != CREDENTIALS_FILE_VERSION:
        raise ValueError(f"{path}: expected an object with version {CREDENTIALS_FILE_VERSION}")
    credentials = data.get("credentials")
    if not isinstance(credentials, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in credentials.items()
    ):
        raise ValueError(f"{path}: credentials must map service names to strings")
    return credentials


def _masked_headers(request: web.Request) -> dict[str, str]:
    masked = request.app[_MASKED]
    return {
        name.lower(): MASK if name.lower() in masked else value
        for name, value in request.headers.items()
    }


def _hostname(authority: str) -> str:
    # Parse the Host value as an RFC 3986 authority: drops ":port" and IPv6 brackets.
    try:
        return urlsplit(f"//{authority}").hostname or ""
    except ValueError:
        return ""


def _credential_ok(request: web.Request, expected: ServiceCredential) -> bool:
    if expected.header is None:
        return not any(name.lower() in MASKED_HEADERS for name in request.headers)
    sent = request.headers.getall(expected.header, [])
    if expected.value is None or len(sent) != 1:
        return False
    return hmac.compare_digest(sent[0].encode(), expected.value.encode())


# -- real-API answers -----------------------------------------------------------------

_REPLY: Final = "Hello from the authz egress stand-in."
_DEFAULT_MODEL: Final = {"openai": "gpt-4o-mini", "anthropic": "claude-sonnet-4-5"}
_MAX_MODEL_CHARS: Final = 256
# A fixed creation time for the model objects (the stand-in has no catalogue).
_MODELS_CREATED: Final = 1_735_689_600  # 2025-01-01T00:00:00Z
_GITHUB_DOCS: Final = "https://docs.github.com/rest"


class _ApiError(Exception):
    """A client-side fault the real API answers with ``status`` and its error shape."""

    def __init__(self, status: int, kind: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.code = status, kind, message, code


def _error_body(api: str, error: _ApiError, request_id: str) -> dict[str, Any]:
    # Each API's documented error object:
    # https://platform.openai.com/docs/guides/error-codes,
    # https://docs.anthropic.com/en/api/errors,
    # https://docs.github.com/en/rest/using-the-rest-api/troubleshooting-the-rest-api
    if api == "openai":
        return {
            "error": {
                "message": error.message,
                "type": error.kind,
                "param": None,
                "code": error.code,
            }
        }
    if api == "anthropic":
        return {
            "type": "error",
            "error": {"type": error.kind, "message": error.message},
            "request_id": request_id,
        }
    return {
        "message": error.message,
        "documentation_url": _GITHUB_DOCS,
        "status": str(error.status),
    }


def _credential_error(api: str, sent: bool) -> _ApiError:
    if api == "openai":
        if sent:
            return _ApiError(
                401, "invalid_request_error", "Incorrect API key provided.", "invalid_api_key"
            )
        return _ApiError(401, "invalid_request_error", "You didn't provide an API key.")
    if api == "anthropic":
        message = "invalid x-api-key" if sent else "x-api-key header is required"
        return _ApiError(401, "authentication_error", message)
    return _ApiError(401, "", "Bad credentials" if sent else "Requires authentication")


def _request_id_header(api: str) -> str:
    return {"openai": "x-request-id", "anthropic": "request-id"}.get(api, "x-github-request-id")


def _json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object (empty -> ``{}``); :class:`_ApiError` 400 when
    it is not one. orjson is linear and refuses nesting deeper than 1024."""
    if not body.strip():
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise _ApiError(400, "invalid_request_error", "The request body is not a JSON object.")
    return data


@dataclass(frozen=True, slots=True)
class _Stream:
    """An answer sent as server-sent events: ``(event name or None, data)`` in order;
    ``data`` is JSON-encoded unless it is a string (OpenAI's closing ``[DONE]``)."""

    events: list[tuple[str | None, dict[str, Any] | str]]

    def render(self, echo: Mapping[str, Any]) -> bytes:
        """The event stream (https://html.spec.whatwg.org/multipage/server-sent-events.html),
        ``echo`` merged into the first event's object (the message of Anthropic's
        ``message_start``)."""
        out = []
        for number, (name, data) in enumerate(self.events):
            if number == 0 and isinstance(data, dict):
                inner = data.get("message") if name == "message_start" else data
                if isinstance(inner, dict):
                    inner.update(echo)
            text = data if isinstance(data, str) else json.dumps(data)
            out.append((f"event: {name}\n" if name else "") + f"data: {text}\n\n")
        return "".join(out).encode()


def _model(api: str, data: Mapping[str, Any]) -> str:
    model = data.get("model")
    if isinstance(model, str) and 0 < len(model) <= _MAX_MODEL_CHARS:
        return model
    return _DEFAULT_MODEL[api]


def _usage(body: bytes) -> tuple[int, int]:
    """(input, output) token counts: an estimate, four bytes of request body a token."""
    return max(1, (len(body) + 3) // 4), len(_REPLY.split())


def _openai_model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": _MODELS_CREATED, "owned_by": "system"}


def _anthropic_model(model_id: str) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model_id,
        "display_name": model_id,
        "created_at": "2025-01-01T00:00:00Z",
    }


def _model_id(path: str) -> str | None:
    # /v1/models/{id}: one non-empty segment of bounded length.
    model_id = path.removeprefix("/v1/models/")
    if model_id and "/" not in model_id and len(model_id) <= _MAX_MODEL_CHARS:
        return model_id
    return None


def _openai_stream(model: str) -> _Stream:
    # Chunks: the role, the text, the finish reason; then "[DONE]".
    head = {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
    }
    deltas: list[tuple[dict[str, Any], str | None]] = [
        ({"role": "assistant", "content": ""}, None),
        ({"content": _REPLY}, None),
        ({}, "stop"),
    ]
    chunks: list[tuple[str | None, dict[str, Any] | str]] = [
        (
            None,
            {**head, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": f}]},
        )
        for d, f in deltas
    ]
    return _Stream([*chunks, (None, "[DONE]")])


def _openai(method: str, path: str, body: bytes) -> dict[str, Any] | _Stream | None:
    if method == "GET" and path == "/v1/models":
        models = [_openai_model(m) for m in ("gpt-4o", _DEFAULT_MODEL["openai"])]
        return {"object": "list", "data": models}
    if method == "GET" and path.startswith("/v1/models/") and (model_id := _model_id(path)):
        return _openai_model(model_id)
    if method == "POST" and path == "/v1/chat/completions":
        data = _json_object(body)
        prompt, completion = _usage(body)
        if data.get("stream") is True:
            return _openai_stream(_model("openai", data))
        return {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": _model("openai", data),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": _REPLY, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
            "system_fingerprint": None,
        }
    return None


def _anthropic_stream(message: dict[str, Any]) -> _Stream:
    # message_start (no content yet), one text block with one delta, message_delta with
    # the stop reason and the output tokens, message_stop.
    usage = message["usage"]
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "usage": {**usage, "output_tokens": 0},
    }
    events: list[tuple[str | None, dict[str, Any] | str]] = [
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": _REPLY},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return _Stream(events)


def _anthropic(method: str, path: str, body: bytes) -> dict[str, Any] | _Stream | None:
    if method == "POST" and path == "/v1/messages":
        data = _json_object(body)
        tokens_in, tokens_out = _usage(body)
        message = {
            "id": f"msg_{secrets.token_hex(12)}",
            "type": "message",
            "role": "assistant",
            "model": _model("anthropic", data),
            "content": [{"type": "text", "text": _REPLY}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out},
        }
        return _anthropic_stream(message) if data.get("stream") is True else message
    if method == "POST" and path == "/v1/messages/count_tokens":
        _json_object(body)
        return {"input_tokens": _usage(body)[0]}
    if method == "GET" and path == "/v1/models":
        ids = [_DEFAULT_MODEL["anthropic"], "claude-haiku-4-5"]
        return {
            "data": [_anthropic_model(m) for m in ids],
            "has_more": False,
            "first_id": ids[0],
            "last_id": ids[-1],
        }
    if method == "GET" and path.startswith("/v1/models/") and (model_id := _model_id(path)):
        return _anthropic_model(model_id)
    return None


def _github(method: str, path: str, body: bytes) -> dict[str, Any] | _Stream | None:
    if method != "GET" or path != "/user":
        return None
    # Every member GitHub's OpenAPI description requires of a private-user
    # (https://github.com/github/rest-api-description, components/schemas/private-user).
    login, api = "standin-user", "https://api.github.com/users/standin-user"
    return {
        "login": login,
        "id": 1,
        "node_id": "MDQ6VXNlcjE=",
        "avatar_url": "https://avatars.githubusercontent.com/u/1?v=4",
        "gravatar_id": "",
        "url": api,
        "html_url": f"https://github.com/{login}",
        "followers_url": f"{api}/followers",
        "following_url": f"{api}/following{{/other_user}}",
        "gists_url": f"{api}/gists{{/gist_id}}",
        "starred_url": f"{api}/starred{{/owner}}{{/repo}}",
        "subscriptions_url": f"{api}/subscriptions",
        "organizations_url": f"{api}/orgs",
        "repos_url": f"{api}/repos",
        "events_url": f"{api}/events{{/privacy}}",
        "received_events_url": f"{api}/received_events",
        "type": "User",
        "user_view_type": "private",
        "site_admin": False,
        "name": "Stand-in User",
        "company": None,
        "blog": "",
        "location": None,
        "email": None,
        "hireable": None,
        "bio": None,
        "twitter_username": None,
        "public_repos": 0,
        "public_gists": 0,
        "followers": 0,
        "following": 0,
        "created_at": "2025-01-01T00:00:00Z",
        "updated_at": "2025-01-01T00:00:00Z",
        "private_gists": 0,
        "total_private_repos": 0,
        "owned_private_repos": 0,
        "disk_usage": 0,
        "collaborators": 0,
        "two_factor_authentication": True,
    }


_ANSWERS: Final[Mapping[str, Callable[[str, str, bytes], dict[str, Any] | _Stream | None]]] = {
    "openai": _openai,
    "anthropic": _anthropic,
    "github": _github,
}


def _check_version(api: str, request: web.Request) -> None:
    # The Anthropic SDK sends anthropic-version on every call; an unknown one is refused
    # like the real API does. A missing one is accepted (the proxy tests send none).
    versions = request.headers.getall("anthropic-version", [])
    if (
        api == "anthropic"
        and versions
        and (len(versions) > 1 or versions[0] not in ANTHROPIC_VERSIONS)
    ):
        known = ", ".join(sorted(ANTHROPIC_VERSIONS))
        raise _ApiError(400, "invalid_request_error", f"anthropic-version: must be one of {known}")


# -- the handler ---------------------------------------------------------------------


async def _echo(request: web.Request) -> web.Response:
    echo: dict[str, Any] = {"service": request.app[_NAME]}
    services = request.app[_SERVICES]
    api: str | None = None
    if services:
        hostname = _hostname(request.host)
        expected = services.get(hostname)
        if expected is None:
            return web.json_response({"error": "unknown_host", "host": request.host}, status=421)
        api = API_BY_HOST.get(hostname)
        echo["service"] = expected.service
        if not _credential_ok(request, expected):
            if api is None:
                return web.json_response(
                    {
                        "error": "invalid_credential",
                        "service": expected.service,
                        "credential_ok": False,
                    },
                    status=401,
                )
            sent = expected.header is not None and expected.header in request.headers
            return _api_error(api, _credential_error(api, sent))
        echo["credential_ok"] = True
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        if api is None:
            raise
        message = f"The request body is larger than {MAX_BODY_BYTES} bytes."
        return _api_error(api, _ApiError(413, "invalid_request_error", message))
    echo.update(
        method=request.method,
        host=request.host,
        path=request.path,
        query=request.query_string,
        headers=_masked_headers(request),
        body_bytes=len(body),
    )
    if api is None:
        return web.json_response(echo)
    try:
        _check_version(api, request)
        answer = _ANSWERS[api](request.method, request.path, body)
    except _ApiError as exc:
        return _api_error(api, exc)
    headers = {_request_id_header(api): f"req_{secrets.token_hex(12)}"}
    if isinstance(answer, _Stream):
        return web.Response(
            body=answer.render(echo), content_type="text/event-stream", headers=headers
        )
    # The echo's members never collide with the API's (checked in the unit tests).
    payload = echo if answer is None else {**answer, **echo}
    return web.json_response(payload, headers=headers)


def _api_error(api: str, error: _ApiError) -> web.Response:
    request_id = f"req_{secrets.token_hex(12)}"
    body = _error_body(api, error, request_id)
    if error.status == 401:
        body["credential_ok"] = False
    return web.json_response(
        body, status=error.status, headers={_request_id_header(api): request_id}
    )


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(
    name: str = "demo-upstream", services: Mapping[str, ServiceCredential] | None = None
) -> web.Application:
    """The echo application; ``name`` is reported in every answer. ``services`` (from
    :func:`load_services`, keyed by host) turns on the egress stand-in mode."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[_NAME] = name
    app[_SERVICES] = dict(services or {})
    app[_MASKED] = MASKED_HEADERS | {s.header for s in app[_SERVICES].values() if s.header}
    app.router.add_get("/healthz", _healthz)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


def _ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def main() -> None:
    """Serve the echo app on 127.0.0.1 (``--port``, ``--name``; HTTPS with ``--tls-cert``
    and ``--tls-key``; stand-in mode with ``--services`` and ``--credentials``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--name", default="demo-upstream")
    parser.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="... and this private key (PEM)")
    parser.add_argument("--services", type=Path, help="egress data.json (.services)")
    parser.add_argument("--credentials", type=Path, help="authz's egress secrets file (JSON)")
    args = parser.parse_args()
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if (args.services is None) != (args.credentials is None):
        parser.error("--services and --credentials go together")
    services: dict[str, ServiceCredential] = {}
    if args.services is not None:
        try:
            egress = specs(read_services(args.services))
            services = load_services(egress, load_credentials(args.credentials))
        except (OSError, ValueError) as exc:
            parser.error(f"cannot load services/credentials: {exc}")
    context = _ssl_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    web.run_app(
        create_app(args.name, services),
        host=args.host,
        port=args.port,
        ssl_context=context,
        print=None,
    )


if __name__ == "__main__":
    main()
