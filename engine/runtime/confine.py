"""What a client's loading kwargs and generation args may say.

Owns: :func:`confine_kwargs` (locations the proxy owns refused; other models named only through the allow-list
:data:`MODEL_KWARGS`, each resolved inside the model directories and permitted like the model, every other kwarg
that names a model, processor, file or code refused; ``trust_remote_code`` at any depth only with ``[engine]
trust_remote_code`` and — for transform and transform_stream, as in PostgresML — the session's PostgresML
settings, for every model named; pickle-loading overrides refused), :func:`permit_remote_code` (the session's
side of that, as PostgresML decides it), :func:`refuse_unsupported_loading` (bitsandbytes quantized
loading and GGML weights through ctransformers, which PostgresML offers and nothing here runs: 0A000) and
:func:`generation_kwargs` (no ``generate`` argument that loads or runs code, models or files).

Must not: load models or decide where a model is (``engine.runtime.locate`` does).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from engine.api import EngineConfig, InvalidArgument, NotSupported, PermissionDenied, SessionSettings
from engine.runtime.locate import plain_name, resolve

# Loading kwargs (pipeline, from_pretrained, sentence-transformers) that name the proxy's own cache, offload
# and download locations or its network: a client never chooses them.
OWNED_KWARGS = frozenset({"cache_dir", "cache_folder", "offload_folder", "local_dir", "proxies"})
# The only loading kwargs that may name another model (the pipeline's tokenizer, config, processors): each a name,
# resolved inside the model directories and permitted like the model (allow-lists, remote code).
MODEL_KWARGS = frozenset(
    {"tokenizer", "config", "feature_extractor", "image_processor", "video_processor", "processor"}
)
# Loading kwargs naming a file or folder inside the model: plain names only (no way out of it).
INNER_KWARGS = frozenset({"subfolder", "gguf_file"})
# Dicts of loading kwargs (for the model, tokenizer, config, processor, adapter): confined as the top level.
NESTED_KWARGS = frozenset({"model_kwargs", "tokenizer_kwargs", "config_kwargs", "processor_kwargs", "adapter_kwargs"})
# Loading kwargs that would load a model, code or files past every check (the assistant model of assisted
# generation; hub kernels; a PEFT adapter's path; pipeline_class and decoder objects): refused (22023).
LOADING_REFUSED = frozenset(
    {"assistant_model", "assistant_tokenizer", "_adapter_model_path", "use_kernels", "kernel_config",
     "allow_all_kernels", "pipeline_class", "decoder"}
)  # fmt: skip
# Any other loading kwarg whose name says it names a model, processor, file or code: refused (22023), so a kwarg
# a later transformers adds cannot name one unchecked. Settings whose names read so are listed.
_NAMES_SOMETHING = re.compile(
    r"(?:^|_)(?:models?|tokenizers?|processors?|extractors?|configs?|adapters?|kernels?|decoders?|files?|paths?"
    r"|dirs?|folders?|repos?|code|class)$"
)
NAMING_SETTINGS = frozenset({"quantization_config", "trust_remote_code"})


REMOTE_CODE_HINT = "Set [engine] trust_remote_code = true to run code shipped with models."


def _unsafe_loading(key: str, value: Any) -> bool:
    """An override that lets a pickle-based loader run (``weights_only`` anything but true,
    ``use_safetensors`` false)."""
    if key == "weights_only":
        return value is not True
    return key == "use_safetensors" and value is not None and not value


Permit = Callable[[str], None]  # raises unless the caller's allow-lists let the named model load


def confine_kwargs(
    init: dict[str, Any],
    config: EngineConfig,
    settings: SessionSettings | None = None,
    model: str = "",
    permit: Permit | None = None,
) -> dict[str, Any]:
    """``init`` with every location in it checked: owned ones refused (42501); another model named only through
    :data:`MODEL_KWARGS` (a name, resolved inside the model directories, passed to ``permit`` like ``model``),
    any other kwarg that names a model, processor, file or code refused (22023); ``trust_remote_code`` at any
    depth refused (22023) unless ``[engine] trust_remote_code``, then (42501) unless the session's settings trust
    ``model`` and every model named (:func:`permit_remote_code`), and passed explicitly at the top (never left to a
    library default); pickle-loading overrides refused (22023)."""
    wants = _refuse_unsafe(init, config.trust_remote_code)
    if wants:
        permit_remote_code(model, settings)

    def check(name: str) -> None:
        if permit is not None:
            permit(name)
        if wants:
            permit_remote_code(name, settings)

    out = _confine(init, config, check)
    out["trust_remote_code"] = bool(init.get("trust_remote_code", False))
    return out


def permit_remote_code(model: str, settings: SessionSettings | None) -> None:
    """Code shipped with ``model`` may run for this session (``[engine] trust_remote_code`` allowed it already): as
    PostgresML, ``pgml.huggingface_trust_remote_code`` on (its default is off) and ``model`` in
    ``pgml.huggingface_trust_remote_code_whitelist`` unless that is empty; else 42501. ``settings`` None: a call
    with no session (nothing to narrow)."""
    if settings is None:
        return
    trusted = settings.trust_remote_code_whitelist
    if not settings.trust_remote_code or (trusted and model not in trusted):
        raise PermissionDenied(  # PostgresML's message
            f"model {model} is not trusted to run remote code",
            hint=f"Consider setting pgml.huggingface_trust_remote_code = 'true' or adding {model} to"
            " pgml.huggingface_trust_remote_code_whitelist",
        )


def _items(value: Any) -> Iterator[tuple[Any, Any]]:
    """Every (key, value) pair of the dicts in ``value``, at any depth of dicts and lists."""
    if isinstance(value, list):
        for item in value:
            yield from _items(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key, item
            yield from _items(item)


def _refuse_unsafe(value: Any, remote_code: bool) -> bool:
    """Refuse code-loading and pickle-loading kwargs anywhere in ``value``; whether it asks for remote code."""
    wants = False
    for key, item in _items(value):
        if key == "trust_remote_code" and item not in (None, False):
            if not remote_code:
                raise InvalidArgument("trust_remote_code is not allowed", hint=REMOTE_CODE_HINT)
            wants = True
        if _unsafe_loading(key, item):
            raise InvalidArgument(
                f'the kwarg "{key}" cannot be overridden',
                detail="pgml-proxy loads model weights only from formats that cannot run code.",
                hint=f'Remove "{key}" from the kwargs.',
            )
    return wants


def _confine(init: dict[str, Any], config: EngineConfig, check: Permit, top: bool = True) -> dict[str, Any]:
    out = dict(init)
    for key, value in init.items():
        if key in OWNED_KWARGS:
            raise PermissionDenied(
                f'the kwarg "{key}" is not allowed',
                detail="pgml-proxy owns its model cache, offload and download locations.",
                hint=f'Remove "{key}" from the kwargs.',
            )
        if key in MODEL_KWARGS:
            out[key] = _named_model(key, value, config, check)
        elif key in INNER_KWARGS:
            if value is not None and not (isinstance(value, str) and plain_name(value)):
                raise InvalidArgument(f'"{key}" must name a file or folder inside the model (no path syntax)')
        elif key in NESTED_KWARGS:
            if value is not None and not isinstance(value, dict):
                raise InvalidArgument(f'the kwarg "{key}" must be a JSON object')
            out[key] = _confine(value, config, check, top=False) if value is not None else None
        elif _names_something(key, top):
            raise InvalidArgument(
                f'the kwarg "{key}" is not allowed',
                detail="Loading kwargs cannot load other models, code or files; another model is named only"
                f" as {', '.join(sorted(MODEL_KWARGS))}, and is checked like the model.",
                hint=f'Remove "{key}" from the kwargs.',
            )
    return out


def _named_model(key: str, value: Any, config: EngineConfig, check: Permit) -> str | None:
    """The resolved location of the model that ``key`` names, once ``check`` lets it load."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f'the kwarg "{key}" must name a model (a string)')
    check(value)  # before anything is looked up, as for the model
    return resolve(value, config)


