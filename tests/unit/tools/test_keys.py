"""authz.tools.keys: key generation, digests, and the plaintext-credential lint for bundle data."""

from __future__ import annotations

import hashlib
import json
import string
from pathlib import Path
from typing import Any

import pytest

from authz.core.errors import DataFileError
from authz.core.input import mask_credential
from authz.tools.keys import KEY_PREFIX, digest, generate_key, lint_data, lint_file

ROOT = Path(__file__).resolve().parents[3]
PLAINTEXT = "ak_Zq3v9XlT0pR7mN2bW8yK4cJ6hF1dS5gA"
OTHER_PLAINTEXT = "hunter2-correct-horse"
DIGEST = hashlib.sha256(PLAINTEXT.encode()).hexdigest()
# The problem wordings (keys.lint_data docstring); each follows a JSON path.
NOT_DIGEST = "credential field holds a value that is not a SHA-256 digest"
LOOKS_PLAIN = "value looks like a plaintext credential"
KEY_NOT_DIGEST = "a key is not a SHA-256 hex digest (plaintext API key?)"


@pytest.mark.parametrize(
    ("key", "hashed"),
    [
        (PLAINTEXT, PLAINTEXT),
        (f"  {PLAINTEXT}\n", PLAINTEXT),
        ("", ""),
        ("clé", "clé"),
        (f"\t{PLAINTEXT}\r\n", PLAINTEXT),
        (f"\u00a0{PLAINTEXT}\u2003", f"\u00a0{PLAINTEXT}\u2003"),
    ],
    ids=["plain", "stripped", "empty", "non-ascii", "tab-crlf", "unicode-space-kept"],
)
def test_digest_is_hex_sha256_of_the_stripped_key(key: str, hashed: str) -> None:
    assert digest(key) == hashlib.sha256(hashed.encode("utf-8")).hexdigest()


@pytest.mark.parametrize(
    ("header", "value"),
    [("x-api-key", PLAINTEXT), ("authorization", f"Bearer {PLAINTEXT}")],
    ids=["x-api-key", "bearer"],
)
def test_digest_matches_what_the_input_document_carries(header: str, value: str) -> None:
    # Bundle data is keyed by digest(); policies compare it with input.credentials.
    credential_digest, _ = mask_credential(header, value)
    assert digest(PLAINTEXT) == credential_digest


