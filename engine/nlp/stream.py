"""Streaming ``pgml.transform_stream``: generated text handed out fragment by fragment as it is decoded.

Owns: the prompts of a stream (the chat form, a model's task prefix), ``generate`` in a background thread
feeding a batched streamer that flushes at word boundaries (as PostgresML's own streamer did) and ends each
sequence before its first stop string, and the non-streaming form inside a larger statement
(:func:`stream_all`: every fragment, as rows).

Must not: load, resolve or cache models (``engine.nlp.tasks`` does), map generation args
(``engine.nlp.generation_args`` does), or import ML libraries at import time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import Any

from engine.api import InvalidArgument
from engine.nlp import generation_args
from engine.nlp.generate import DECODE_DEFAULTS, OWN_ARGS, chat_prompts, encode, generate_error, model_generate
from engine.nlp.json_args import json_object
from engine.nlp.tasks import Loaded, TaskSpec, load, parse_task
from engine.nlp.transform import CHAT_ONLY, STREAM_TASKS, conversation, task_prefix
from engine.runtime.confine import generation_kwargs
from engine.runtime.context import Context
from engine.runtime.threads import limited

# Fragments ``generate`` may run ahead of its reader before it waits (each a few words per sequence).
FRAGMENTS_AHEAD = 16


def stream(task: Any, args: Any, inputs: Any, ctx: Context) -> Generator[list[str], None, None]:
    """``pgml.transform_stream``: each new text fragment as a list of strings, one per generated sequence.

    ``inputs``: the prompt (text; a list of prompts also works) or, for ``conversational``, one conversation
    (the jsonb[] of messages). For text-generation the prompt is streamed too, as PostgresML's open-source
    streamer did; conversational and seq2seq tasks stream new text only. Nothing runs before the first
    ``next()``: iterate it in an engine worker. STRICT: a NULL argument yields nothing. A cancel raises
    Canceled at the next fragment; closing the iterator stops the generation.
    """
    if task is None or args is None or inputs is None:
        return
    args = dict(generation_kwargs(json_object(args, "args")))
    spec, loaded = load(parse_task(task), ctx)
    if spec.family not in STREAM_TASKS:
        raise InvalidArgument(
            f"pgml.transform_stream streams text generation, not {spec.task}",
            hint="Use text-generation, conversational, text2text-generation, summarization or translation.",
        )
    if "eos_token" in args:
        args["eos_token_id"] = loaded.tokenizer.convert_tokens_to_ids(args.pop("eos_token"))
    own = OWN_ARGS - {"batch_size"} - set(DECODE_DEFAULTS)  # generate's args and encode's
    gen = generation_args.parse(
        args, own | {"chat_template"} if spec.task == "conversational" else own,
        prompt_in_output=spec.task == "text-generation",
    )  # fmt: skip
    gen.report(ctx.notices)
    kwargs = gen.kwargs
    texts, skip_prompt = _stream_prompts(spec, loaded, inputs, kwargs)
    if gen.echo is not None and spec.task == "text-generation":
        skip_prompt = not gen.echo
    options = {"add_special_tokens": kwargs.pop("add_special_tokens", True)}
    if "truncation" in kwargs:
        options["truncation"] = kwargs.pop("truncation")
    with loaded.lock:  # only the tokenization; generation runs beside other calls
        prepared = encode(loaded.tokenizer, texts, kwargs, **options)
    try:
        call = gen.call_kwargs(loaded.model, loaded.tokenizer, int(prepared["input_ids"].shape[1]))
    except ValueError as exc:
        raise InvalidArgument(f"invalid generation args: {exc}") from exc
    yield from stream_generate(
        loaded.model, loaded.tokenizer, prepared, call, ctx, skip_prompt=skip_prompt, stops=gen.stop
    )


def _stream_prompts(spec: TaskSpec, loaded: Loaded, inputs: Any, args: dict[str, Any]) -> tuple[list[str], bool]:
    """The texts to generate from, and whether their tokens are left out of the stream."""
    items = inputs if isinstance(inputs, list) else [inputs]
    if spec.task == "conversational":
        args["add_special_tokens"] = False
        return chat_prompts(loaded.tokenizer, [conversation(items)], args.pop("chat_template", None)), True
    if not items or any(not isinstance(item, str) for item in items):
        raise InvalidArgument(CHAT_ONLY.replace("transform", "transform_stream") if items else "no input to stream")
    if spec.task == "text-generation":
        return list(items), False
    prefix, defaults = task_prefix(loaded.model, spec.task)
    for key, value in defaults.items():
        args.setdefault(key, value)
    return [prefix + item for item in items], True


def stream_all(rows: list[tuple[Any, ...]], ctx: Context) -> list[Any]:
    """``transform_stream`` where it cannot stream (inside a larger statement): every fragment, as rows."""
    return [
        None if any(v is None for v in row[:3]) else list(stream(row[0], row[1] or {}, row[2], ctx)) for row in rows
    ]


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
        self.closed = threading.Event()  # the reader is gone: nothing more is handed over
        # Bounded: while the reader does not take fragments, ``generate`` waits in :meth:`put` (no CPU, no memory).
        self.queue: queue.Queue[list[str] | None] = queue.Queue(maxsize=FRAGMENTS_AHEAD)
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
        self.hand(None)

    def hand(self, item: list[str] | None) -> None:
        """Put ``item`` on the queue, waiting while it is full, unless the reader closed meanwhile."""
        while not self.closed.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

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
            self.hand(pieces)


def stream_generate(
    model: Any, tokenizer: Any, inputs: Any, kwargs: dict[str, Any], ctx: Context, *, skip_prompt: bool,
    stops: tuple[str, ...] = (),
) -> Iterator[list[str]]:  # fmt: skip
    """Run ``generate`` on tokenized ``inputs`` (``engine.nlp.generate.encode``) in a thread; yield each new
    fragment, one string per sequence, each sequence ending before its first stop string of ``stops``.

    ``kwargs``: the ``generate`` arguments (``GenerationArgs.call_kwargs``; its stopping criteria are kept).
    Raises Canceled promptly when
    ``ctx.cancelled`` is set; closing the iterator stops the generation. Beam search cannot stream
    (transformers refuses it): that is an InvalidArgument.
    """
    inputs = inputs.to(model.device)
    streamer = BatchStreamer(tokenizer, skip_prompt, stops)
    closed = streamer.closed
    failures: list[Exception] = []

    def run() -> None:
        try:
            with limited(ctx.settings, "transform_stream"):  # this thread computes: pgml.omp_num_threads here too
                model_generate(
                    model, inputs, kwargs, ctx.cancelled.is_set, closed.is_set, streamer.finished.is_set,
                    streamer=streamer,
                )  # fmt: skip
        except Exception as exc:
            failures.append(exc)
            streamer.hand(None)

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
            raise generate_error(failures[0]) from failures[0]
    finally:
        closed.set()
        thread.join(timeout=5)
