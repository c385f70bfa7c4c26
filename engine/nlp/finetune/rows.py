"""What a ``pgml.tune`` run trains on: per task kind, the model to fine-tune and its tokenized rows.

Owns: loading the base model for a kind (sequence classification, causal LM, seq2seq LM, extractive
QA), tokenizing the rows of each kind (labels masked over a conversation's prompt, question-answering
windows labelled with the answer's token span), the collators, and the prompt of one exchange
(:func:`chat_prompt`: the tokenizer's chat template or the run's ``prompt_template``).

Must not: run the Trainer (``engine.nlp.finetune.trainer`` does), or import torch or transformers at
import time (each builder imports them when a run starts: seconds to import).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.api import EngineConfig, EngineError, InvalidArgument
from engine.nlp.finetune.plan import Plan, check_template, input_limit
from engine.nlp.finetune.scores import classification_scores

_MARK = "\ue000pgml-assistant\ue000"  # stands in for the reply, to split the prompt from it


@dataclass
class Job:
    """What a Trainer run needs, built per kind."""

    model: Any
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    collator: Any
    compute_metrics: Callable[[Any], dict[str, float]] | None = None
    labels: list[Any] | None = None


def _load_model(kind: str, path: str, name: str, config: EngineConfig, tokenizer: Any, **kwargs: Any) -> Any:
    import torch  # lazy: seconds to import; the engine imports without them
    import transformers

    auto = {
        "classification": transformers.AutoModelForSequenceClassification,
        "causal": transformers.AutoModelForCausalLM,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "qa": transformers.AutoModelForQuestionAnswering,
    }[kind]
    try:
        model = auto.from_pretrained(path, dtype=torch.float32, trust_remote_code=config.trust_remote_code, **kwargs)
    except ValueError as exc:
        raise InvalidArgument(f"model {name} cannot be fine-tuned as a {kind} model: {exc}") from exc
    except OSError as exc:
        raise EngineError(f"could not load model {name}: {exc}") from exc
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _classification_job(
    plan: Plan, tokenizer: Any, path: str, name: str, config: EngineConfig,
    train: dict[str, list[Any]], test: dict[str, list[Any]],
) -> Job:  # fmt: skip
    from transformers import DataCollatorWithPadding  # lazy: transformers imports torch (seconds)

    labels = sorted(set(train["class_column"]) | set(test["class_column"]), key=lambda v: (type(v).__name__, v))
    if len(labels) < 2:
        raise InvalidArgument(f"text classification needs at least 2 distinct classes, found {len(labels)}")
    id2label = {i: str(v) for i, v in enumerate(labels)}
    index = {v: i for i, v in enumerate(labels)}
    model = _load_model(
        "classification", path, name, config, tokenizer, num_labels=len(labels), id2label=id2label,
        label2id={v: i for i, v in id2label.items()}, ignore_mismatched_sizes=True,
    )  # fmt: skip
    length = input_limit(plan, tokenizer)

    def encode(table: dict[str, list[Any]]) -> list[dict[str, Any]]:
        texts = [table["text1_column"], table["text2_column"]] if "text1_column" in table else [table["text_column"]]
        enc = tokenizer(*texts, truncation=True, max_length=length)
        return [{**{k: enc[k][i] for k in enc}, "labels": index[y]} for i, y in enumerate(table["class_column"])]

    stored = [v if isinstance(v, str | int | float | bool) else str(v) for v in labels]
    return Job(model, encode(train), encode(test), DataCollatorWithPadding(tokenizer), classification_scores, stored)


def _seq2seq_job(
    plan: Plan, tokenizer: Any, path: str, name: str, config: EngineConfig,
    train: dict[str, list[Any]], test: dict[str, list[Any]],
) -> Job:  # fmt: skip
    from transformers import DataCollatorForSeq2Seq  # lazy: transformers imports torch (seconds)

    model = _load_model("seq2seq", path, name, config, tokenizer)
    length = input_limit(plan, tokenizer)
    target_length = plan.target_length or length

    def encode(table: dict[str, list[Any]]) -> list[dict[str, Any]]:
        enc = tokenizer(table["text_column"], truncation=True, max_length=length)
        targets = tokenizer(text_target=table["target_column"], truncation=True, max_length=target_length)
        labels = targets["input_ids"]
        return [{**{k: enc[k][i] for k in enc}, "labels": labels[i]} for i in range(len(labels))]

    return Job(model, encode(train), encode(test), DataCollatorForSeq2Seq(tokenizer, model=model))


def _causal_job(
    plan: Plan, tokenizer: Any, path: str, name: str, config: EngineConfig,
    train: dict[str, list[Any]], test: dict[str, list[Any]],
) -> Job:  # fmt: skip
    from transformers import DataCollatorForSeq2Seq  # lazy: transformers imports torch (seconds)

    if tokenizer.pad_token_id is None:
        raise InvalidArgument(f"the tokenizer of {name} has neither a pad nor an EOS token")
    model = _load_model("causal", path, name, config, tokenizer)
    length = input_limit(plan, tokenizer)

    def encode(table: dict[str, list[Any]]) -> list[dict[str, Any]]:
        if plan.task == "text_generation":
            return [_text_row(tokenizer, length, text) for text in table["text_column"]]
        rows = zip(table["system_column"], table["user_column"], table["assistant_column"], strict=True)
        return [conversation_row(plan, tokenizer, length, *row) for row in rows]

    # Pads input_ids with the pad token and labels with -100: right for causal LMs too.
    return Job(model, encode(train), encode(test), DataCollatorForSeq2Seq(tokenizer, padding=True))


def chat_prompt(tokenizer: Any, template: str | None, system: str | None, user: str, assistant: str) -> tuple[str, str]:
    """``(prompt, full text)`` of one exchange: the prompt ends where the assistant's reply starts."""
    if template is not None:
        template = check_template(template)  # also a stored one: the manifest comes from pgml.files
        text = template.format(system=system or "", user=user, assistant=_MARK, eos_token=tokenizer.eos_token or "")
    elif not getattr(tokenizer, "chat_template", None):
        example = '"{system}\\nUser: {user}\\nAssistant: {assistant}{eos_token}"'
        raise InvalidArgument(
            "the tokenizer has no chat template", hint=f"Pass hyperparams.prompt_template: {example}."
        )
    else:
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": _MARK}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as exc:  # jinja2 TemplateError (e.g. a template without a system role)
            raise InvalidArgument(f"the chat template rejected a conversation: {exc}") from exc
    if _MARK not in text:
        raise InvalidArgument("the prompt template drops the assistant's message")
    return text[: text.index(_MARK)], text.replace(_MARK, assistant)


