"""JSON from files and requests this process did not write: only what the JSON standard allows, nested boundedly.

Python's :func:`json.loads` accepts ``NaN``, ``Infinity`` and ``1e999`` (an inf), none of which is JSON, and either
recurses until ``RecursionError`` on deep nesting or returns a value so deep that copying it later does. Every such
case here is a :class:`ValueError` with one phrase naming it, which callers turn into their own one-line error.
"""

from __future__ import annotations

import json
import math
from typing import Any

#: Deepest nesting of objects and arrays accepted in catalogue lines and index metadata.
MAX_DEPTH = 32


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (use null or a number)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of the range of a float")
    return value


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``text`` as standard JSON nested at most ``max_depth`` deep; anything else raises :class:`ValueError`
    (``json.JSONDecodeError`` for syntax, with its position)."""
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    check_depth(value, max_depth)
    return value


def depth(value: Any, limit: int | None = None) -> int:
    """How deeply ``value`` nests dicts and lists (a scalar: 0), without recursion. With ``limit``, stops as soon as
    it is passed (so a value that contains itself, which is infinitely deep, ends the walk). A container reached
    twice is walked once (shared parts cost nothing more)."""
    deepest, stack, seen = 0, [(value, 1)], set()
    while stack:
        v, d = stack.pop()
        items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else None
        if items is None:
            continue
        deepest = max(deepest, d)
        if limit is not None and deepest > limit:
            return deepest
        if id(v) in seen:
            continue
        seen.add(id(v))
        stack.extend((x, d + 1) for x in items)
    return deepest


def check_depth(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`ValueError` when ``value`` nests deeper than ``max_depth`` (or contains itself)."""
    if depth(value, max_depth) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels (or it contains itself)")
