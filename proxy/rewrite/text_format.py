"""PostgreSQL's text representation of the values the engine consumes and produces, both directions.

Owns: Python value -> the input text PostgreSQL accepts for a type (arrays, records, jsonb, vectors),
and the text a server sends -> Python value, with the server's own errors for text it would reject
(22P02, 22003, 22021…). Also the limits on one argument value, checked wherever a value is read
(SQL literal, bound parameter, gathered row), so no input can exhaust the proxy's memory or stack,
and each answer is the server's own SQLSTATE for its kind:

- text of one value longer than :data:`MAX_VALUE_LENGTH` (64 Mi characters; bytes
  for bound parameters): 54000;
- an array with more than :data:`MAX_ARRAY_ELEMENTS` (1,000,000) elements, or a
  JSON value with more than :data:`MAX_JSON_NODES` (1,000,000) values: 54000;
- JSON nested deeper than :data:`MAX_JSON_DEPTH` (256 arrays/objects): 54001 (the
  server's own limit is its stack, thousands of levels; Python's is ~1,000);
- text that is not UTF-8 or holds a NUL byte: 22021, as the server reports it.

Must not: know about SQL trees (:mod:`proxy.rewrite.literals` turns these texts into nodes).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from proxy.errors import (
    CharacterNotInRepertoire,
    InvalidParameterValue,
    InvalidTextRepresentation,
    NumericValueOutOfRange,
    ProgramLimitExceeded,
    StatementTooComplex,
    UntranslatableCharacter,
)

MAX_VALUE_LENGTH = 64 * 1024 * 1024
MAX_ARRAY_ELEMENTS = 1_000_000
MAX_JSON_NODES = 1_000_000
MAX_JSON_DEPTH = 256
NUMBER_TYPES = frozenset({"bigint", "integer", "smallint", "real", "double precision", "boolean"})


# --------------------------------------------------------------------------- #
# Python value -> PostgreSQL text representation
# --------------------------------------------------------------------------- #


def format_floats(values: Any) -> str:
    """A real[] literal body: 9 significant digits round-trip every float4 exactly (None: NULL)."""
    try:
        return "{" + ",".join([f"{x:.9g}" for x in values]) + "}"
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


_UTF8_LEADS = ((2, 0xE0, 0xC0), (3, 0xF0, 0xE0), (4, 0xF8, 0xF0))


def decode_utf8(data: bytes) -> str:
    """Bytes of a text value -> str; not UTF-8, or a NUL byte: 22021 with the server's own message."""
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        bad = exc.start
    else:
        if "\0" not in text:
            return text
        bad = data.index(b"\0")
    nul = data.find(b"\0")
    if 0 <= nul < bad:
        bad = nul
    lead = data[bad]
    width = next((n for n, mask, bits in _UTF8_LEADS if lead & mask == bits), 1)  # pg_utf_mblen
    shown = " ".join(f"0x{b:02x}" for b in data[bad : bad + width])
    raise CharacterNotInRepertoire(f'invalid byte sequence for encoding "UTF8": {shown}')


def check_length(size: int) -> None:
    """One argument value's text (characters, or bytes of a bound parameter) within MAX_VALUE_LENGTH."""
    if size > MAX_VALUE_LENGTH:
        raise ProgramLimitExceeded(
            f"a pgml argument value of {size} bytes exceeds the pgml-proxy limit of {MAX_VALUE_LENGTH} bytes"
        )


def _check_elements(count: int) -> None:
    if count > MAX_ARRAY_ELEMENTS:
        raise ProgramLimitExceeded(
            f"a pgml argument array has more than the pgml-proxy limit of {MAX_ARRAY_ELEMENTS} elements"
        )


