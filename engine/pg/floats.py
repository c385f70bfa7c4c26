"""``real`` values as PostgreSQL prints them (float4out), fast for arrays.

Owns: the text of floats under a session's ``extra_float_digits``: above 0 (the default, 1, and what
drivers set) the shortest text that reads back to the same value, in fixed notation when the decimal
exponent is in [-4, 6) and ``d.ddde±XX`` otherwise (printf's thresholds, as PostgreSQL's ryu output keeps
them), never a text exactly halfway to a neighbouring float4; at 0 or below ``%.{6+extra}g``. ``NaN``,
``Infinity`` and ``-Infinity`` as PostgreSQL spells them. A vector of thousands of values is printed by
orjson's shortest-float writer (C speed) and only the tokens whose notation differs are respelled.

Must not: know columns, rows or sessions: it prints numbers.
"""

from __future__ import annotations

import math
import re
from decimal import ROUND_FLOOR, Decimal
from typing import Any

import numpy as np
import orjson

REAL_DIGITS = 6  # FLT_DIG
# Below this a float4's halfway points to its neighbours need more than 9 decimal figures: no shortest text is a tie.
TIE_FREE = 2.0**20
# orjson's tokens that PostgreSQL spells otherwise: an integral ".0", five or more zeros after the point,
# seven or more digits before it, an exponent (orjson and PostgreSQL choose notations at other thresholds,
# and pad exponents differently).
_RESPELL = re.compile(rb"(?<![0-9.])(?:-?[0-9]+\.0(?![0-9])|-?0\.0000[0-9]*|-?[0-9]{7,}\.[0-9]+|-?[0-9.]+e[-+]?[0-9]+)")


def float_text(value: float, extra_float_digits: int = 1) -> str:
    """One value as float4out prints it."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if extra_float_digits <= 0:
        return "%.*g" % (max(REAL_DIGITS + extra_float_digits, 1), value)  # noqa: UP031 - C's %g is the definition
    return _spell(_shortest_real(np.float32(value)))


def _shortest_real(single: np.float32) -> str:
    """The shortest decimal that reads back to ``single`` and is not exactly halfway to a neighbour (PostgreSQL's
    ryu output leaves such a tie out; numpy and orjson accept it, which only a float4 of 2^20 or more can meet),
    the nearer of the two candidates of that length when both are (the even one when they are equally near)."""
    if abs(single) < TIE_FREE:
        return str(single)  # numpy's shortest round-trip text
    exact = Decimal(float(single))
    with np.errstate(over="ignore"):  # the largest float4's upper neighbour is infinity (no tie there)
        halfway = {(exact + Decimal(float(np.nextafter(single, d)))) / 2 for d in (-np.inf, np.inf)}
        for figures in range(1, 10):
            quantum = Decimal(1).scaleb(exact.adjusted() - figures + 1)
            low = (exact / quantum).to_integral_value(ROUND_FLOOR) * quantum
            # The nearer first; equally near, the one whose last figure is even (round half to even, as ryu).
            nearer = sorted((low, low + quantum), key=lambda c: (abs(c - exact), int(c / quantum) % 2))
            for candidate in nearer:
                if candidate not in halfway and np.float32(str(candidate)) == single:
                    return str(candidate)
    return repr(float(single))


def _spell(shortest: str) -> str:
    """A shortest decimal (any notation) in PostgreSQL's notation."""
    negative = shortest.startswith("-")
    number = Decimal(shortest.lstrip("-"))
    if number == 0:
        return "-0" if negative else "0"
    _, figures, exponent = number.normalize().as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, figures))
    magnitude = len(text) - 1 + exponent  # the decimal exponent of the leading digit
    if -4 <= magnitude < REAL_DIGITS:
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
    joined = real_texts_joined(values, extra_float_digits)
    return joined.decode().split(",") if joined else []


def real_array_text(values: Any, extra_float_digits: int = 1) -> str:
    """A ``real[]`` without NULLs as array_out prints it: ``{0.1,-2.5e-05,…}``."""
    return "{" + real_texts_joined(values, extra_float_digits).decode() + "}"


def real_texts_joined(values: Any, extra_float_digits: int = 1) -> bytes:
    """The texts of :func:`real_texts`, joined by commas (ASCII: a comma never occurs in one)."""
    array = np.asarray(values, dtype=np.float32)
    if extra_float_digits <= 0 or not np.isfinite(array).all() or (len(array) and np.abs(array).max() >= TIE_FREE):
        # orjson writes non-finite values as null, and accepts a halfway shortest text for large values
        return ",".join(float_text(v, extra_float_digits) for v in array.tolist()).encode()
    if not len(array):
        return b""
    data = orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY)
    if _RESPELL.search(data) is not None:
        data = _RESPELL.sub(lambda m: _spell(m.group().decode()).encode(), data)
    return data[1:-1]
