"""stack.upstream: the echo API (demo upstream and egress stand-in) never echoes a secret;
the stand-in answers the endpoints the examples use so the official SDKs parse them."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from anthropic.types import Message, MessageTokensCount, ModelInfo, RawMessageStreamEvent
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter

from authz.stack.upstream import (
    ANTHROPIC_VERSIONS,
    MASK,
    MAX_BODY_BYTES,
    ServiceCredential,
    create_app,
    load_credentials,
    load_services,
)
from tests.helpers import ROOT

SERVICES: dict[str, Any] = {
    "openai": {
        "base_url": "https://api.openai.com",
        "credential": {"header": "authorization", "format": "Bearer {secret}"},
    },
    "anthropic": {
        "base_url": "https://api.anthropic.com",
        "credential": {"header": "x-api-key", "format": "{secret}"},
    },
    "custom": {
        "base_url": "https://custom.example:8443/v1",
        "credential": {"header": "X-Custom-Token", "format": "tok={secret}"},
    },
    "nosecret": {
        "base_url": "https://nosecret.example",
        "credential": {"header": "authorization", "format": "Bearer {secret}"},
    },
}
CREDENTIALS = {"openai": "sk-openai-123", "anthropic": "sk-ant-456", "custom": "c-789"}
SECRETS = list(CREDENTIALS.values())


async def client_for(app: web.Application) -> AsyncIterator[TestClient[web.Request, Any]]:
    async with TestClient(TestServer(app)) as client:
        yield client


@pytest.fixture
async def standin() -> AsyncIterator[TestClient[web.Request, Any]]:
    async for client in client_for(create_app("standin", load_services(SERVICES, CREDENTIALS))):
        yield client


@pytest.fixture
async def demo() -> AsyncIterator[TestClient[web.Request, Any]]:
    async for client in client_for(create_app()):
        yield client


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text


# -- stand-in mode: the credential each service expects ------------------------------


@pytest.mark.parametrize(
    ("host", "headers", "service"),
    [
        ("api.openai.com", {"Authorization": "Bearer sk-openai-123"}, "openai"),
        ("API.OpenAI.com:443", {"authorization": "Bearer sk-openai-123"}, "openai"),
        ("api.anthropic.com", {"x-api-key": "sk-ant-456"}, "anthropic"),
        ("custom.example:8443", {"x-custom-token": "tok=c-789"}, "custom"),
    ],
    ids=["bearer", "case-and-port", "x-api-key", "custom-format"],
)
async def test_right_credential_is_echoed_masked(
    standin: TestClient[web.Request, Any], host: str, headers: Mapping[str, str], service: str
) -> None:
    resp = await standin.post(
        "/v1/things?limit=2",
        headers={"Host": host, "Cookie": "session=abc", **headers},
        data=b"12345",
    )
    text = await resp.text()
    assert resp.status == 200, text
    assert_no_secret(text, *SECRETS, "session=abc")
    body = json.loads(text)
    assert body["credential_ok"] is True
    assert body["service"] == service
    assert body["host"] == host
    assert (body["method"], body["path"], body["query"]) == ("POST", "/v1/things", "limit=2")
    assert body["body_bytes"] == 5
    for name in headers:
        assert body["headers"][name.lower()] == MASK
    assert body["headers"]["cookie"] == MASK


@pytest.mark.parametrize(
    ("host", "headers"),
    [
        ("api.openai.com", {}),
        ("api.openai.com", {"authorization": "Bearer wrong"}),
        ("api.openai.com", {"authorization": "sk-openai-123"}),  # unformatted
        ("api.openai.com", {"authorization": "Bearer  sk-openai-123"}),
        ("api.openai.com", {"x-api-key": "sk-openai-123"}),  # wrong header
        ("api.anthropic.com", {"x-api-key": "sk-openai-123"}),  # another service's secret
        ("api.anthropic.com", {"authorization": "Bearer sk-ant-456"}),
        ("nosecret.example", {"authorization": "Bearer "}),  # no secret in the file
        ("nosecret.example", {"authorization": "Bearer None"}),
    ],
    ids=[
        "missing",
        "wrong",
        "unformatted",
        "double-space",
        "wrong-header",
        "other-service-secret",
        "anthropic-bearer",
        "no-secret-empty",
        "no-secret-none",
    ],
)
async def test_wrong_credential_is_401(
    standin: TestClient[web.Request, Any], host: str, headers: Mapping[str, str]
) -> None:
    resp = await standin.get("/v1/models", headers={"Host": host, **headers})
    text = await resp.text()
    assert resp.status == 401
    assert_no_secret(text, *SECRETS)
    body = json.loads(text)
    # The real API's error shape on the hosts the stand-in plays an API for.
    if host == "api.openai.com":
        assert body["error"]["type"] == "invalid_request_error"
        assert resp.headers["x-request-id"].startswith("req_")
    elif host == "api.anthropic.com":
        assert body["type"] == "error"
        assert body["error"]["type"] == "authentication_error"
    else:
        assert body["error"] == "invalid_credential"
    assert body["credential_ok"] is False


async def test_duplicate_credential_header_is_401(
    standin: TestClient[web.Request, Any],
) -> None:
    headers = [
        ("Host", "api.openai.com"),
        ("Authorization", "Bearer sk-openai-123"),
        ("Authorization", "Bearer sk-openai-123"),
    ]
    resp = await standin.get("/", headers=headers)
    assert resp.status == 401


@pytest.mark.parametrize("host", ["api.github.com", "openai", "[::1", "127.0.0.1:1234"])
async def test_unknown_host_is_421(standin: TestClient[web.Request, Any], host: str) -> None:
    resp = await standin.get("/", headers={"Host": host, "authorization": "Bearer sk-openai-123"})
    text = await resp.text()
    assert resp.status == 421
    assert json.loads(text)["error"] == "unknown_host"
    assert_no_secret(text, *SECRETS)


async def test_healthz_needs_no_credential(standin: TestClient[web.Request, Any]) -> None:
    resp = await standin.get("/healthz", headers={"Host": "anything"})
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


# -- demo mode (gateway upstream): echo everything, mask credentials -------------------


async def test_demo_echo_masks_credential_headers(demo: TestClient[web.Request, Any]) -> None:
    secret_headers = {
        "Authorization": "Bearer s1",
        "Proxy-Authorization": "Basic czI=",
        "X-Api-Key": "s3",
        "Cookie": "s4=1",
        "X-Sandbox-Token": "s5",
    }
    resp = await demo.get("/api/v1/items", headers={**secret_headers, "x-authz-role": "user"})
    text = await resp.text()
    assert resp.status == 200
    assert_no_secret(text, "s1", "czI=", "s3", "s4=1", "s5")
    body = json.loads(text)
    assert body["service"] == "demo-upstream"
    assert "credential_ok" not in body
    for name in secret_headers:
        assert body["headers"][name.lower()] == MASK
    assert body["headers"]["x-authz-role"] == "user"


async def test_demo_accepts_any_host_and_no_credential(
    demo: TestClient[web.Request, Any],
) -> None:
    resp = await demo.get("/x", headers={"Host": "api.github.com"})
    assert resp.status == 200
    body = await resp.json()
    assert body["headers"].get("authorization") is None


# -- loading -----------------------------------------------------------------------------


def test_load_services_keys_by_host_and_never_reprs_a_secret() -> None:
    loaded = load_services(SERVICES, CREDENTIALS)
    assert sorted(loaded) == [
        "api.anthropic.com",
        "api.openai.com",
        "custom.example",
        "nosecret.example",
    ]
    assert loaded["custom.example"].header == "x-custom-token"
    assert loaded["custom.example"].value == "tok=c-789"
    assert loaded["nosecret.example"].value is None
    assert_no_secret(repr(loaded), *SECRETS)


def test_load_services_accepts_the_real_services_data() -> None:
    data = json.loads((ROOT / "policy/egress/data.json").read_text(encoding="utf-8"))
    loaded = load_services(data["services"], {})
    assert {c.service for c in loaded.values()} == set(data["services"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"base_url": "nohost"}, "base_url has no host"),
        ({"base_url": "https://a.example", "credential": {}}, "credential.header"),
        ({"base_url": "https://a.example", "credential": {"format": "{secret}"}}, "header"),
        ({"base_url": "https://a.example", "credential": {"header": "h"}}, "credential.format"),
        (
            {"base_url": "https://a.example", "credential": {"header": "h", "format": "x"}},
            "credential.format",
        ),
        ("https://a.example", "must be an object"),
    ],
    ids=["no-host", "empty-credential", "no-header", "no-format", "format-without-secret", "str"],
)
def test_load_services_errors(spec: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"service 's': .*{message}"):
        load_services({"s": spec}, {})


def test_load_credentials(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({"version": 1, "credentials": CREDENTIALS}))
    assert load_credentials(path) == CREDENTIALS


@pytest.mark.parametrize(
    "content",
    [
        {"credentials": {"openai": "sk-openai-123"}},
        {"version": 2, "credentials": {"openai": "sk-openai-123"}},
        {"version": 1, "credentials": ["sk-openai-123"]},
        {"version": 1, "credentials": {"openai": 123}},
        ["sk-openai-123"],
    ],
    ids=["no-version", "version-2", "list", "non-string", "not-object"],
)
def test_load_credentials_errors_never_show_a_secret(tmp_path: Path, content: object) -> None:
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=str(path)) as info:
        load_credentials(path)
    assert "sk-openai-123" not in str(info.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"version": 1, "credentials": {"openai": "sk-\xff"}}', "not UTF-8"),
        (b'{"version": 1, "credentials": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    ],
    ids=["not-utf8", "nested-too-deeply"],
)
def test_load_credentials_refuses_a_hostile_file_naming_it_never_its_bytes(
    tmp_path: Path, raw: bytes, message: str
) -> None:
    path = tmp_path / "secrets.json"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=message) as info:
        load_credentials(path)
    assert str(path) in str(info.value)
    assert "0xff" not in str(info.value)


async def test_a_service_without_credential_refuses_any_credential_header() -> None:
    services = load_services({"echo": {"base_url": "https://echo.example"}}, {})
    assert services == {"echo.example": ServiceCredential("echo", None, None)}
    async with TestClient(TestServer(create_app("standin", services))) as client:
        clean = await client.get("/get", headers={"Host": "echo.example"})
        assert clean.status == 200
        assert (await clean.json())["credential_ok"] is True
        leaked = await client.get(
            "/get", headers={"Host": "echo.example", "Authorization": "Bearer x"}
        )
        assert leaked.status == 401


# -- real-API answers: the official SDKs parse them ------------------------------------

# The echo's members, added to every real-API answer (the SDKs keep them as extras).
ECHO_KEYS = {"service", "credential_ok", "method", "host", "path", "query", "headers"}
ECHO_KEYS |= {"body_bytes"}
# GitHub's OpenAPI description, components/schemas/private-user, "required"
# (https://github.com/github/rest-api-description), with each member's JSON type.
GITHUB_PRIVATE_USER: dict[str, type | tuple[type, ...]] = {
    **dict.fromkeys(
        [
            "login",
            "node_id",
            "avatar_url",
            "url",
            "html_url",
            "followers_url",
            "following_url",
            "gists_url",
            "starred_url",
            "subscriptions_url",
            "organizations_url",
            "repos_url",
            "events_url",
            "received_events_url",
            "type",
            "created_at",
            "updated_at",
        ],
        str,
    ),
    **dict.fromkeys(
        ["gravatar_id", "name", "company", "location", "email", "bio"], (str, type(None))
    ),
    "blog": (str, type(None)),
    "hireable": (bool, type(None)),
    "site_admin": bool,
    "two_factor_authentication": bool,
    **dict.fromkeys(
        [
            "id",
            "public_repos",
            "public_gists",
            "followers",
            "following",
            "private_gists",
            "total_private_repos",
            "owned_private_repos",
            "disk_usage",
            "collaborators",
        ],
        int,
    ),
}
GITHUB = {**SERVICES, "github": {**SERVICES["openai"], "base_url": "https://api.github.com"}}
GITHUB_TOKEN = "ghp-secret-000"
ALL_SECRETS = [*SECRETS, GITHUB_TOKEN]


@pytest.fixture
async def api_standin() -> AsyncIterator[TestClient[web.Request, Any]]:
    """The stand-in playing OpenAI, Anthropic and GitHub, served on 127.0.0.1."""
    services = load_services(GITHUB, {**CREDENTIALS, "github": GITHUB_TOKEN})
    async for client in client_for(create_app("standin", services)):
        yield client


def _openai(server: TestClient[web.Request, Any], key: str) -> openai.AsyncOpenAI:
    # Host: the egress Envoy rewrites it to the real host; here the client sends it.
    return openai.AsyncOpenAI(
        api_key=key,
        base_url=str(server.make_url("/v1")),
        default_headers={"Host": "api.openai.com"},
        max_retries=0,
    )


def _anthropic(
    server: TestClient[web.Request, Any], key: str, **headers: str
) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        api_key=key,
        base_url=str(server.make_url("")),
        default_headers={"Host": "api.anthropic.com", **headers},
        max_retries=0,
    )


def assert_clean(response: httpx.Response) -> None:
    """No secret in the answer's body or in any of its headers."""
    for secret in ALL_SECRETS:
        assert secret not in response.text
        assert all(secret not in f"{k}: {v}" for k, v in response.headers.items())


