"""``load_dataset`` through Hugging Face ``datasets``: hub datasets and the file builders.

Owns: what is handed to ``datasets.load_dataset`` (checked kwargs; hub ids never read as local
directories), offline behaviour, a private cache for converted local files, all splits concatenated,
and feature dtypes mapped to SQL types.

Must not: let a client choose a cache or download location; import ``datasets`` at import time (it
imports pyarrow, pandas and fsspec: seconds; imported when a load runs).
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from engine.api import EngineError, InvalidArgument, NotSupported, PermissionDenied, UnknownModel
from engine.ml.datasets.files import denied, denied_remote, local_files, pathlike, remote, repo_relative, split_patterns
from engine.ml.datasets.table import Columns, Rows
from engine.runtime.locate import configure_offline
from engine.runtime.paths import Roots

# Value dtypes. large_string (what the csv/json builders infer) is a string too; an all-NULL
# column (dtype null) becomes text rather than failing the whole load.
HF_VALUE_TYPES = {
    "string": "text",
    "large_string": "text",
    "null": "text",
    "int64": "bigint",
    "int32": "integer",
    "int16": "smallint",
    "int8": "smallint",
    "float64": "double precision",
    "float32": "real",
    "float16": "real",
    "bool": "boolean",
}
# Feature classes stored as JSON (dict and list features, and the dict-shaped ones).
HF_JSON_FEATURES = frozenset({"List", "LargeList", "Sequence", "Json", "Translation", "TranslationVariableLanguages"})
OFFLINE_HINT = (
    "Set [engine] allow_downloads to fetch it from the Hugging Face Hub, or load a file from the proxy's data"
    " directories: source 'csv', 'json' or 'parquet' with kwargs {\"data_files\": \"file.csv\"}."
)
# Builders that read local files. Other packaged builders are refused: pandas unpickles (runs code), iceberg
# and lance take catalogs and tokens, and the media folders give features no SQL column holds.
FILE_BUILDERS = frozenset({"arrow", "csv", "json", "parquet", "text", "xml"})
# load_dataset kwargs that name the proxy's own cache and download locations (or fsspec options and
# credentials for them), or write beside them: a client never chooses these.
PROXY_OWNED = frozenset({"cache_dir", "download_config", "storage_options", "save_infos"})


@dataclass(frozen=True)
class Plan:
    """What to hand ``datasets.load_dataset``: ``target`` and checked ``kwargs``; ``local``: a file builder."""

    source: str
    target: str
    kwargs: dict[str, Any]
    local: bool


def plan(source: str, kwargs: dict[str, Any], allow_downloads: bool, roots: Roots) -> Plan:
    """Check every location in the request (nothing is opened for a path outside ``roots``)."""
    owned = sorted(PROXY_OWNED & set(kwargs))
    if owned:
        raise PermissionDenied(
            f'load_dataset: the kwarg "{owned[0]}" is not allowed',
            detail="pgml-proxy owns its cache and download locations and options; clients cannot choose them.",
            hint=f'Remove "{owned[0]}" from kwargs.',
        )
    kwargs = dict(kwargs)
    if source in FILE_BUILDERS:
        data_files, data_dir = kwargs.pop("data_files", None), kwargs.pop("data_dir", None)
        kwargs["data_files"] = local_files(source, data_files, data_dir, roots, allow_downloads)
        return Plan(source, source, kwargs, True)
    packaged: Any = getattr(importlib.import_module("datasets.packaged_modules"), "_PACKAGED_DATASETS_MODULES", {})
    if source in packaged:
        raise NotSupported(
            f'load_dataset: the "{source}" builder is not supported',
            hint=f"Local files load with the builders {', '.join(sorted(FILE_BUILDERS))}.",
        )
    if source.startswith(("hf://datasets/", "hf://buckets/")) and not pathlike(source[len("hf://") :]):
        target = source  # remote only: datasets never looks for a local directory of that name
    elif remote(source):
        raise denied_remote(source)
    elif pathlike(source):
        path = os.path.normpath(source) if os.path.isabs(source) else ""
        if path and roots.within(path) and roots.really_within(path):
            raise InvalidArgument(
                "load_dataset: a directory is not a source",
                hint="Name a file builder and the directory: source 'csv' (or json, parquet …) with kwargs"
                ' {"data_dir": "…"}.',
            )
        raise denied(source, roots)
    else:  # a hub id: never a directory relative to the proxy's working directory
        target = f"hf://datasets/{source}"
    if kwargs.get("data_files") is not None:  # paths inside the hub repository
        for patterns in split_patterns(kwargs["data_files"]).values():
            for pattern in patterns:
                repo_relative(pattern, roots, allow_downloads)
    if kwargs.get("data_dir") is not None:
        repo_relative(kwargs["data_dir"], roots, allow_downloads)
    return Plan(source, target, kwargs, False)


@contextmanager
def cache_dir(plan: Plan) -> Iterator[str | None]:
    """Local files are converted in a private temporary cache, gone after the call; hub datasets use the
    proxy's Hugging Face cache (downloads are kept)."""
    if not plan.local:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="pgml-dataset-", ignore_cleanup_errors=True) as path:
        yield path


