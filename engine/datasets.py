"""``pgml.load_dataset``: turning a dataset source into a table definition and its rows.

Owns: the six built-in scikit-learn datasets (PostgresML's exact table and column
names, column order, SQL types and label conventions), loading any other source
through Hugging Face ``datasets.load_dataset`` (all splits concatenated, feature
dtypes mapped to SQL types), offline behaviour, the confinement of local files to
``[engine] data_dirs`` (every path resolved and checked before anything is opened),
and encoding rows in PostgreSQL COPY text format.

Must not: talk to a database or paste a value into SQL. :class:`TableData` gives
the statements (identifiers quoted) and the COPY payload; the caller runs them.
Must not open, list or create a path a client named outside ``data_dirs``, nor let
a client choose a cache or download location. Heavy libraries (scikit-learn,
datasets) are imported only when a load runs.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from engine.api import EngineError, InvalidArgument, NotSupported, PermissionDenied, UnknownModel
from engine.models import configure_offline
from engine.paths import Roots

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


def quote_ident(name: str) -> str:
    """Always double-quoted, embedded quotes doubled (case and spaces are kept)."""
    if not name:
        raise InvalidArgument("a table or column name must not be empty")
    if "\0" in name:
        raise InvalidArgument(f"the name {name!r} contains a NUL character")
    return '"' + name.replace('"', '""') + '"'


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
    _hf_module(allow_downloads)  # offline flags before anything imports datasets
    plan = _plan(source, kwargs, allow_downloads, Roots(data_dirs))
    with _cache_dir(plan) as cache_dir:  # rows are read lazily: encode them before the cache goes
        columns, rows = _load_hf(plan, subset, limit, cache_dir, allow_downloads)
        try:
            return _table(source, columns, rows, source)
        except EngineError:
            raise
        except Exception as exc:  # decoding rows happens lazily, inside datasets
            raise EngineError(f'load_dataset("{source}") failed while reading rows: {exc}') from exc


def _table(name: str, columns: Columns, rows: Rows, returned_name: str) -> TableData:
    data, count = encode_copy(columns, rows)
    return TableData(SCHEMA, name, columns, data, count, returned_name)


# --------------------------------------------------------------------------- #
# Built-ins (scikit-learn's bundled copies of PostgresML's embedded CSVs)
# --------------------------------------------------------------------------- #

_BC_FEATURES = (
    "radius",
    "texture",
    "perimeter",
    "area",
    "smoothness",
    "compactness",
    "concavity",
    "concave points",
    "symmetry",
    "fractal dimension",
)
BREAST_CANCER_FEATURES = (
    tuple(f"mean {f}" for f in _BC_FEATURES)
    + tuple(f"{f} error" for f in _BC_FEATURES)
    + tuple(f"worst {f}" for f in _BC_FEATURES)
)
DIABETES_FEATURES = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")
# Column -> sklearn feature name.
IRIS_FEATURES = {
    "sepal_length": "sepal length (cm)",
    "sepal_width": "sepal width (cm)",
    "petal_length": "petal length (cm)",
    "petal_width": "petal width (cm)",
}
# PostgresML's order: hue before color_intensity (sklearn has them the other way round).
WINE_FEATURES = (
    "alcohol",
    "malic_acid",
    "ash",
    "alcalinity_of_ash",
    "magnesium",
    "total_phenols",
    "flavanoids",
    "nonflavanoid_phenols",
    "proanthocyanins",
    "hue",
    "color_intensity",
    "od280/od315_of_diluted_wines",
    "proline",
)
LINNERUD_COLUMNS = ("chins", "situps", "jumps", "weight", "waist", "pulse")


def _bunch(loader: str, **kwargs: Any) -> Any:
    sk_datasets: Any = importlib.import_module("sklearn.datasets")
    return getattr(sk_datasets, loader)(**kwargs)


def _features(bunch: Any, wanted: dict[str, str], limit: int | None) -> list[list[float]]:
    """The rows of ``bunch.data`` restricted to ``wanted`` (column -> sklearn name), in ``wanted``'s order."""
    names = [str(n) for n in bunch.feature_names]
    missing = [sk for sk in wanted.values() if sk not in names]
    if missing:  # a scikit-learn release renamed something: better an error than shuffled columns
        raise EngineError(f"scikit-learn's dataset lacks the features {missing}")
    data = bunch.data[:limit, [names.index(sk) for sk in wanted.values()]]
    rows: list[list[float]] = data.tolist()
    return rows


