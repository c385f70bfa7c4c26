"""``[engine] embed_backend = "onnx"``: pgml.embed through real proxies running ONNX Runtime.

The same vectors as the torch backend (all-MiniLM-L6-v2 from its PyPI package, and a tiny random DistilBERT
built here, which has no token_type_ids), the export written once into ``onnx_cache_dir`` and reused by the
next proxy, and the errors: a bad backend name at config load, ONNX Runtime missing, an unusable cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest

from proxy.config import ConfigError, load
from tests.conftest import MINILM, Postgres, ProxyProcess, start_proxy
from tests.tiny_models import WORDS

pytestmark = pytest.mark.slow

TEXTS = [
    "The cat sat on the mat.",
    "Stock markets fell sharply on Monday as investors sold shares.",
    "x",
    "A recipe that needs two cups of flour, three eggs and a long, slow bake in a hot oven " * 8,
]
TINY = "tiny-distilbert-embedder"
EXPORTED = "exported a model to ONNX"


def onnx_proxy(pg: Postgres, workdir: Path, model_dirs: str, cache: Path, **env: str) -> ProxyProcess:
    return start_proxy(
        pg.dsn(),
        workdir,
        PGML_PROXY_ENGINE_MODEL_DIRS=model_dirs,
        PGML_PROXY_ENGINE_EMBED_BACKEND="onnx",
        PGML_PROXY_ENGINE_ONNX_CACHE_DIR=str(cache),
        **env,
    )


def embed(dsn: str, model: str, texts: list[str]) -> np.ndarray:
    """The array form: one statement, one encode of every text."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT embed FROM pgml.embed(%s, %s::text[])", (model, texts)).fetchall()
    return np.array([list(row[0]) for row in rows], dtype=np.float64)


def embed_rows(dsn: str, model: str, texts: list[str]) -> np.ndarray:
    """One pgml.embed per text, as a constant call each (simple protocol: no parameters)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = [conn.execute(f"SELECT pgml.embed('{model}', '{text}')").fetchone() for text in texts]
    return np.array([list(row[0]) for row in rows if row is not None], dtype=np.float64)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def tiny_distilbert_embedder(directory: Path) -> Path:
    """A 2-layer random DistilBERT (inputs: input_ids and attention_mask only) with mean pooling, saved as a
    sentence-transformers model."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import DistilBertConfig, DistilBertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(
        [" ".join(WORDS)] * 10, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials)
    )
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"], model_max_length=64,
    )  # fmt: skip
    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=backend.get_vocab_size(), dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64
    )
    hf = directory.parent / f"{directory.name}-hf"
    DistilBertModel(config).save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    transformer = Transformer(str(hf), max_seq_length=64)
    SentenceTransformer(modules=[transformer, Pooling(32, "mean")], device="cpu").save(str(directory))
    return directory


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("onnx-models")
    tiny_distilbert_embedder(base / TINY)
    return base


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache") / "exports"  # created by the proxy on its first export


@pytest.fixture(scope="module")
def first(
    pg: Postgres, model_dir: Path, tiny_dir: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    handle = onnx_proxy(pg, tmp_path_factory.mktemp("onnx-proxy"), f"{model_dir},{tiny_dir}", cache)
    try:
        yield handle
    finally:
        handle.stop()


def test_minilm_same_vectors_as_torch(first: ProxyProcess, proxy: ProxyProcess) -> None:
    onnx = embed(first.dsn(), MINILM, TEXTS)
    torch = embed(proxy.dsn(), MINILM, TEXTS)  # the shared proxy: embed_backend = "torch"
    assert onnx.shape == torch.shape == (len(TEXTS), 384)
    assert min_cosine(onnx, torch) >= 0.999
    single = embed_rows(first.dsn(), MINILM, ["hello world", "a kitten is resting on a rug"])
    assert min_cosine(single, embed_rows(proxy.dsn(), MINILM, ["hello world", "a kitten is resting on a rug"])) >= 0.999
    assert first.log_text().count(EXPORTED) == 1  # one export for every call of the model


def test_tiny_model_without_token_type_ids(first: ProxyProcess, tiny_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(tiny_dir / TINY), device="cpu").encode(TEXTS, convert_to_numpy=True)
    onnx = embed(first.dsn(), TINY, TEXTS)
    assert onnx.shape == reference.shape == (len(TEXTS), 32)
    assert min_cosine(onnx, reference) >= 0.999


def test_export_reused_by_the_next_proxy(
    first: ProxyProcess, pg: Postgres, model_dir: Path, tiny_dir: Path, cache: Path, tmp_path: Path
) -> None:
    before = embed(first.dsn(), MINILM, TEXTS)
    embed(first.dsn(), TINY, TEXTS)
    exports = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(exports) == 2 and all(p.suffix == ".onnx" for p in exports)  # MiniLM and the tiny model, no leftovers
    assert (cache.stat().st_mode & 0o777) == 0o700
    second = onnx_proxy(pg, tmp_path, f"{model_dir},{tiny_dir}", cache)
    try:
        after = embed(second.dsn(), MINILM, TEXTS)
        embed(second.dsn(), TINY, TEXTS)
        log = second.log_text()
    finally:
        second.stop()
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)
    assert EXPORTED not in log
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == exports