def _shown(text: str) -> str:
    """A value quoted in an error message: PostgreSQL quotes the whole input; a long one is cut here."""
    return text if len(text) <= 100 else text[:100] + "…"


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
        raise InvalidTextRepresentation(f'malformed array literal: "{_shown(text)}"')
    body = text[1:-1]
    if not body.strip():
        return []
    parts = _QUOTED.split(body, maxsplit=MAX_ARRAY_ELEMENTS + 1) if '"' in body else [body]
    stretches, quoted = parts[0::2], parts[1::2]  # unquoted text between quoted elements, and their contents
    _check_elements(len(quoted))
    out: list[str | None] = []
    last = len(stretches) - 1
    for i, stretch in enumerate(stretches):
        if stretch != "," or i == 0 or i == last:  # "," between two quoted elements: nothing to read
            _unquoted(stretch, i > 0, i < last, out, text)
        if i < last:
            content = quoted[i]
            out.append(_ESCAPE.sub(r"\1", content) if "\\" in content else content)
    _check_elements(len(out))
    return out


def _unquoted(stretch: str, after_quote: bool, before_quote: bool, out: list[str | None], text: str) -> None:
    """The unquoted elements of the text between two quoted ones (or an end of the literal)."""
    pieces = stretch.split(",", MAX_ARRAY_ELEMENTS + 1)
    if after_quote:  # spaces, then a comma (or the end)
        if pieces[0].strip() or (len(pieces) == 1 and before_quote):
            raise InvalidTextRepresentation(f'malformed array literal: "{_shown(text)}"')
        pieces = pieces[1:]
    if before_quote:  # spaces after the comma
        if pieces[-1].strip():
            raise InvalidTextRepresentation(f'malformed array literal: "{_shown(text)}"')
        pieces = pieces[:-1]
    for piece in pieces:
        element = piece.strip()
        if "{" in element:
            raise InvalidParameterValue("multidimensional arrays are not accepted here")
        if not element or "}" in element or '"' in element:
            raise InvalidTextRepresentation(f'malformed array literal: "{_shown(text)}"')
        out.append(None if element.upper() == "NULL" else element)
    _check_elements(len(out))


_INTEGER_RANGES = {
    "smallint": (-(2**15), 2**15 - 1),
    "integer": (-(2**31), 2**31 - 1),
    "bigint": (-(2**63), 2**63 - 1),
}
_INTEGER = re.compile(r"\s*[+-]?[0-9]+(?:_[0-9]+)*\s*")  # PostgreSQL 16+ also takes 1_000; ASCII digits only


def parse_integer(text: str, sql_type: str = "bigint") -> int:
    """An integer as int8in/int4in read it: 22P02 when it is not one, 22003 outside the type's range."""
    if _INTEGER.fullmatch(text) is None:
        raise InvalidTextRepresentation(f'invalid input syntax for type {sql_type}: "{_shown(text)}"')
    low, high = _INTEGER_RANGES.get(sql_type, _INTEGER_RANGES["bigint"])
    spelled = text.strip()
    digits = spelled.lstrip("+-").replace("_", "").lstrip("0") or "0"
    value = 0 if len(digits) > 19 else int(digits) * (-1 if spelled.startswith("-") else 1)
    if len(digits) > 19 or not low <= value <= high:
        raise NumericValueOutOfRange(f'value "{_shown(spelled)}" is out of range for type {sql_type}')
    return value


def parse_float(text: str, sql_type: str = "double precision") -> float:
    """A float as float8in reads it (NaN, Infinity, exponents); 22P02 when it is not one."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or "_" in text or not text.strip().isascii():  # Python reads 1_0 and Unicode digits too
        raise InvalidTextRepresentation(f'invalid input syntax for type {sql_type}: "{_shown(text)}"')
    if math.isinf(value) and "inf" not in text.lower():
        raise NumericValueOutOfRange(f'"{_shown(text.strip())}" is out of range for type {sql_type}')
    return value


_TRUE = ("t", "tr", "tru", "true", "y", "ye", "yes", "on", "1")
_FALSE = ("f", "fa", "fal", "fals", "false", "n", "no", "of", "off", "0")


def parse_bool(text: str) -> bool:
    """A boolean as boolin reads it (``t``, ``yes``, ``on``, ``1`` … any case, with spaces around)."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise InvalidTextRepresentation(f'invalid input syntax for type boolean: "{_shown(text)}"')


