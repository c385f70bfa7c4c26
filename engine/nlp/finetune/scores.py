"""The scores a ``pgml.tune`` run reports, as pure functions of predictions and references.

Owns: macro F1 and accuracy of a classifier, sacreBLEU-style corpus BLEU and ROUGE-1/2 of generated
texts (simple word tokens: close to but not identical with those libraries), and SQuAD's answer
normalization, F1 and exact match.

Must not: run models (``engine.nlp.finetune.trainer`` generates the outputs it scores), or import an ML
library.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Any

import numpy as np


def classification_scores(prediction: Any) -> dict[str, float]:
    """Macro F1 (over the classes in truth or prediction, as scikit-learn) and accuracy."""

    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted, truth = np.asarray(logits).argmax(-1), np.asarray(prediction.label_ids).reshape(-1)
    scores = []
    for label in np.union1d(truth, predicted):
        tp = float(np.sum((predicted == label) & (truth == label)))
        fp_fn = float(np.sum(predicted == label) + np.sum(truth == label)) - 2 * tp
        scores.append(2 * tp / (2 * tp + fp_fn) if tp else 0.0)
    return {"f1": float(np.mean(scores)), "accuracy": float(np.mean(predicted == truth))}


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


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> list[str]:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces -> words."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return _ARTICLES.sub(" ", text).split()


def answer_f1(prediction: str, truth: str) -> float:
    predicted, gold = normalize_answer(prediction), normalize_answer(truth)
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum(min(predicted.count(w), gold.count(w)) for w in set(predicted))
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)
