"""The header lists every part of authz agrees on, defined once.

- :data:`CREDENTIAL_HEADERS`: the one list of credential headers. It drives hashing (the
  OPA input carries ``sha256:<hex>`` in their place, ``authz.core.input``; a bearer JWT in
  ``authorization`` stays in clear for ``io.jwt.*``, its digest listed all the same,
  ``authz.core.input.is_bearer_jwt``), stripping (every allow no policy decided, in
  bypass, dry-run or fail-open, removes them; the shipped policies remove every header
  named in ``input.credentials`` from their allows, and the egress Envoy routes remove
  them too; a policy of your own decides, as with opa-envoy-plugin) and redaction
  (decision log and audit trail).
  ``AUTHZ_CREDENTIAL_HEADERS`` may add names; it never removes these.
- :data:`IDENTITY_HEADERS`: who the caller claims to be (the sandbox id); never forwarded.
- :data:`FORWARDING_HEADERS`: client-sent proxy and method-override headers
  (RFC 7239 ``Forwarded``, the de-facto ``X-Forwarded-*``/``X-Real-IP``, and the
  ``X-HTTP-Method-Override`` family): a client must not choose what an upstream believes
  about its address, host or method. Envoy sets its own ``x-forwarded-for`` where it is
  configured to (``use_remote_address``). ``x-forwarded-proto`` is not listed: an edge
  Envoy (``use_remote_address: true``) overwrites it with the scheme it saw, so removing
  it would only drop Envoy's own value.

All names are lowercase (HTTP/2 and Envoy's ext_authz ``headers`` map use lowercase).

The syntax of a header field name (and of an auth scheme) is RFC 9110's ``token``
(https://www.rfc-editor.org/rfc/rfc9110#section-5.6.2), written here once:
:data:`TCHAR` / :data:`TOKEN` for patterns that embed it, :func:`is_token` and
:func:`is_header_name` (a lowercase token) for checks.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "CREDENTIAL_HEADERS",
    "FORWARDING_HEADERS",
    "IDENTITY_HEADERS",
    "OWN_PREFIX",
    "TCHAR",
    "TOKEN",
    "TUNNEL_ADDRESS_HEADER",
    "UNENFORCED_REMOVALS",
    "is_header_name",
    "is_safe_field_value",
    "is_token",
]

# RFC 9110 section 5.6.2: tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" /
# "." / "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA; token = 1*tchar. A regular-expression
# character class (one tchar) and the token, for patterns that embed them.
TCHAR: Final = r"[!#$%&'*+.^_`|~0-9A-Za-z-]"
TOKEN: Final = TCHAR + "+"
_TOKEN_RE: Final = re.compile(TOKEN)
_LOWER_TOKEN_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
_UNSAFE_VALUE_RE: Final = re.compile(r"[\r\n\x00]")


def is_token(text: str, max_length: int | None = None) -> bool:
    """True when ``text`` is an RFC 9110 ``token`` (section 5.6.2: one or more tchar,
    ASCII only) of at most ``max_length`` characters (no limit when None)."""
    if max_length is not None and len(text) > max_length:
        return False
    return _TOKEN_RE.fullmatch(text) is not None


def is_header_name(name: str, max_length: int | None = None) -> bool:
    """True when ``name`` is a lowercase header field name: an RFC 9110 ``token``
    (section 5.6.2, field-name = token) without uppercase letters, as HTTP/2 (RFC 9113
    section 8.2.1) and Envoy's ext_authz ``headers`` map carry them; at most
    ``max_length`` characters (no limit when None)."""
    if max_length is not None and len(name) > max_length:
        return False
    return _LOWER_TOKEN_RE.fullmatch(name) is not None


CREDENTIAL_HEADERS: Final = (
    "x-api-key",
    "authorization",
    "proxy-authorization",
    "x-sandbox-token",
    "api-key",
    "x-goog-api-key",
    "cookie",
)
IDENTITY_HEADERS: Final = ("x-sandbox-id",)
FORWARDING_HEADERS: Final = (
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
)
# Request headers in authz's own namespace: only a decision may set them.
OWN_PREFIX: Final = "x-authz-"
# What an allow no policy decided (bypass, a suppressed deny, fail-open) removes, besides
# the configured credential headers and every client-sent ``x-authz-*`` header.
UNENFORCED_REMOVALS: Final = frozenset(CREDENTIAL_HEADERS + IDENTITY_HEADERS + FORWARDING_HEADERS)


def is_safe_field_value(value: str) -> bool:
    """False when ``value`` contains CR, LF or NUL: RFC 9110 section 5.5 calls such field
    values invalid and dangerous (a recipient may split the header or the message there),
    so a value authz sets or injects must never carry one."""
    return _UNSAFE_VALUE_RE.search(value) is None


# -- egress tunnels (issue 18) ------------------------------------------------------------
# The request header authz sets on an egress tunnel's allow: the "ip:port" it resolved and
# checked, which the egress Envoy connects to (ORIGINAL_DST cluster, use_http_header). In
# authz's own namespace, so a client-sent value never survives (the egress Envoy also
# removes it before ext_authz).
TUNNEL_ADDRESS_HEADER: Final = OWN_PREFIX + "tunnel-address"
