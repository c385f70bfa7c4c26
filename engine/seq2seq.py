"""Model-level code behind ``pgml.transform`` for what transformers 5 has no pipeline for, and streaming.

Owns: batched ``generate`` with a cancel check between decoding steps (seq2seq tasks — summarization,
translation, text2text-generation — and the conversational chat form), extractive question answering on
``AutoModelForQuestionAnswering``, and ``transform_stream``'s token streaming (``generate`` in a background
thread feeding a batched streamer that flushes at word boundaries, as PostgresML's own streamer did).

Must not: load, resolve or cache models, or check permissions (``engine.transform`` does); map client
generation args (``engine.generation_args`` does: functions here take its GenerationArgs); import ML
libraries at import time. Every function takes an already loaded model and tokenizer.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from engine import generation_args
from engine.api import EngineError, InvalidArgument

if TYPE_CHECKING:
    from engine.generation_args import GenerationArgs
    from engine.text import Context

# Keyword arguments of the old HF pipelines that are not ``generate`` arguments.
DECODE_DEFAULTS = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
# The args :func:`generate` and :func:`encode` take themselves (all others go to ``generate``).
OWN_ARGS = frozenset({"batch_size", "truncation", "add_special_tokens", "src_lang", "tgt_lang", *DECODE_DEFAULTS})


class StopWhenSet:
    """A ``generate`` stopping criterion: stop every sequence once any of the events is set (cancel, close)."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        stop = any(event.is_set() for event in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def stopping(*events: threading.Event, more: Iterable[Any] = ()) -> Any:
    """The stopping criteria of a ``generate`` call: stop once an event is set, and ``more`` (stop strings)."""
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList([StopWhenSet(*events), *more])


def _generate_error(exc: Exception) -> EngineError:
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


def generate(
    model: Any, tokenizer: Any, texts: list[str], args: GenerationArgs, ctx: Context, *, new_only: bool
) -> list[list[str]]:
    """Per text, its ``num_return_sequences`` decoded outputs, each cut at its first stop string; ``new_only``
    drops a decoder-only model's prompt.

    Texts go through in batches of at most ``batch_size`` sequences (kwarg, at most ``[engine] batch_size``;
    ``n`` sequences per text); a cancel stops the current batch after its next decoding step.
    """
    import torch

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
            criteria = stopping(ctx.cancelled, more=call.pop("stopping_criteria", ()))
            with torch.inference_mode():
                ids = model.generate(**inputs, stopping_criteria=criteria, **call)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise _generate_error(exc) from exc
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


# --------------------------------------------------------------------------- #
# Question answering
# --------------------------------------------------------------------------- #

QA_ARGS = frozenset({"top_k", "max_answer_len", "max_seq_len", "doc_stride", "max_question_len", "topk"})