def _names_something(key: str, top: bool) -> bool:
    """``key`` loads something past the checks: :data:`LOADING_REFUSED`, a ``generate`` argument that does
    (:data:`GENERATE_REFUSED`), or a name that reads as naming a model, processor, file or code (GGML's kwargs
    at the top are left to :func:`refuse_unsupported_loading`, 0A000)."""
    if key in LOADING_REFUSED or (key in GENERATE_REFUSED and key != "trust_remote_code"):
        return True
    if key in NAMING_SETTINGS or (top and key in GGML_KWARGS):
        return False
    return bool(_NAMES_SOMETHING.search(key))


# Loading kwargs of PostgresML's ctransformers pipeline (GGML weights): model_file names the weights file in the
# repository, model_type its architecture; lib picks ctransformers' native library.
GGML_KWARGS = ("model_file", "model_type", "lib")
GGML_HINT = (
    "GGML weights need ctransformers, which pgml-proxy does not run. Use the model's transformers version"
    ' (safetensors), or a GGUF file of it: {"model": "<repo>", "gguf_file": "<file>.gguf"}.'
)


def refuse_unsupported_loading(name: str, init: dict[str, Any]) -> None:
    """0A000 for what PostgresML loads and this engine cannot: ``load_in_4bit`` / ``load_in_8bit`` (bitsandbytes;
    transformers 5 takes them only as a BitsAndBytesConfig, and it needs CUDA) and GGML models (a name with
    ``-ggml``, or ctransformers' ``model_file`` / ``model_type``; PostgresML sends names with ``-gguf`` there too,
    which transformers reads itself given ``gguf_file``)."""
    nested: dict[str, Any] = init["model_kwargs"] if isinstance(init.get("model_kwargs"), dict) else {}
    for flag in ("load_in_4bit", "load_in_8bit"):
        if init.get(flag) or nested.get(flag):
            raise NotSupported(
                f'"{flag}": quantized loading with bitsandbytes is not supported by pgml-proxy',
                hint="Remove the flag to load the model in full precision, or use a pre-quantized model.",
            )
    given = [key for key in GGML_KWARGS if key in init]
    if "-ggml" in name.lower() or given:
        what = f'the kwarg "{given[0]}"' if given else f'model "{name}"'
        raise NotSupported(f"{what}: GGML models (ctransformers) are not supported by pgml-proxy", hint=GGML_HINT)


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
