"""Bound parameter values: the bytes of a Bind's parameters -> Python values, by type OID.

Owns: which parameters of a pgml call the proxy reads (the types of :data:`engine.pg.types.PARAM_TYPES`,
and a user-defined type's label in text format), each parameter's format code, and naming the
parameter whose binary bytes do not fit its type (22P03). The value formats themselves are
``engine.pg``'s (text: :mod:`engine.pg.text`, binary: :mod:`engine.pg.binary`), with the server's own
SQLSTATE for bytes that do not fit: 22021 for text that is not UTF-8, 22P03 for bad binary data,
54000 beyond :mod:`engine.pg.scalars`' limits, 0A000 for a type the proxy does not read.

Must not: do I/O, parse or print values itself, or decide where a value goes
(:mod:`proxy.rewrite.params` puts it into the statement).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from engine.api import EngineError, InvalidBinaryRepresentation
from engine.pg import types
from engine.pg.binary import binary_value
from engine.pg.scalars import check_length, decode_utf8
from engine.pg.text import from_text
from proxy.errors import FeatureNotSupported, InvalidParameterValue, ProxyError
from proxy.wire.messages import Bind


def bound_values(
    bind: Bind, oids: Sequence[int]
) -> tuple[dict[int, tuple[Any, int]], dict[int, ProxyError | EngineError]]:
    """Each ``$n``'s value and type OID, and the error of each one that cannot be read (raised where used)."""
    values: dict[int, tuple[Any, int]] = {}
    problems: dict[int, ProxyError | EngineError] = {}
    for i, data in enumerate(bind.params):
        oid = oids[i] if i < len(oids) else types.UNSPECIFIED
        try:
            code = bind.format_of(i)
            if code not in (0, 1):
                raise InvalidParameterValue(f"unsupported format code: {code}")
            values[i + 1] = (param_value(data, code == 1, oid, i + 1), oid)
        except (ProxyError, EngineError) as exc:
            problems[i + 1] = exc
    return values, problems


def param_value(data: bytes | None, binary: bool, type_oid: int, number: int = 0) -> Any:
    """The Python value of one bound parameter (``number``: its 1-based position, for messages).

    Errors are the server's own for the same bytes: 22021 for text that is not UTF-8,
    22P03 for binary data that does not fit the type, 54000 beyond the size limits.
    """
    if data is None:
        return None
    check_length(len(data))
    kind = types.PARAM_TYPES.get(type_oid)
    if kind is None and type_oid >= types.FIRST_USER_OID and not binary:
        return decode_utf8(data)  # a user-defined type such as pgml's enums (algorithm, strategy…): its label
    if kind is None:
        raise FeatureNotSupported(f"pgml-proxy cannot read a parameter of type OID {type_oid} in a pgml call")
    if not binary:
        return from_text(decode_utf8(data), kind)
    try:
        return binary_value(data, type_oid)
    except struct.error:
        raise InvalidBinaryRepresentation(f"incorrect binary data format in bind parameter {number}") from None
