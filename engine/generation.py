"""Generating with a model tuned by ``pgml.tune`` (``pgml.generate``), and the generation-quality scores.

Owns: loading a tuned model from its stored files (once per model version, through the shared
model cache), batched ``model.generate`` returning only new text for causal LMs, and the BLEU / ROUGE
approximations tune reports.

Must not: know about SQL or the registry (the caller passes the files), map client generation args
(``engine.generation_args`` does: OpenAI-style names as well as Hugging Face ones), or import torch or
transformers at import time.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import generation_args
from engine.api import Canceled, EngineError, InvalidArgument, NotSupported
from engine.generation_args import GenerationArgs
from engine.models import ModelCache, generation_kwargs, pick_device

if TYPE_CHECKING:
    from proxy.config import EngineSection

MANIFEST = "pgml_tune.json"  # task, kind, labels, prompt template of a tuned model
MAX_NEW_TOKENS = 256
CANCELED = "canceling statement due to user request"


def generate_all(
    model: Any, tokenizer: Any, kind: str, inputs: list[str], batch: int, cancelled: Callable[[], bool],
    add_special: bool, mapped: GenerationArgs | None = None, **kwargs: Any,
) -> list[str]:  # fmt: skip
    """``model.generate(**kwargs)`` per input, in batches: the continuation for causal LMs, the output for seq2seq,
    cut at its first stop string.

    ``mapped``: a client's args (``generation_args.parse``), else ``kwargs`` (Hugging Face names) are used.
    ``cancelled`` is polled between batches and after every decoding step (a stopping criterion): once it
    says so, Canceled is raised.
    """
    import torch
    from transformers import StoppingCriteriaList

    generation_kwargs(kwargs)  # no code-loading generation args
    args = mapped if mapped is not None else GenerationArgs(kwargs)
    model.eval()
    args.kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    out: list[str] = []
    step = max(1, batch)
    side = "left" if kind == "causal" else "right"  # a causal LM continues from the last column
    for start in range(0, len(inputs), step):
        if cancelled():
            raise Canceled(CANCELED)
        enc = tokenizer(inputs[start : start + step], return_tensors="pt", padding=True, truncation=True,
                        padding_side=side, add_special_tokens=add_special)  # fmt: skip
        enc.pop("token_type_ids", None)
        enc = enc.to(model.device)
        call = args.call_kwargs(model, tokenizer, int(enc["input_ids"].shape[1]))
        criteria = StoppingCriteriaList([_StopWhen(cancelled), *call.pop("stopping_criteria", ())])
        with torch.inference_mode():
            generated = model.generate(**enc, stopping_criteria=criteria, **call)
        if cancelled():
            raise Canceled(CANCELED)
        if kind == "causal":
            generated = generated[:, enc["input_ids"].shape[1] :]
        out.extend(args.cut(text).strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True))
    return out


class _StopWhen:
    """A ``generate`` stopping criterion: every sequence stops once ``cancelled()`` is true."""

    def __init__(self, cancelled: Callable[[], bool]) -> None:
        self.cancelled = cancelled

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        stop = bool(self.cancelled())
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100) as sacreBLEU's default: 4-grams, exp smoothing, brevity penalty."""
    correct, total, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        hyp, ref = re.findall(r"\w+|[^\w\s]", hypothesis), re.findall(r"\w+|[^\w\s]", reference)
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, 5):
            correct[n - 1] += sum((_ngrams(hyp, n) & _ngrams(ref, n)).values())
            total[n - 1] += max(len(hyp) - n + 1, 0)
    if not all(total):
        return 0.0
    log_sum, smooth = 0.0, 1.0
    for c, t in zip(correct, total, strict=True):
        smooth *= 1 if c else 2
        log_sum += math.log(100.0 * c / t if c else 100.0 / (smooth * t))
    return (1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)) * math.exp(log_sum / 4)


def rouge(hypotheses: list[str], references: list[str], n: int) -> tuple[float, float, float]:
    """ROUGE-n ``(precision, recall, f1)`` averaged over pairs, on lowercased alphanumeric words."""
    sums = [0.0, 0.0, 0.0]
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        hyp = _ngrams(re.findall(r"[a-z0-9]+", hypothesis.lower()), n)
        ref = _ngrams(re.findall(r"[a-z0-9]+", reference.lower()), n)
        overlap = sum((hyp & ref).values())
        p, r = overlap / max(hyp.total(), 1), overlap / max(ref.total(), 1)
        for i, value in enumerate((p, r, 2 * p * r / (p + r) if p + r else 0.0)):
            sums[i] += value
    count = max(len(hypotheses), 1)
    return sums[0] / count, sums[1] / count, sums[2] / count


