"""``real`` and ``double precision`` values as PostgreSQL prints them (float4out / float8out), fast for arrays.

Owns: the text of floats under a session's ``extra_float_digits``: above 0 (the default, 1, and what
drivers set) the shortest text that reads back to the same value, in fixed notation when the decimal
exponent is in [-4, P) and ``d.ddde±XX`` otherwise (P = 6 for real, 15 for double precision — printf's
thresholds, as PostgreSQL's ryu output keeps them); at 0 or below ``%.{P+extra}g``. ``NaN``,
``Infinity`` and ``-Infinity`` as PostgreSQL spells them. A vector of thousands of values is printed by
orjson's shortest-float writer (C speed) and only the tokens whose notation differs are respelled.

Must not: know columns, rows or sessions: it prints numbers.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any

import numpy as np
import orjson

REAL_DIGITS, DOUBLE_DIGITS = 6, 15  # FLT_DIG, DBL_DIG
# Below this a float4's halfway points to its neighbours need more than 9 decimal figures: no shortest text is a tie.
TIE_FREE = 2.0**20
# orjson's tokens that PostgreSQL spells otherwise: an integral ".0", five or more zeros after the point,
# seven or more digits before it, an exponent (orjson and PostgreSQL choose notations at other thresholds,
# and pad exponents differently).
_RESPELL = re.compile(rb"(?<![0-9.])(?:-?[0-9]+\.0(?![0-9])|-?0\.0000[0-9]*|-?[0-9]{7,}\.[0-9]+|-?[0-9.]+e[-+]?[0-9]+)")


def float_text(value: float, digits: int = REAL_DIGITS, extra_float_digits: int = 1) -> str:
    """One value as float4out (``digits`` 6) or float8out (15) prints it."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if extra_float_digits <= 0:
        return "%.*g" % (max(digits + extra_float_digits, 1), value)  # noqa: UP031 - C's %g is the definition
    if digits == REAL_DIGITS:
        return _spell(_shortest_real(np.float32(value)), digits)
    return _spell(repr(float(value)), digits)  # Python's repr: the shortest text that reads back the same


def _shortest_real(single: np.float32) -> str:
    """The shortest decimal that reads back to ``single`` and is not exactly halfway to a neighbour: PostgreSQL's
    ryu output leaves such a tie out (numpy and orjson accept it), which only a float4 of 2^20 or more can meet."""
    if abs(single) < TIE_FREE:
        return str(single)  # numpy's shortest round-trip text
    exact = float(single)
    with np.errstate(over="ignore"):  # the largest float4's upper neighbour is infinity (no tie there)
        halfway = {(exact + float(np.nextafter(single, direction))) / 2 for direction in (-np.inf, np.inf)}
        for figures in range(1, 10):
            text = "%.*e" % (figures - 1, exact)  # noqa: UP031 - the correctly rounded decimal of that many figures
            if np.float32(text) == single and float(text) not in halfway:
                return text
    return "%.8e" % exact  # noqa: UP031 - 9 figures always read back


def _spell(shortest: str, digits: int) -> str:
    """A shortest decimal (any notation) in PostgreSQL's notation."""
    negative = shortest.startswith("-")
    number = Decimal(shortest.lstrip("-"))
    if number == 0:
        return "-0" if negative else "0"
    _, figures, exponent = number.normalize().as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, figures))
    magnitude = len(text) - 1 + exponent  # the decimal exponent of the leading digit
    if -4 <= magnitude < digits:
        if exponent >= 0:
            body = text + "0" * exponent
        elif magnitude >= 0:
            body = text[: magnitude + 1] + "." + text[magnitude + 1 :]
        else:
            body = "0." + "0" * (-magnitude - 1) + text
    else:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        body = f"{mantissa}e{'-' if magnitude < 0 else '+'}{abs(magnitude):02d}"
    return ("-" if negative else "") + body


def real_texts(values: Any, extra_float_digits: int = 1) -> list[str]:
    """Each value of a 1-D float array as float4out prints it."""
    return _texts(np.asarray(values, dtype=np.float32), REAL_DIGITS, extra_float_digits)


def real_array_text(values: Any, extra_float_digits: int = 1) -> str:
    """A ``real[]`` without NULLs as array_out prints it: ``{0.1,-2.5e-05,…}``."""
    return "{" + ",".join(real_texts(values, extra_float_digits)) + "}"


def _texts(array: np.ndarray, digits: int, extra_float_digits: int) -> list[str]:
    if extra_float_digits <= 0 or not np.isfinite(array).all() or (len(array) and np.abs(array).max() >= TIE_FREE):
        # orjson writes non-finite values as null, and accepts a halfway shortest text for large values
        return [float_text(v, digits, extra_float_digits) for v in array.tolist()]
    if not len(array):
        return []
    data = orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY)
    if _RESPELL.search(data) is not None:
        data = _RESPELL.sub(lambda m: _spell(m.group().decode(), digits).encode(), data)
    return data[1:-1].decode().split(",")