def test_changed_model_is_exported_again(pg: Postgres, tiny_dir: Path, tmp_path: Path) -> None:
    """A model directory whose files change (same path) gets a new export, never the stale one."""
    models = tmp_path / "models"
    tiny_distilbert_embedder(models / TINY)
    cache = tmp_path / "cache"
    handle = onnx_proxy(pg, tmp_path, str(models), cache)
    try:
        embed(handle.dsn(), TINY, TEXTS)
    finally:
        handle.stop()
    modules = models / TINY / "modules.json"
    os.utime(modules, ns=(modules.stat().st_atime_ns, modules.stat().st_mtime_ns + 10**9))
    handle = onnx_proxy(pg, tmp_path, str(models), cache)
    try:
        embed(handle.dsn(), TINY, TEXTS)
        assert handle.log_text().count(EXPORTED) == 1
    finally:
        handle.stop()
    assert len(list(cache.iterdir())) == 2


def test_missing_onnxruntime_is_0a000(pg: Postgres, model_dir: Path, tmp_path: Path) -> None:
    """Without ONNX Runtime (an import that fails as a missing package does), embeds fail with 0A000 and a hint
    naming the extra; nothing is written to the cache."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "onnxruntime.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'onnxruntime'\", name='onnxruntime')\n"
    )
    path = os.pathsep.join([str(shadow), *filter(None, [os.environ.get("PYTHONPATH")])])
    cache = tmp_path / "cache"
    handle = onnx_proxy(pg, tmp_path, str(model_dir), cache, PYTHONPATH=path)
    try:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            embed(handle.dsn(), MINILM, ["hello"])
    finally:
        handle.stop()
    assert "onnxruntime" in info.value.diag.message_primary
    assert "pgml-proxy[onnx]" in (info.value.diag.message_hint or "")
    assert not cache.exists()


def test_unwritable_cache_is_an_error(pg: Postgres, tiny_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    handle = onnx_proxy(pg, tmp_path, str(tiny_dir), blocker / "exports")
    try:
        with pytest.raises(psycopg.errors.ExternalRoutineException) as info:
            embed(handle.dsn(), TINY, ["hello"])
    finally:
        handle.stop()
    assert "onnx_cache_dir" in (info.value.diag.message_hint or "")


@pytest.mark.parametrize("value", ["tensorrt", "ONNX", ""])
def test_bad_backend_names_the_key(tmp_path: Path, value: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[engine]\nembed_backend = '{value}'\n")
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert "engine.embed_backend" in str(info.value) and "torch, onnx" in str(info.value)
    with pytest.raises(ConfigError, match=r"engine\.embed_backend"):
        load(None, {"PGML_PROXY_ENGINE_EMBED_BACKEND": value})


def test_backend_from_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[engine]\nembed_backend = 'onnx'\nonnx_cache_dir = '/var/cache/pgml'\n")
    config = load(path, {})
    assert (config.engine.embed_backend, config.engine.onnx_cache_dir) == ("onnx", "/var/cache/pgml")
    assert load(path, {"PGML_PROXY_ENGINE_EMBED_BACKEND": "torch"}).engine.embed_backend == "torch"
    assert load(None, {}).engine.embed_backend == "torch"
