"""``pgml.load_dataset``: a dataset source loaded into a table through the client's own session.

Owns: the procedure (the role must be able to create the table first; DROP, CREATE and ``COPY … FROM
STDIN`` in one unit), the arguments (source, subset, limit, kwargs), and which loader a source goes to:
a built-in (``engine.ml.datasets.builtins``), or Hugging Face ``datasets`` (``engine.ml.datasets.hub``;
local files only under ``[engine] data_dirs``, ``engine.ml.datasets.files``).

Must not: paste a value into SQL (:class:`~engine.ml.datasets.table.TableData` gives the statements,
identifiers quoted), or load on the event loop (``Context.work``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.api import Call, EngineError, InvalidArgument, PermissionDenied, Statement
from engine.ml.datasets.builtins import BUILTINS
from engine.ml.datasets.hub import cache_dir, hf_module, load_hf, plan
from engine.ml.datasets.table import SCHEMA, Columns, Rows, TableData, encode_copy
from engine.pg import registry
from engine.runtime.context import Context
from engine.runtime.paths import Roots

MAX_SOURCE_CHARS = 255


def load(
    source: str,
    subset: str | None,
    limit: int | None,
    kwargs: dict[str, Any],
    *,
    allow_downloads: bool,
    data_dirs: Sequence[str] = (),
) -> TableData:
    """Load ``source`` (a built-in name, a file builder such as ``csv`` reading files under ``data_dirs``,
    or a Hugging Face hub dataset) as a table."""
    if not isinstance(source, str) or not source or "\0" in source:
        raise InvalidArgument("load_dataset: source must be a non-empty dataset name")
    if len(source) > MAX_SOURCE_CHARS:  # no hub id, builder or file name is this long (the OS would refuse it)
        raise InvalidArgument(f"load_dataset: source must be at most {MAX_SOURCE_CHARS} characters")
    if limit is not None and limit < 0:
        raise InvalidArgument(f"load_dataset: limit must not be negative (got {limit})")
    if not isinstance(kwargs, dict):
        raise InvalidArgument("load_dataset: kwargs must be a JSON object")
    builtin = BUILTINS.get(source)
    if builtin is not None:
        if subset is not None:
            raise InvalidArgument(f'load_dataset: the built-in dataset "{source}" has no subsets (got "{subset}")')
        if kwargs:
            raise InvalidArgument(
                f'load_dataset: the built-in dataset "{source}" takes no kwargs (got {", ".join(sorted(kwargs))})'
            )
        columns, rows = builtin(limit)
        return _table(source, columns, rows, f"{SCHEMA}.{source}")
    hf_module(allow_downloads)  # offline flags before anything imports datasets
    request = plan(source, kwargs, allow_downloads, Roots(data_dirs))
    with cache_dir(request) as directory:  # rows are read lazily: encode them before the cache goes
        columns, rows = load_hf(request, subset, limit, directory, allow_downloads)
        try:
            return _table(source, columns, rows, source)
        except EngineError:
            raise
        except Exception as exc:  # decoding rows happens lazily, inside datasets
            raise EngineError(f'load_dataset("{source}") failed while reading rows: {exc}') from exc


def _table(name: str, columns: Columns, rows: Rows, returned_name: str) -> TableData:
    data, count = encode_copy(columns, rows)
    return TableData(SCHEMA, name, columns, data, count, returned_name)


_CAN_CREATE = "SELECT has_schema_privilege('pgml', 'CREATE')"


async def load_dataset(call: Call, ctx: Context) -> list[Any]:
    """``pgml.load_dataset(source, subset, limit, kwargs)`` -> (table_name, rows), table replaced."""
    db = ctx.database()
    out: list[Any] = []
    # The role must be able to create the table before the proxy reads anything on its behalf.
    if call.rows and (await registry.rows(db, _CAN_CREATE)).rows[0][0] != "t":
        raise PermissionDenied(
            "permission denied for schema pgml",
            detail="pgml.load_dataset creates its table in schema pgml.",
            hint="An administrator can allow it with GRANT CREATE ON SCHEMA pgml TO <role>.",
        )
    for source, subset, limit, kwargs in call.rows:
        if source is None:
            raise InvalidArgument("source must not be NULL")
        if not isinstance(kwargs, dict):
            raise InvalidArgument("kwargs must be a JSON object")
        table = await ctx.work(
            load, source, subset, limit, kwargs or {},
            allow_downloads=ctx.config.allow_downloads, data_dirs=ctx.config.data_dirs,
        )  # fmt: skip
        *ddl, copy = table.statements()
        await db.execute([*(Statement(s) for s in ddl), Statement(copy, copy_data=table.copy_data)])
        out.append([(table.returned_name, table.rows)])
    return out