def _numbers(text: str, element: str) -> list[Any]:
    """A numeric array's text (``{1,2.5,NULL}``, ``{{1,2},{3,4}}`` row-major) -> Python numbers."""
    _check_elements(text.count(",") + 1)
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
        raise InvalidTextRepresentation(f'invalid input syntax for type {element}: "{_shown(text)}"') from exc
    numbers = [v for v in values if v is not None]
    low, high = _INTEGER_RANGES.get(element, _INTEGER_RANGES["bigint"])
    if numbers and not low <= min(numbers) <= max(numbers) <= high:
        raise NumericValueOutOfRange(f"value out of range for type {element} in an array")
    return values


def parse_record(text: str) -> tuple[str | None, ...]:
    """Fields of a record literal ``(1,"a b",)`` as text (an empty unquoted field is NULL)."""
    if len(text) < 2 or text[0] != "(" or text[-1] != ")":
        raise InvalidTextRepresentation(f'malformed record literal: "{_shown(text)}"')
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


# JSON strings hold no structure: removed before nesting and size are measured (the unrolled loop is linear).
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_JSON_SURROGATE = re.compile(r"(?<!\\)(?:\\\\)*\\u[dD][89a-fA-F]")
_JSON_INVALID = "invalid input syntax for type json"


def _json_constant(name: str) -> Any:
    raise InvalidTextRepresentation(_JSON_INVALID, detail=f'Token "{name}" is invalid.')


def _json_int(text: str) -> int:
    if len(text) > 1000:  # Python refuses to read integers of over 4,300 digits; jsonb's numeric holds them
        raise NumericValueOutOfRange("a number in a JSON value of a pgml argument is too large for pgml-proxy")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise NumericValueOutOfRange("a number in a JSON value of a pgml argument is out of range for pgml-proxy")
    return value


def _check_json_shape(text: str) -> None:
    """Nesting depth and value count of JSON text (its strings removed), measured without recursion."""
    import numpy as np  # only for JSON with many brackets or commas; the engine loads numpy anyway

    structure = np.frombuffer(_JSON_STRING.sub('""', text).encode(), dtype=np.uint8)
    opens = (structure == ord("[")) | (structure == ord("{"))
    closes = (structure == ord("]")) | (structure == ord("}"))
    steps = opens.astype(np.int32) - closes.astype(np.int32)
    depth = int(np.cumsum(steps).max()) if len(steps) else 0
    if depth > MAX_JSON_DEPTH:
        raise StatementTooComplex(
            f"a JSON value in a pgml argument is nested deeper than the pgml-proxy limit of {MAX_JSON_DEPTH} levels"
        )
    if int(opens.sum()) + int((structure == ord(",")).sum()) + 1 > MAX_JSON_NODES:
        raise ProgramLimitExceeded(
            f"a JSON value in a pgml argument has more than the pgml-proxy limit of {MAX_JSON_NODES} values"
        )


def parse_json(text: str) -> Any:
    """JSON text -> Python value, accepting what jsonb accepts within the limits above."""
    check_length(len(text))
    opens = text.count("[") + text.count("{")
    if opens > MAX_JSON_DEPTH or opens + text.count(",") + 1 > MAX_JSON_NODES:  # cheap bounds first
        _check_json_shape(text)
    try:
        value = json.loads(text, parse_constant=_json_constant, parse_int=_json_int, parse_float=_json_float)
    except json.JSONDecodeError as exc:
        raise InvalidTextRepresentation(_JSON_INVALID, detail=f"{exc.msg} at character {exc.pos + 1}.") from None
    except RecursionError:  # cannot happen within MAX_JSON_DEPTH; kept as the last line of defence
        raise StatementTooComplex("a JSON value in a pgml argument is nested too deeply") from None
    if "\\u" in text:
        if _JSON_NUL.search(text):
            raise UntranslatableCharacter(
                "unsupported Unicode escape sequence", detail="\\u0000 cannot be converted to text."
            )
        if _JSON_SURROGATE.search(text):
            try:
                json.dumps(value, ensure_ascii=False).encode()
            except UnicodeEncodeError:
                raise InvalidTextRepresentation(
                    _JSON_INVALID, detail="Unicode low surrogate must follow a high surrogate."
                ) from None
    return value


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
    raise InvalidParameterValue(f"cannot read a value of type {sql_type}")
