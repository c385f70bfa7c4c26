"""The objects ``generate`` calls each decoding step: stopping criteria and logits processors.

Owns: stopping once the call is canceled or closed (:class:`StopWhen`, in every generate of the engine),
at stop strings (:class:`StopAtStrings`), OpenAI's additive presence / frequency penalties
(:class:`OpenAIPenalties`), and a seeded sampler with its own ``torch.Generator`` (:class:`SeededSampler`).

Must not: decide which of them a call gets (``engine.nlp.generation_args`` does), load models, or import
torch or transformers at import time: each is imported when ``generate`` first calls one (lazy: seconds
to import, and the engine must import without them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any


class StopWhen:
    """A ``generate`` stopping criterion: every sequence stops once any of ``checks`` says so (a cancel flag's
    ``is_set`` — itself a checkpoint of the engine's fair turns —, a closed stream, all stop strings met)."""

    def __init__(self, *checks: Callable[[], bool]) -> None:
        self.checks = checks

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        stop = any(check() for check in self.checks)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def stopping(*checks: Callable[[], bool], more: Iterable[Any] = ()) -> Any:
    """The stopping criteria of a ``generate`` call: stop once a check says so, and ``more`` (stop strings)."""
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList([StopWhen(*checks), *more])


class _Steps:
    """Tells where a ``generate`` call's new tokens begin in the ``input_ids`` it passes each step (a
    processor may be reused by a pipeline's next generate: a new call is a change of rows or length)."""

    def __init__(self) -> None:
        self.start = 0
        self._last: tuple[int, int] | None = None

    def new(self, input_ids: Any, offset: int) -> bool:
        """Records this step; True when it is the first of a generation (its new tokens start ``offset`` back)."""
        rows, length = int(input_ids.shape[0]), int(input_ids.shape[1])
        fresh = self._last is None or self._last[0] != rows or length != self._last[1] + 1
        if fresh:
            self.start = length - offset
        self._last = (rows, length)
        return fresh


class StopAtStrings:
    """A stopping criterion: a sequence is done once its generated text (decoded, special tokens skipped)
    holds one of ``stops``. Decodes only the last tokens, enough for the longest stop string; the text is
    cut after decoding (``cut``), so this only ends generation early."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.window = 2 * max(len(stop) for stop in stops) + 8
        self._steps = _Steps()
        self._done: list[bool] = []

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        if self._steps.new(input_ids, 1):  # the criterion sees each step's token already appended
            self._done = [False] * int(input_ids.shape[0])
        start = max(self._steps.start, int(input_ids.shape[1]) - self.window)
        for row, done in enumerate(self._done):
            if not done:
                text = self.tokenizer.decode(input_ids[row, start:].tolist(), skip_special_tokens=True)
                self._done[row] = any(stop in text for stop in self.stops)
        return torch.tensor(self._done, dtype=torch.bool, device=input_ids.device)


class OpenAIPenalties:
    """OpenAI's penalties on the tokens generated so far (not the prompt's):
    ``logit -= frequency * count + presence * (count > 0)``."""

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence = presence
        self.frequency = frequency
        self._steps = _Steps()

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self._steps.new(input_ids, 0)  # a processor sees the tokens before this step's
        new = input_ids[:, self._steps.start :]
        if new.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, new, torch.ones_like(new, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class SeededSampler:
    """Sampling with a generator of its own, seeded once per ``generate``: applies the sampling parameters
    (temperature, top-k, top-p, …) as generate would, draws each row's next token, and leaves only that
    token possible, so generate's own draw (from the shared global generator) can only pick it. Other
    sessions' generations share no random state with it: the same seed gives the same text."""

    def __init__(self, seed: int, sampling: Mapping[str, Any]) -> None:
        self.seed = seed
        self.sampling = dict(sampling)
        self._generator: Any = None
        self._warpers: list[Any] = []
        self._steps = _Steps()

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self._steps.new(input_ids, 0) or self._generator is None:  # a new generation: seeded afresh
            self._generator = torch.Generator(device=scores.device).manual_seed(self.seed)
            self._warpers = _warpers(self.sampling, scores.device)
        for warper in self._warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        picked = torch.multinomial(probs, num_samples=1, generator=self._generator)
        only = torch.full_like(scores, -math.inf)
        return only.scatter_(1, picked, 0.0)


def _warpers(sampling: Mapping[str, Any], device: Any) -> list[Any]:
    """HF's sampling processors for these parameters, in generate's order (no beams: keep at least 1)."""
    from transformers.generation import logits_process as lp

    out: list[Any] = []
    temperature = sampling.get("temperature", 1.0)
    if temperature is not None and temperature != 1.0:
        out.append(lp.TemperatureLogitsWarper(temperature))
    if sampling.get("top_h") is not None and hasattr(lp, "TopHLogitsWarper"):
        out.append(lp.TopHLogitsWarper(top_h=sampling["top_h"]))
    if sampling.get("top_k") not in (None, 0):
        out.append(lp.TopKLogitsWarper(top_k=sampling["top_k"], min_tokens_to_keep=1))
    if sampling.get("top_p") is not None and sampling["top_p"] < 1.0:
        out.append(lp.TopPLogitsWarper(top_p=sampling["top_p"], min_tokens_to_keep=1))
    if sampling.get("min_p") is not None:
        out.append(lp.MinPLogitsWarper(min_p=sampling["min_p"], min_tokens_to_keep=1))
    if sampling.get("typical_p") is not None and sampling["typical_p"] < 1.0:
        out.append(lp.TypicalLogitsWarper(mass=sampling["typical_p"], min_tokens_to_keep=1))
    if sampling.get("epsilon_cutoff") and 0.0 < sampling["epsilon_cutoff"] < 1.0:
        out.append(lp.EpsilonLogitsWarper(epsilon=sampling["epsilon_cutoff"], min_tokens_to_keep=1))
    if sampling.get("eta_cutoff") and 0.0 < sampling["eta_cutoff"] < 1.0:
        out.append(lp.EtaLogitsWarper(epsilon=sampling["eta_cutoff"], min_tokens_to_keep=1, device=device))
    return out
