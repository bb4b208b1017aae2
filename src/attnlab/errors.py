"""The two errors attnlab raises on purpose.

``UnsupportedError`` means "this mechanism cannot do that" (a capability is missing); ``ValueError`` means
"the input is malformed" and always names what was expected and what was received.
"""

from __future__ import annotations


class UnsupportedError(NotImplementedError):
    """A mechanism was asked for a capability it does not have (causal, decode, padding, 1-D or 2-D input)."""

    def __init__(self, mechanism: str, capability: str, detail: str = "") -> None:
        self.mechanism = mechanism
        self.capability = capability
        msg = f"mechanism '{mechanism}' does not support {capability}"
        super().__init__(msg + (f": {detail}" if detail else ""))


def shape_error(what: str, expected: str, received: object) -> ValueError:
    """A ValueError that says what was expected and what was received."""
    return ValueError(f"{what}: expected {expected}, received {received}")


def positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``, else the ValueError that says so."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise shape_error(name, f"an integer >= {minimum}", repr(value))
    return value
