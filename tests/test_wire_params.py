"""Bound parameter bytes -> values (proxy.wire.params), sans-IO: text and binary formats, the server's SQLSTATEs."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from engine.api import EngineError
from proxy.errors import ProxyError
from proxy.wire.messages import Bind
from proxy.wire.params import bound_values, param_value


def binary_array(element: int, values: list[bytes | None], ndim: int = 1, flags: int = 0) -> bytes:
    head = struct.pack("!iiI", ndim, flags, element) + (struct.pack("!ii", len(values), 1) if ndim else b"")
    return head + b"".join(struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v for v in values)


READ: list[tuple[bytes | None, bool, int, Any]] = [
    (None, False, 25, None),
    (b"hello", False, 25, "hello"),
    (b"hello", True, 1043, "hello"),
    (b"42", False, 20, 42),
    (struct.pack("!q", -7), True, 20, -7),
    (struct.pack("!i", 7), True, 23, 7),
    (struct.pack("!h", 7), True, 21, 7),
    (b"\x01", True, 16, True),
    (b"t", False, 16, True),
    (struct.pack("!d", 0.5), True, 701, 0.5),
    (struct.pack("!f", 0.25), True, 700, 0.25),
    (b'{"a": [1]}', False, 3802, {"a": [1]}),
    (b'\x01{"a": 1}', True, 3802, {"a": 1}),
    (b"[1, 2]", True, 114, [1, 2]),
    (b"{1,2}", False, 1021, [1.0, 2.0]),
    (binary_array(25, [b"a", None, b"c"]), True, 1009, ["a", None, "c"]),
    (binary_array(20, [struct.pack("!q", 3)]), True, 1016, [3]),
    (binary_array(25, [], ndim=0), True, 1009, []),
    (b"xgboost", False, 16390, "xgboost"),  # a user-defined enum: its label
]


@pytest.mark.parametrize(("data", "binary", "oid", "value"), READ)
def test_param_value(data: bytes | None, binary: bool, oid: int, value: Any) -> None:
    assert param_value(data, binary, oid) == value


FAILS: list[tuple[bytes, bool, int, str]] = [
    (b"\xff", False, 25, "22021"),  # not UTF-8
    (b"a\x00b", False, 25, "22021"),  # a NUL byte
    (b"\x02{}", True, 3802, "22P03"),  # jsonb version 2
    (b"\x00\x00\x00", True, 23, "22P03"),  # int4 of 3 bytes
    (binary_array(25, [b"a"]) + b"x", True, 1009, "22P03"),  # trailing bytes
    (binary_array(25, [b"a"], flags=2), True, 1009, "22P03"),  # bad flags
    (binary_array(23, [struct.pack("!i", 1)]), True, 1009, "42804"),  # element type int4 in a text[]
    (binary_array(25, [b"a"], ndim=7), True, 1009, "54000"),  # beyond MAXDIM
    (binary_array(25, [b"a"], ndim=2), True, 1009, "0A000"),  # multidimensional
    (b"x", False, 600, "0A000"),  # a type the proxy does not read (point)
    (b"x", True, 16390, "0A000"),  # a user-defined type in binary
]


@pytest.mark.parametrize(("data", "binary", "oid", "code"), FAILS)
def test_param_value_errors(data: bytes, binary: bool, oid: int, code: str) -> None:
    with pytest.raises((ProxyError, EngineError)) as info:
        param_value(data, binary, oid, 1)
    assert info.value.sqlstate == code


def test_bound_values_keep_each_error_for_its_parameter() -> None:
    bind = Bind("", "s", (0, 1, 2), (b"7", b"\xff\xff", b"x"), ())
    values, problems = bound_values(bind, [20, 23])
    assert values == {1: (7, 20)}
    assert problems[2].sqlstate == "22P03"  # binary int4 of 2 bytes
    assert problems[3].sqlstate == "22023"  # format code 2
