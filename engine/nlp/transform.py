"""``pgml.transform``: Hugging Face tasks, one batched call per (task, args) for all rows of a statement.

Owns: results shaped exactly as PostgresML's (transformers 4.x) pipelines returned them (§1.9 of the API
reference): per-input outputs, with the old pipelines' single-input quirks (every other task of
``transformers.pipeline`` is ``engine.nlp.any_task``'s, with that pipeline's own shapes); the chat form (jsonb[]
messages, one conversation per row); a ``{"model": …}`` that names a project tuned by ``pgml.tune``
(its model files are used, ``engine.nlp.finetune.tuned``); the task prefixes and chat conversations
``pgml.transform_stream`` shares.

Must not: know SQL or the wire protocol, or import ML libraries at import time. Which model runs and
loading it are ``engine.nlp.tasks``'; batched generation is ``engine.nlp.generate``'s, question answering
``engine.nlp.answer``'s; what the generation args mean (OpenAI-style and Hugging Face names) is
``engine.nlp.generation_args``'.

transform's ``cache`` argument is ignored: like PostgresML, models are always cached (process-wide).
Calls on one loaded model are serialized (pipelines and fast tokenizers are not thread-safe).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from engine.api import Call, InvalidArgument
from engine.nlp import any_task, generation_args
from engine.nlp.answer import answer
from engine.nlp.any_task import plain
from engine.nlp.decoding import stopping
from engine.nlp.finetune import tuned
from engine.nlp.generate import OWN_ARGS, chat_prompts, generate_batches
from engine.nlp.generation_args import GenerationArgs
from engine.nlp.json_args import json_object
from engine.nlp.tasks import OWN_TASKS, PIPELINE_TASKS, SEQ2SEQ_TASKS, Loaded, TaskSpec, load, parse_task
from engine.runtime.confine import generation_kwargs
from engine.runtime.context import Context

OUTPUT_KEYS = {
    "summarization": "summary_text",
    "translation": "translation_text",
    "text2text-generation": "generated_text",
}
STREAM_TASKS = SEQ2SEQ_TASKS | {"text-generation", "conversational"}
GENERATING = STREAM_TASKS  # the tasks whose args are generation args (engine.nlp.generation_args)
# The text-generation pipeline's own call arguments (besides generate's).
PIPELINE_ARGS = frozenset(
    {
        "return_full_text", "return_text", "return_tensors", "clean_up_tokenization_spaces", "prefix",
        "handle_long_generation", "stop_sequence", "truncation", "continue_final_message", "skip_special_tokens",
        "add_special_tokens", "padding", "batch_size",
    }
)  # fmt: skip
CHAT_ONLY = "ARRAY[]::JSONB inputs for transform should only be used with a conversational task"


async def transform(call: Call, ctx: Context) -> list[Any]:
    """``pgml.transform`` where ``{"model": …}`` may name a project tuned by ``pgml.tune`` (its files are used)."""
    rows = list(call.rows)
    names = sorted({t["model"] for t, *_ in rows if isinstance(t, dict) and isinstance(t.get("model"), str)})
    if names and call.db is not None:
        paths = await tuned.model_directories(ctx, names)
        if paths:  # a tuned project's files are in this process's private directory: its models run here
            rows = [(({**t, "model": paths[t["model"]]},) if _tuned(t, paths) else (t,)) + tuple(r) for t, *r in rows]
            result: list[Any] = await ctx.work(transform_rows, rows, ctx)
            return result
    return await ctx.on_rows("transform", transform_rows, rows)


def _tuned(task: Any, paths: dict[str, str]) -> bool:
    return isinstance(task, dict) and task.get("model") in paths


def transform_rows(rows: list[tuple[Any, ...]], ctx: Context) -> list[Any]:
    """``(task, args, inputs[, cache])`` rows -> one JSON-ready result per row (None when an argument is NULL).

    Rows with the same task and args share one model and one batched call.
    """
    results: list[Any] = [None] * len(rows)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        if any(value is None for value in row):
            continue  # STRICT: NULL in, NULL out
        task, args, inputs = row[:3]
        if not isinstance(inputs, list):
            raise InvalidArgument("pgml.transform inputs must be an array")
        groups[(json.dumps(task, sort_keys=True), json.dumps(json_object(args, "args"), sort_keys=True))].append(i)
    for (task_text, args_text), indexes in groups.items():
        ctx.check()
        spec, loaded = load(parse_task(json.loads(task_text)), ctx)
        outputs = _run(spec, loaded, json.loads(args_text), [rows[i][2] for i in indexes], ctx)
        for i, output in zip(indexes, outputs, strict=True):
            results[i] = output
    return results


def _message(value: Any) -> dict[str, Any] | None:
    """A chat message ({role, content}) given as an object or JSON text, else None."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, dict) and "role" in value else None