def _real(names: Iterable[str]) -> Columns:
    return tuple((name, "real") for name in names)


def _labelled(features: Columns, x: list[list[float]], label: tuple[str, str], y: list[Any]) -> tuple[Columns, Rows]:
    return (*features, label), [(*row, value) for row, value in zip(x, y, strict=True)]


def _breast_cancer(limit: int | None) -> tuple[Columns, Rows]:
    bunch = _bunch("load_breast_cancer")
    x = _features(bunch, {n: n for n in BREAST_CANCER_FEATURES}, limit)
    malignant = (bunch.target[:limit] == 0).tolist()  # sklearn: 0 = malignant, 1 = benign
    return _labelled(_real(BREAST_CANCER_FEATURES), x, ("malignant", "boolean"), malignant)


def _diabetes(limit: int | None) -> tuple[Columns, Rows]:
    bunch = _bunch("load_diabetes", scaled=False)
    x = _features(bunch, {n: n for n in DIABETES_FEATURES}, limit)
    return _labelled(_real(DIABETES_FEATURES), x, ("target", "real"), bunch.target[:limit].tolist())


def _digits(limit: int | None) -> tuple[Columns, Rows]:
    bunch = _bunch("load_digits")
    images = bunch.images[:limit].astype("int16").tolist()  # 8x8, values 0..16
    target = bunch.target[:limit].tolist()
    return (("image", "smallint[][]"), ("target", "smallint")), list(zip(images, target, strict=True))


def _iris(limit: int | None) -> tuple[Columns, Rows]:
    bunch = _bunch("load_iris")
    x = _features(bunch, IRIS_FEATURES, limit)
    return _labelled(_real(IRIS_FEATURES), x, ("target", "integer"), bunch.target[:limit].tolist())


def _linnerud(limit: int | None) -> tuple[Columns, Rows]:
    bunch = _bunch("load_linnerud")  # data: Chins, Situps, Jumps; target: Weight, Waist, Pulse
    exercise = _features(bunch, {c: c.capitalize() for c in LINNERUD_COLUMNS[:3]}, limit)
    names = [str(n) for n in bunch.target_names]
    order = [names.index(c.capitalize()) for c in LINNERUD_COLUMNS[3:]]
    physiological = bunch.target[:limit, order].tolist()
    return _real(LINNERUD_COLUMNS), [(*x, *y) for x, y in zip(exercise, physiological, strict=True)]


def _wine(limit: int | None) -> tuple[Columns, Rows]:
    bunch = _bunch("load_wine")
    x = _features(bunch, {n: n for n in WINE_FEATURES}, limit)
    return _labelled(_real(WINE_FEATURES), x, ("target", "integer"), bunch.target[:limit].tolist())


BUILTINS: dict[str, Callable[[int | None], tuple[Columns, Rows]]] = {
    "breast_cancer": _breast_cancer,
    "diabetes": _diabetes,
    "digits": _digits,
    "iris": _iris,
    "linnerud": _linnerud,
    "wine": _wine,
}


# --------------------------------------------------------------------------- #
# Hugging Face datasets
# --------------------------------------------------------------------------- #

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
REMOTE_SCHEMES = frozenset({"http", "https", "hf"})  # fetched only with allow_downloads; never file://
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_MAGIC = re.compile(r"[*?\[]")  # glob characters (datasets resolves data_files with fsspec's glob)