def question(value: Any) -> tuple[str, str]:
    """``'{"question": …, "context": …}'`` (or the decoded object) -> (question, context)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidArgument(f'question-answering inputs must be JSON {{"question", "context"}}: {exc}') from exc
    if not isinstance(value, dict) or not isinstance(value.get("question"), str):
        raise InvalidArgument('each question-answering input must be a JSON object {"question": …, "context": …}')
    if not isinstance(value.get("context"), str):
        raise InvalidArgument('each question-answering input needs a "context" string')
    return value["question"], value["context"]


def answer(model: Any, tokenizer: Any, inputs: list[Any], args: dict[str, Any], ctx: Context) -> list[Any]:
    """Per input the best span(s) of its context: ``{answer, start, end, score}`` (a list of them if top_k > 1).

    Like HF's old pipeline: long contexts are split into overlapping windows, non-context tokens masked,
    score = softmax(start) * softmax(end) of the span, spans at most ``max_answer_len`` tokens.
    """
    unknown = set(args) - QA_ARGS
    if unknown:
        raise InvalidArgument(f"unknown question-answering args: {', '.join(sorted(unknown))}")
    top_k = int(args.get("top_k", args.get("topk", 1)))
    limit = min(int(min(tokenizer.model_max_length, 1e6)), getattr(model.config, "max_position_embeddings", 512))
    length = min(int(args.get("max_seq_len", 384)), limit)
    window = {"max_length": length, "stride": int(args.get("doc_stride", min(128, length // 2)))}
    results: list[Any] = []
    for value in inputs:
        ctx.check()
        text, context = question(value)
        spans = _spans(model, tokenizer, text, context, window, int(args.get("max_answer_len", 15)))
        best = [
            {"score": score, "start": start, "end": end, "answer": context[start:end]} for score, start, end in spans
        ][:top_k]
        results.append(best if top_k > 1 else (best[0] if best else {"score": 0.0, "start": 0, "end": 0, "answer": ""}))
    return results


def _spans(
    model: Any, tokenizer: Any, text: str, context: str, window: dict[str, int], max_len: int
) -> list[tuple[float, int, int]]:
    """Candidate answers (score, start char, end char), best first, over every window of the context."""
    import torch

    try:
        enc = tokenizer(
            text, context, truncation="only_second", return_overflowing_tokens=True,
            return_offsets_mapping=True, padding=True, return_tensors="pt", **window,
        )  # fmt: skip
    except Exception as exc:  # e.g. a stride too large for the question
        raise InvalidArgument(f"could not tokenize the question: {exc}") from exc
    names = [name for name in tokenizer.model_input_names if name in enc]
    with torch.inference_mode():
        out = model(**{name: enc[name].to(model.device) for name in names})
    found: dict[tuple[int, int], float] = {}
    for feature in range(enc["input_ids"].shape[0]):
        in_context = torch.tensor([sid == 1 for sid in enc.sequence_ids(feature)])
        if not bool(in_context.any()):
            continue
        start = out.start_logits[feature].float().cpu().masked_fill(~in_context, -1e4).softmax(-1)
        end = out.end_logits[feature].float().cpu().masked_fill(~in_context, -1e4).softmax(-1)
        ones = torch.ones(len(start), len(start))
        band = torch.triu(ones) - torch.triu(ones, diagonal=max_len)  # 0 <= end - start < max_answer_len
        scores = torch.outer(start, end) * band * in_context[:, None] * in_context[None, :]
        offsets = enc["offset_mapping"][feature].tolist()
        for flat in scores.flatten().topk(min(20, scores.numel())).indices.tolist():
            i, j = divmod(flat, len(start))
            if scores[i, j] > 0:
                key = (int(offsets[i][0]), int(offsets[j][1]))
                found[key] = max(found.get(key, 0.0), float(scores[i, j]))
    return sorted(((score, s, e) for (s, e), score in found.items()), key=lambda c: -c[0])


# --------------------------------------------------------------------------- #
# Streaming
# --------------------------------------------------------------------------- #


def _flush_all(text: str) -> bool:
    """Whether a fragment may end here: a newline, or a CJK character (no spaces between words)."""
    if not text:
        return False
    code = ord(text[-1])
    return text.endswith("\n") or 0x3040 <= code <= 0x9FFF or 0xAC00 <= code <= 0xD7AF or 0xF900 <= code <= 0xFAFF


class BatchStreamer:
    """A ``generate`` streamer for any number of sequences: puts one list of new text (one per sequence) per step.

    Text is flushed at word boundaries (up to the last space), newlines and CJK characters, like
    PostgresML's streamer; the prompt is either skipped or streamed too. With ``stops`` a sequence's text
    ends before its first stop string (searched after the prompt): text that could begin one is held
    back until the next tokens tell, and ``finished`` is set once every sequence has met one. ``None``
    on the queue ends it.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.stops = stops
        self.finished = threading.Event()
        self.queue: queue.Queue[list[str] | None] = queue.Queue()
        self._tokens: list[list[int]] | None = None
        self._sent: list[int] = []
        self._start: list[int] = []  # where each text's generated part begins (after a streamed prompt)
        self._done: list[bool] = []

    def put(self, value: Any) -> None:
        rows = value.tolist()
        if self._tokens is None:  # the first call carries the prompt (decoder start ids for seq2seq models)
            self._tokens = [[] if self.skip_prompt else list(row) for row in rows]
            self._sent = [0] * len(rows)
            self._done = [False] * len(rows)
            self._start = [len(self.tokenizer.decode(tokens, skip_special_tokens=True)) for tokens in self._tokens]
        elif rows and isinstance(rows[0], list):  # several tokens per step (assisted decoding)
            for tokens, row in zip(self._tokens, rows, strict=True):
                tokens.extend(row)
        else:
            for tokens, token in zip(self._tokens, rows, strict=True):
                tokens.append(token)
        self._emit(final=False)

    def end(self) -> None:
        if self._tokens is not None:
            self._emit(final=True)
        self.queue.put(None)

    def _emit(self, final: bool) -> None:
        assert self._tokens is not None
        pieces = []
        for i, tokens in enumerate(self._tokens):
            if self._done[i]:
                pieces.append("")
                continue
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            stop = len(text) if final or _flush_all(text) else text.rfind(" ") + 1
            if self.stops:
                at = generation_args.first_stop(text, self.stops, self._start[i])
                if at >= 0:
                    stop, self._done[i] = at, True
                elif not final:
                    stop = min(stop, len(text) - generation_args.held_back(text, self.stops, self._start[i]))
            piece = text[self._sent[i] : stop] if stop > self._sent[i] else ""
            self._sent[i] += len(piece)
            pieces.append(piece)
        if self._done and all(self._done):
            self.finished.set()
        if any(pieces):
            self.queue.put(pieces)


def stream_generate(
    model: Any, tokenizer: Any, inputs: Any, kwargs: dict[str, Any], ctx: Context, *, skip_prompt: bool,
    stops: tuple[str, ...] = (),
) -> Iterator[list[str]]:  # fmt: skip
    """Run ``generate`` on tokenized ``inputs`` (see :func:`encode`) in a thread; yield each new fragment,
    one string per sequence, each sequence ending before its first stop string of ``stops``.

    ``kwargs``: the ``generate`` arguments (``GenerationArgs.call_kwargs``; its stopping criteria are kept).
    Raises Canceled promptly when
    ``ctx.cancelled`` is set; closing the iterator stops the generation. Beam search cannot stream
    (transformers refuses it): that is an InvalidArgument.
    """
    import torch

    inputs = inputs.to(model.device)
    streamer = BatchStreamer(tokenizer, skip_prompt, stops)
    closed = threading.Event()
    failures: list[Exception] = []
    kwargs = dict(kwargs)
    criteria = stopping(ctx.cancelled, closed, streamer.finished, more=kwargs.pop("stopping_criteria", ()))

    def run() -> None:
        try:
            with torch.inference_mode():
                model.generate(**inputs, streamer=streamer, stopping_criteria=criteria, **kwargs)
        except Exception as exc:
            failures.append(exc)
            streamer.queue.put(None)

    thread = threading.Thread(target=run, name="pgml-transform-stream", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = streamer.queue.get(timeout=0.05)
            except queue.Empty:
                ctx.check()
                continue
            ctx.check()
            if item is None:
                break
            yield item
        if failures:
            raise _generate_error(failures[0]) from failures[0]
    finally:
        closed.set()
        thread.join(timeout=5)