async def test_openai_sdk_parses_models_and_chat_completion(
    api_standin: TestClient[web.Request, Any],
) -> None:
    async with _openai(api_standin, "sk-openai-123") as client:
        listed = await client.models.with_raw_response.list()
        page = listed.parse()
        assert [type(m) for m in page.data] == [Model] * len(page.data)
        assert page.data
        for raw in listed.http_response.json()["data"]:
            Model.model_validate(raw, strict=True)  # every required member, right types

        got = await client.models.with_raw_response.retrieve("gpt-x")
        assert Model.model_validate(got.http_response.json()).id == "gpt-x"
        assert got.parse().id == "gpt-x"

        created = await client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
        completion = created.parse()
        assert isinstance(completion, ChatCompletion)
        ChatCompletion.model_validate(created.http_response.json())
        assert completion.model == "gpt-4o"
        assert completion.choices[0].message.content
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None
        assert completion.usage.total_tokens > 0
        assert completion._request_id is not None
        assert completion._request_id.startswith("req_")
        # The echo rides along as extras: the stand-in saw exactly the credential.
        assert completion.model_extra is not None
        assert completion.model_extra["credential_ok"] is True
        assert completion.model_extra["headers"]["authorization"] == MASK
        for response in (listed.http_response, got.http_response, created.http_response):
            assert_clean(response)