@dataclass(frozen=True)
class _Plan:
    """What to hand ``datasets.load_dataset``: ``target`` and checked ``kwargs``; ``local``: a file builder."""

    source: str
    target: str
    kwargs: dict[str, Any]
    local: bool


def _plan(source: str, kwargs: dict[str, Any], allow_downloads: bool, roots: Roots) -> _Plan:
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
        kwargs["data_files"] = _local_files(source, data_files, data_dir, roots, allow_downloads)
        return _Plan(source, source, kwargs, True)
    packaged: Any = getattr(importlib.import_module("datasets.packaged_modules"), "_PACKAGED_DATASETS_MODULES", {})
    if source in packaged:
        raise NotSupported(
            f'load_dataset: the "{source}" builder is not supported',
            hint=f"Local files load with the builders {', '.join(sorted(FILE_BUILDERS))}.",
        )
    if source.startswith(("hf://datasets/", "hf://buckets/")) and not _pathlike(source[len("hf://") :]):
        target = source  # remote only: datasets never looks for a local directory of that name
    elif _remote(source):
        raise _denied_remote(source)
    elif _pathlike(source):
        path = os.path.normpath(source) if os.path.isabs(source) else ""
        if path and roots.within(path) and roots.really_within(path):
            raise InvalidArgument(
                "load_dataset: a directory is not a source",
                hint="Name a file builder and the directory: source 'csv' (or json, parquet …) with kwargs"
                ' {"data_dir": "…"}.',
            )
        raise _denied(source, roots)
    else:  # a hub id: never a directory relative to the proxy's working directory
        target = f"hf://datasets/{source}"
    if kwargs.get("data_files") is not None:  # paths inside the hub repository
        for patterns in _split_patterns(kwargs["data_files"]).values():
            for pattern in patterns:
                _repo_relative(pattern, roots, allow_downloads)
    if kwargs.get("data_dir") is not None:
        _repo_relative(kwargs["data_dir"], roots, allow_downloads)
    return _Plan(source, target, kwargs, False)


def _remote(text: str) -> bool:
    return bool(_URL.match(text)) or "::" in text  # ``::`` chains fsspec file systems (zip://…::/path)


