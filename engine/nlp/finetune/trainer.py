"""The model side of ``pgml.tune``: one Trainer run, from validated settings to the tuned model's files.

Owns: one run at a time per process, the Trainer (cancel between steps, one event per Trainer log),
test metrics, and the tuned model's files (plus ``pgml_tune.json``: task, kind, labels, prompt
template). Settings are ``engine.nlp.finetune.plan``'s, training rows ``engine.nlp.finetune.rows``'.

Generative tasks report ``loss`` and ``perplexity`` (test ``eval_loss``) and, except text-generation,
from greedy outputs on the first ``SCORED_ROWS`` test rows, ``bleu`` (sacreBLEU-style corpus BLEU;
``blue`` too for translation, PostgresML's key-metric spelling) and, for seq2seq, ROUGE-1/2
``rouge_ngram_*`` / ``rouge_bigram_*`` (the ``rouge`` package's per-pair average); simple word tokens,
so close to but not identical with those libraries. All tasks keep the Trainer's numeric ``eval_*``
values and ``fit_time``. Without test rows the training rows are scored.


Must not: know about SQL, the registry or the wire protocol (the caller reads rows, stores the files
and events); import torch or transformers at import time (seconds; each is imported when a run starts);
download unless ``allow_downloads``.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.api import CANCELED, Canceled, EngineConfig, EngineError
from engine.nlp.answer import spans
from engine.nlp.finetune.plan import (
    INPUT_LENGTHS,
    MAX_ANSWER_TOKENS,
    TARGET_LENGTHS,
    Plan,
    build_plan,
    input_limit,
    tables,
    training_args,
)
from engine.nlp.finetune.rows import BUILDERS, Job, answer_texts, chat_prompt
from engine.nlp.finetune.scores import answer_f1, bleu, normalize_answer, rouge
from engine.nlp.finetune.tuned import MANIFEST, MAX_NEW_TOKENS, generate_all
from engine.runtime.device import pick_device
from engine.runtime.locate import no_progress_bars, resolve

_SKIPPED_FILES = frozenset({"training_args.bin"})  # a pickle holding temporary paths
SCORED_ROWS = 256
_ONE_RUN = threading.Lock()


@dataclass(frozen=True)
class TuneResult:
    """A fine-tuned model: its files (relative paths), test metrics, settings used, Trainer log events."""

    files: dict[str, bytes]
    metrics: dict[str, float]
    hyperparams: dict[str, Any]
    events: list[dict[str, Any]]


def fine_tune(
    task: str, model_name: str, train: dict[str, list[Any]], test: dict[str, list[Any]], hyperparams: dict[str, Any],
    config: EngineConfig, cancelled: Callable[[], bool], on_log: Callable[[dict[str, Any]], None],
    y_column: str | None = None,
) -> TuneResult:  # fmt: skip
    """Fine-tune ``model_name`` for ``task`` on ``train`` (column -> values), score it on ``test``.

    ``y_column`` (``y_column_name``) names the task's *y* role. One run at a time per process (Trainer
    resets accelerate's process-wide state); a run waiting for another one still notices ``cancelled``.
    """
    plan = build_plan(task, hyperparams, list(train), y_column)
    train = tables(plan, train)
    test = tables(plan, test, train)
    path = resolve(model_name, config)
    events: list[dict[str, Any]] = []

    def log(event: dict[str, Any]) -> None:
        events.append(event)
        on_log(event)

    while not _ONE_RUN.acquire(timeout=0.05):  # short: this wait holds an engine turn between checkpoints
        if cancelled():
            raise Canceled(CANCELED)
    try:
        files, metrics, used = _fit(plan, path, model_name, config, train, test, cancelled, log)
    finally:
        _ONE_RUN.release()
    used_hyperparams = {"model_name": model_name, "training_args": used, "dataset_args": plan.columns}
    used_hyperparams.update({k: v for k, v in hyperparams.items() if k in (*INPUT_LENGTHS, *TARGET_LENGTHS, "stride")})
    if plan.prompt_template is not None:
        used_hyperparams["prompt_template"] = plan.prompt_template
    return TuneResult(files, metrics, used_hyperparams, events)


def _fit(
    plan: Plan, path: str, name: str, config: EngineConfig, train: dict[str, list[Any]],
    test: dict[str, list[Any]], cancelled: Callable[[], bool], log: Callable[[dict[str, Any]], None],
) -> tuple[dict[str, bytes], dict[str, float], dict[str, Any]]:  # fmt: skip
    """Train, score and save in a temporary directory: (files, metrics, training_args as used)."""
    no_progress_bars()
    with tempfile.TemporaryDirectory(prefix="pgml-tune-") as tmp:
        args, used = training_args(plan.training_args, tmp, pick_device(config.device))
        tokenizer = _load_tokenizer(path, name, config)
        if cancelled():
            raise Canceled(CANCELED)
        job = BUILDERS[plan.kind](plan, tokenizer, path, name, config, train, test)
        trainer, stop = _trainer(job, args, tokenizer, cancelled, log)
        started = time.perf_counter()
        trainer.train()
        fit_time = time.perf_counter() - started
        if stop.is_set():
            raise Canceled(CANCELED)
        metrics = {**_metrics(plan, trainer, tokenizer, test, cancelled), "fit_time": fit_time}
        out = Path(tmp) / "model"
        trainer.save_model(str(out))  # the model and its processing_class (the tokenizer)
        manifest = {"task": plan.task, "kind": plan.kind, "labels": job.labels, "prompt_template": plan.prompt_template}
        (out / MANIFEST).write_text(json.dumps(manifest))
        files = {
            p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in _SKIPPED_FILES
        }
        del trainer, job
        _release_gpu_memory()
    return files, metrics, used


def _release_gpu_memory() -> None:
    import torch  # lazy: seconds to import; the engine imports without it

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load_tokenizer(path: str, name: str, config: EngineConfig) -> Any:
    from transformers import AutoTokenizer  # lazy: transformers imports torch (seconds)

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise EngineError(f"could not load the tokenizer of {name}: {exc}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _trainer(
    job: Job, args: Any, tokenizer: Any, cancelled: Callable[[], bool], log: Callable[[dict[str, Any]], None]
) -> tuple[Any, threading.Event]:
    from transformers import PrinterCallback, Trainer, TrainerCallback  # lazy: see _load_tokenizer

    stop = threading.Event()

    class Hooks(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if cancelled():
                stop.set()
                control.should_training_stop = control.should_epoch_stop = True
            return control

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if cancelled():
                raise Canceled(CANCELED)
            return control

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
            event = {k: _json_value(v) for k, v in (logs or {}).items()}
            event.update(step=state.global_step, max_steps=state.max_steps)
            event.setdefault("epoch", _json_value(state.epoch))
            log(event)
            return control

    trainer = Trainer(
        model=job.model, args=args, data_collator=job.collator, train_dataset=job.train_rows,
        eval_dataset=job.eval_rows, processing_class=tokenizer, compute_metrics=job.compute_metrics,
        callbacks=[Hooks()],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # with disable_tqdm it would print every log to stdout
    return trainer, stop


def _json_value(value: Any) -> Any:
    """A log value as JSON can hold it (jsonb has no NaN or infinity)."""
    if isinstance(value, bool | str | int) or value is None:
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


def _evaluate(trainer: Any) -> dict[str, Any]:
    """The Trainer's test evaluation; the one it ran after the last step already (an eval_strategy) is reused."""
    last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return {k: v for k, v in last.items() if k.startswith("eval_")}
    return dict(trainer.evaluate())


