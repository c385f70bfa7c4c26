"""Values in the tree: typed literal nodes, and constant argument nodes read into Python values.

Owns: building ``CAST('…' AS type)`` nodes (literals always carry their type; their text is
PostgreSQL's for the value, :mod:`engine.pg.text`), and folding constant argument nodes
(``'x'``, ``ARRAY['a']``, ``'{…}'::jsonb``, ``NULL``, casts the server would read with the same
input function) into Python values — everything else (columns, parameters, expressions, casts
that change a value) is not constant, for the server to compute.

Must not: paste SQL text together — every literal is an AST node that pglast
deparses with correct quoting.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pglast
from pglast import ast

from engine.pg.text import NUMBER_TYPES, from_text, to_text


class _NotConstant:
    def __repr__(self) -> str:
        return "NOT_CONSTANT"


NOT_CONSTANT: Any = _NotConstant()


@lru_cache(maxsize=256)
def type_name(sql_type: str) -> ast.TypeName:
    """The TypeName node for a type spelled in SQL (shared; never mutate it)."""
    stmt = pglast.parse_sql(f"SELECT NULL::{sql_type}")[0].stmt
    cast = stmt.targetList[0].val  # type: ignore[union-attr]
    assert isinstance(cast, ast.TypeCast)
    return cast.typeName  # type: ignore[return-value]


def cast(node: ast.Node, sql_type: str) -> ast.TypeCast:
    return ast.TypeCast(arg=node, typeName=type_name(sql_type))


def text_const(value: str) -> ast.A_Const:
    return ast.A_Const(isnull=False, val=ast.String(sval=value))


def null_const() -> ast.A_Const:
    return ast.A_Const(isnull=True)


def literal(value: Any, sql_type: str) -> ast.TypeCast:
    """``CAST('<text of value>' AS sql_type)``, or ``CAST(NULL AS sql_type)``."""
    text = to_text(value, sql_type)
    return cast(null_const() if text is None else text_const(text), sql_type)


# --------------------------------------------------------------------------- #
# Constant folding of argument nodes
# --------------------------------------------------------------------------- #


def fold(node: ast.Node | None, sql_type: str) -> Any:
    """The Python value of a constant argument node as ``sql_type``, else NOT_CONSTANT.

    Constants are literals, NULL, casts of constants and ARRAY[...] of constants;
    anything else (columns, parameters, expressions) is evaluated by the server.
    """
    match node:
        case ast.A_Const(isnull=True):
            return None
        case ast.A_Const(val=ast.String(sval=text)):
            return from_text(text, sql_type)
        case ast.A_Const(val=ast.Integer(ival=number)):
            return from_text(str(number), sql_type) if sql_type != "text" else str(number)
        case ast.A_Const(val=ast.Float(fval=number)):
            return from_text(number, sql_type) if sql_type != "text" else number
        case ast.A_Const(val=ast.Boolean(boolval=flag)):
            return flag if sql_type == "boolean" else NOT_CONSTANT
        case ast.TypeCast(arg=ast.A_Const(val=ast.Float()), typeName=ast.TypeName(names=names)) if (
            names and names[-1].sval in _INTEGER_SPELLINGS
        ):
            return NOT_CONSTANT  # 0.3::integer is 0: rounding is the server's
        case ast.TypeCast(arg=inner, typeName=ast.TypeName() as name) if _castable(name, sql_type):
            # A cast chain through a string type reads the same text with the outer type's input function:
            # CAST('{…}'::varchar AS jsonb) (SQLAlchemy's cast(literal(s), JSONB), a bound varchar cast).
            while isinstance(inner, ast.TypeCast) and inner.typeName is not None and _is_string(inner.typeName):
                if not isinstance(inner.arg, ast.A_Const | ast.TypeCast):
                    break
                inner = inner.arg
            return fold(inner, sql_type)
        case ast.A_ArrayExpr(elements=elements) if sql_type.endswith("[]"):
            # PostgreSQL types ARRAY['1', '2'] as text[] (no implicit cast to a number array).
            # and ARRAY[1, 2] as integer[] (no implicit cast to text[]).
            if sql_type[:-2] in NUMBER_TYPES and any(_untyped_string(e) for e in elements or ()):
                return NOT_CONSTANT
            if sql_type[:-2] == "text" and any(_number(e) for e in elements or ()):
                return NOT_CONSTANT
            values = [fold(e, sql_type[:-2]) for e in elements or ()]
            return NOT_CONSTANT if any(v is NOT_CONSTANT for v in values) else values
        case ast.RowExpr(args=args) if sql_type == "record":
            values = [_fold_field(a) for a in args or ()]
            return NOT_CONSTANT if any(v is NOT_CONSTANT for v in values) else tuple(values)
    return NOT_CONSTANT


def _untyped_string(node: Any) -> bool:
    return isinstance(node, ast.A_Const) and isinstance(node.val, ast.String)


def _number(node: Any) -> bool:
    return isinstance(node, ast.A_Const) and isinstance(node.val, ast.Integer | ast.Float)


def _fold_field(node: ast.Node | None) -> Any:
    """A constant field of ``ROW(…)``, as the Python value its literal spells (no target type)."""
    match node:
        case ast.A_Const(isnull=True):
            return None
        case ast.A_Const(val=ast.String(sval=text)):
            return text
        case ast.A_Const(val=ast.Integer(ival=number)):
            return number
        case ast.A_Const(val=ast.Float(fval=str(number))):
            return float(number)
        case ast.A_Const(val=ast.Boolean(boolval=flag)):
            return flag
        case ast.TypeCast(arg=inner):
            return _fold_field(inner)
        case ast.A_ArrayExpr(elements=elements):
            values = [_fold_field(e) for e in elements or ()]
            return NOT_CONSTANT if any(v is NOT_CONSTANT for v in values) else values
    return NOT_CONSTANT


def is_constant(node: Any) -> bool:
    """A literal, NULL, a cast of a constant or ARRAY[...] of constants (no columns, no $n)."""
    match node:
        case ast.A_Const():
            return True
        case ast.TypeCast(arg=inner):
            return is_constant(inner)
        case ast.A_ArrayExpr(elements=elements):
            return all(is_constant(e) for e in elements or ())
    return False


_SAME = {
    "text": {"text", "varchar", "bpchar", "character varying", "character"},
    "jsonb": {"jsonb", "json"},
    "bigint": {"int8", "bigint", "int4", "integer", "int2", "smallint"},
    "boolean": {"bool", "boolean"},
    # Numbers fold into float arguments (a bound int test_size, '0.25'::numeric …).
    "real": {"float4", "real", "float8", "double precision", "numeric", "int8", "bigint", "int4", "integer", "int2"},
    "double precision": {"float4", "real", "float8", "double precision", "numeric", "int8", "bigint", "int4", "int2"},
}


_INTEGER_SPELLINGS = frozenset({"int8", "bigint", "int4", "integer", "int2", "smallint"})


def _is_string(name: ast.TypeName) -> bool:
    spelled = name.names[-1].sval if name.names else ""
    return not name.arrayBounds and spelled in _SAME["text"]


def _castable(name: ast.TypeName, sql_type: str) -> bool:
    """A cast we can fold: to the parameter's own type family (``'…'::jsonb`` for a jsonb arg).

    Not one that changes the value: a length or precision (``varchar(3)``, ``numeric(5, 2)``) or blank-padded
    ``char``: the server computes those (and ``0.3::integer``, refused by :func:`fold`).
    """
    spelled = name.names[-1].sval if name.names else ""
    if name.typmods or spelled in ("bpchar", "character", "char"):
        return False
    is_array = bool(name.arrayBounds)
    base = sql_type[:-2] if sql_type.endswith("[]") else sql_type
    if is_array != sql_type.endswith("[]"):
        return False
    if base.startswith("pgml."):  # 'xgboost'::pgml.algorithm, or a text cast
        return spelled == base[5:] or spelled in _SAME["text"]
    return spelled in _SAME.get(base, {base})