def conversation(inputs: list[Any]) -> list[dict[str, Any]]:
    messages = [_message(value) for value in inputs]
    if not messages or any(message is None for message in messages):
        raise InvalidArgument('conversational inputs must be a jsonb[] of {"role": …, "content": …} messages')
    return [message for message in messages if message is not None]


def _generation(spec: TaskSpec, args: dict[str, Any], ctx: Context) -> GenerationArgs:
    """A generating task's args mapped (OpenAI-style names included), its notices reported."""
    own = PIPELINE_ARGS if spec.task == "text-generation" else OWN_ARGS
    if spec.task == "conversational":
        own = own | {"chat_template"}
    mapped = generation_args.parse(args, own, prompt_in_output=spec.task == "text-generation")
    mapped.report(ctx.notices)
    return mapped


def _run(spec: TaskSpec, loaded: Loaded, args: dict[str, Any], batches: list[list[Any]], ctx: Context) -> list[Any]:
    """One result per row (``batches``: each row's inputs), all rows' inputs in one batched call."""
    args = dict(generation_kwargs(args))  # no code-loading generation args, whatever the task
    if "eos_token" in args and loaded.tokenizer is not None:  # PostgresML: eos_token -> eos_token_id
        args["eos_token_id"] = loaded.tokenizer.convert_tokens_to_ids(args.pop("eos_token"))
    if spec.family not in PIPELINE_TASKS | OWN_TASKS:
        return any_task.run(spec.task, loaded, batches, args, ctx)  # any other pipeline task, as is
    gen = _generation(spec, args, ctx) if spec.family in GENERATING else None
    if spec.task == "conversational":
        assert gen is not None
        prompts = chat_prompts(
            loaded.tokenizer, [conversation(inputs) for inputs in batches], gen.kwargs.pop("chat_template", None)
        )
        gen.kwargs.setdefault("add_special_tokens", False)
        return _batches(
            loaded, prompts, _batch(gen, ctx), ctx,
            lambda part: generate_batches(loaded.model, loaded.tokenizer, part, gen, ctx, new_only=True),
        )  # fmt: skip
    if any(isinstance(value, dict) for inputs in batches for value in inputs):
        raise InvalidArgument(CHAT_ONLY)
    texts = [value for inputs in batches for value in inputs]
    if any(value is None for value in texts):
        raise InvalidArgument("pgml.transform inputs must not contain NULL")
    if spec.task == "question-answering":
        per_input = _batches(
            loaded, texts, ctx.config.batch_size, ctx,
            lambda part: answer(loaded.model, loaded.tokenizer, part, args, ctx),
        )  # fmt: skip
    elif spec.task == "text-generation":
        assert gen is not None
        per_input = _text_generation(loaded, texts, gen, ctx)
    elif spec.task in PIPELINE_TASKS:
        per_input = _pipeline(spec.task, loaded, texts, args, ctx)
    else:
        assert gen is not None
        per_input = _seq2seq(spec, loaded, texts, gen, ctx)
    results, start = [], 0
    for inputs in batches:
        results.append(_shape(spec.family, per_input[start : start + len(inputs)]))
        start += len(inputs)
    return results


def _batch(gen: GenerationArgs, ctx: Context) -> int:
    """Inputs per generate call: at most ``batch_size`` sequences (``n`` per input)."""
    return gen.per_call(ctx.batch_size(gen.kwargs.get("batch_size")))


def _batches(
    loaded: Loaded, items: list[Any], size: int, ctx: Context, run: Callable[[list[Any]], list[Any]]
) -> list[Any]:
    """``run`` over slices of ``items``, each under the model's lock; between slices (the lock not held)
    a checkpoint: a cancel stops here, and other sessions' calls get their turn."""
    out: list[Any] = []
    for start in range(0, len(items), size):
        ctx.check()
        with loaded.lock:
            out.extend(run(items[start : start + size]))
    return out


def _shape(family: str, outputs: list[Any]) -> Any:
    """A row's result from its per-input outputs, with the old pipelines' quirks for a single input."""
    if family in ("fill-mask", "question-answering") and len(outputs) == 1:
        return outputs[0]
    if family in SEQ2SEQ_TASKS and all(len(output) == 1 for output in outputs):
        return [output[0] for output in outputs]  # one sequence per input: not nested
    return outputs


