"""A per-row call's gathered argument rows read in binary, and the binary rows of its result table.

Owns: which gathered types are read from ``COPY (SELECT DISTINCT …) TO STDOUT (FORMAT binary)``
(:data:`KEYS`: type OID -> the key column's type, the same type, so a key goes into the result table as
the bytes it came in, exactly — floats too — and the lookup compares with the type's own equality);
decoding those rows into the engine's argument tuples (float arrays column-wise by numpy, text by
``engine.pg.table``, other values by ``engine.pg.binary``) and key fields; and the COPY BINARY rows that
fill the table (the keys as gathered, then the result's binary form, for the value types in
:data:`engine.pg.binary.SEND`).

Values are what the text path reads (``engine.pg.text.from_text``): ints as int, text as str; float arrays
(which only the predict family takes, reading each row with ``np.asarray``) as flattened numpy rows of
their own precision instead of lists of Python floats. What the binary forms cannot give the same way —
arrays of different lengths in one column, NaN or NULL elements (NaN is all numpy has for both) — is left
to the text path (None).

Must not: run anything or choose overloads (:mod:`proxy.rewrite.per_row` does both).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.api import InvalidArgument
from engine.pg import copy, types
from engine.pg.binary import SEND, binary_value
from engine.pg.fields import Fields, read_fields
from engine.pg.scalars import check_length
from engine.pg.table import decode_column

# Gathered type OID -> the key column type (the same type: its binary form is the gathered bytes).
KEYS = {
    types.TEXT: "text", types.VARCHAR: "varchar", types.BPCHAR: "bpchar", types.NAME: "name",
    types.INT2: "smallint", types.INT4: "integer", types.INT8: "bigint", types.BOOL: "boolean",
    types.FLOAT8: "double precision", types.JSONB: "jsonb",
    types.FLOAT4_ARRAY: "real[]", types.FLOAT8_ARRAY: "double precision[]",
}  # fmt: skip
_TEXTS = frozenset({types.TEXT, types.VARCHAR, types.BPCHAR, types.NAME})
# Float array type -> how it is decoded, and the dtype of the rows the engine gets (float32 for real[]).
_FLOAT_ARRAYS = {types.FLOAT4_ARRAY: ("real[]", np.float32), types.FLOAT8_ARRAY: ("double precision[]", np.float64)}


@dataclass(frozen=True)
class Gathered:
    """The gathered rows with no NULL argument: engine argument tuples, and each one's key fields (binary)."""

    tuples: list[tuple[Any, ...]]
    keys: list[tuple[bytes, ...]]
    count: int  # every gathered row, NULL arguments included


def readable(oids: Sequence[int]) -> bool:
    return all(oid in KEYS for oid in oids)


def decode(
    data: bytes, messages: Sequence[int], oids: Sequence[int], fixed: list[Any], given: list[int]
) -> Gathered | None:
    """The gathered COPY rows (``data``, in CopyData messages of these lengths) of columns ``oids`` (all
    :func:`readable`) as argument tuples: ``fixed`` with the gathered values at the positions ``given``; None
    when the text path must read them (see the module doc)."""
    fields = read_fields(data, messages, len(oids))
    columns = []
    for index, oid in enumerate(oids):
        values = _values(fields, index, oid)
        if values is None:
            return None
        columns.append(values)
    slots: list[Iterable[Any]] = [itertools.repeat(value) for value in fixed]
    for position, values in zip(given, columns, strict=True):
        slots[position] = values
    tuples = list(zip(*slots, strict=False)) if columns else [tuple(fixed)] * fields.num_rows  # repeats: endless
    keys = list(zip(*(fields.raw(index) for index in range(len(oids))), strict=True))
    present = np.logical_and.reduce([lengths >= 0 for lengths in fields.lengths], initial=True)
    if not present.all():  # STRICT: a NULL argument gives NULL, no lookup row needed
        kept = np.flatnonzero(present).tolist()
        tuples, keys = [tuples[i] for i in kept], [keys[i] for i in kept]
    return Gathered(tuples, keys, fields.num_rows)


def _values(fields: Fields, index: int, oid: int) -> list[Any] | None:
    """One gathered column's values (None for NULL), as the text path reads them; None: not here."""
    lengths = fields.lengths[index]
    if len(lengths):
        check_length(int(lengths.max()))
    if oid in _FLOAT_ARRAYS:
        sql_type, dtype = _FLOAT_ARRAYS[oid]
        try:
            column = decode_column(fields, index, f"${index + 1}", sql_type)
        except InvalidArgument:  # arrays of different lengths: fine for the text path
            return None
        floats = column.floats
        if np.isnan(floats[~column.nulls]).any():  # NaN or NULL elements: numpy cannot tell them apart
            return None
        rows: list[Any] = list(floats.astype(dtype))
        for row in np.flatnonzero(column.nulls).tolist():
            rows[row] = None
        return rows
    if oid in _TEXTS:
        return decode_column(fields, index, f"${index + 1}", "text").texts
    return [None if raw is None else binary_value(raw, oid) for raw in fields.raw(index)]


def copy_rows(keys: Sequence[tuple[bytes | None, ...]], results: list[Any], value_type: str) -> bytes:
    """COPY BINARY of the result table: the key fields as gathered, then each result in its binary form."""
    write = SEND[value_type]
    return copy.encode_binary(
        [*key, None if value is None else write(value)] for key, value in zip(keys, results, strict=True)
    )