async def test_anthropic_sdk_parses_message_tokens_and_models(
    api_standin: TestClient[web.Request, Any],
) -> None:
    async with _anthropic(api_standin, "sk-ant-456") as client:
        created = await client.messages.with_raw_response.create(
            model="claude-sonnet-4-5",
            max_tokens=64,
            messages=[{"role": "user", "content": "hi"}],
        )
        message = created.parse()
        assert isinstance(message, Message)
        Message.model_validate(created.http_response.json())
        assert message.model == "claude-sonnet-4-5"
        assert message.content[0].type == "text"
        assert message.content[0].text
        assert message.stop_reason == "end_turn"
        assert message.usage.input_tokens > 0
        assert message._request_id is not None
        assert message._request_id.startswith("req_")
        assert message.model_extra is not None
        assert message.model_extra["credential_ok"] is True
        assert message.model_extra["headers"]["x-api-key"] == MASK
        assert message.model_extra["headers"]["anthropic-version"] in ANTHROPIC_VERSIONS

        counted = await client.messages.with_raw_response.count_tokens(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}]
        )
        assert isinstance(counted.parse(), MessageTokensCount)
        MessageTokensCount.model_validate(counted.http_response.json())

        listed = await client.models.with_raw_response.list()
        page = listed.parse()
        assert page.data
        assert all(isinstance(m, ModelInfo) for m in page.data)
        for raw in listed.http_response.json()["data"]:
            ModelInfo.model_validate(raw)
        got = await client.models.with_raw_response.retrieve("claude-x")
        assert got.parse().id == "claude-x"
        for response in (
            created.http_response,
            counted.http_response,
            listed.http_response,
            got.http_response,
        ):
            assert_clean(response)