def _pathlike(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or "\\" in text or any(s in ("", ".", "..") for s in text.split("/"))


def _remote_allowed(text: str, allow_downloads: bool) -> None:
    scheme = text.split(":", 1)[0].lower()
    if not allow_downloads or "::" in text or not _URL.match(text) or scheme not in REMOTE_SCHEMES:
        raise _denied_remote(text)


def _repo_relative(text: Any, roots: Roots, allow_downloads: bool) -> None:
    """A hub dataset's data_files / data_dir: paths inside its repository, or (with downloads) a URL."""
    if not isinstance(text, str) or not text or "\0" in text:
        raise InvalidArgument("load_dataset: data_files and data_dir must be non-empty paths")
    if _remote(text):
        _remote_allowed(text, allow_downloads)
    elif _pathlike(text):
        raise _denied(text, roots)


def _split_patterns(value: Any) -> dict[str, list[str]]:
    """``data_files`` in each form datasets takes, as split -> patterns."""
    bad = InvalidArgument(
        "load_dataset: data_files must be a path, a list of paths, an object of split -> path(s),"
        ' or a list of {"split": …, "path": …} objects'
    )

    def paths(item: Any) -> list[str]:
        items = [item] if isinstance(item, str) else item
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise bad
        return list(items)

    out: dict[str, list[str]] = {}
    if isinstance(value, str):
        out["train"] = [value]
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for entry in value:
            if set(entry) != {"split", "path"} or not isinstance(entry["split"], str) or entry["split"] in out:
                raise bad
            out[entry["split"]] = paths(entry["path"])
    elif isinstance(value, list):
        out["train"] = paths(value)
    elif isinstance(value, dict):
        out = {str(split): paths(item) for split, item in value.items()}
    else:
        raise bad
    if not out or not all(out.values()):
        raise InvalidArgument("load_dataset: data_files must name at least one file")
    return out


def _confine(text: Any, base: str | None, roots: Roots) -> str:
    """``text`` (a path or glob; relative: to ``base``) as an absolute normalized pattern under ``roots``.

    Decided by the text and by resolving symbolic links (``realpath`` also resolves missing paths), so a
    path outside gets the same answer whether it exists or not; nothing outside is opened or listed.
    """
    if not isinstance(text, str) or not text:
        raise InvalidArgument("load_dataset: a path must be a non-empty string")
    if "\0" in text:
        raise InvalidArgument("load_dataset: a path must not contain NUL characters")
    if text.startswith("~") or "\\" in text or (base is None and not os.path.isabs(text)):
        raise _denied(text, roots)
    path = os.path.normpath(text if os.path.isabs(text) else os.path.join(base or "", text))
    if not roots.within(path):
        raise _denied(text, roots)
    parts = path.split(os.sep)
    static = next((i for i, part in enumerate(parts) if _MAGIC.search(part)), len(parts))
    head = os.sep.join(parts[:static]) or os.sep  # the part of a glob before its first wildcard
    if not roots.really_within(head):
        raise _denied(text, roots)
    return path


def _local_files(source: str, data_files: Any, data_dir: Any, roots: Roots, allow_downloads: bool) -> Any:
    """The files a file builder reads, resolved and checked, as a DataFilesDict datasets uses as is."""
    data_files_module: Any = importlib.import_module("datasets.data_files")
    DataFilesDict, DataFilesList = data_files_module.DataFilesDict, data_files_module.DataFilesList
    base = roots.base
    if data_dir is not None:
        if isinstance(data_dir, str) and _remote(data_dir):
            raise _denied_remote(data_dir)
        if isinstance(data_dir, str) and _MAGIC.search(data_dir):
            raise InvalidArgument("load_dataset: data_dir must not contain wildcards")
        base = _confine(data_dir, base, roots)
    entries: dict[str, list[tuple[str, str]]] = {}  # split -> (pattern, as the client wrote it)
    if data_files is not None:
        for split, patterns in _split_patterns(data_files).items():
            entries[split] = []
            for pattern in patterns:
                if _remote(pattern):
                    _remote_allowed(pattern, allow_downloads)
                    entries[split].append((pattern, pattern))
                else:
                    entries[split].append((_confine(pattern, base, roots), pattern))
    elif data_dir is not None and base is not None:
        try:  # datasets' own layout rules (train/test file and directory names) inside the checked directory
            found = data_files_module.get_data_patterns(base)
        except Exception as exc:
            raise InvalidArgument(f'load_dataset: no data files in "{data_dir}"', detail=str(exc)) from exc
        entries = {str(split): [(os.path.join(base, p), str(data_dir)) for p in ps] for split, ps in found.items()}
    else:
        raise InvalidArgument(
            f'load_dataset("{source}") needs the files to read',
            hint='Give kwargs {"data_files": "file.csv"} (relative to the first of [engine] data_dirs)'
            ' or {"data_dir": "…"}.',
        )
    out = DataFilesDict()
    for split, items in entries.items():
        files = DataFilesList([], [])
        for pattern, shown in items:
            if _remote(pattern):
                files = files + DataFilesList.from_patterns([pattern])  # (+= would drop origin_metadata)
            else:
                files = files + _matches(pattern, shown, roots)
        if not files:
            names = ", ".join(dict.fromkeys(f'"{shown}"' for _, shown in items))
            raise InvalidArgument(f'load_dataset: no file matches {names} (split "{split}")')
        out[split] = files
    return out


def _matches(pattern: str, shown: str, roots: Roots) -> Any:
    """The files ``pattern`` (checked by :func:`_confine`) matches, each resolved and checked again."""
    DataFilesList: Any = importlib.import_module("datasets.data_files").DataFilesList
    try:
        found = DataFilesList.from_patterns([pattern], base_path=os.sep)
    except FileNotFoundError as exc:
        raise InvalidArgument(f'load_dataset: no file "{shown}"') from exc
    real: list[str] = []
    for path in found:
        if not roots.really_within(path):  # a symbolic link inside a data directory that leads out
            raise _denied(shown, roots)
        real.append(os.path.realpath(path))  # what datasets opens: no link is followed after the check
    try:
        return DataFilesList(real, [(str(os.path.getmtime(path)),) for path in real])
    except OSError as exc:
        raise InvalidArgument(f'load_dataset: cannot read "{shown}"') from exc


def _denied(shown: str, roots: Roots) -> PermissionDenied:
    none = "" if roots.real else ", and none are configured"
    return PermissionDenied(
        f'load_dataset: permission denied to read "{shown}"',
        detail=f"pgml-proxy reads local files only inside its [engine] data_dirs{none}; paths that leave them"
        " (absolute paths elsewhere, `..`, `~`, symbolic links leading out) are refused.",
        hint="Ask an administrator to put the file in a data directory, and name it relative to the first one,"
        ' e.g. {"data_files": "houses.csv"}.',
    )


def _denied_remote(shown: str) -> PermissionDenied:
    return PermissionDenied(
        f'load_dataset: permission denied to fetch "{shown}"',
        detail="Remote files are fetched only with [engine] allow_downloads, and only over http(s):// or hf://"
        " (never file:// or chained fsspec URLs).",
    )


@contextmanager
def _cache_dir(plan: _Plan) -> Iterator[str | None]:
    """Local files are converted in a private temporary cache, gone after the call; hub datasets use the
    proxy's Hugging Face cache (downloads are kept)."""
    if not plan.local:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="pgml-dataset-", ignore_cleanup_errors=True) as path:
        yield path


