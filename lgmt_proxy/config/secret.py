"""A value that must never be printed (tokens, proxy credentials)."""

from __future__ import annotations

import attrs


@attrs.frozen(repr=False)
class Secret:
    """A value that must never be printed: ``repr`` and ``str`` hide it."""

    _value: str = attrs.field(alias="value")

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__