def test_known_digest_vector() -> None:
    # SHA-256("abc") from FIPS 180-2, appendix B.1.
    assert digest("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("prefix", [KEY_PREFIX, "sbx_", ""], ids=["default", "sandbox", "none"])
def test_generate_key_shape(prefix: str) -> None:
    key = generate_key(prefix) if prefix != KEY_PREFIX else generate_key()
    assert key.startswith(prefix)
    body = key[len(prefix) :]
    # 32 random bytes in unpadded URL-safe base64.
    assert len(body) == 43
    assert set(body) <= set(string.ascii_letters + string.digits + "-_")


def test_default_prefix_is_ak() -> None:
    assert KEY_PREFIX == "ak_"
    assert generate_key().startswith("ak_")


def test_generated_keys_are_unique() -> None:
    keys = {generate_key() for _ in range(1000)}
    assert len(keys) == 1000


def test_generated_keys_are_caught_by_the_lint() -> None:
    key = generate_key()
    assert lint_data({"note": key}) != []
    assert lint_data({"api_keys": {digest(key): {"role": "user"}}}) == []


LINT_CASES: list[tuple[str, Any, list[str]]] = [
    # (id, data, expected problems)
    (
        "clean",
        {
            "api_keys": {DIGEST: {"id": "key-1", "role": "admin", "rate_limit_tier": "premium"}},
            "path_rules": [{"pattern": "/api/v1/**", "methods": ["GET"], "roles": ["user"]}],
            "rate_limit_tiers": {"default": {"requests_per_minute": 60}},
        },
        [],
    ),
    ("empty", {}, []),
    ("scalars", {"count": 3, "enabled": True, "nothing": None, "ratio": 0.5}, []),
    (
        "plaintext-api-keys-map-key",
        {"api_keys": {PLAINTEXT: {"role": "admin"}}},
        [f"data.api_keys: {KEY_NOT_DIGEST}"],
    ),
    (
        "plaintext-api-keys-map-key-without-prefix",
        {"api_keys": {OTHER_PLAINTEXT: {"role": "admin"}}},
        [f"data.api_keys: {KEY_NOT_DIGEST}"],
    ),
    (
        "uppercase-digest-as-api-keys-map-key",
        {"api_keys": {DIGEST.upper(): {}}},
        [f"data.api_keys: {KEY_NOT_DIGEST}"],
    ),
    (
        "digest-with-trailing-newline-as-api-keys-map-key",
        {"api_keys": {DIGEST + "\n": {}}},
        [f"data.api_keys: {KEY_NOT_DIGEST}"],
    ),
    (
        "nested-api-keys-map",
        {"tenants": {"t1": {"api_keys": {OTHER_PLAINTEXT: {}}}}},
        [f"data.tenants.t1.api_keys: {KEY_NOT_DIGEST}"],
    ),
    (
        "credential-field-plaintext",
        {"services": {"billing": {"token": OTHER_PLAINTEXT}}},
        [f"data.services.billing.token: {NOT_DIGEST}"],
    ),
    (
        "credential-suffix-fields",
        {
            "upstream_token": OTHER_PLAINTEXT,
            "client_secret": OTHER_PLAINTEXT,
            "Signing_Key": OTHER_PLAINTEXT,
        },
        [
            f"data.upstream_token: {NOT_DIGEST}",
            f"data.client_secret: {NOT_DIGEST}",
            f"data.Signing_Key: {NOT_DIGEST}",
        ],
    ),
    (
        "credential-named-fields",
        {"password": OTHER_PLAINTEXT, "apikey": OTHER_PLAINTEXT},
        [
            f"data.password: {NOT_DIGEST}",
            f"data.apikey: {NOT_DIGEST}",
        ],
    ),
    ("credential-field-with-digest", {"token": DIGEST, "api_key": DIGEST}, []),
    ("sha256-and-digest-fields", {"key_sha256": DIGEST, "token_digest": DIGEST}, []),
    (
        "reference-and-metadata-fields",
        {
            "token_ref": "vault://kv/billing",
            "key_id": "key-1",
            "token_header": "x-api-key",
            "key_format": "hex",
        },
        [],
    ),
    (
        "sk-value-anywhere",
        {"notes": {"example": "sk-live-abc123"}},
        [f"data.notes.example: {LOOKS_PLAIN}"],
    ),
    (
        "ghp-value-in-sha256-field",
        {"key_sha256": "ghp_abcdef"},
        [f"data.key_sha256: {LOOKS_PLAIN}"],
    ),
    (
        "nested-lists",
        {
            "users": [
                {"name": "a", "keys": [["sk-abc"], "AKIAIOSFODNN7EXAMPLE"]},
                {"token": OTHER_PLAINTEXT},
            ]
        },
        [
            f"data.users[0].keys[0][0]: {LOOKS_PLAIN}",
            f"data.users[0].keys[1]: {LOOKS_PLAIN}",
            f"data.users[1].token: {NOT_DIGEST}",
        ],
    ),
    ("top-level-list", ["xoxb-1", "fine"], [f"data[0]: {LOOKS_PLAIN}"]),
]


@pytest.mark.parametrize(
    ("data", "problems"),
    [case[1:] for case in LINT_CASES],
    ids=[case[0] for case in LINT_CASES],
)
def test_lint_data(data: Any, problems: list[str]) -> None:
    assert lint_data(data) == problems


@pytest.mark.parametrize(
    "value",
    [[OTHER_PLAINTEXT, "also-plain"], [[OTHER_PLAINTEXT]]],
    ids=["list", "nested-list"],
)
def test_plaintext_list_under_credential_field_is_flagged(value: list[Any]) -> None:
    # A key rotation list is still plaintext credentials under a credential field.
    problems = lint_data({"service": {"api_key": value}})
    assert problems
    assert all(problem.startswith("data.service.api_key") for problem in problems)


def test_lint_data_names_the_source() -> None:
    assert lint_data({"token": "x"}, where="bundle/data.json") == [
        f"bundle/data.json.token: {NOT_DIGEST}"
    ]


@pytest.mark.parametrize(
    ("content", "problems"),
    [
        ('{"token": "x"}', [f"token: {NOT_DIGEST}"]),
        (json.dumps({"token": DIGEST}), []),
        ("{}", []),
    ],
    ids=["plaintext", "digest", "empty-object"],
)
def test_lint_file_lints_the_file_and_names_it(
    tmp_path: Path, content: str, problems: list[str]
) -> None:
    path = tmp_path / "data.json"
    path.write_text(content, encoding="utf-8")
    assert lint_file(path) == [f"{path}.{problem}" for problem in problems]


@pytest.mark.parametrize(
    "content", [b"{not json", b"\xff\xfe{}", None], ids=["not-json", "not-utf8", "missing"]
)
def test_lint_file_refuses_an_unreadable_file_naming_it(
    tmp_path: Path, content: bytes | None
) -> None:
    path = tmp_path / "data.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataFileError, match="cannot read JSON") as caught:
        lint_file(path)
    assert str(caught.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    "data",
    [
        {"api_keys": {PLAINTEXT: {"role": "admin"}}},
        {"api_keys": {PLAINTEXT: {"note": "sk-live-abc"}}},
        {"api_keys": {PLAINTEXT: {"upstream_token": OTHER_PLAINTEXT}}},
        {"api_keys": {OTHER_PLAINTEXT: [{"token": "x"}]}},
        {"token": PLAINTEXT},
        {"nested": [{"password": PLAINTEXT}]},
    ],
    ids=[
        "map-key",
        "map-key-with-nested-problem",
        "map-key-with-nested-credential-field",
        "map-key-with-nested-list",
        "field-value",
        "list-item",
    ],
)
def test_problems_never_quote_the_secret(data: Any) -> None:
    problems = lint_data(data)
    assert problems
    text = "\n".join(problems)
    assert PLAINTEXT not in text
    assert OTHER_PLAINTEXT not in text


def test_shipped_policy_data_is_clean() -> None:
    data = json.loads((ROOT / "policy" / "gateway" / "data.json").read_text(encoding="utf-8"))
    assert lint_data(data, where="policy/gateway/data.json") == []
