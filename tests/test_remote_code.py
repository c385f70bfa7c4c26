"""Code shipped with a model, or named in generation args, never runs unless ``[engine] trust_remote_code``.

Each model here is a real (tiny, random) model inside the model directories whose code would write a
marker file when imported: through ``auto_map`` in its config.json (loading kwargs, at any depth), or in
``custom_generate/generate.py`` (generation args of pgml.transform, transform_stream and pgml.generate).
Every refusal is checked with the marker absent afterwards; one configured load shows the marker works.
Also: client batch sizes are capped at ``[engine] batch_size``, and with downloads allowed a hub name is
never opened as a directory relative to the working directory.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from engine.api import Canceled, EngineConfig, EngineError, InvalidArgument, UnknownModel
from engine.nlp.embed import embed
from engine.nlp.finetune import tuned
from engine.nlp.rank import rank
from engine.nlp.stream import stream
from engine.runtime.cache import ModelCache
from engine.runtime.confine import confine_kwargs, generation_kwargs
from tests.test_transform import MODEL_DIRS, make_ctx, models, one
from tests.tiny_models import tiny_bert_classifier, tiny_gpt2

__all__ = ["models"]  # the fixture, imported for the model directories make_ctx() uses

EVIL = """
from pathlib import Path
Path({marker!r}).write_text("ran")
from transformers import BertConfig


class EvilConfig(BertConfig):
    pass
"""
GENERATE = """
from pathlib import Path
Path({marker!r}).write_text("ran")


def generate(model, **kwargs):
    raise RuntimeError("custom generate ran")
