"""Values as the server sends them in a result column: the text (typoutput) and binary (typsend) forms.

Owns: a batch of one column's values, of a type pgml functions return (``real[]``, ``real``, ``text``,
``jsonb``) — optionally cast to ``text``, ``varchar`` or pgvector's
``vector`` — encoded exactly as PostgreSQL would send them: floats as float4out / float8out print
them under the session's ``extra_float_digits`` (:mod:`engine.pg.floats`), ``jsonb`` as jsonb_out
normalises it (keys by length then bytes, ``", "`` and ``": "``, numbers as numeric_out prints the
text they were written as), ``vector`` as vector_out (``[1,2.5]``, shortest floats) and vector_send.
A vector of the wrong dimension count is the error pgvector gives (22000).

Must not: know statements or sessions; the caller says the type, cast and format.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
from numpy.typing import NDArray

from engine.api import DataException, InvalidTextRepresentation, UntranslatableCharacter
from engine.pg.binary import SEND, send_jsonb
from engine.pg.floats import real_array_text, real_texts, real_texts_joined

# The result types encoded here (other return types are the server's to print).
TYPES = frozenset({"real[]", "real", "text", "jsonb"})


def encode(values: list[Any], sql_type: str, *, cast: str | None = None, binary: bool = False,
           extra_float_digits: int = 1, dimensions: int | None = None) -> list[bytes | None]:  # fmt: skip
    """Each value (None: NULL) as the server sends a column of ``sql_type`` (cast to ``cast``) in that format."""
    if cast == "vector":
        return [None if v is None else _vector(v, binary, dimensions) for v in values]
    if sql_type == "real":  # float4out / float4send of the whole column at once
        present = np.asarray([v for v in values if v is not None], dtype=np.float32)
        if binary:
            sent = present.astype(">f4").tobytes()
            forms = iter([sent[i : i + 4] for i in range(0, len(sent), 4)])
        else:
            forms = iter([t.encode() for t in real_texts(present, extra_float_digits)])
        return [None if v is None else next(forms) for v in values]
    textual = not binary or cast is not None  # text and varchar are sent as their text in either format
    return [None if v is None else _one(v, sql_type, textual, extra_float_digits) for v in values]


@dataclass(frozen=True)
class Encoded:
    """A column's encoded values held together: value ``i`` is ``data[starts[i] : starts[i] + lengths[i]]``
    (length -1: NULL), for writing many DataRows at once (``proxy.wire.rows``)."""

    data: bytes
    starts: NDArray[np.int64]
    lengths: NDArray[np.int64]


def encode_column(values: Any, sql_type: str, *, cast: str | None = None, binary: bool = False,
                  extra_float_digits: int = 1, dimensions: int | None = None) -> Encoded:  # fmt: skip
    """:func:`encode` of a column as one :class:`Encoded`; a ``real`` column without NULLs (a numpy array, or a
    sequence of numbers) is printed or packed at once, without a Python object per value."""
    if sql_type == "real" and cast is None:
        array = _floats(values)
        if array is not None and binary:
            return Encoded(array.astype(">f4").tobytes(), np.arange(len(array), dtype=np.int64) * 4,
                           np.full(len(array), 4, np.int64))  # fmt: skip
        if array is not None:
            return _split(real_texts_joined(array, extra_float_digits), len(array))
    forms = encode(list(values), sql_type, cast=cast, binary=binary, extra_float_digits=extra_float_digits,
                   dimensions=dimensions)  # fmt: skip
    lengths = np.fromiter((-1 if f is None else len(f) for f in forms), np.int64, len(forms))
    starts = np.zeros(len(forms), np.int64)
    np.cumsum(np.maximum(lengths[:-1], 0), out=starts[1:])
    return Encoded(b"".join(f for f in forms if f is not None), starts, lengths)


def _floats(values: Any) -> NDArray[np.float32] | None:
    """Numbers without a NULL as a float32 array (None: a NULL among them)."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        return values.astype(np.float32, copy=False)
    if None in (values.tolist() if isinstance(values, np.ndarray) else values):
        return None
    return np.asarray(values, dtype=np.float32)


def _split(joined: bytes, count: int) -> Encoded:
    """Comma-joined texts (none holds a comma) as an :class:`Encoded` of ``count`` values."""
    commas = np.flatnonzero(np.frombuffer(joined, np.uint8) == ord(","))
    starts = np.concatenate((np.zeros(min(count, 1), np.int64), commas + 1))
    ends = np.concatenate((commas, np.full(min(count, 1), len(joined), np.int64)))
    return Encoded(joined, starts, ends - starts)


def _one(value: Any, sql_type: str, textual: bool, extra_float_digits: int) -> bytes:
    if sql_type == "jsonb":  # normalised here: the client gets jsonb_out's text, in either format
        text = jsonb_text(value)
        return text.encode() if textual else send_jsonb(text)
    if not textual:
        return SEND[sql_type](value)
    match sql_type:
        case "real[]":
            return real_array_text(value, extra_float_digits).encode()
        case "text":
            return str(value).encode()
    raise TypeError(f"no text output here for {sql_type}")  # real: the batch way, in encode


def _vector(value: Any, binary: bool, dimensions: int | None) -> bytes:
    floats = np.asarray(value, dtype=np.float32)
    if dimensions is not None and len(floats) != dimensions:
        raise DataException(f"expected {dimensions} dimensions, not {len(floats)}")
    if binary:  # vector_send: dimensions, an unused int16, then the float4s
        return struct.pack("!hh", len(floats), 0) + floats.astype(">f4").tobytes()
    return ("[" + ",".join(real_texts(floats)) + "]").encode()  # vector_out: shortest floats, always


def jsonb_text(value: Any) -> str:
    """The text jsonb_out gives for the jsonb of ``value`` (as written by ``json.dumps``)."""
    match value:
        case None:
            return "null"
        case bool():
            return "true" if value else "false"
        case int():
            return str(value)
        case float() | np.floating():
            return _numeric(float(value))
        case str():
            if "\x00" in value:  # what jsonb_in says of "\u0000"
                detail = "\\u0000 cannot be converted to text."
                raise UntranslatableCharacter("unsupported Unicode escape sequence", detail=detail)
            return json.dumps(value, ensure_ascii=False)
        case dict():
            keys = sorted(value, key=lambda k: (len(str(k).encode()), str(k).encode()))
            pairs = (f"{json.dumps(str(k), ensure_ascii=False)}: {jsonb_text(value[k])}" for k in keys)
            return "{" + ", ".join(pairs) + "}"
        case list() | tuple():
            return "[" + ", ".join(jsonb_text(v) for v in value) + "]"
        case np.integer():
            return str(int(value))
        case np.ndarray():
            return jsonb_text(value.tolist())
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _numeric(value: float) -> str:
    """numeric_out of the JSON number ``json.dumps`` writes for ``value``: every digit, no exponent."""
    if not math.isfinite(value):  # json.dumps would write NaN / Infinity, which jsonb_in rejects
        raise InvalidTextRepresentation("invalid input syntax for type json", detail=f'Token "{value}" is invalid.')
    number = Decimal(repr(value))
    return format(abs(number) if number == 0 else number, "f")  # numeric has no negative zero