async def test_github_user_has_every_member_githubs_schema_requires(
    api_standin: TestClient[web.Request, Any],
) -> None:
    async with httpx.AsyncClient(base_url=str(api_standin.make_url(""))) as client:
        resp = await client.get(
            "/user",
            headers={
                "Host": "api.github.com",
                "Authorization": f"Bearer {GITHUB_TOKEN}",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28",
            },
        )
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["x-github-request-id"]
    user = resp.json()
    wrong = {
        k: user.get(k)
        for k, t in GITHUB_PRIVATE_USER.items()
        if not isinstance(user.get(k, ...), t)
    }
    assert wrong == {}
    assert user["type"] == "User"
    assert user["credential_ok"] is True
    assert_clean(resp)


@pytest.mark.parametrize(
    "model",
    [Model, ChatCompletion, Message, ModelInfo, MessageTokensCount],
    ids=lambda m: m.__name__,
)
def test_echo_members_never_shadow_an_api_member(model: type[Any]) -> None:
    assert ECHO_KEYS.isdisjoint(model.model_fields)
    assert ECHO_KEYS.isdisjoint(GITHUB_PRIVATE_USER)


async def test_openai_sdk_raises_authentication_error_on_a_wrong_key(
    api_standin: TestClient[web.Request, Any],
) -> None:
    async with _openai(api_standin, "sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.models.list()
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
            )
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    assert info.value.type == "invalid_request_error"
    assert_clean(info.value.response)


