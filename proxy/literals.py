"""Values <-> SQL: typed literal nodes, constant folding of argument nodes, PostgreSQL text formats.

Owns: building ``CAST('…' AS type)`` nodes (literals always carry their type),
reading constant argument nodes (``'x'``, ``ARRAY['a']``, ``'{…}'::jsonb``,
``NULL``) into Python values, and the text representations PostgreSQL uses for
the types the engine consumes and produces (arrays, records, jsonb, vectors).

Must not: paste SQL text together — every literal is an AST node that pglast
deparses with correct quoting.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from pglast import ast, parse_sql

from proxy.errors import InvalidParameterValue, InvalidTextRepresentation


class _NotConstant:
    def __repr__(self) -> str:
        return "NOT_CONSTANT"


NOT_CONSTANT: Any = _NotConstant()


@lru_cache(maxsize=256)
def type_name(sql_type: str) -> ast.TypeName:
    """The TypeName node for a type spelled in SQL (shared; never mutate it)."""
    stmt = parse_sql(f"SELECT NULL::{sql_type}")[0].stmt
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
# Python value -> PostgreSQL text representation
# --------------------------------------------------------------------------- #


def format_floats(values: Any) -> str:
    """A real[] literal body: 9 significant digits round-trip every float4 exactly."""
    return "{" + ",".join([f"{x:.9g}" for x in values]) + "}"


def quote_element(text: str | None) -> str:
    """Quote one element of an array or record literal."""
    if text is None:
        return "NULL"
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_text(value: Any, sql_type: str) -> str | None:
    """The input text PostgreSQL accepts for ``value`` as ``sql_type``."""
    if value is None:
        return None
    if sql_type == "real[]":
        return format_floats(value)
    if sql_type == "jsonb":
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    if sql_type.endswith("[]"):
        element = sql_type[:-2]
        return "{" + ",".join(quote_element(to_text(v, element)) for v in value) + "}"
    if sql_type == "boolean":
        return "true" if value else "false"
    if isinstance(value, tuple):  # a composite row
        return "(" + ",".join("" if v is None else quote_element(str(v)) for v in value) + ")"
    return str(value)


# --------------------------------------------------------------------------- #
# PostgreSQL text representation -> Python value
# --------------------------------------------------------------------------- #


def parse_array(text: str) -> list[str | None]:
    """Elements of a one-dimensional array literal ``{a,"b c",NULL}`` (as text, NULL -> None)."""
    text = text.strip()
    if text.startswith("[") and "=" in text:  # explicit bounds: [1:2]={...}
        text = text.split("=", 1)[1].strip()
    if len(text) < 2 or text[0] != "{" or text[-1] != "}":
        raise InvalidTextRepresentation(f'malformed array literal: "{text}"')
    body, i = text[1:-1], 0
    out: list[str | None] = []
    while i < len(body):
        if body[i] == '"':
            i, chars = i + 1, []
            while i < len(body) and body[i] != '"':
                if body[i] == "\\" and i + 1 < len(body):
                    i += 1
                chars.append(body[i])
                i += 1
            out.append("".join(chars))
            i += 1
        else:
            j = i
            while j < len(body) and body[j] != ",":
                j += 1
            raw = body[i:j].strip()
            if raw.startswith("{"):
                raise InvalidParameterValue("multidimensional arrays are not accepted here")
            out.append(None if raw.upper() == "NULL" else raw)
            i = j
        if i < len(body):
            if body[i] != ",":
                raise InvalidTextRepresentation(f'malformed array literal: "{text}"')
            i += 1
    return out


def _numbers(text: str, element: str) -> list[Any]:
    """A numeric array's text (``{1,2.5,NULL}``, ``{{1,2},{3,4}}`` row-major) -> Python numbers."""
    body = text.replace("{", "").replace("}", "").strip()
    if "=" in body:  # explicit bounds: [1:2]={...}
        body = body.split("=", 1)[1]
    if not body:
        return []
    convert: Any = {"boolean": lambda v: v.lower() in ("t", "true"), "real": float, "double precision": float}
    cast = convert.get(element, int)
    try:
        return [None if v.strip().upper() == "NULL" else cast(v) for v in body.split(",")]
    except ValueError as exc:
        raise InvalidTextRepresentation(f'invalid input syntax for type {element}: "{text[:60]}"') from exc


