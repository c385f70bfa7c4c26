"""The text form of PostgreSQL values by catalogue type: arrays, records, identifiers, both directions.

Owns: the input text PostgreSQL accepts for a Python value of a catalogue type (:func:`to_text`: array
elements always quoted; :func:`array_out`: elements quoted only where array_out would), the text the
server sends read back into Python values (:func:`from_text`), the array literal grammar (``{…}``,
quoted elements with backslash escapes, ``NULL``, ``[l:u]=`` bounds; one dimension for arguments,
any for the server's own output), record literals, and quoted identifiers. Errors are the server's
own SQLSTATE for text that does not fit (``engine.pg.scalars`` for single values and the limits).

Must not: paste SQL together (identifiers and literals only; ``proxy.rewrite`` builds statements as
AST nodes), or decode COPY streams (``engine.pg.copy``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from engine.api import InvalidArgument, InvalidTextRepresentation, NumericValueOutOfRange
from engine.pg.scalars import (
    INTEGER_RANGES,
    MAX_ARRAY_ELEMENTS,
    check_elements,
    check_length,
    parse_bool,
    parse_float,
    parse_integer,
    parse_json,
    shown,
)

# Element types whose arrays read at C speed, any dimensions flattened (and that constant folding keeps apart).
NUMBER_TYPES = frozenset({"bigint", "integer", "smallint", "real", "double precision", "boolean"})
_ARRAY_SPECIAL = frozenset('{}",\\ \t\n\r\v\f')  # what array_out quotes an element for (with "" and NULL)

# --------------------------------------------------------------------------- #
# Python value -> PostgreSQL text representation
# --------------------------------------------------------------------------- #


def format_floats(values: Any) -> str:
    """A real[] literal body: 9 significant digits round-trip every float4 exactly (None: NULL)."""
    items = values.tolist() if hasattr(values, "tolist") else values  # a numpy array's Python floats format faster
    try:
        return "{" + ",".join([f"{x:.9g}" for x in items]) + "}"
    except TypeError:  # NULL elements (a bound array parameter): rare, so the fast path above stays
        return "{" + ",".join(["NULL" if x is None else f"{x:.9g}" for x in values]) + "}"


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


def array_out(value: Any, element: Callable[[Any], str]) -> str:
    """An array literal as the server's array_out prints it, ``{1,2}`` or ``{{1,2},{3,4}}``: ``element`` gives
    each non-NULL element's text, quoted only where needed (empty, ``NULL``, specials)."""
    if isinstance(value, list | tuple):
        return "{" + ",".join(array_out(v, element) for v in value) + "}"
    if value is None:
        return "NULL"
    text = element(value)
    if text == "" or text.upper() == "NULL" or any(c in _ARRAY_SPECIAL for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def quote_ident(name: str) -> str:
    """An SQL identifier, always double-quoted, embedded quotes doubled (case and spaces are kept)."""
    if not name:
        raise InvalidArgument("a table or column name must not be empty")
    if "\0" in name:
        raise InvalidArgument(f"the name {name!r} contains a NUL character")
    return '"' + name.replace('"', '""') + '"'


# --------------------------------------------------------------------------- #
# PostgreSQL text representation -> Python value
# --------------------------------------------------------------------------- #


_QUOTED = re.compile(r'"([^"\\]*(?:\\.[^"\\]*)*)"', re.DOTALL)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def parse_array(text: str) -> list[str | None]:
    """Elements of a one-dimensional array literal ``{a,"b c",NULL}`` (as text, NULL -> None).

    Read with C-speed splits, not per character: a literal of a million elements takes a fraction of
    a second on the event loop, and no more than MAX_ARRAY_ELEMENTS are ever held.
    """
    text = text.strip()
    if text.startswith("[") and "=" in text:  # explicit bounds: [1:2]={...}
        text = text.split("=", 1)[1].strip()
    if len(text) < 2 or text[0] != "{" or text[-1] != "}":
        raise InvalidTextRepresentation(f'malformed array literal: "{shown(text)}"')
    body = text[1:-1]
    if not body.strip():
        return []
    parts = _QUOTED.split(body, maxsplit=MAX_ARRAY_ELEMENTS + 1) if '"' in body else [body]
    stretches, quoted = parts[0::2], parts[1::2]  # unquoted text between quoted elements, and their contents
    check_elements(len(quoted))
    out: list[str | None] = []
    last = len(stretches) - 1
    for i, stretch in enumerate(stretches):
        if stretch != "," or i == 0 or i == last:  # "," between two quoted elements: nothing to read
            _unquoted(stretch, i > 0, i < last, out, text)
        if i < last:
            content = quoted[i]
            out.append(_ESCAPE.sub(r"\1", content) if "\\" in content else content)
    check_elements(len(out))
    return out


def _unquoted(stretch: str, after_quote: bool, before_quote: bool, out: list[str | None], text: str) -> None:
    """The unquoted elements of the text between two quoted ones (or an end of the literal)."""
    pieces = stretch.split(",", MAX_ARRAY_ELEMENTS + 1)
    if after_quote:  # spaces, then a comma (or the end)
        if pieces[0].strip() or (len(pieces) == 1 and before_quote):
            raise InvalidTextRepresentation(f'malformed array literal: "{shown(text)}"')
        pieces = pieces[1:]
    if before_quote:  # spaces after the comma
        if pieces[-1].strip():
            raise InvalidTextRepresentation(f'malformed array literal: "{shown(text)}"')
        pieces = pieces[:-1]
    for piece in pieces:
        element = piece.strip()
        if "{" in element:
            raise InvalidArgument("multidimensional arrays are not accepted here")
        if not element or "}" in element or '"' in element:
            raise InvalidTextRepresentation(f'malformed array literal: "{shown(text)}"')
        out.append(None if element.upper() == "NULL" else element)
    check_elements(len(out))


_STRUCTURE = re.compile(r'"(?:[^"\\]|\\.)*"|[{},]', re.DOTALL)  # quoted elements (skipped), braces, commas


def parse_array_literal(text: str) -> tuple[list[str | None], tuple[int, ...]]:
    """An array literal of any number of dimensions (as the server prints it: COPY output, registry rows)
    -> (row-major flattened elements, shape); ``(0,)`` for an empty array.

    Each innermost ``{…}`` is read as :func:`parse_array` reads a one-dimensional literal; the levels
    around them hold only sub-arrays separated by commas.
    """
    body = text.strip()
    if body.startswith("[") and "=" in body:  # explicit bounds: [1:2][1:3]={...}
        body = body.split("=", 1)[1].strip()
    if not body.startswith("{"):
        raise _malformed(text)
    if "{" not in body[1:]:  # one dimension: the fast reader
        elements = parse_array(body)
        return elements, (len(elements),) if elements else (0,)
    flat, shape = _nested(body, text)
    check_elements(len(flat))
    return flat, shape if flat else (0,)


def _nested(body: str, text: str) -> tuple[list[str | None], tuple[int, ...]]:
    """The elements and shape of a literal with sub-arrays (``body``: ``text`` without bounds)."""
    flat: list[str | None] = []
    shape: dict[int, int] = {}  # depth -> size of the first array completed at that depth
    opened: list[int] = []  # where each open array's "{" is
    children: list[int | None] = []  # per open array: its sub-arrays so far (None: none, so far)
    last, mark = "", 0  # the previous structural token at an outer level, and where the text after it begins
    for match in _STRUCTURE.finditer(body):
        token, gap = match.group(), body[mark : match.start()]
        if token[0] == '"' or (token == "," and children and children[-1] is None):
            continue  # an innermost array's element or comma: parse_array's
        if token == "{":
            if children:
                if gap.strip() or last not in ("{", ","):  # a sub-array after elements, or without a comma
                    raise _malformed(text)
                children[-1] = (children[-1] or 0) + 1
            opened.append(match.start())
            children.append(None)
        elif not children or (children[-1] is not None and (gap.strip() or last != "}")):
            raise _malformed(text)  # outside any array, or a comma or "}" not right after a sub-array
        elif token == "}":
            start, size = opened.pop(), children.pop()
            if size is None:  # an innermost array
                elements = parse_array(body[start : match.end()])
                flat.extend(elements)
                size = len(elements)
            shape.setdefault(len(opened), size)
            if not opened and body[match.end() :].strip():
                raise _malformed(text)
        last, mark = token, match.end()
    if opened:
        raise _malformed(text)
    return flat, tuple(shape[depth] for depth in sorted(shape))


def _malformed(text: str) -> InvalidTextRepresentation:
    return InvalidTextRepresentation(f'malformed array literal: "{shown(text)}"')


def _numbers(text: str, element: str) -> list[Any]:
    """A numeric array's text (``{1,2.5,NULL}``, ``{{1,2},{3,4}}`` row-major) -> Python numbers."""
    check_elements(text.count(",") + 1)
    body = text.replace("{", "").replace("}", "").strip()
    if "=" in body:  # explicit bounds: [1:2]={...}
        body = body.split("=", 1)[1]
    if not body:
        return []
    parts = body.split(",")
    # Plain numbers (no NULL, ASCII, no 1_000 that Python reads and PostgreSQL 15 does not): read at C speed.
    plain = "null" not in body.lower() and body.isascii() and "_" not in body
    try:
        if element == "boolean":
            return [None if v.strip().upper() == "NULL" else parse_bool(v) for v in parts]
        if element in ("real", "double precision"):
            if plain:
                floats = list(map(float, parts))
                if not any(map(math.isinf, floats)):  # else: Infinity spelled, or an overflow (each checked)
                    return floats
            return [None if v.strip().upper() == "NULL" else parse_float(v, element) for v in parts]
        values = list(map(int, parts)) if plain else [None if v.strip().upper() == "NULL" else int(v) for v in parts]
    except ValueError as exc:
        raise InvalidTextRepresentation(f'invalid input syntax for type {element}: "{shown(text)}"') from exc
    numbers = [v for v in values if v is not None]
    low, high = INTEGER_RANGES.get(element, INTEGER_RANGES["bigint"])
    if numbers and not low <= min(numbers) <= max(numbers) <= high:
        raise NumericValueOutOfRange(f"value out of range for type {element} in an array")
    return values


def parse_record(text: str) -> tuple[str | None, ...]:
    """Fields of a record literal ``(1,"a b",)`` as text (an empty unquoted field is NULL)."""
    if len(text) < 2 or text[0] != "(" or text[-1] != ")":
        raise InvalidTextRepresentation(f'malformed record literal: "{shown(text)}"')
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
    check_length(len(text))
    match sql_type:
        case "text":
            return text
        case _ if sql_type.startswith("pgml."):  # pgml's enums (algorithm, strategy, …): their labels
            return text
        case "record":
            return parse_record(text)
        case "jsonb":
            return parse_json(text)
        case "bigint" | "integer" | "smallint":
            return parse_integer(text, sql_type)
        case "boolean":
            return parse_bool(text)
        case "real" | "double precision":
            return parse_float(text, sql_type)
        case _ if sql_type.endswith("[]"):
            element = sql_type[:-2]
            if element in NUMBER_TYPES and '"' not in text:  # numbers (any dimensions, flattened): a plain split
                return _numbers(text, element)
            return [from_text(v, element) for v in parse_array(text)]
    raise InvalidArgument(f"cannot read a value of type {sql_type}")
