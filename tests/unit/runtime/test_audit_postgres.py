"""authz.runtime.audit.postgres without a database: the URL as logs show it, the indexed
columns copied from a body, and the replica id refused before any connection."""

from __future__ import annotations

import pytest

from authz.core.errors import ConfigError
from authz.core.secret import MASK, Secret
from authz.runtime.audit.postgres import (
    INDEXED_MAX_CHARS,
    PostgresStorage,
    indexed_columns,
    mask_url,
)

PASSWORD = "pg-Secret-7"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"postgresql://authz:{PASSWORD}@db.internal:5432/authz",
            f"postgresql://authz:{MASK}@db.internal:5432/authz",
        ),
        (
            f"postgresql://authz@db.internal/authz?password={PASSWORD}&sslmode=require",
            "postgresql://authz@db.internal/authz",
        ),
        (f"postgres://:{PASSWORD}@[::1]:5433/a", f"postgres://:{MASK}@[::1]:5433/a"),
        ("postgresql://db.internal/authz", "postgresql://db.internal/authz"),
        (f"postgresql://authz:{PASSWORD}@host:notaport/x", "postgresql://<redacted>"),
    ],
    ids=["password", "password-in-query", "ipv6", "no-credentials", "unparseable-port"],
)
def test_mask_url_never_shows_the_password(url: str, shown: str) -> None:
    assert mask_url(url) == shown
    assert PASSWORD not in mask_url(url)


@pytest.mark.parametrize(
    ("body", "columns"),
    [
        ('{"key_id": "key-a", "sandbox_id": "sb-1"}', ("key-a", "sb-1")),
        ('{"key_id": "key-a"}', ("key-a", None)),
        ('{"key_id": "k\\u0000nul", "sandbox_id": 7}', (None, None)),
        (f'{{"key_id": "{"k" * (INDEXED_MAX_CHARS + 1)}"}}', (None, None)),
        (f'{{"key_id": "{"k" * INDEXED_MAX_CHARS}"}}', ("k" * INDEXED_MAX_CHARS, None)),
        ('["key_id"]', (None, None)),
        ("not json", (None, None)),
    ],
    ids=["both", "key-only", "nul-and-number", "too-long", "at-the-cap", "not-object", "not-json"],
)
def test_indexed_columns_copy_only_bounded_strings(
    body: str, columns: tuple[str | None, str | None]
) -> None:
    assert indexed_columns(body) == columns


@pytest.mark.parametrize("replica", ["", "-x", "a b", "a/b", "x" * 129], ids=str)
def test_bad_replica_id_is_refused_before_connecting(replica: str) -> None:
    # Port 1: nothing listens; the id is refused before any connection is tried.
    url = Secret(f"postgresql://authz:{PASSWORD}@127.0.0.1:1/authz")
    with pytest.raises(ConfigError) as caught:
        PostgresStorage(url, replica)
    assert "AUTHZ_REPLICA_ID" in str(caught.value)
    assert PASSWORD not in str(caught.value)
