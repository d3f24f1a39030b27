"""stack.upstream: the echo API (demo upstream and egress stand-in) never echoes a secret."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from authz.stack.upstream import (
    MASK,
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
