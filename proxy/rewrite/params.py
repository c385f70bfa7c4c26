"""``$n`` in pgml calls: replacing bound parameters by typed literals so the call becomes constant.

Owns: replacing ``$n`` references inside ``pgml.*`` call arguments with typed literals
of the values a Bind carries (read by :mod:`proxy.wire.params`). A ``$n`` under an
explicit cast (``$1::jsonb`` with ``$1`` bound as varchar, as pgjdbc binds strings)
becomes a literal of the cast's type, the value converted as the server's cast would
convert it (text input of the target type, number conversions); and finding which
``$n`` a tree uses.

Must not: do I/O, decode messages or parameter bytes (that is :mod:`proxy.wire`), or
substitute parameters outside pgml call arguments (the rest of the statement keeps its
``$n`` and the server binds them as usual).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from pglast import ast, visitors

from engine.api import NumericValueOutOfRange
from engine.pg.scalars import INTEGER_RANGES
from engine.pg.text import from_text
from engine.pg.types import PARAM_TYPES
from proxy.rewrite.literals import literal


def substitute_params(roots: Sequence[ast.Node], values: dict[int, tuple[Any, int]]) -> None:
    """Replace ``$n`` under ``roots`` by typed literals of the bound values (in place).

    ``$n::type`` becomes one literal of ``type`` when the server's cast from the parameter's type
    is one :func:`cast_value` performs (text input, numbers); otherwise ``$n`` becomes a literal of
    its own type under the cast. Only numbers present in ``values`` are replaced; a root itself is
    never a ParamRef (callers pass FuncCall nodes or whole statements).
    """

    class Swap(visitors.Visitor):
        def visit_TypeCast(self, ancestors: Any, node: ast.TypeCast) -> Any:
            names: list[ast.TypeName | None] = []  # the casts around the parameter, outermost first
            inner: Any = node
            while isinstance(inner, ast.TypeCast):
                names.append(inner.typeName)
                inner = inner.arg
            if not isinstance(inner, ast.ParamRef) or int(inner.number or 0) not in values:
                return None
            value, oid = values[int(inner.number or 0)]
            kind = PARAM_TYPES.get(oid, "text")
            for done, name in enumerate(reversed(names)):  # innermost first, as the server applies them
                target = cast_target(name) or ""
                converted = cast_value(value, kind, target) if target else NOT_CAST
                if converted is NOT_CAST:  # this cast and those around it stay, over the value so far
                    result: ast.Node = literal(value, kind)
                    for outer in names[len(names) - done - 1 :: -1]:
                        result = ast.TypeCast(arg=result, typeName=outer)
                    return result
                value, kind = converted, target
            return literal(value, kind)

        def visit_ParamRef(self, ancestors: Any, node: ast.ParamRef) -> Any:
            number = int(node.number or 0)
            if number not in values:
                return None
            value, oid = values[number]
            return literal(value, PARAM_TYPES.get(oid, "text"))

    for root in roots:
        Swap()(root)


# The target of an explicit cast, spelled as the parser leaves it (``pg_catalog.int4``), in the type names
# of :mod:`proxy.rewrite.literals`. Types with a modifier (``varchar(3)`` truncates) and other types are left alone.
_CAST_TARGETS = {
    "text": "text", "varchar": "text", "jsonb": "jsonb", "int8": "bigint", "int4": "integer", "int2": "smallint",
    "float4": "real", "float8": "double precision", "bool": "boolean",
}  # fmt: skip
_FLOATS = ("real", "double precision")
NOT_CAST: Any = object()  # a conversion cast_value leaves to the server


def cast_target(name: ast.TypeName | None) -> str | None:
    """The type of ``CAST(x AS name)`` in :mod:`proxy.rewrite.literals`' names (None: one not handled here)."""
    if name is None or name.typmods or name.setof or name.pct_type:
        return None
    names = [n.sval for n in name.names or () if isinstance(n, ast.String)]
    if len(names) == 2 and names[0] == "pg_catalog":
        names = names[1:]
    if len(names) != 1 or names[0] not in _CAST_TARGETS:
        return None
    bounds = name.arrayBounds or ()
    if len(bounds) > 1:
        return None
    return _CAST_TARGETS[names[0]] + ("[]" if bounds else "")


def cast_value(value: Any, source: str, target: str) -> Any:
    """``value`` of type ``source`` cast explicitly to ``target`` as PostgreSQL casts it, else NOT_CAST.

    Text to anything is the target's text input (``'{"a": 1}'::text::jsonb``, ``'7'::varchar::int8``);
    numbers convert between themselves (rounding half to even into integers, range-checked with
    22003) and with boolean (the server has that cast for int4 only, and it prepared the statement,
    so an integer reaching here is one). Arrays cast element by element.
    """
    if value is None:
        return None
    if source == target or (source in INTEGER_RANGES and target in INTEGER_RANGES):
        return _checked(value, target)
    if source == "text":
        return from_text(value, target)  # the cast of text to any type is the type's input function
    if source.endswith("[]") and target.endswith("[]"):
        elements = [cast_value(v, source[:-2], target[:-2]) for v in value]
        return NOT_CAST if any(v is NOT_CAST for v in elements) else elements
    if target == "text" and source in INTEGER_RANGES:
        return str(value)
    if target == "text" and source == "boolean":
        return "true" if value else "false"
    if source in INTEGER_RANGES and target in _FLOATS:
        return _checked(float(value), target)
    if source in _FLOATS and target in INTEGER_RANGES:
        if value != value or value in (float("inf"), float("-inf")):
            raise NumericValueOutOfRange(f"{target} out of range")
        return _checked(round(value), target)
    if source in _FLOATS and target in _FLOATS:
        return _checked(value, target)
    if source in INTEGER_RANGES and target == "boolean":  # only int4 has it: the server let the statement through
        return value != 0
    if source == "boolean" and target in INTEGER_RANGES:
        return int(value)
    return NOT_CAST


def _checked(value: Any, sql_type: str) -> Any:
    """``value`` within the range of ``sql_type`` (22003 beyond, as the server's casts report it)."""
    if sql_type in INTEGER_RANGES and not INTEGER_RANGES[sql_type][0] <= value <= INTEGER_RANGES[sql_type][1]:
        raise NumericValueOutOfRange(f"{sql_type} out of range")
    if sql_type == "real" and isinstance(value, float) and value == value and abs(value) != float("inf"):
        try:
            return struct.unpack("!f", struct.pack("!f", value))[0]
        except OverflowError:
            raise NumericValueOutOfRange("value out of range: overflow") from None
    return value


def referenced_params(roots: Sequence[ast.Node]) -> set[int]:
    """The ``$n`` numbers used under ``roots``."""
    found: set[int] = set()

    class Find(visitors.Visitor):
        def visit_ParamRef(self, ancestors: Any, node: ast.ParamRef) -> None:
            found.add(int(node.number or 0))

    for root in roots:
        Find()(root)
    return found
