"""A dataset as a table to store: its definition, and its rows as PostgreSQL COPY text.

Owns: :class:`TableData` (the statements, identifiers quoted, and the COPY payload) and each SQL type's
input text for the values a dataset holds (shortest round-tripping floats, JSON with NaN as null, array
literals), NUL characters refused as PostgreSQL refuses them.

Must not: talk to a database or paste a value into SQL (the caller runs the statements).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.api import EngineError, InvalidArgument
from engine.pg.copy import encode_text
from engine.pg.text import array_out, quote_ident

SCHEMA = "pgml"
Columns = tuple[tuple[str, str], ...]
Rows = Iterable[Sequence[Any]]


@dataclass(frozen=True)
class TableData:
    """A dataset ready to store: ``schema.name`` with ``columns``, and its rows as COPY text."""

    schema: str
    name: str
    columns: Columns
    copy_data: bytes
    rows: int
    returned_name: str

    @property
    def qualified(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    def statements(self) -> list[str]:
        """DROP, CREATE, then ``COPY ... FROM STDIN`` (last: the caller sends :attr:`copy_data` to it)."""
        table = self.qualified
        columns = ", ".join(f"{quote_ident(name)} {type_}" for name, type_ in self.columns)
        return [
            f"DROP TABLE IF EXISTS {table} CASCADE",
            f"CREATE TABLE {table} ({columns})",
            f"COPY {table} FROM STDIN",
        ]


def encode_copy(columns: Columns, rows: Rows) -> tuple[bytes, int]:
    """Rows as PostgreSQL COPY text (one line per row, ``\\N`` for NULL) and how many there were."""
    formatters = [_formatter(name, type_) for name, type_ in columns]
    texts = [
        [None if value is None else text(value) for text, value in zip(formatters, row, strict=True)] for row in rows
    ]
    return encode_text(texts), len(texts)


def _formatter(column: str, type_: str) -> Callable[[Any], str]:
    """A function from a non-NULL value to PostgreSQL's input text for ``type_``."""
    if type_.endswith("]"):
        element = _formatter(column, type_.split("[", 1)[0])
        return lambda value: array_out(value, element)
    if type_ in ("real", "double precision"):
        return format_float
    if type_ in ("smallint", "integer", "bigint"):
        return lambda value: str(int(value))
    if type_ == "boolean":
        return lambda value: "t" if value else "f"
    if type_ == "jsonb":
        return lambda value: _no_nul(column, value, format_json)
    if type_ == "text":
        return lambda value: _no_nul(column, value, str)
    raise EngineError(f"no COPY encoder for the SQL type {type_}")


def _no_nul(column: str, value: Any, format_: Callable[[Any], str]) -> str:
    try:
        text = format_(value)
    except _NulError:
        text = "\0"
    if "\0" in text:
        raise InvalidArgument(f'load_dataset: column "{column}" holds a NUL character, which PostgreSQL cannot store')
    return text


class _NulError(ValueError):
    pass


def format_float(value: Any) -> str:
    """Shortest text that reads back as the same double (PostgreSQL rounds it once more for ``real``)."""
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    return repr(number)


def format_json(value: Any) -> str:
    """JSON text for a jsonb column; NaN and infinities become null, as orjson (PostgresML's encoder) does."""
    return json.dumps(_jsonable(value), ensure_ascii=False, allow_nan=False, default=str)


def _jsonable(value: Any) -> Any:
    if isinstance(value, str):
        if "\0" in value:
            raise _NulError  # jsonb rejects \u0000
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {_jsonable(str(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    return value
