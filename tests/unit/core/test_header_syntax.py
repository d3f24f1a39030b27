"""RFC 9110's ``token`` rule (section 5.6.2), the syntax of header field names and auth
schemes, is written once in authz.core.headers and every module uses that copy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from authz.core.headers import TCHAR, TOKEN, is_header_name, is_safe_field_value, is_token

AUTHZ = Path(__file__).resolve().parents[3] / "authz"

# (text, is a token, is a lowercase header name)
CASES = [
    ("x-api-key", True, True),
    ("authorization", True, True),
    ("Authorization", True, False),
    ("X-Api-Key", True, False),
    ("!#$%&'*+-.^_`|~", True, True),  # every tchar that is not DIGIT / ALPHA
    ("0123456789", True, True),
    ("bearer", True, True),
    ("", False, False),
    ("a b", False, False),
    ("a:b", False, False),
    ("a\tb", False, False),
    ("x-api-key\n", False, False),
    ("\nx-api-key", False, False),
    ("a,b", False, False),
    ('a"b', False, False),
    ("a(b)", False, False),
    ("a/b", False, False),
    ("a@b", False, False),
    ("a[b]", False, False),
    ("a{b}", False, False),
    ("a;b", False, False),
    ("a=b", False, False),
    ("a?b", False, False),
    ("a\\b", False, False),
    ("a<b>", False, False),
    ("a\x00b", False, False),
    ("a\x7fb", False, False),
    ("caf\u00e9", False, False),  # tchar is ASCII only
    ("\u0131d", False, False),  # dotless i: no Unicode case folding into ASCII
    ("\uff41", False, False),  # fullwidth a
]


@pytest.mark.parametrize(("text", "token", "header_name"), CASES, ids=[repr(c[0]) for c in CASES])
def test_token_rule_accepts_exactly_rfc9110_tchar_runs(
    text: str, token: bool, header_name: bool
) -> None:
    assert is_token(text) is token
    assert is_header_name(text) is header_name
    assert (re.fullmatch(TOKEN, text) is not None) is token


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [("abc", 3, True), ("abcd", 3, False), ("abc", None, True), ("a" * 10_000, None, True)],
    ids=["at-limit", "over-limit", "no-limit", "long-without-limit"],
)
def test_token_rule_honours_max_length(text: str, limit: int | None, expected: bool) -> None:
    assert is_token(text, limit) is expected
    assert is_header_name(text, limit) is expected


def test_tchar_is_one_character_of_the_token() -> None:
    assert re.fullmatch(TCHAR, "a")
    assert re.fullmatch(TCHAR, "~")
    assert not re.fullmatch(TCHAR, "ab")
    assert TOKEN == TCHAR + "+"


def test_no_module_writes_the_tchar_class_again() -> None:
    # The distinctive run of tchar punctuation; any copy of the rule contains it.
    spelled = "!#$%&'*+"
    copies = sorted(
        str(path.relative_to(AUTHZ))
        for path in AUTHZ.rglob("*.py")
        if path.name != "headers.py" and spelled in path.read_text(encoding="utf-8")
    )
    assert copies == []


@pytest.mark.parametrize(
    ("value", "safe"),
    [
        ("Bearer abc", True),
        ("", True),
        ("tab\tinside", True),
        ("caf\u00e9", True),
        ("a\rb", False),
        ("a\nb", False),
        ("a\r\nX-Injected: 1", False),
        ("a\x00b", False),
        ("trailing\n", False),
    ],
    ids=["plain", "empty", "htab", "non-ascii", "cr", "lf", "crlf-injection", "nul", "trailing-lf"],
)
def test_field_value_is_unsafe_exactly_with_cr_lf_or_nul(value: str, safe: bool) -> None:
    assert is_safe_field_value(value) is safe
