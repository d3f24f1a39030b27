"""authz.tools.services is the one reader of the egress services file: typed values, and
every refusal names the file and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from authz.tools.services import (
    Credential,
    ServicesError,
    Upstream,
    read_services,
    specs,
)

ROOT = Path(__file__).resolve().parents[3]
GOOD = {
    "base_url": "https://api.example.com/v1",
    "credential": {"header": "x-k", "format": "{secret}"},
}


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "data.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_services_file_reads_into_typed_values(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {"services": {"api": GOOD, "public": {"base_url": "https://pub.example:8443"}}},
    )
    loaded = read_services(path)
    assert list(loaded) == ["api", "public"]
    assert loaded["api"].upstream == Upstream("https", "api.example.com", 443, "/v1")
    assert loaded["api"].credential == Credential("x-k", "{secret}")
    assert loaded["public"].credential is None
    assert loaded["public"].upstream.authority == "pub.example:8443"
    assert specs(loaded)["api"] == GOOD


def test_services_file_shipped_in_the_repository_reads() -> None:
    loaded = read_services(ROOT / "policy/egress/data.json")
    raw = json.loads((ROOT / "policy/egress/data.json").read_text(encoding="utf-8"))["services"]
    assert set(loaded) == set(raw)
    assert all(s.upstream.tls for s in loaded.values() if s.credential is not None)


BAD = {
    "not-json": ("{nope", "cannot read"),
    "not-object": ("[1]", ".services must be an object"),
    "no-services": ({"tiers": {}}, ".services must be an object"),
    "services-list": ({"services": []}, ".services must be an object"),
    "bad-name": ({"services": {"Bad_Name": GOOD}}, "'Bad_Name': the name"),
    "spec-not-object": ({"services": {"a": "https://a.example"}}, "'a': must be an object"),
    "no-base-url": ({"services": {"a": {}}}, "'a': base_url"),
    "base-url-query": ({"services": {"a": {"base_url": "https://a.example/?q"}}}, "'a': base_url"),
    "http-with-credential": (
        {"services": {"a": {**GOOD, "base_url": "http://a.example", "credential": {}}}},
        "'a': base_url 'http://a.example' is plain http",
    ),
    "credential-not-object": (
        {"services": {"a": {"base_url": "https://a.example", "credential": "k"}}},
        "'a': credential must be an object",
    ),
    "header-uppercase": (
        {"services": {"a": {**GOOD, "credential": {"header": "X-K", "format": "{secret}"}}}},
        "'a': credential.header",
    ),
    "header-not-token": (
        {"services": {"a": {**GOOD, "credential": {"header": "x k", "format": "{secret}"}}}},
        "'a': credential.header",
    ),
    "format-missing": (
        {"services": {"a": {**GOOD, "credential": {"header": "x-k"}}}},
        "'a': credential.format",
    ),
    "format-without-secret": (
        {"services": {"a": {**GOOD, "credential": {"header": "x-k", "format": "k"}}}},
        "'a': credential.format",
    ),
}


@pytest.mark.parametrize(("data", "field"), BAD.values(), ids=BAD.keys())
def test_services_file_errors_name_the_file_and_the_field(
    tmp_path: Path, data: Any, field: str
) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ServicesError) as caught:
        read_services(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert field in str(caught.value)


def test_services_file_missing_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ServicesError, match=r"absent\.json"):
        read_services(tmp_path / "absent.json")


def test_services_file_nested_too_deeply_is_a_services_error(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('{"services": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}")
    with pytest.raises(ServicesError, match=r"data\.json: cannot read the egress services"):
        read_services(path)