def hf_module(allow_downloads: bool) -> Any:
    """``datasets``, with the hub switched off when downloads are not allowed (a miss then fails in ms).

    Offline mode is process-wide and stays on (``allow_downloads`` is engine configuration, fixed for the
    process); with downloads allowed nothing is changed, so an ``HF_HUB_OFFLINE`` set outside still holds.
    """
    if not allow_downloads:
        configure_offline(False)
    module: Any = importlib.import_module("datasets")
    if not allow_downloads:  # the flags are read at import: set them too in case it happened earlier
        hub_constants: Any = importlib.import_module("huggingface_hub.constants")
        hub_constants.HF_HUB_OFFLINE = True
        module.config.HF_HUB_OFFLINE = True
        module.config.HF_DATASETS_OFFLINE = True
    module.disable_progress_bars()
    return module


def load_hf(
    plan: Plan, subset: str | None, limit: int | None, cache_dir: str | None, allow_downloads: bool
) -> tuple[Columns, Rows]:
    module = hf_module(allow_downloads)
    call_kwargs = dict(plan.kwargs)
    if limit is not None:
        if "split" in call_kwargs:
            raise InvalidArgument(
                'load_dataset: give either "limit" or a "split" kwarg, not both',
                hint='A split can carry its own slice, e.g. {"split": "test[:100]"}.',
            )
        # datasets refuses an empty slice, so limit 0 reads one row for the schema and keeps none.
        call_kwargs["split"] = f"train[:{max(limit, 1)}]"
    if call_kwargs.get("streaming"):
        raise InvalidArgument("load_dataset: streaming datasets are not supported")
    if cache_dir is not None:
        call_kwargs["cache_dir"] = cache_dir
    try:
        result = module.load_dataset(plan.target, subset, **call_kwargs)
    except Exception as exc:
        raise _hf_error(exc, plan.source, allow_downloads) from exc
    splits = _splits(result, module)
    if limit == 0:
        splits = [split.select([]) for split in splits]
    return _hf_columns(splits), _hf_rows(splits)


def _hf_error(exc: Exception, source: str, allow_downloads: bool) -> EngineError:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, importlib.import_module("datasets.exceptions").DatasetNotFoundError):
        return UnknownModel(f'dataset "{source}" was not found', detail=text)
    if isinstance(exc, ConnectionError):
        if not allow_downloads or "OfflineModeIsEnabled" in text:  # HF_HUB_OFFLINE may also come from outside
            return UnknownModel(f'dataset "{source}" is not available offline', detail=text, hint=OFFLINE_HINT)
        return EngineError(f'dataset "{source}" could not be fetched from the Hugging Face Hub', detail=text)
    if isinstance(exc, TypeError | ValueError | FileNotFoundError):
        return InvalidArgument(f'load_dataset("{source}") rejected its arguments: {exc}', detail=text)
    root: BaseException = exc
    while root.__cause__ is not None or root.__context__ is not None:  # "error while generating" says little
        root = root.__cause__ or root.__context__ or root
    reason = (str(root).strip().splitlines() or [type(root).__name__])[-1]
    return EngineError(f'load_dataset("{source}") failed: {exc} ({reason})', detail=f"{text}\n{root!r}")


def _splits(result: Any, module: Any) -> list[Any]:
    if isinstance(result, module.Dataset):
        return [result]
    if isinstance(result, module.DatasetDict):
        return list(result.values())
    if isinstance(result, list) and all(isinstance(split, module.Dataset) for split in result):
        return result  # {"split": ["train", "test"]}
    raise InvalidArgument(f"load_dataset returned a {type(result).__name__}; only Dataset and DatasetDict load")


def _hf_columns(splits: list[Any]) -> Columns:
    columns: Columns | None = None
    for split in splits:
        these = tuple((str(name), _sql_type(str(name), feature)) for name, feature in split.features.items())
        if columns is not None and these != columns:
            raise InvalidArgument(
                "load_dataset: the splits have different columns and cannot share one table",
                detail=f"{list(columns)} versus {list(these)}",
                hint='Load one split with {"split": "<name>"}.',
            )
        columns = these
    return columns or ()


def _sql_type(column: str, feature: Any) -> str:
    if isinstance(feature, dict | list):
        return "jsonb"
    kind = type(feature).__name__
    if kind in HF_JSON_FEATURES:
        return "jsonb"
    if kind == "ClassLabel":
        return "bigint"  # stored as int64 class ids
    dtype = str(feature.dtype) if kind == "Value" else kind
    sql = HF_VALUE_TYPES.get(dtype) if kind == "Value" else None
    if sql is None:
        raise InvalidArgument(
            f'load_dataset: column "{column}" has the unsupported feature type {dtype}',
            detail=f"feature: {feature!r}",
            hint="Supported: string, dict/list, int8-64, float16-64 and bool features.",
        )
    return sql


def _hf_rows(splits: list[Any]) -> Iterable[tuple[Any, ...]]:
    for split in splits:
        names = list(split.column_names)
        for batch in split.iter(batch_size=1000):
            yield from zip(*(batch[name] for name in names), strict=True)
