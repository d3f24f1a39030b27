"""Secret values: credentials and tokens that print masked everywhere.

Starlette's ``datastructures.Secret`` pattern: ``repr``/``str`` give :data:`MASK`;
only :meth:`Secret.reveal` gives the value, called where it goes on the wire.

:func:`is_secret_ref` is the syntax of a secret's name, written once: the keys of the
egress secrets file (``authz.runtime.secrets``) and the ``credential.ref`` a policy
decision names (``authz.core.decision``) must agree on it.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MASK", "Secret", "is_secret_ref"]

MASK: Final = "**********"
# 1-128 characters: letters, digits, '_', '.', '-'; the first a letter or digit.
_REF: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def is_secret_ref(text: str) -> bool:
    """True when ``text`` names a secret: 1 to 128 ASCII letters, digits, ``_``, ``.``
    or ``-``, starting with a letter or digit (e.g. ``openai``, ``github.app-1``)."""
    return _REF.fullmatch(text) is not None


class Secret:
    """An opaque secret string (API token, credential). Compare with :meth:`reveal`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the clear value; call only where the value is put on the wire."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{MASK}')"

    def __str__(self) -> str:
        return MASK

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)