@dataclass(frozen=True)
class Tuned:
    """A tuned model loaded from its files (what the model cache keeps; ``nbytes`` sizes it there)."""

    model: Any
    tokenizer: Any
    kind: str
    task: str
    prompt_template: str | None
    nbytes: int


def generate(
    files: dict[str, bytes], key: str, inputs: list[str], config_kwargs: dict[str, Any],
    engine_config: EngineSection, cache: ModelCache, cancelled: threading.Event | None = None,
    notices: list[str] | None = None,
) -> list[str]:  # fmt: skip
    """``model.generate(**config_kwargs)`` per input with the tuned model in ``files`` (cached under ``key``).

    Seq2seq models return their output; causal LMs only the generated continuation, and a
    ``conversation`` model takes each input as the user's message, formatted as in tuning. Without
    ``max_new_tokens`` / ``max_length`` up to ``MAX_NEW_TOKENS`` are generated. ``cancelled`` (the call's
    cancel flag: cancel, disconnect, call_timeout) stops it at the next decoding step with Canceled.
    ``config_kwargs`` may use OpenAI-style names (``engine.generation_args``); what they cannot honour is
    said in ``notices`` (the call's notices channel).
    """
    cached = cache.peek(key)  # the caller sends no files once the model is cached
    if cached is not None:
        manifest = {"kind": cached.kind, "task": cached.task}
    else:
        manifest = json.loads(files.get(MANIFEST, b"{}"))
    if manifest.get("kind") not in ("causal", "seq2seq"):
        task = str(manifest.get("task", "this")).replace("_", "-")
        hint = "Use a model tuned for conversation, text2text, summarization or translation."
        raise NotSupported(f"pgml.generate does not apply to {task} models", hint=hint)
    if not isinstance(config_kwargs, dict):
        raise InvalidArgument("the generate config must be a JSON object")
    generation_kwargs(config_kwargs)  # before anything is loaded
    mapped = generation_args.parse(config_kwargs, {"eos_token"})  # OpenAI-style names too
    if notices is not None:
        mapped.report(notices)
    if mapped.sequences > 1:
        raise InvalidArgument(
            "pgml.generate returns one text per input", hint="Leave n / num_return_sequences out (or 1)."
        )
    tuned: Tuned = cache.get(key, lambda: load_tuned(files, manifest, engine_config))
    kwargs = mapped.kwargs
    if "eos_token" in kwargs:  # as PostgresML's transform: a token text becomes its id
        kwargs["eos_token_id"] = tuned.tokenizer.convert_tokens_to_ids(kwargs.pop("eos_token"))
    if "max_new_tokens" not in kwargs and "max_length" not in kwargs:  # HF's default max_length=20 counts the prompt
        kwargs["max_new_tokens"] = tuned.model.generation_config.max_new_tokens or MAX_NEW_TOKENS
    texts = [text if isinstance(text, str) else "" for text in inputs]
    from engine.tune import chat_prompt  # tune imports this module

    if tuned.task == "conversation":
        texts = [chat_prompt(tuned.tokenizer, tuned.prompt_template, None, text, "")[0] for text in texts]
    stop = cancelled.is_set if cancelled is not None else lambda: False
    special = tuned.kind == "seq2seq" or tuned.prompt_template is not None  # a chat template has its own
    try:
        return generate_all(tuned.model, tuned.tokenizer, tuned.kind, texts, engine_config.batch_size,
                             stop, special, mapped)  # fmt: skip
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"invalid generate config: {exc}") from exc


def load_tuned(files: dict[str, bytes], manifest: dict[str, Any], config: EngineSection) -> Tuned:
    """Writes the files to a temporary directory, loads model and tokenizer, removes the directory."""
    import transformers

    from engine.tune import _quiet

    _quiet()
    kind = manifest["kind"]
    auto = transformers.AutoModelForSeq2SeqLM if kind == "seq2seq" else transformers.AutoModelForCausalLM
    with tempfile.TemporaryDirectory(prefix="pgml-generate-") as tmp:
        root = Path(tmp).resolve()
        for name, data in files.items():
            target = (root / name).resolve()
            if not target.is_relative_to(root):
                raise InvalidArgument(f"invalid model file path: {name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        try:
            model: Any = auto.from_pretrained(tmp, trust_remote_code=config.trust_remote_code)
            tokenizer = transformers.AutoTokenizer.from_pretrained(tmp, trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise EngineError(f"could not load the tuned model: {exc}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(pick_device(config.device)).eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return Tuned(model, tokenizer, kind, manifest.get("task", ""), manifest.get("prompt_template"), int(size))
