"""Batched ``generate`` for ``pgml.transform`` (seq2seq tasks and the chat form), and the one ``model.generate``
call every generating path of the engine makes (:func:`model_generate`).

Owns: tokenizing a batch (translation tokenizers get ``src_lang`` / ``tgt_lang``), the batches of a call
(at most ``batch_size`` sequences each, a cancel checkpoint between them), decoding and cutting each
output at its first stop string, the chat form's prompts, and what a failed ``generate`` means for the
client.

Must not: load, resolve or cache models, or check permissions (``engine.nlp.tasks`` does); map client
generation args (``engine.nlp.generation_args`` does: functions here take its GenerationArgs); import ML
libraries at import time. Every function takes an already loaded model and tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from engine.api import EngineError, InvalidArgument
from engine.nlp.decoding import stopping
from engine.nlp.generation_args import GenerationArgs
from engine.runtime.context import Context

# Keyword arguments of the old HF pipelines that are not ``generate`` arguments.
DECODE_DEFAULTS = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
# The args :func:`generate_batches` and :func:`encode` take themselves (all others go to ``generate``).
OWN_ARGS = frozenset({"batch_size", "truncation", "add_special_tokens", "src_lang", "tgt_lang", *DECODE_DEFAULTS})


def model_generate(model: Any, inputs: Any, call: dict[str, Any], *checks: Callable[[], bool], **extra: Any) -> Any:
    """``model.generate`` on tokenized ``inputs`` with ``call`` (``GenerationArgs.call_kwargs``: its stopping
    criteria are kept), every sequence stopping once one of ``checks`` says so (a cancel flag's ``is_set``)."""
    import torch  # lazy: seconds to import; the engine imports without it

    call = dict(call)
    criteria = stopping(*checks, more=call.pop("stopping_criteria", ()))
    with torch.inference_mode():
        return model.generate(**inputs, stopping_criteria=criteria, **call, **extra)


def generate_error(exc: Exception) -> EngineError:
    """A failed ``generate``: bad arguments (22023) or the model's own failure."""
    if isinstance(exc, (TypeError, ValueError)):
        return InvalidArgument(f"invalid generation args: {exc}")
    return EngineError(f"text generation failed: {type(exc).__name__}: {exc}")


def encode(tokenizer: Any, texts: list[str], kwargs: dict[str, Any], **options: Any) -> Any:
    """Tokenize a batch (padded); translation tokenizers (NLLB, M2M, mBART) get src_lang/tgt_lang as HF did."""
    src, tgt = kwargs.pop("src_lang", None), kwargs.pop("tgt_lang", None)
    build = getattr(tokenizer, "_build_translation_inputs", None)
    if build is not None and src is not None and tgt is not None:
        options.pop("add_special_tokens", None)  # it adds them itself
        return build(texts, return_tensors="pt", src_lang=src, tgt_lang=tgt, padding=True, **options)
    if src is not None or tgt is not None:
        raise InvalidArgument("src_lang / tgt_lang need a multilingual translation model (NLLB, M2M100, mBART)")
    return tokenizer(texts, return_tensors="pt", padding=True, **options)


def generate_batches(
    model: Any, tokenizer: Any, texts: list[str], args: GenerationArgs, ctx: Context, *, new_only: bool
) -> list[list[str]]:
    """Per text, its ``num_return_sequences`` decoded outputs, each cut at its first stop string; ``new_only``
    drops a decoder-only model's prompt.

    Texts go through in batches of at most ``batch_size`` sequences (kwarg, at most ``[engine] batch_size``;
    ``n`` sequences per text); a cancel stops the current batch after its next decoding step.
    """
    kwargs = dict(args.kwargs)
    batch = args.per_call(ctx.batch_size(kwargs.pop("batch_size", None)))
    decode = {key: kwargs.pop(key, value) for key, value in DECODE_DEFAULTS.items()}
    options = {
        "truncation": kwargs.pop("truncation", True),
        "add_special_tokens": kwargs.pop("add_special_tokens", True),
    }
    count = args.sequences
    results: list[list[str]] = []
    for start in range(0, len(texts), batch):
        ctx.check()
        part = texts[start : start + batch]
        own = dict(kwargs)
        inputs = encode(tokenizer, part, own, **options).to(model.device)
        mapped = replace(args, kwargs=own)
        try:
            call = mapped.call_kwargs(model, tokenizer, int(inputs["input_ids"].shape[1]))
            ids = model_generate(model, inputs, call, ctx.cancelled.is_set)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise generate_error(exc) from exc
        ctx.check()
        if new_only:
            ids = ids[:, inputs["input_ids"].shape[1] :]
        decoded = [args.cut(text) for text in tokenizer.batch_decode(ids, **decode)]
        results.extend(decoded[i * count : (i + 1) * count] for i in range(len(part)))
    return results


def chat_prompts(tokenizer: Any, conversations: list[list[dict[str, Any]]], template: str | None) -> list[str]:
    """Each conversation through the chat template, ending with the assistant's turn."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument(
            "this model's tokenizer has no chat template",
            hint='Pass one in args: {"chat_template": "{% for m in messages %}…{% endfor %}"}.',
        )
    try:
        return [
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, chat_template=template)
            for messages in conversations
        ]
    except Exception as exc:  # jinja errors, messages without role/content
        raise InvalidArgument(f"could not apply the chat template: {exc}") from exc
