"""Extractive question answering for ``pgml.transform`` (transformers 5 has no pipeline for it).

Owns: reading each ``{"question", "context"}`` input, and the spans of an ``AutoModelForQuestionAnswering``
over overlapping windows of a long context, as the old pipeline scored them (also tune's scoring).

Must not: load, resolve or cache models (``engine.nlp.tasks`` does), or import torch at import time.
"""

from __future__ import annotations

import json
from typing import Any

from engine.api import InvalidArgument
from engine.runtime.context import Context

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
        found = spans(model, tokenizer, text, context, window, int(args.get("max_answer_len", 15)))
        best = [
            {"score": score, "start": start, "end": end, "answer": context[start:end]} for score, start, end in found
        ][:top_k]
        results.append(best if top_k > 1 else (best[0] if best else {"score": 0.0, "start": 0, "end": 0, "answer": ""}))
    return results


def spans(
    model: Any, tokenizer: Any, text: str, context: str, window: dict[str, int], max_len: int
) -> list[tuple[float, int, int]]:
    """Candidate answers (score, start char, end char), best first, over every window of the context."""
    import torch  # lazy: seconds to import; the engine imports without it

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