"""


class Evil:
    """A model directory whose code writes ``marker`` when it runs."""

    def __init__(self, root: Path, marker: Path) -> None:
        self.root = root
        self.marker = marker

    def ran(self) -> bool:
        found = self.marker.exists()
        self.marker.unlink(missing_ok=True)
        return found


@pytest.fixture(scope="module")
def evil(models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Evil:
    """``evil`` (a BERT with auto_map code) and ``evil-gpt2`` (a GPT-2 with custom_generate), in MODEL_DIRS."""
    root = Path(MODEL_DIRS[0])
    marker = tmp_path_factory.mktemp("marker") / "ran"
    bert = tiny_bert_classifier(root / "evil")
    config = json.loads((bert / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_code.EvilConfig"}
    (bert / "config.json").write_text(json.dumps(config))
    (bert / "evil_code.py").write_text(EVIL.format(marker=str(marker)))
    gpt = tiny_gpt2(root / "evil-gpt2")
    (gpt / "custom_generate").mkdir()
    (gpt / "custom_generate" / "generate.py").write_text(GENERATE.format(marker=str(marker)))
    return Evil(root, marker)


NESTED = [
    {"config_kwargs": {"trust_remote_code": True}},
    {"model_kwargs": {"trust_remote_code": True}},
    {"tokenizer_kwargs": {"trust_remote_code": True}},
    {"model_kwargs": {"something": {"trust_remote_code": "yes"}}},
]


def refused(call: Any, evil: Evil) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        call()
    assert info.value.sqlstate == "22023"
    assert not evil.ran()
    return info.value


def test_nested_trust_remote_code_is_refused_for_embed(evil: Evil) -> None:
    for kwargs in [{"trust_remote_code": True}, *NESTED]:
        error = refused(lambda kwargs=kwargs: embed([("evil", "x", kwargs)], make_ctx()), evil)
        assert error.hint and "[engine] trust_remote_code" in error.hint, kwargs


def test_nested_trust_remote_code_is_refused_for_rank(evil: Evil) -> None:
    for kwargs in [*NESTED, {"processor_kwargs": {"trust_remote_code": True}}]:
        refused(lambda kwargs=kwargs: rank([("evil", "q", ["a"], kwargs)], make_ctx()), evil)


def test_nested_trust_remote_code_is_refused_for_transform(evil: Evil) -> None:
    for kwargs in [{"trust_remote_code": True}, *NESTED]:
        task = {"task": "text-classification", "model": "evil", **kwargs}
        refused(lambda task=task: one(make_ctx(), task, ["hello"]), evil)


def test_configured_trust_remote_code_runs_the_code(evil: Evil) -> None:
    """The marker works: with [engine] trust_remote_code = true the nested flag does load the code."""
    # The evil config class is no real model (the load fails after its import); what matters is that it ran.
    with pytest.raises((EngineError, ValueError)):
        embed([("evil", "x", {"config_kwargs": {"trust_remote_code": True}})], make_ctx(trust_remote_code=True))
    assert evil.ran()


def test_unsafe_loading_overrides_are_refused(evil: Evil) -> None:
    config = EngineConfig(model_dirs=tuple(MODEL_DIRS))
    for init in (
        {"weights_only": False},
        {"model_kwargs": {"weights_only": False}},
        {"use_safetensors": False},
        {"model_kwargs": {"use_safetensors": False}},
    ):
        with pytest.raises(InvalidArgument):
            confine_kwargs(init, config)
    assert confine_kwargs({}, config) == {"trust_remote_code": False}  # explicitly off, never a library default
    assert confine_kwargs({"model_kwargs": {"trust_remote_code": False}}, config)["trust_remote_code"] is False
    allowed = EngineConfig(model_dirs=tuple(MODEL_DIRS), trust_remote_code=True)
    assert confine_kwargs({"trust_remote_code": True}, allowed)["trust_remote_code"] is True
    assert confine_kwargs({"use_safetensors": True}, config)["use_safetensors"] is True


# --------------------------------------------------------------------------- #
# Generation args
# --------------------------------------------------------------------------- #


def code_args(evil: Evil) -> list[dict[str, Any]]:
    where = str(evil.root / "evil-gpt2")
    return [
        {"custom_generate": where, "trust_remote_code": True, "max_new_tokens": 2},
        {"custom_generate": where, "max_new_tokens": 2},
        {"trust_remote_code": True, "max_new_tokens": 2},
        {"generate_kwargs": {"custom_generate": where, "trust_remote_code": True}},
        {"assistant_model": where, "max_new_tokens": 2},
    ]


def test_generation_args_that_load_code_are_refused_in_transform(evil: Evil, models: dict[str, str]) -> None:
    chat = [json.dumps({"role": "user", "content": "hello"})]
    for args in code_args(evil):
        for task, inputs in (
            ({"task": "text-generation", "model": "evil-gpt2"}, ["hello"]),
            ({"task": "conversational", "model": "evil-gpt2"}, chat),
            ({"task": "text2text-generation", "model": models["t5"]}, ["hello"]),
            ({"task": "summarization", "model": models["t5"]}, ["hello"]),
            ({"task": "translation_en_to_fr", "model": models["t5"]}, ["hello"]),
        ):
            refused(lambda task=task, inputs=inputs, args=args: one(make_ctx(), task, inputs, args), evil)


def test_generation_args_that_load_code_are_refused_in_transform_stream(evil: Evil, models: dict[str, str]) -> None:
    for args in code_args(evil):
        for task in (
            {"task": "text-generation", "model": "evil-gpt2"},
            {"task": "summarization", "model": models["t5"]},
        ):
            refused(lambda task=task, args=args: list(stream(task, args, "hello", make_ctx())), evil)


def tuned_files(directory: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    files[tuned.MANIFEST] = json.dumps({"kind": "causal", "task": "text-generation"}).encode()
    return files


def test_generation_args_that_load_code_are_refused_in_generate(evil: Evil) -> None:
    files = tuned_files(evil.root / "evil-gpt2")
    config = EngineConfig(device="cpu")
    for args in code_args(evil):
        refused(lambda args=args: tuned.generate_tuned(files, "evil", ["hi"], args, config, ModelCache(1 << 30)), evil)


def test_generation_kwargs_pass_plain_args() -> None:
    args = {"max_new_tokens": 3, "do_sample": False, "generate_kwargs": {"num_beams": 2}}
    assert generation_kwargs(args) == args
    with pytest.raises(InvalidArgument):
        generation_kwargs({"streamer": "x"})


# --------------------------------------------------------------------------- #
# Cancel, batch sizes, downloads
# --------------------------------------------------------------------------- #


def test_cancel_stops_pgml_generate(evil: Evil, tmp_path: Path) -> None:
    files = tuned_files(tiny_gpt2(tmp_path / "gpt2"))
    cache, config = ModelCache(1 << 30), EngineConfig(device="cpu")
    tuned.generate_tuned(files, "tuned", ["hi"], {"max_new_tokens": 1}, config, cache)  # loaded and warm
    cancelled = threading.Event()
    timer = threading.Timer(0.3, cancelled.set)
    timer.start()
    with pytest.raises(Canceled):  # 8000 tokens: far longer than the timer, unless the cancel stops it
        tuned.generate_tuned(files, "tuned", ["hi"], {"max_new_tokens": 8000, "min_new_tokens": 8000}, config, cache,
                            cancelled=cancelled)  # fmt: skip
    timer.cancel()


class CountingEncoder:
    """A stand-in for the model's encode(): records the slices the engine hands it (the engine's batching)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def encode(self, texts: list[str], batch_size: int, **kwargs: Any) -> Any:
        import numpy as np

        self.sizes.append(len(texts))
        return np.zeros((len(texts), 2), dtype=np.float32)


def test_client_batch_size_never_exceeds_the_configured_one(models: dict[str, str]) -> None:
    from engine.nlp.embed import _encode

    ctx = make_ctx(batch_size=4)
    encoder = CountingEncoder()
    _encode(encoder, ["x"] * 10, {"batch_size": 100000}, ctx)
    assert max(encoder.sizes) == 4  # not one 10-text slice
    encoder = CountingEncoder()
    _encode(encoder, ["x"] * 10, {"batch_size": 2}, ctx)
    assert max(encoder.sizes) == 2  # less is fine
    with pytest.raises(InvalidArgument):
        _encode(CountingEncoder(), ["x"], {"batch_size": "many"}, ctx)
    assert ctx.batch_size(100000) == 4 and ctx.batch_size(None) == 4 and ctx.batch_size(0) == 1


def test_downloads_never_open_a_relative_directory(
    models: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    tiny_bert_classifier(tmp_path / "tmp" / "x")  # a loadable model relative to the working directory
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # downloads allowed, network off
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ctx = make_ctx(allow_downloads=True)
    with pytest.raises(UnknownModel) as info:
        one(ctx, {"task": "text-classification", "model": "tmp/x"}, ["hello"])
    assert info.value.sqlstate == "42704"
    with pytest.raises(UnknownModel):
        embed([("tmp/x", "hello", {})], ctx)
