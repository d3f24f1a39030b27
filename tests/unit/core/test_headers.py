"""authz.core.headers is the one list of credential, identity and forwarding headers: the
shipped policy data and every other list derived from it cannot drift from it."""

from __future__ import annotations

import json
import re

import pytest

from authz.core.headers import CREDENTIAL_HEADERS, FORWARDING_HEADERS, IDENTITY_HEADERS
from tests.helpers import ROOT

EGRESS_DATA = ROOT / "policy/egress/data.json"
# RFC 9110 section 5.1 field-name token, lowercase as HTTP/2 and Envoy send it.
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")

LISTS = {
    "CREDENTIAL_HEADERS": CREDENTIAL_HEADERS,
    "IDENTITY_HEADERS": IDENTITY_HEADERS,
    "FORWARDING_HEADERS": FORWARDING_HEADERS,
}


@pytest.mark.parametrize("names", LISTS.values(), ids=LISTS.keys())
def test_header_lists_are_lowercase_field_names_without_duplicates(
    names: tuple[str, ...],
) -> None:
    assert all(TOKEN.fullmatch(name) for name in names), names
    assert len(set(names)) == len(names)


def test_header_lists_do_not_overlap() -> None:
    assert not set(CREDENTIAL_HEADERS) & set(IDENTITY_HEADERS)
    assert not set(CREDENTIAL_HEADERS) & set(FORWARDING_HEADERS)
    assert not set(IDENTITY_HEADERS) & set(FORWARDING_HEADERS)


@pytest.mark.parametrize(
    "names",
    [CREDENTIAL_HEADERS, FORWARDING_HEADERS],
    ids=["credentials", "forwarding"],
)
def test_egress_policy_strips_every_listed_header(names: tuple[str, ...]) -> None:
    # The egress policy's strip list covers the one list of credentials, identity and
    # forwarding headers: no credential and no X-Forwarded-For/Forwarded/X-Real-IP
    # reaches a third party.
    strip = json.loads(EGRESS_DATA.read_text(encoding="utf-8"))["strip_headers"]
    assert set(names) <= set(strip), sorted(set(names) - set(strip))


def test_egress_identity_headers_are_the_listed_ones() -> None:
    # The policy strips data.egress.identity's id and token headers: the id header is the
    # identity header, the token header a credential.
    identity = json.loads(EGRESS_DATA.read_text(encoding="utf-8"))["identity"]
    assert (identity["id_header"],) == IDENTITY_HEADERS
    assert identity["token_header"] in CREDENTIAL_HEADERS
