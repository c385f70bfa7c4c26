"""JSON-object arguments of the text functions (``kwargs``, ``args``, a task JSON), checked once.

Owns: the two readings PostgresML's functions give such an argument: a decoded jsonb value that must
be an object (:func:`kwargs_object`), or an object that may still be JSON text (:func:`json_object`).

Must not: know which keys an argument may hold (each function checks its own).
"""

from __future__ import annotations

import json
from typing import Any

from engine.api import InvalidArgument


def kwargs_object(value: Any) -> dict[str, Any]:
    """A ``kwargs`` jsonb value: an object (NULL: none)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"kwargs must be a JSON object, not {type(value).__name__}")
    return value


def json_object(value: Any, what: str) -> dict[str, Any]:
    """``value`` (an object, or JSON text of one) as a dict; ``what`` names it in the error."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidArgument(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, not {type(value).__name__}")
    return value