def _pipeline(task: str, loaded: Loaded, texts: list[str], args: dict[str, Any], ctx: Context) -> list[Any]:
    """Per input, the pipeline's output; slices of the inputs so a cancel takes effect between them."""
    if any(not isinstance(text, str) for text in texts):
        raise InvalidArgument(f"{task} inputs must be text")
    args = dict(args)
    batch = ctx.batch_size(args.pop("batch_size", None))
    outputs: list[Any] = []
    for start in range(0, len(texts), batch * 8):
        ctx.check()
        part = texts[start : start + batch * 8]
        result = _call_pipe(task, loaded, part, batch, args)
        if task == "fill-mask" and len(part) == 1:
            result = [result]  # the pipeline unwraps a one-element list
        outputs.extend(plain(result))
    ctx.check()
    return outputs


def _call_pipe(task: str, loaded: Loaded, part: list[str], batch: int, args: dict[str, Any]) -> Any:
    try:
        with loaded.lock:
            return loaded.pipe(part, batch_size=batch, **args)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"invalid args for {task}: {exc}") from exc


def _text_generation(loaded: Loaded, texts: list[str], gen: GenerationArgs, ctx: Context) -> list[Any]:
    """Per input, the text-generation pipeline's ``[{"generated_text": prompt + continuation}, …]`` (one per
    sequence; the prompt left out with ``return_full_text`` / ``echo`` false), each continuation cut at its
    first stop string.

    transformers 5's pipeline samples by default (do_sample, temperature 0.7); PostgresML's (4.x) and
    transform_stream follow the model's own generation config: greedy unless it says otherwise.
    """
    if any(not isinstance(text, str) for text in texts):
        raise InvalidArgument("text-generation inputs must be text")
    kwargs = dict(gen.kwargs)
    batch = gen.per_call(ctx.batch_size(kwargs.pop("batch_size", None)))
    explicit = "return_full_text" in kwargs or gen.echo is not None
    full = kwargs.pop("return_full_text", True if gen.echo is None else gen.echo)
    special = bool(kwargs.get("add_special_tokens", False))
    own = replace(gen, kwargs=kwargs)
    outputs: list[Any] = []
    for start in range(0, len(texts), batch):
        ctx.check()
        part = texts[start : start + batch]

        def longest(part: list[str] = part) -> int:
            return max(len(ids) for ids in loaded.tokenizer(part, add_special_tokens=special)["input_ids"])

        try:
            with loaded.lock:  # the cap tokenizes the prompts
                call = own.call_kwargs(loaded.model, loaded.tokenizer, longest, pipeline=True)
                call["stopping_criteria"] = stopping(ctx.cancelled.is_set, more=call.pop("stopping_criteria", ()))
                if gen.stop:
                    call["return_full_text"] = False  # the prompt is added back after the cut
                elif explicit:
                    call["return_full_text"] = full
                result = plain(loaded.pipe(part, batch_size=len(part), **call))
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"invalid args for text-generation: {exc}") from exc
        if gen.stop:
            result = [
                [_cut(output, prompt if full else "", gen) for output in outs]
                for prompt, outs in zip(part, result, strict=True)
            ]
        outputs.extend(result)
    ctx.check()
    return outputs


def _cut(output: Any, prompt: str, gen: GenerationArgs) -> Any:
    if isinstance(output, dict) and isinstance(output.get("generated_text"), str):
        return {**output, "generated_text": prompt + gen.cut(output["generated_text"])}
    return output


def task_prefix(model: Any, task: str) -> tuple[str, dict[str, Any]]:
    """The input prefix and generation defaults a model's config keeps for a task (T5's task_specific_params)."""
    params = dict((getattr(model.config, "task_specific_params", None) or {}).get(task) or {})
    prefix = params.pop("prefix", None) or getattr(model.config, "prefix", None) or ""
    return str(prefix), params


def _seq2seq(spec: TaskSpec, loaded: Loaded, texts: list[str], gen: GenerationArgs, ctx: Context) -> list[Any]:
    """Per input, ``[{translation_text | summary_text | generated_text}, …]`` (one per returned sequence)."""
    if any(not isinstance(text, str) for text in texts):
        raise InvalidArgument(f"{spec.task} inputs must be text")
    prefix, defaults = task_prefix(loaded.model, spec.task)
    gen = gen.with_defaults(defaults)
    languages = re.fullmatch(r"translation_(\w+)_to_(\w+)", spec.task)
    if languages and hasattr(loaded.tokenizer, "_build_translation_inputs"):  # NLLB, M2M100, mBART, as HF did
        gen.kwargs.setdefault("src_lang", languages[1])
        gen.kwargs.setdefault("tgt_lang", languages[2])
    outputs = _batches(
        loaded, [prefix + t for t in texts], _batch(gen, ctx), ctx,
        lambda part: generate_batches(loaded.model, loaded.tokenizer, part, gen, ctx, new_only=False),
    )  # fmt: skip
    key = OUTPUT_KEYS[spec.family]
    return [[{key: text} for text in sequences] for sequences in outputs]