def _metrics(
    plan: Plan, trainer: Any, tokenizer: Any, test: dict[str, list[Any]], cancelled: Callable[[], bool]
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for key, value in _evaluate(trainer).items():
        number = _json_value(value)
        if isinstance(number, int | float) and not isinstance(number, bool):
            metrics[key.removeprefix("eval_") if key in ("eval_f1", "eval_accuracy") else key] = float(number)
    if plan.kind == "classification":
        return metrics
    if "eval_loss" in metrics:
        metrics["loss"] = metrics["eval_loss"]
        if metrics["eval_loss"] < 700:  # exp() stays finite
            metrics["perplexity"] = math.exp(metrics["eval_loss"])
    if plan.task == "text_generation":
        return metrics  # PostgresML's text-generation metric: perplexity
    if plan.kind == "qa":
        return {**metrics, **_qa_scores(trainer.model, tokenizer, plan, test, cancelled)}
    if plan.kind == "seq2seq":
        sources, references = test["text_column"][:SCORED_ROWS], test["target_column"][:SCORED_ROWS]
    else:
        rows = list(zip(test["system_column"], test["user_column"], test["assistant_column"], strict=True))
        sources = [chat_prompt(tokenizer, plan.prompt_template, s, u, "")[0] for s, u, _ in rows[:SCORED_ROWS]]
        references = [a for _, _, a in rows[:SCORED_ROWS]]
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references), default=0)
    outputs = generate_all(
        trainer.model, tokenizer, plan.kind, sources, trainer.args.per_device_eval_batch_size, cancelled,
        plan.kind == "seq2seq" or plan.prompt_template is not None,
        max_new_tokens=max(1, min(longest + 8, MAX_NEW_TOKENS)), do_sample=False,
    )  # fmt: skip
    metrics["bleu"] = bleu(outputs, references)
    if plan.task == "translation":
        metrics["blue"] = metrics["bleu"]  # the translation key metric's name in PostgresML (sic)
    if plan.kind == "seq2seq":
        for n, name in ((1, "ngram"), (2, "bigram")):
            p, r, f = rouge(outputs, references, n)
            metrics.update({f"rouge_{name}_f1": f, f"rouge_{name}_precision": p, f"rouge_{name}_recall": r})
    return metrics


def _qa_scores(
    model: Any, tokenizer: Any, plan: Plan, test: dict[str, list[Any]], cancelled: Callable[[], bool]
) -> dict[str, float]:
    """SQuAD ``f1`` and ``exact_match`` (fractions) of the best span on the first ``SCORED_ROWS`` test rows.

    The best span is always an answer (no null-answer threshold), so unanswerable questions score 0.
    """
    model.eval()
    length = input_limit(plan, tokenizer)
    window = {"max_length": length, "stride": min(plan.stride, length // 2)}
    f1 = exact = 0.0
    rows = list(zip(test["question_column"], test["context_column"], test["answers_column"], strict=True))
    for question, context, answers in rows[:SCORED_ROWS]:
        if cancelled():
            raise Canceled(CANCELED)
        found = spans(model, tokenizer, question, context, window, MAX_ANSWER_TOKENS)
        predicted = context[found[0][1] : found[0][2]] if found else ""
        golds = answer_texts(answers) or [""]
        f1 += max(answer_f1(predicted, g) for g in golds)
        exact += max(float(normalize_answer(predicted) == normalize_answer(g)) for g in golds)
    scored = max(1, min(len(rows), SCORED_ROWS))
    return {"f1": f1 / scored, "exact_match": exact / scored}
