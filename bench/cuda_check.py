"""Device check of the engine's CUDA path (run on a GPU machine; CI has none).

Builds a tiny random-weight BERT sentence encoder (its own vocabulary, saved to a
temp dir), then evaluates the same ``pgml.embed`` batch through ``LocalEngine``
with ``device = "cpu"`` and with ``device = "cuda"`` (and ``auto``), and prints
where the model ran, the largest difference between the two results, and the
time of each. Exits non-zero when CUDA is unavailable or the results differ.

    python bench/cuda_check.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.api import Call, EngineConfig, signatures
from engine.runtime.executor import LocalEngine


def tiny_encoder(directory: Path) -> Path:
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(200)] + list("abcdefghij")
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    path = directory / "tiny-bert"
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(path)
    config = BertConfig(vocab_size=len(words), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128)  # fmt: skip
    BertModel(config).save_pretrained(path)
    encoder = SentenceTransformer(modules=[models.Transformer(str(path)), models.Pooling(64)])
    out = directory / "tiny-st"
    encoder.save(str(out))
    return out


async def run(device: str, model: str, texts: list[str]) -> tuple[list[Any], float, str]:
    engine = LocalEngine(EngineConfig(device=device, model_dirs=()))
    sig = next(s for s in signatures("embed") if s.params[1].type == "text")
    rows = [(model, t, {}) for t in texts]
    await engine.evaluate(Call(sig, rows[:2]))  # load
    started = time.perf_counter()
    result = await engine.evaluate(Call(sig, rows))
    elapsed = time.perf_counter() - started
    loaded = next(iter(engine.cache._models.values()))[0]  # the one model this engine loaded
    where = str(next(loaded.parameters()).device)
    await engine.close()
    return result, elapsed, where


def main() -> int:
    import torch

    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    if not torch.cuda.is_available():
        return 1
    print(f"gpu: {torch.cuda.get_device_name(0)}")
    with tempfile.TemporaryDirectory() as tmp:
        model = str(tiny_encoder(Path(tmp)))
        texts = [" ".join(f"w{(i * 7 + j) % 200}" for j in range(20)) for i in range(2000)]
        cpu, cpu_s, cpu_where = asyncio.run(run("cpu", model, texts))
        gpu, gpu_s, gpu_where = asyncio.run(run("cuda", model, texts))
        _, _, auto_where = asyncio.run(run("auto", model, texts))
    diff = max(float(abs(a - b).max()) for a, b in zip(cpu, gpu, strict=True))
    print(f"cpu: {cpu_s:.3f} s on {cpu_where}; cuda: {gpu_s:.3f} s on {gpu_where}; auto chose {auto_where}")
    print(f"max |cpu - cuda| over {len(texts)} vectors of {len(cpu[0])} dims: {diff:.2e}")
    ok = gpu_where.startswith("cuda") and auto_where.startswith("cuda") and cpu_where == "cpu" and diff < 1e-3
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
