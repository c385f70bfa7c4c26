"""``pgml.transform`` for every other task of ``transformers.pipeline``, with the pipeline's own output shape.

PostgresML hands any task to ``transformers.pipeline`` and returns ``pipe(inputs, **args)`` as JSON. Here
the inputs of all rows of a statement that share a task and args go through the pipeline together (sliced,
a cancel checkpoint between slices; the pipeline's ``batch_size`` only when the args give one, as not every
pipeline batches), and each row gets what ``pipe(row_inputs)`` returns: a list with one
output per input, or the single output where the pipeline unwraps a one-element list
(table-question-answering, depth-estimation, keypoint-matching).

Inputs: text for text tasks. An input that is JSON text of an object or array is decoded for the tasks
that take structured inputs (table-question-answering's ``{"table": {column: [cells…]}, "query": …}``, every
non-text task: ``{"image": …, "question": …}``, image pairs, chat messages); ``jsonb[]`` elements arrive as
objects already. Media references are decoded by ``engine.nlp.media`` (no network, no path outside
``[engine] data_dirs``, bounded sizes), each slice's only when it is sent, and so are the args' (``images``,
``videos``, chat messages' content parts …). document-question-answering without ``word_boxes`` runs
tesseract (through pytesseract, when installed) on the decoded image, as the pipeline does. Outputs are
made JSON-ready by :func:`plain`: numpy and torch values as numbers and lists, PIL images (masks, depth
maps) as PNG ``data:`` URIs, bytes as base64.

Owns: the inputs' reading per task, the batched calls, the per-row shapes, :func:`plain`.

Must not: load models (``engine.nlp.tasks``), fetch or open files itself, or import ML libraries at import
time.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from engine.api import EngineError, InvalidArgument, NotSupported
from engine.nlp import media
from engine.nlp.tasks import Loaded
from engine.runtime.context import Context

UNWRAPS = frozenset({"table-question-answering", "depth-estimation", "keypoint-matching"})
STRUCTURED_TEXT_TASKS = frozenset({"table-question-answering"})  # text tasks whose inputs are JSON objects
AUDIO_TASKS = frozenset({"audio-classification", "automatic-speech-recognition", "zero-shot-audio-classification"})
VIDEO_TASKS = frozenset({"video-classification"})
# Multimodal tasks whose bare string inputs are prompts, not media (their media come in structured inputs).
PROMPT_TASKS = frozenset({"any-to-any", "decision"})


def kind(task: str) -> str | None:
    """What a bare string input of ``task`` is: None (text), or the media kind it references."""
    from transformers.pipelines import SUPPORTED_TASKS  # lazy: imports torch (seconds)

    entry: Any = SUPPORTED_TASKS.get(task, {})
    if entry.get("type") == "text" or task in PROMPT_TASKS:
        return None
    if task in AUDIO_TASKS:
        return media.AUDIO
    return media.VIDEO if task in VIDEO_TASKS else media.IMAGE


def read_input(task: str, value: Any, decoder: media.Decoder) -> Any:
    """One input as the pipeline takes it: JSON text decoded where structured, media references decoded."""
    what = kind(task)
    structured = task in STRUCTURED_TEXT_TASKS or what is not None or task in PROMPT_TASKS
    if structured and isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidArgument(f"a {task} input is not valid JSON: {exc}") from exc
    if task in STRUCTURED_TEXT_TASKS and not (isinstance(value, dict) and "table" in value and "query" in value):
        raise InvalidArgument(
            f'each {task} input must be a JSON object {{"table": …, "query": …}}',
            hint='e.g. {"table": {"city": ["Paris", "Berlin"], "people": ["2.1M", "3.7M"]}, "query": "…"}',
        )
    if what is None:  # text pipelines open no files; prompt tasks' chat content parts may name media
        return decoder.decode(value, media.IMAGE) if task in PROMPT_TASKS else value
    return decoder.decode(value, what)


def read_args(task: str, args: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The call args, media references in them decoded like inputs (``images=…``, chat messages in ``text=…``)."""
    what = kind(task)
    if what is None and task not in PROMPT_TASKS:
        return dict(args)
    decoder = media.Decoder(ctx.config)
    return {key: decoder.item(key, value, what or media.IMAGE) for key, value in args.items()}


def run(task: str, loaded: Loaded, batches: list[list[Any]], args: dict[str, Any], ctx: Context) -> list[Any]:
    """One result per row: what ``pipe(row_inputs, **args)`` returns, all rows' inputs in batched calls."""
    args = read_args(task, args, ctx)
    explicit = args.pop("batch_size", None)  # passed on only when given: not every pipeline batches (TAPAS)
    batch = ctx.batch_size(explicit)
    if explicit is not None:
        args["batch_size"] = batch
    values = [value for inputs in batches for value in inputs]
    outputs: list[Any] = []
    for start in range(0, len(values), batch * 8):
        ctx.check()
        decoder = media.Decoder(ctx.config)  # each slice's media decoded only now, within one budget
        part = [read_input(task, value, decoder) for value in values[start : start + batch * 8]]
        result = _call(task, loaded, part, args)
        if task in UNWRAPS and len(part) == 1:
            result = [result]  # the pipeline unwraps a one-element list
        if not isinstance(result, list) or len(result) != len(part):
            raise EngineError(f"the {task} pipeline returned {type(result).__name__}, not one output per input")
        outputs.extend(plain(result))
    ctx.check()
    results, start = [], 0
    for inputs in batches:
        row = outputs[start : start + len(inputs)]
        results.append(row[0] if task in UNWRAPS and len(row) == 1 else row)
        start += len(inputs)
    return results


def _call(task: str, loaded: Loaded, part: list[Any], args: dict[str, Any]) -> Any:
    try:
        with loaded.lock:
            return loaded.pipe(part, **args)
    except ImportError as exc:  # e.g. PyAV for video, pytesseract for document-question-answering
        raise NotSupported(f"the {task} pipeline needs a package that is not installed: {exc}") from exc
    except (TypeError, ValueError, KeyError) as exc:
        raise InvalidArgument(f"invalid inputs or args for {task}: {exc}") from exc


def plain(value: Any) -> Any:
    """JSON-ready: numpy/torch scalars and arrays as Python numbers and lists, PIL images as PNG data: URIs."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, float):
        return float(value)
    if value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if type(value).__module__.startswith("PIL.") and hasattr(value, "save"):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    if hasattr(value, "tolist"):
        return plain(value.tolist())
    return str(value)
