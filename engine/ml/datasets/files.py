"""Local files a ``load_dataset`` file builder may read: every path confined to ``[engine] data_dirs``.

Owns: the ``data_files`` / ``data_dir`` forms ``datasets`` takes, resolving and checking each path and
glob before anything is opened (an answer that does not depend on what exists outside), the files as a
``DataFilesDict`` ``datasets`` uses as is (no link followed after the check), and remote URLs (only with
``allow_downloads``, only http(s):// or hf://).

Must not: open, list or create a path a client named outside ``data_dirs``; import ``datasets`` at
import time (its ``data_files`` module is imported when a load runs).
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Any

from engine.api import InvalidArgument, PermissionDenied
from engine.runtime.paths import Roots

REMOTE_SCHEMES = frozenset({"http", "https", "hf"})  # fetched only with allow_downloads; never file://
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_MAGIC = re.compile(r"[*?\[]")  # glob characters (datasets resolves data_files with fsspec's glob)


def remote(text: str) -> bool:
    return bool(_URL.match(text)) or "::" in text  # ``::`` chains fsspec file systems (zip://…::/path)


def pathlike(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or "\\" in text or any(s in ("", ".", "..") for s in text.split("/"))


def _remote_allowed(text: str, allow_downloads: bool) -> None:
    scheme = text.split(":", 1)[0].lower()
    if not allow_downloads or "::" in text or not _URL.match(text) or scheme not in REMOTE_SCHEMES:
        raise denied_remote(text)


def repo_relative(text: Any, roots: Roots, allow_downloads: bool) -> None:
    """A hub dataset's data_files / data_dir: paths inside its repository, or (with downloads) a URL."""
    if not isinstance(text, str) or not text or "\0" in text:
        raise InvalidArgument("load_dataset: data_files and data_dir must be non-empty paths")
    if remote(text):
        _remote_allowed(text, allow_downloads)
    elif pathlike(text):
        raise denied(text, roots)


def split_patterns(value: Any) -> dict[str, list[str]]:
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
        raise denied(text, roots)
    path = os.path.normpath(text if os.path.isabs(text) else os.path.join(base or "", text))
    if not roots.within(path):
        raise denied(text, roots)
    parts = path.split(os.sep)
    static = next((i for i, part in enumerate(parts) if _MAGIC.search(part)), len(parts))
    head = os.sep.join(parts[:static]) or os.sep  # the part of a glob before its first wildcard
    if not roots.really_within(head):
        raise denied(text, roots)
    return path


def local_files(source: str, data_files: Any, data_dir: Any, roots: Roots, allow_downloads: bool) -> Any:
    """The files a file builder reads, resolved and checked, as a DataFilesDict datasets uses as is."""
    data_files_module: Any = importlib.import_module("datasets.data_files")
    DataFilesDict, DataFilesList = data_files_module.DataFilesDict, data_files_module.DataFilesList
    base = roots.base
    if data_dir is not None:
        if isinstance(data_dir, str) and remote(data_dir):
            raise denied_remote(data_dir)
        if isinstance(data_dir, str) and _MAGIC.search(data_dir):
            raise InvalidArgument("load_dataset: data_dir must not contain wildcards")
        base = _confine(data_dir, base, roots)
    entries: dict[str, list[tuple[str, str]]] = {}  # split -> (pattern, as the client wrote it)
    if data_files is not None:
        for split, patterns in split_patterns(data_files).items():
            entries[split] = []
            for pattern in patterns:
                if remote(pattern):
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
            if remote(pattern):
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
            raise denied(shown, roots)
        real.append(os.path.realpath(path))  # what datasets opens: no link is followed after the check
    try:
        return DataFilesList(real, [(str(os.path.getmtime(path)),) for path in real])
    except OSError as exc:
        raise InvalidArgument(f'load_dataset: cannot read "{shown}"') from exc


def denied(shown: str, roots: Roots) -> PermissionDenied:
    none = "" if roots.real else ", and none are configured"
    return PermissionDenied(
        f'load_dataset: permission denied to read "{shown}"',
        detail=f"pgml-proxy reads local files only inside its [engine] data_dirs{none}; paths that leave them"
        " (absolute paths elsewhere, `..`, `~`, symbolic links leading out) are refused.",
        hint="Ask an administrator to put the file in a data directory, and name it relative to the first one,"
        ' e.g. {"data_files": "houses.csv"}.',
    )


def denied_remote(shown: str) -> PermissionDenied:
    return PermissionDenied(
        f'load_dataset: permission denied to fetch "{shown}"',
        detail="Remote files are fetched only with [engine] allow_downloads, and only over http(s):// or hf://"
        " (never file:// or chained fsspec URLs).",
    )
