"""ONNX Runtime in place of PyTorch for sentence-transformers embeddings (``[engine] embed_backend = "onnx"``).

Owns: exporting the transformer of a loaded ``SentenceTransformer`` to ONNX (torch's dynamo exporter, then
onnxscript's ONNX Runtime fusions: attention, skip layer norm, GELU), the export cache under ``[engine]
onnx_cache_dir`` (one file per model version and loading kwargs, written atomically, reused by later loads
and later processes), and :class:`OnnxTransformer`, which runs the exported graph with ONNX Runtime in the
transformer's place, so tokenization, pooling, normalization and every ``encode()`` kwarg stay
sentence-transformers' own.

Must not: resolve or confine model names (``engine.nlp.embed`` hands it a resolved, confined path), write
anywhere but the cache directory, or be imported before a model load needs it (it imports torch and ONNX
Runtime: ``engine.nlp.embed`` imports it lazily and turns a missing package into 0A000).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx_ir
import onnxruntime
import onnxscript
import torch
from onnxscript.rewriter.ort_fusions import optimize_for_ort

from engine.api import EngineConfig, EngineError, NotSupported
from engine.runtime.cache import model_bytes

log = logging.getLogger(__name__)

# Bumped when the exported graph changes for the same model (exporter options, fusions): old files are then
# ignored, never loaded in the wrong shape.
EXPORT_FORMAT = 1
SUFFIX = ".onnx"
TORCH_HINT = 'Set [engine] embed_backend = "torch" to embed this model with PyTorch.'


def cache_root(config: EngineConfig) -> Path:
    """Where exports live: ``[engine] onnx_cache_dir``, else ``$XDG_CACHE_HOME/pgml-proxy/onnx``."""
    if config.onnx_cache_dir:
        return Path(config.onnx_cache_dir).absolute()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base).absolute() / "pgml-proxy" / "onnx"


def attach(encoder: Any, path: str, init: dict[str, Any], config: EngineConfig) -> None:
    """Put ONNX Runtime in place of the PyTorch transformer of ``encoder`` (loaded on the CPU from ``path``
    with ``init``), exporting it into the cache first unless an export of this model version is there."""
    transformer = _transformer(encoder)
    file = cache_root(config) / (export_key(path, init) + SUFFIX)
    if not file.is_file():
        _export(transformer, file)
    transformer.model = OnnxTransformer(_session(file), transformer.model.config, _input_names(transformer))
    encoder.nbytes = file.stat().st_size + model_bytes(encoder)  # what the model cache counts


def export_key(path: str, init: dict[str, Any]) -> str:
    """The export's file name: a digest of the model's files (names, sizes, mtimes), the loading kwargs and
    the exporter's versions, so a changed model or exporter gets a new export."""
    root = Path(path)
    files = sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()
    )
    identity = {
        "format": EXPORT_FORMAT,
        "torch": torch.__version__,
        "onnxscript": onnxscript.__version__,
        "path": os.path.realpath(path),
        "files": files,
        "init": init,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:40]


class OnnxTransformer(torch.nn.Module):
    """The exported graph of a Hugging Face encoder, called as sentence-transformers calls the model it
    replaces: token tensors in, ``{"last_hidden_state": tensor}`` out (CPU tensors sharing ONNX Runtime's
    output buffer)."""

    def __init__(self, session: Any, config: Any, input_names: tuple[str, ...]) -> None:
        super().__init__()
        self.session = session
        self.config = config
        self.input_names = input_names
        self.device = torch.device("cpu")

    def forward(self, **features: Any) -> dict[str, torch.Tensor]:
        feed = {name: features[name].numpy() for name in self.input_names}
        (hidden,) = self.session.run(None, feed)
        return {"last_hidden_state": torch.from_numpy(hidden)}


def _transformer(encoder: Any) -> Any:
    """The first module of ``encoder`` when it is a text transformer whose forward gives token embeddings."""
    from sentence_transformers.base.modules.transformer import Transformer  # lazy: part of the model load

    first = encoder[0] if len(encoder) else None
    text = getattr(first, "modality_config", {}).get("text", {}) if isinstance(first, Transformer) else {}
    if text.get("method") != "forward" or text.get("method_output_name") != "last_hidden_state":
        raise NotSupported(
            "the ONNX embedding backend supports only sentence-transformers models that start with a text"
            " Transformer module",
            hint=TORCH_HINT,
        )
    return first


def _input_names(transformer: Any) -> tuple[str, ...]:
    """The tokenizer outputs the model's forward takes, in the tokenizer's order (the graph's inputs)."""
    accepted = inspect.signature(transformer.model.forward).parameters
    return tuple(name for name in transformer.tokenizer.model_input_names if name in accepted)


class _Wrapped(torch.nn.Module):
    """The Hugging Face model with positional token inputs and one output, as the exporter wants it."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        output = self.model(**dict(zip(self.names, tensors, strict=True)), return_dict=True)
        return output.last_hidden_state  # type: ignore[no-any-return]


def _export(transformer: Any, file: Path) -> None:
    """Export ``transformer``'s model to ``file`` (a temporary file in its directory first, then renamed:
    a concurrent load sees a whole file or none)."""
    started = time.monotonic()
    names = _input_names(transformer)
    # Two texts of different lengths: batch and sequence dimensions of size >= 2 stay symbolic.
    sample = transformer.tokenizer(["a b c d", "a"], padding=True, return_tensors="pt")
    dims = {"batch": torch.export.Dim("batch"), "sequence": torch.export.Dim("sequence")}
    shapes = {"tensors": tuple({0: dims["batch"], 1: dims["sequence"]} for _ in names)}
    try:
        file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with torch.no_grad(), _quiet():
            program = torch.onnx.export(
                _Wrapped(transformer.model, names).eval(),
                tuple(sample[name] for name in names),
                input_names=list(names),
                output_names=["last_hidden_state"],
                dynamo=True,
                dynamic_shapes=shapes,
                external_data=False,
                verbose=False,
            )
            assert program is not None
            model, _ = optimize_for_ort(onnx_ir.from_proto(program.model_proto))
        fd, partial = tempfile.mkstemp(prefix=file.stem, suffix=".partial", dir=file.parent)
        os.close(fd)
        try:
            onnx_ir.save(model, partial)
            os.replace(partial, file)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    except OSError as exc:
        raise EngineError(
            f"could not write the ONNX export to the cache directory: {exc.strerror}",
            hint="Set [engine] onnx_cache_dir to a directory the proxy can write.",
        ) from exc
    except Exception as exc:  # the exporter's own errors: an architecture it cannot trace
        raise NotSupported(f"could not export the model to ONNX: {exc}", hint=TORCH_HINT) from exc
    log.info("exported a model to ONNX in %.1f s (%s)", time.monotonic() - started, file.name)


# The exporter's and the graph passes' loggers: one line per rewrite at INFO, the torchvision ops they skip.
_CHATTY_LOGGERS = ("torch.onnx", "torch.export", "onnx_ir", "onnxscript")


@contextmanager
def _quiet() -> Iterator[None]:
    """No exporter chatter in the proxy's log: its loggers at WARNING (ERROR for torch's, which warns
    about missing torchvision ops) and its Python warnings (deprecations inside torch.export) dropped,
    for the duration of an export (once per model version)."""
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if name.startswith("torch") else logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _session(file: Path) -> Any:
    """An ONNX Runtime CPU session for ``file``: every graph optimization, as many threads as torch uses, and
    threads that sleep between runs instead of spinning (the event loop, the server and other sessions'
    calls share these cores; bench/onnx_embed.py measures both)."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
