"""The text of single PostgreSQL values: numbers, booleans, JSON, UTF-8, and the limits on one value.

Owns: reading an integer, a float, a boolean or JSON as the server's input functions read them (int8in,
float8in, boolin, jsonb_in), with the server's own SQLSTATE and message for text that does not fit; text
bytes that are not UTF-8 (22021); and the limits on one argument value, checked wherever a value is read
(SQL literal, bound parameter, gathered row), so no input can exhaust memory or the stack:

- text of one value longer than :data:`MAX_VALUE_LENGTH` (64 Mi characters; bytes
  for bound parameters): 54000;
- an array with more than :data:`MAX_ARRAY_ELEMENTS` (1,000,000) elements, or a
  JSON value with more than :data:`MAX_JSON_NODES` (1,000,000) values: 54000;
- JSON nested deeper than :data:`MAX_JSON_DEPTH` (256 arrays/objects): 54001 (the
  server's own limit is its stack, thousands of levels; Python's is ~1,000).

Must not: know SQL syntax or types beyond these (arrays and records are ``engine.pg.text``'s).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from engine.api import (
    CharacterNotInRepertoire,
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
    hexes = " ".join(f"0x{b:02x}" for b in data[bad : bad + width])
    raise CharacterNotInRepertoire(f'invalid byte sequence for encoding "UTF8": {hexes}')


def check_length(size: int) -> None:
    """One argument value's text (characters, or bytes of a bound parameter) within MAX_VALUE_LENGTH."""
    if size > MAX_VALUE_LENGTH:
        raise ProgramLimitExceeded(
            f"a pgml argument value of {size} bytes exceeds the pgml-proxy limit of {MAX_VALUE_LENGTH} bytes"
        )


def check_elements(count: int) -> None:
    if count > MAX_ARRAY_ELEMENTS:
        raise ProgramLimitExceeded(
            f"a pgml argument array has more than the pgml-proxy limit of {MAX_ARRAY_ELEMENTS} elements"
        )


def shown(text: str) -> str:
    """A value quoted in an error message: PostgreSQL quotes the whole input; a long one is cut here."""
    return text if len(text) <= 100 else text[:100] + "…"


INTEGER_RANGES = {
    "smallint": (-(2**15), 2**15 - 1),
    "integer": (-(2**31), 2**31 - 1),
    "bigint": (-(2**63), 2**63 - 1),
}
_INTEGER = re.compile(r"\s*[+-]?[0-9]+(?:_[0-9]+)*\s*")  # PostgreSQL 16+ also takes 1_000; ASCII digits only


def parse_integer(text: str, sql_type: str = "bigint") -> int:
    """An integer as int8in/int4in read it: 22P02 when it is not one, 22003 outside the type's range."""
    if _INTEGER.fullmatch(text) is None:
        raise InvalidTextRepresentation(f'invalid input syntax for type {sql_type}: "{shown(text)}"')
    low, high = INTEGER_RANGES.get(sql_type, INTEGER_RANGES["bigint"])
    spelled = text.strip()
    digits = spelled.lstrip("+-").replace("_", "").lstrip("0") or "0"
    value = 0 if len(digits) > 19 else int(digits) * (-1 if spelled.startswith("-") else 1)
    if len(digits) > 19 or not low <= value <= high:
        raise NumericValueOutOfRange(f'value "{shown(spelled)}" is out of range for type {sql_type}')
    return value


def parse_float(text: str, sql_type: str = "double precision") -> float:
    """A float as float8in reads it (NaN, Infinity, exponents); 22P02 when it is not one."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or "_" in text or not text.strip().isascii():  # Python reads 1_0 and Unicode digits too
        raise InvalidTextRepresentation(f'invalid input syntax for type {sql_type}: "{shown(text)}"')
    if math.isinf(value) and "inf" not in text.lower():
        raise NumericValueOutOfRange(f'"{shown(text.strip())}" is out of range for type {sql_type}')
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
    raise InvalidTextRepresentation(f'invalid input syntax for type boolean: "{shown(text)}"')


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