def parse_record(text: str) -> tuple[str | None, ...]:
    """Fields of a record literal ``(1,"a b",)`` as text (an empty unquoted field is NULL)."""
    if len(text) < 2 or text[0] != "(" or text[-1] != ")":
        raise InvalidTextRepresentation(f'malformed record literal: "{text}"')
    body, i, fields = text[1:-1], 0, []
    while True:
        chars: list[str] = []
        quoted = False
        while i < len(body) and (quoted or body[i] != ","):
            c = body[i]
            if c == '"':
                if quoted and i + 1 < len(body) and body[i + 1] == '"':
                    chars.append('"')
                    i += 1
                else:
                    quoted = not quoted
                    if not chars:
                        chars.append("")  # '""' is an empty string, not NULL
            elif c == "\\" and i + 1 < len(body):
                i += 1
                chars.append(body[i])
            else:
                chars.append(c)
            i += 1
        fields.append("".join(chars) if chars else None)
        if i >= len(body):
            return tuple(fields)
        i += 1


def from_text(text: str | None, sql_type: str) -> Any:
    """Decode the text form of ``sql_type`` (as a server sends it) into a Python value."""
    if text is None:
        return None
    match sql_type:
        case "text":
            return text
        case _ if sql_type.startswith("pgml."):  # pgml's enums (algorithm, strategy, …): their labels
            return text
        case "record":
            return parse_record(text)
        case "jsonb":
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise InvalidTextRepresentation("invalid input syntax for type json", detail=str(exc)) from exc
        case "bigint" | "integer":
            try:
                return int(text)
            except ValueError as exc:
                raise InvalidTextRepresentation(f'invalid input syntax for type {sql_type}: "{text}"') from exc
        case "boolean":
            return text.lower() in ("t", "true", "yes", "on", "1")
        case "real" | "double precision":
            return float(text)
        case _ if sql_type.endswith("[]"):
            element = sql_type[:-2]
            if element in _NUMBERS and '"' not in text:  # numbers (any dimensions, flattened): a plain split
                return _numbers(text, element)
            return [from_text(v, element) for v in parse_array(text)]
    raise InvalidParameterValue(f"cannot read a value of type {sql_type}")


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
        case ast.TypeCast(arg=inner, typeName=ast.TypeName() as name) if _castable(name, sql_type):
            return fold(inner, sql_type)
        case ast.A_ArrayExpr(elements=elements) if sql_type.endswith("[]"):
            values = [fold(e, sql_type[:-2]) for e in elements or ()]
            return NOT_CONSTANT if any(v is NOT_CONSTANT for v in values) else values
        case ast.RowExpr(args=args) if sql_type == "record":
            values = [_fold_field(a) for a in args or ()]
            return NOT_CONSTANT if any(v is NOT_CONSTANT for v in values) else tuple(values)
    return NOT_CONSTANT


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


_NUMBERS = frozenset({"bigint", "integer", "smallint", "real", "double precision", "boolean"})
_SAME = {
    "text": {"text", "varchar", "bpchar", "character varying", "character"},
    "jsonb": {"jsonb", "json"},
    "bigint": {"int8", "bigint", "int4", "integer", "int2", "smallint"},
    "boolean": {"bool", "boolean"},
    # Numbers fold into float arguments (a bound int test_size, '0.25'::numeric …).
    "real": {"float4", "real", "float8", "double precision", "numeric", "int8", "bigint", "int4", "integer", "int2"},
    "double precision": {"float4", "real", "float8", "double precision", "numeric", "int8", "bigint", "int4", "int2"},
}


def _castable(name: ast.TypeName, sql_type: str) -> bool:
    """A cast we can fold: to the parameter's own type family (``'…'::jsonb`` for a jsonb arg)."""
    spelled = name.names[-1].sval if name.names else ""
    is_array = bool(name.arrayBounds)
    base = sql_type[:-2] if sql_type.endswith("[]") else sql_type
    if is_array != sql_type.endswith("[]"):
        return False
    if base.startswith("pgml."):  # 'xgboost'::pgml.algorithm, or a text cast
        return spelled == base[5:] or spelled in _SAME["text"]
    return spelled in _SAME.get(base, {base})
