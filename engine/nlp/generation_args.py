"""OpenAI-style and Hugging Face generation arguments -> ``generate`` keyword arguments.

Owns: the one mapping every generating path uses (``pgml.transform`` for text-generation, the seq2seq
tasks and the chat form, ``pgml.transform_stream``, ``pgml.generate``): the OpenAI names Korvus and hosted
PostgresML send (``max_tokens``, ``stop``, ``n``, ``temperature``, ``top_p``, ``presence_penalty``,
``frequency_penalty``, ``seed``, ``logit_bias``, ``echo``, …) turned into Hugging Face ones, native Hugging
Face names passed as they are, and 22023 for a name neither knows (listing the accepted ones); which logits
processors and stopping criteria carry what HF has no argument for (OpenAI's additive presence / frequency
penalties, a seeded sampler with its own ``torch.Generator``, stop strings); cutting a text at its first stop
string (OpenAI leaves the stop text out); capping ``max_new_tokens`` at the room left in the model's context.

Must not: load models, run ``generate``, know SQL, or import ML libraries at import time (the processors
themselves are ``engine.nlp.decoding``'s).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from engine.api import InvalidArgument
from engine.nlp.decoding import OpenAIPenalties, SeededSampler, StopAtStrings

# OpenAI name -> what it becomes (also the text of the 22023 hint and of the docs).
OPENAI_ARGS: dict[str, str] = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "n": "num_return_sequences",
    "stop": "stop strings; the text ends before the first one (not included)",
    "temperature": "temperature, sampling on (do_sample); 0 is greedy decoding",
    "top_p": "top_p, sampling on (do_sample)",
    "presence_penalty": "OpenAI's additive penalty on tokens already generated",
    "frequency_penalty": "OpenAI's additive penalty per occurrence of a generated token",
    "seed": "a seeded generator: the same seed samples the same text",
    "logit_bias": "sequence_bias (one-token sequences)",
    "echo": "return_full_text (text-generation)",
    "best_of": "accepted; only best_of = n is honoured",
    "logprobs": "accepted; no log probabilities are returned",
    "top_logprobs": "accepted; no log probabilities are returned",
    "response_format": "accepted; only text is produced",
    "user": "accepted and ignored",
}
MAX_N = 128  # OpenAI's limit for n
# generate() arguments that change what it returns (a dict instead of token ids): the engine decodes ids.
RETURN_SHAPE_ARGS = frozenset(
    {"return_dict_in_generate", "output_scores", "output_logits", "output_attentions", "output_hidden_states"}
)
# The sampling parameters (HF's former "warpers") and the values generate() takes when neither the call nor
# the model's generation config sets them.
SAMPLING_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "top_h": None,
}
# What the sampling parameters are set to when the seeded sampler applies them itself: no effect in generate.
NEUTRAL_SAMPLING: dict[str, Any] = {**SAMPLING_DEFAULTS, "top_k": 0}


@functools.cache
def hf_generate_args() -> frozenset[str]:
    """The names Hugging Face ``generate`` takes as generation parameters (GenerationConfig's fields), less
    the ones that change its return type."""
    from transformers import GenerationConfig  # lazy: transformers imports torch (seconds)

    names = {name for name in vars(GenerationConfig()) if not name.startswith("_")}  # type: ignore[no-untyped-call]
    return frozenset(names - RETURN_SHAPE_ARGS - {"transformers_version"})


@dataclass
class GenerationArgs:
    """One call's generation arguments, mapped: ``kwargs`` holds Hugging Face names (and the path's own
    arguments, which the caller pops); what HF has no argument for is kept beside."""

    kwargs: dict[str, Any]
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    echo: bool | None = None
    notices: tuple[str, ...] = field(default=())

    @property
    def sequences(self) -> int:
        """Sequences returned per input (``num_return_sequences``)."""
        value = self.kwargs.get("num_return_sequences")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1

    def with_defaults(self, defaults: Mapping[str, Any]) -> GenerationArgs:
        """These args over ``defaults`` (a model's task-specific generation parameters)."""
        return replace(self, kwargs={**defaults, **self.kwargs})

    def report(self, notices: list[str]) -> None:
        """Adds this call's notices to the call's notices channel, each once."""
        for notice in self.notices:
            if notice not in notices:
                notices.append(notice)

    def cut(self, text: str) -> str:
        """``text`` up to (not including) its first stop string."""
        return cut(text, self.stop)

    def per_call(self, batch: int) -> int:
        """Inputs per ``generate`` call so that one call holds at most ``batch`` sequences."""
        return max(1, batch // self.sequences)

    def call_kwargs(
        self, model: Any, tokenizer: Any, prompt_length: int | Callable[[], int], *, pipeline: bool = False
    ) -> dict[str, Any]:
        """The keyword arguments for one ``generate`` (or text-generation pipeline) call on ``model``.

        ``prompt_length``: the tokens of the (padded) prompts, for the cap of ``max_new_tokens`` at the
        room left in the model's context. Stop strings (OpenAI's, and HF's own ``stop_strings`` /
        ``stop_sequence``) become a stopping criterion under ``"stopping_criteria"`` (a list: the caller adds
        its own criteria to it). With ``pipeline`` the sampling parameters are all set (the model's
        generation config, as transformers 4.x's pipeline used: not transformers 5's own pipeline defaults).
        """
        kwargs = dict(self.kwargs)
        _cap(kwargs, model, prompt_length)
        stops = list(self.stop)
        for name in ("stop_strings", "stop_sequence") if pipeline else ("stop_strings",):
            native = kwargs.pop(name, None)  # HF's own: generation stops there, the text is not cut
            if native is not None:
                stops += [native] if isinstance(native, str) else list(native)
        if stops:
            if any(not isinstance(stop, str) or not stop for stop in stops):
                raise InvalidArgument("stop strings must be non-empty strings")
            kwargs["stopping_criteria"] = [StopAtStrings(tokenizer, tuple(stops))]
        config = model.generation_config
        if pipeline:
            kwargs.setdefault("do_sample", bool(getattr(config, "do_sample", False)))
        processors: list[Any] = []
        if self.presence_penalty or self.frequency_penalty:
            processors.append(OpenAIPenalties(self.presence_penalty, self.frequency_penalty))
        sampling = bool(kwargs.get("do_sample", getattr(config, "do_sample", False)))
        if sampling:
            resolved = _resolved_sampling(config, kwargs)
            if pipeline:
                kwargs.update(resolved)
            if self.seed is not None:
                beams = kwargs.get("num_beams", getattr(config, "num_beams", None) or 1)
                if isinstance(beams, int) and beams > 1:
                    raise InvalidArgument(
                        "seed applies to sampling without beam search",
                        hint='Pass "num_beams": 1 with a seed, or leave the seed out.',
                    )
                processors.append(SeededSampler(self.seed, resolved))
                kwargs.update({key: value for key, value in NEUTRAL_SAMPLING.items() if key in resolved})
        if processors:
            kwargs["logits_processor"] = processors
        return kwargs


def parse(args: Mapping[str, Any], extra: Iterable[str] = (), *, prompt_in_output: bool = False) -> GenerationArgs:
    """Maps a call's ``args`` (OpenAI-style or Hugging Face names) to :class:`GenerationArgs`.

    ``extra``: the names the calling path takes itself (``batch_size``, ``chat_template``, the
    text-generation pipeline's ``return_full_text``, …). ``prompt_in_output``: whether the path can
    return the prompt with the text (``echo``). Raises InvalidArgument (22023) for a name no mapping
    knows and generate does not take, for a bad value, and for an OpenAI name and its HF twin both given
    with different values.
    """
    kwargs = dict(args)
    openai = {key: kwargs.pop(key) for key in list(kwargs) if key in OPENAI_ARGS}
    openai = {key: value for key, value in openai.items() if value is not None}  # OpenAI: null = the default
    accepted = hf_generate_args() | frozenset(extra)
    unknown = sorted(key for key in kwargs if key not in accepted)
    if unknown:
        raise _unknown(unknown, frozenset(extra))
    notices: list[str] = []
    for name in ("max_tokens", "max_completion_tokens"):
        if name in openai:
            _twin(kwargs, "max_new_tokens", _integer(name, openai[name], 1), name)
    if "n" in openai:
        n = _integer("n", openai["n"], 1, MAX_N)
        _twin(kwargs, "num_return_sequences", n, "n")
        if n > 1 and "do_sample" not in kwargs and "temperature" not in openai and "num_beams" not in kwargs:
            kwargs["do_sample"] = True  # OpenAI samples by default (temperature 1): n distinct completions
    if "temperature" in openai:
        temperature = _number("temperature", openai["temperature"], 0.0, None)
        if temperature == 0:  # greedy decoding, as OpenAI's temperature 0
            kwargs["do_sample"] = False
            kwargs.pop("temperature", None)
            openai.pop("top_p", None)
        else:
            _twin(kwargs, "temperature", temperature, "temperature")
            kwargs.setdefault("do_sample", True)
    if "top_p" in openai:
        top_p = _number("top_p", openai["top_p"], 0.0, 1.0)
        if top_p == 0:
            raise InvalidArgument("top_p must be greater than 0")
        _twin(kwargs, "top_p", top_p, "top_p")
        kwargs.setdefault("do_sample", True)
    presence = _number("presence_penalty", openai.get("presence_penalty", 0.0), -2.0, 2.0)
    frequency = _number("frequency_penalty", openai.get("frequency_penalty", 0.0), -2.0, 2.0)
    seed = None
    if "seed" in openai:
        seed = _integer("seed", openai["seed"], -(2**63), 2**64 - 1) % 2**64
    stop = _stops(openai["stop"]) if "stop" in openai else ()
    if "logit_bias" in openai:
        if "sequence_bias" in kwargs:
            raise InvalidArgument("pass logit_bias or sequence_bias, not both")
        kwargs["sequence_bias"] = _logit_bias(openai["logit_bias"])
    echo = None
    if "echo" in openai:
        if not isinstance(openai["echo"], bool):
            raise InvalidArgument("echo must be true or false")
        echo = openai["echo"]
        if echo and not prompt_in_output:
            notices.append('the generation arg "echo" is ignored: this task returns new text only')
    if "best_of" in openai:
        best_of = _integer("best_of", openai["best_of"], 1)
        if best_of > max(1, int(kwargs.get("num_return_sequences", 1) or 1)):
            notices.append('the generation arg "best_of" is ignored: n completions are generated, not best_of')
    for name in ("logprobs", "top_logprobs"):
        if openai.get(name):
            notices.append(f'the generation arg "{name}" is ignored: PostgresML results hold text only')
    response_format = openai.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        notices.append('the generation arg "response_format" is ignored: the model\'s text is returned as is')
    sequences = kwargs.get("num_return_sequences", 1)
    beams = kwargs.get("num_beams", 1)
    if kwargs.get("do_sample") is False and isinstance(sequences, int) and sequences > 1 and beams in (None, 1):
        raise InvalidArgument(
            f"{sequences} sequences per input need sampling: greedy decoding (temperature 0) gives one",
            hint="Pass a temperature above 0, or n 1.",
        )
    return GenerationArgs(kwargs, stop, seed, presence, frequency, echo, tuple(notices))


def cut(text: str, stops: Iterable[str], start: int = 0) -> str:
    """``text`` up to its first stop string at or after ``start``."""
    at = first_stop(text, stops, start)
    return text if at < 0 else text[:at]


def first_stop(text: str, stops: Iterable[str], start: int = 0) -> int:
    """Where the earliest stop string in ``text[start:]`` begins, or -1."""
    found = [at for at in (text.find(stop, start) for stop in stops if stop) if at >= 0]
    return min(found) if found else -1


def held_back(text: str, stops: Iterable[str], start: int = 0) -> int:
    """How many characters at the end of ``text`` (not before ``start``) could begin a stop string: a stream
    holds them until the next tokens tell."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text) - start), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


# --------------------------------------------------------------------------- #
# Checks
# --------------------------------------------------------------------------- #


def _unknown(names: list[str], extra: frozenset[str]) -> InvalidArgument:
    quoted = ", ".join(f'"{name}"' for name in names)
    own = f" This task's own: {', '.join(sorted(extra))}." if extra else ""
    return InvalidArgument(
        f"unknown generation arg{'s' if len(names) > 1 else ''} {quoted}",
        detail=f"Accepted: the OpenAI-style {', '.join(OPENAI_ARGS)}; Hugging Face generate's "
        f"{', '.join(sorted(hf_generate_args()))}.{own}",
        hint="OpenAI-style names map to Hugging Face generate: max_tokens -> max_new_tokens, n -> "
        "num_return_sequences, stop -> stop strings, temperature / top_p -> sampling.",
    )


def _twin(kwargs: dict[str, Any], hf_name: str, value: Any, name: str) -> None:
    """Sets ``kwargs[hf_name]`` from OpenAI's ``name``; both given with different values is an error."""
    if hf_name in kwargs and hf_name != name and kwargs[hf_name] != value:
        raise InvalidArgument(f'"{name}" and "{hf_name}" disagree', hint="Pass one of them.")
    kwargs[hf_name] = value


def _integer(name: str, value: Any, low: int, high: int | None = None) -> int:
    """An integer (JSON's 100.0 from JavaScript clients included) within [low, high]."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise InvalidArgument(f"{name} must be an integer {bound}, not {value!r}")
    return value


def _number(name: str, value: Any, low: float, high: float | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a number, not {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"from {low:g} to {high:g}" if high is not None else f"of at least {low:g}"
        raise InvalidArgument(f"{name} must be a number {bound}, not {value!r}")
    return float(value)


def _stops(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or any(not isinstance(item, str) or not item for item in items):
        raise InvalidArgument("stop must be a non-empty string or an array of them")
    return tuple(dict.fromkeys(items))


def _logit_bias(value: Any) -> list[list[Any]]:
    """OpenAI's ``{"<token id>": bias}`` as HF's ``sequence_bias`` (``[[[id], bias], …]``)."""
    if not isinstance(value, dict):
        raise InvalidArgument('logit_bias must be an object {"<token id>": <bias from -100 to 100>}')
    out: list[list[Any]] = []
    for key, bias in value.items():
        if not str(key).isdigit():
            raise InvalidArgument(f"logit_bias keys must be token ids, not {key!r}")
        out.append([[int(key)], _number("a logit_bias value", bias, -100.0, 100.0)])
    return out


def _context(model: Any) -> int | None:
    """The longest sequence the model's positions allow (None: no fixed limit)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _cap(kwargs: dict[str, Any], model: Any, prompt_length: int | Callable[[], int]) -> None:
    """``max_new_tokens`` no larger than the room the model's context leaves after the prompt (Korvus's
    rag asks for 1,000,000 by default): generation ends there, as OpenAI ends at the context length."""
    wanted = kwargs.get("max_new_tokens")
    context = _context(model)
    if not isinstance(wanted, int) or isinstance(wanted, bool) or context is None or wanted < 1:
        return
    decoder_only = not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    used = (prompt_length() if callable(prompt_length) else prompt_length) if decoder_only else 0
    kwargs["max_new_tokens"] = max(1, min(wanted, context - used))


def _resolved_sampling(config: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling parameters a sampling ``generate`` call uses: the call's, else the model's, else HF's."""
    out: dict[str, Any] = {}
    for key, default in SAMPLING_DEFAULTS.items():
        if key == "top_h" and not hasattr(config, key):
            continue
        value = kwargs[key] if key in kwargs else getattr(config, key, None)
        out[key] = default if value is None else value
    return out