async def test_anthropic_sdk_raises_authentication_error_on_a_wrong_key(
    api_standin: TestClient[web.Request, Any],
) -> None:
    # Another service's real secret is as wrong as a guess.
    async with _anthropic(api_standin, "sk-openai-123") as client:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await client.messages.create(
                model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
    assert info.value.status_code == 401
    assert isinstance(info.value.body, dict)
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "authentication_error"
    assert info.value.request_id is not None
    assert_clean(info.value.response)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"Authorization": "Bearer ghp-wrong"}, "Bad credentials"),
        ({"Authorization": f"token {GITHUB_TOKEN}"}, "Bad credentials"),
        ({}, "Requires authentication"),
    ],
    ids=["wrong", "other-scheme", "missing"],
)
async def test_github_refuses_a_wrong_or_missing_token_like_github(
    api_standin: TestClient[web.Request, Any], headers: dict[str, str], message: str
) -> None:
    async with httpx.AsyncClient(base_url=str(api_standin.make_url(""))) as client:
        resp = await client.get("/user", headers={"Host": "api.github.com", **headers})
    assert resp.status_code == 401
    body = resp.json()
    assert (body["message"], body["status"]) == (message, "401")
    assert body["documentation_url"].startswith("https://docs.github.com/")
    assert_clean(resp)


