"""PostgreSQL's type OIDs by name, and how the values of each type are read.

Owns: the built-in type OIDs the proxy and the engine meet (``pg_type.oid``, fixed by initdb), their
SQL names, the element type of each array type, and which catalogue type (the spelling of
``engine.api.CATALOGUE``) a value of each type is read as, in text (gathered rows) and as a bound
parameter (text or binary format).

Must not: parse or print values (``engine.pg.text``, ``engine.pg.binary`` do), or know about pgml.
"""

from __future__ import annotations

UNSPECIFIED = 0  # a Parse parameter of no stated type: the server infers it (text to us)
BOOL = 16
BYTEA = 17
NAME = 19
INT8 = 20
INT2 = 21
INT4 = 23
TEXT = 25
JSON = 114
JSON_ARRAY = 199
FLOAT4 = 700
FLOAT8 = 701
UNKNOWN = 705  # an untyped literal
BOOL_ARRAY = 1000
NAME_ARRAY = 1003
INT2_ARRAY = 1005
INT4_ARRAY = 1007
TEXT_ARRAY = 1009
BPCHAR_ARRAY = 1014
VARCHAR_ARRAY = 1015
INT8_ARRAY = 1016
FLOAT4_ARRAY = 1021
FLOAT8_ARRAY = 1022
BPCHAR = 1042
VARCHAR = 1043
NUMERIC_ARRAY = 1231
NUMERIC = 1700
RECORD = 2249
JSONB = 3802
JSONB_ARRAY = 3807
FIRST_USER_OID = 16384  # FirstNormalObjectId: types created after initdb (enums, domains) have OIDs from here

# Type OID -> the catalogue type its text is read as (gathered argument rows, text-format values).
READ_AS: dict[int, str] = {
    TEXT: "text", VARCHAR: "text", BPCHAR: "text", NAME: "text", UNKNOWN: "text",
    TEXT_ARRAY: "text[]", VARCHAR_ARRAY: "text[]", BPCHAR_ARRAY: "text[]", NAME_ARRAY: "text[]",
    JSONB: "jsonb", JSON: "jsonb", JSONB_ARRAY: "jsonb[]", JSON_ARRAY: "jsonb[]",
    INT8: "bigint", INT4: "bigint", INT2: "bigint", BOOL: "boolean",
    FLOAT4: "real", FLOAT8: "double precision", FLOAT4_ARRAY: "real[]", FLOAT8_ARRAY: "double precision[]",
    INT2_ARRAY: "bigint[]", INT4_ARRAY: "bigint[]", INT8_ARRAY: "bigint[]", BOOL_ARRAY: "boolean[]",
    NUMERIC: "double precision", NUMERIC_ARRAY: "double precision[]", RECORD: "record",
}  # fmt: skip

# Type OID -> what PostgreSQL calls the type, as overload resolution and the implicit casts name it (an
# untyped literal resolves as text; a record is any row).
TYPE_NAMES: dict[int, str] = {
    **READ_AS, VARCHAR: "varchar", BPCHAR: "bpchar", NAME: "name", JSON: "json", JSON_ARRAY: "json[]",
    VARCHAR_ARRAY: "varchar[]", BPCHAR_ARRAY: "bpchar[]", NAME_ARRAY: "name[]", INT4: "integer", INT2: "smallint",
    INT4_ARRAY: "integer[]", INT2_ARRAY: "smallint[]", NUMERIC: "numeric", NUMERIC_ARRAY: "numeric[]",
}  # fmt: skip

# Array type OID -> its element type OID (the arrays a binary value can be read of).
ELEMENTS: dict[int, int] = {
    TEXT_ARRAY: TEXT, VARCHAR_ARRAY: VARCHAR, FLOAT4_ARRAY: FLOAT4, FLOAT8_ARRAY: FLOAT8, INT8_ARRAY: INT8,
    INT4_ARRAY: INT4, INT2_ARRAY: INT2, JSONB_ARRAY: JSONB, JSON_ARRAY: JSON, BOOL_ARRAY: BOOL,
}  # fmt: skip

# Type OID -> the catalogue type a bound parameter of it is read as: the types with a binary reader
# (engine.pg.binary), in text format too; others are refused.
PARAM_TYPES: dict[int, str] = {
    oid: READ_AS.get(oid, "text")
    for oid in (UNSPECIFIED, TEXT, VARCHAR, BPCHAR, NAME, UNKNOWN, JSONB, JSON, INT8, INT4, INT2, BOOL, FLOAT4, FLOAT8,
                *ELEMENTS)
}  # fmt: skip
