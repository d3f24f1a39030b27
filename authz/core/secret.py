"""Secret values: credentials and tokens that print masked everywhere.

Starlette's ``datastructures.Secret`` pattern: ``repr``/``str`` give :data:`MASK`;
only :meth:`Secret.reveal` gives the value, called where it goes on the wire.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MASK", "Secret"]

MASK: Final = "**********"


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
