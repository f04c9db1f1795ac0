"""Checking arguments before any work starts: the small predicates every config shares.

Each config dataclass of the library validates itself field by field in ``__post_init__`` with
:func:`require`, so a bad value fails at once with a message naming the field, the value and what
is accepted (``bool`` is refused where an int or a number is meant: ``True`` is not 1 step).
"""
from __future__ import annotations


def require(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``."""
    if not ok:
        raise ValueError(message)


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