async def test_anthropic_version_other_than_the_documented_ones_is_400(
    api_standin: TestClient[web.Request, Any],
) -> None:
    async with _anthropic(api_standin, "sk-ant-456", **{"anthropic-version": "2099-01-01"}) as c:
        with pytest.raises(anthropic.BadRequestError) as info:
            await c.messages.create(
                model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert "anthropic-version" in info.value.body["error"]["message"]


@pytest.mark.parametrize(
    ("host", "path", "body", "status"),
    [
        ("api.openai.com", "/v1/chat/completions", b"x" * (MAX_BODY_BYTES + 1), 413),
        ("api.anthropic.com", "/v1/messages", b"x" * (MAX_BODY_BYTES + 1), 413),
        ("api.openai.com", "/v1/chat/completions", b"[1, 2]", 400),
        ("api.openai.com", "/v1/chat/completions", b"{not json", 400),
        ("api.openai.com", "/v1/chat/completions", b"[" * 5000 + b"]" * 5000, 400),
        ("api.anthropic.com", "/v1/messages", b'"text"', 400),
        ("api.anthropic.com", "/v1/messages/count_tokens", b"\xff", 400),
    ],
    ids=[
        "openai-too-large",
        "anthropic-too-large",
        "openai-array",
        "openai-not-json",
        "openai-nested",
        "anthropic-string",
        "anthropic-not-utf8",
    ],
)
async def test_bad_request_bodies_get_the_apis_error_never_a_crash(
    api_standin: TestClient[web.Request, Any], host: str, path: str, body: bytes, status: int
) -> None:
    key = {"Authorization": "Bearer sk-openai-123"}
    if host == "api.anthropic.com":
        key = {"x-api-key": "sk-ant-456", "anthropic-version": "2023-06-01"}
    resp = await api_standin.post(path, headers={"Host": host, **key}, data=io.BytesIO(body))
    text = await resp.text()
    assert resp.status == status, text
    error = json.loads(text)["error"]
    assert error["type"] == "invalid_request_error"
    assert_no_secret(text, *ALL_SECRETS)


@pytest.mark.parametrize(
    ("host", "headers", "path"),
    [
        ("api.openai.com", {"Authorization": "Bearer sk-openai-123"}, "/v1/chat/completions"),
        ("api.anthropic.com", {"x-api-key": "sk-ant-456"}, "/v1/messages"),
    ],
    ids=["openai", "anthropic"],
)
async def test_a_minimal_request_is_answered_so_policy_probes_reach_the_standin(
    api_standin: TestClient[web.Request, Any], host: str, headers: dict[str, str], path: str
) -> None:
    # The proxy tests (and the README's curl examples) send no body or no model and no
    # anthropic-version: the stand-in answers them, with a default model.
    resp = await api_standin.post(path, headers={"Host": host, **headers})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["credential_ok"] is True
    assert body["model"]
    assert body["body_bytes"] == 0


async def test_other_paths_on_an_api_host_still_echo(
    api_standin: TestClient[web.Request, Any],
) -> None:
    resp = await api_standin.get(
        "/repos/acme/widgets",
        headers={"Host": "api.github.com", "Authorization": f"Bearer {GITHUB_TOKEN}"},
    )
    assert resp.status == 200
    body = await resp.json()
    assert (body["service"], body["path"], body["credential_ok"]) == (
        "github",
        "/repos/acme/widgets",
        True,
    )
    assert body["headers"]["authorization"] == MASK


def _sse_data(text: str) -> list[str]:
    """The ``data:`` payloads of an event stream, in order."""
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


async def test_openai_sdk_reads_a_streamed_chat_completion(
    api_standin: TestClient[web.Request, Any],
) -> None:
    messages: list[Any] = [{"role": "user", "content": "hi"}]
    async with _openai(api_standin, "sk-openai-123") as client:
        whole = await client.chat.completions.create(model="gpt-4o", messages=messages)
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=messages, stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert chunks
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (
        whole.choices[0].message.content
    )
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert {c.model for c in chunks} == {"gpt-4o"}
    assert chunks[0].model_extra is not None
    assert chunks[0].model_extra["credential_ok"] is True
    # The raw stream: each chunk valid against the SDK's schema, then [DONE]; no secret.
    resp = await api_standin.post(
        "/v1/chat/completions",
        headers={"Host": "api.openai.com", "Authorization": "Bearer sk-openai-123"},
        json={"model": "gpt-4o", "messages": messages, "stream": True},
    )
    text = await resp.text()
    assert resp.headers["content-type"].startswith("text/event-stream")
    *data, done = _sse_data(text)
    assert done == "[DONE]"
    for item in data:
        ChatCompletionChunk.model_validate_json(item)
    assert_no_secret(text + str(resp.headers), *ALL_SECRETS)


async def test_anthropic_sdk_reads_a_streamed_message(
    api_standin: TestClient[web.Request, Any],
) -> None:
    async with (
        _anthropic(api_standin, "sk-ant-456") as client,
        client.messages.stream(
            model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert isinstance(final, Message)
    assert final.content[0].type == "text"
    assert final.content[0].text == text
    assert text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0
    resp = await api_standin.post(
        "/v1/messages",
        headers={"Host": "api.anthropic.com", "x-api-key": "sk-ant-456"},
        json={"model": "m", "max_tokens": 8, "messages": [], "stream": True},
    )
    raw = await resp.text()
    events = TypeAdapter(RawMessageStreamEvent)
    kinds = [events.validate_json(item).type for item in _sse_data(raw)]
    assert kinds == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert json.loads(_sse_data(raw)[0])["message"]["credential_ok"] is True
    assert_no_secret(raw + str(resp.headers), *ALL_SECRETS)