def _hf_module(allow_downloads: bool) -> Any:
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


def _load_hf(
    plan: _Plan, subset: str | None, limit: int | None, cache_dir: str | None, allow_downloads: bool
) -> tuple[Columns, Rows]:
    module = _hf_module(allow_downloads)
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


# --------------------------------------------------------------------------- #
# COPY text format
# --------------------------------------------------------------------------- #

_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})
_ARRAY_SPECIAL = frozenset('{}",\\ \t\n\r\v\f')


def encode_copy(columns: Columns, rows: Rows) -> tuple[bytes, int]:
    """Rows as PostgreSQL COPY text (one line per row, ``\\N`` for NULL) and how many there were."""
    encoders = [_encoder(name, type_) for name, type_ in columns]
    lines: list[str] = []
    for row in rows:
        fields = ("\\N" if value is None else encode(value) for encode, value in zip(encoders, row, strict=True))
        lines.append("\t".join(fields) + "\n")
    return "".join(lines).encode(), len(lines)


def _encoder(column: str, type_: str) -> Callable[[Any], str]:
    """A function from a non-NULL value to its COPY field (escaped where the text can hold specials)."""
    formatter = _formatter(column, type_)
    if type_ in ("text", "jsonb") or type_.endswith("]"):
        return lambda value: formatter(value).translate(_COPY_ESCAPES)
    return formatter


def _formatter(column: str, type_: str) -> Callable[[Any], str]:
    """A function from a non-NULL value to PostgreSQL's input text for ``type_``."""
    if type_.endswith("]"):
        element = _formatter(column, type_.split("[", 1)[0])
        return lambda value: _array_literal(value, element)
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


def _array_literal(value: Any, element: Callable[[Any], str]) -> str:
    """A PostgreSQL array literal, ``{1,2}`` or ``{{1,2},{3,4}}``, elements quoted where needed."""
    if isinstance(value, list | tuple):
        return "{" + ",".join(_array_literal(v, element) for v in value) + "}"
    if value is None:
        return "NULL"
    text = element(value)
    if text == "" or text.upper() == "NULL" or any(c in _ARRAY_SPECIAL for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text