def conversation_row(
    plan: Plan, tokenizer: Any, length: int, system: str | None, user: str, assistant: str
) -> dict[str, Any]:
    """Token ids with labels masked (-100) over the prompt: the loss is on the assistant's reply only."""
    prompt, full = chat_prompt(tokenizer, plan.prompt_template, system, user, assistant)
    special = plan.prompt_template is not None  # chat templates spell out their own BOS
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(full, add_special_tokens=special, truncation=True, max_length=length, return_offsets_mapping=fast)
    ids = list(enc["input_ids"])
    if fast:
        prompt_tokens = sum(1 for _, end in enc["offset_mapping"] if end <= len(prompt))
    else:
        prompt_tokens = len(tokenizer(prompt, add_special_tokens=special)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and ids and ids[-1] != eos and len(ids) < length:
        ids.append(eos)  # teach the model to stop
    labels = [-100 if i < prompt_tokens else token for i, token in enumerate(ids)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _qa_job(
    plan: Plan, tokenizer: Any, path: str, name: str, config: EngineConfig,
    train: dict[str, list[Any]], test: dict[str, list[Any]],
) -> Job:  # fmt: skip
    """Extractive question answering: every window of a long context is a row, labelled with the answer's
    token span there (or the first token: no answer in this window, or none at all)."""
    from transformers import DataCollatorWithPadding  # lazy: transformers imports torch (seconds)

    if not getattr(tokenizer, "is_fast", False):
        raise InvalidArgument(f"question answering needs a fast tokenizer (character offsets); {name} has none")
    model = _load_model("qa", path, name, config, tokenizer)
    length = input_limit(plan, tokenizer)
    stride = min(plan.stride, length // 2)

    def encode(table: dict[str, list[Any]]) -> list[dict[str, Any]]:
        rows = zip(table["question_column"], table["context_column"], table["answers_column"], strict=True)
        return [f for q, c, a in rows for f in _qa_rows(tokenizer, length, stride, q, c, answer_span(a, c))]

    return Job(model, encode(train), encode(test), DataCollatorWithPadding(tokenizer))


def _qa_rows(
    tokenizer: Any, length: int, stride: int, question: str, context: str, span: tuple[int, int] | None
) -> list[dict[str, Any]]:
    try:
        enc = tokenizer(question, context, truncation="only_second", max_length=length, stride=stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True)  # fmt: skip
    except Exception as exc:  # e.g. a question longer than max_length
        raise InvalidArgument(f"could not tokenize a question: {exc}") from exc
    names = [n for n in tokenizer.model_input_names if n in enc]
    rows = []
    for i in range(len(enc["input_ids"])):
        start = end = 0
        inside = [j for j, sequence in enumerate(enc.sequence_ids(i)) if sequence == 1]
        offsets = enc["offset_mapping"][i]
        if span is not None and inside and offsets[inside[0]][0] <= span[0] and offsets[inside[-1]][1] >= span[1]:
            start = next(j for j in inside if offsets[j][1] > span[0])
            end = max(j for j in inside if offsets[j][0] < span[1])
        rows.append({**{n: enc[n][i] for n in names}, "start_positions": start, "end_positions": end})
    return rows


def answer_texts(value: str) -> list[str]:
    """The gold answers of an ``answers`` value: SQuAD's ``{"text": [...], "answer_start": [...]}``, or plain text."""
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    if isinstance(parsed, dict):
        texts = parsed.get("text", [])
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise InvalidArgument('answers must be text or JSON {"text": [...], "answer_start": [...]}')
        return [t for t in texts if t]
    if isinstance(parsed, str):
        return [parsed] if parsed else []
    raise InvalidArgument('answers must be text or JSON {"text": [...], "answer_start": [...]}')


def answer_span(value: str, context: str) -> tuple[int, int] | None:
    """Character span of the first answer in ``context`` (its ``answer_start`` when right); None: unanswerable."""
    texts = answer_texts(value)
    if not texts:
        return None
    text = texts[0]
    try:
        starts = json.loads(value).get("answer_start", [])
    except (ValueError, AttributeError):
        starts = []
    start = starts[0] if isinstance(starts, list) and starts and type(starts[0]) is int else -1
    if context[start : start + len(text)] != text if start >= 0 else True:
        start = context.find(text)
    return None if start < 0 else (start, start + len(text))


def _text_row(tokenizer: Any, length: int, text: str) -> dict[str, Any]:
    """Language modelling on the whole text (and an EOS): tokenized as pgml.generate tokenizes its prompts."""
    ids = list(tokenizer(text, add_special_tokens=False, truncation=True, max_length=length)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and len(ids) < length:
        ids.append(eos)
    if not ids:
        raise InvalidArgument("text-generation needs texts of at least one token")
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


BUILDERS: dict[str, Callable[..., Job]] = {
    "classification": _classification_job,
    "seq2seq": _seq2seq_job,
    "causal": _causal_job,
    "qa": _qa_job,
}
