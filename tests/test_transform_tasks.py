"""Any ``transformers.pipeline`` task through pgml.transform, with the pipeline's own output shapes (compared
with the pipeline called directly), and media inputs read without the network or files outside data_dirs.

Tiny random-weight models are built here (a TAPAS with a 21-word vocabulary, a one-layer ViT on 16x16 images).
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import wave
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from engine.api import (
    Canceled,
    EngineConfig,
    InvalidArgument,
    NotSupported,
    PermissionDenied,
    ProgramLimitExceeded,
    UnknownModel,
)
from engine.nlp import media
from engine.nlp.any_task import plain, read_args
from engine.nlp.tasks import canonical_task, pipeline_tasks, tasks
from engine.nlp.transform import transform_rows
from engine.runtime.cache import ModelCache
from engine.runtime.context import Context
from tests.conftest import ProxyProcess

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EMPTY]", "city", "people", "paris", "berlin"]
WORDS += ["how", "many", "in", "what", "is", "the", "2", "3", ".", "1", "million"]
TABLE = {"city": ["paris", "berlin"], "people": ["2", "3"]}
QUERIES = ["how many people in paris", "what is the city"]


@pytest.fixture(scope="module")
def dirs(model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tiny random tapas/ and vit/ in the shared proxy's model directory, images/red.png in its data directory;
    outside/ holds a PNG outside data_dirs."""
    import torch
    from PIL import Image
    from transformers import (
        TapasConfig,
        TapasForQuestionAnswering,
        TapasTokenizer,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessorPil,
    )

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tasks")
    models, data, outside = model_dir, data_dir, root / "outside"
    for directory in (data / "images", outside):
        directory.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    config = TapasConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_aggregation_labels=4,
        aggregation_labels={0: "NONE", 1: "SUM", 2: "AVERAGE", 3: "COUNT"},
    )  # fmt: skip
    TapasForQuestionAnswering(config).save_pretrained(models / "tapas")
    TapasTokenizer(str(root / "vocab.txt")).save_pretrained(models / "tapas")
    vit = ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1},
    )  # fmt: skip
    ViTForImageClassification(vit).save_pretrained(models / "vit")
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(models / "vit")
    for path in (data / "images" / "red.png", outside / "red.png"):
        Image.new("RGB", (20, 20), (255, 0, 0)).save(path)
    return {"models": models, "data": data, "outside": outside}


def make_ctx(dirs: dict[str, Path]) -> Context:
    config = EngineConfig(device="cpu", model_dirs=(str(dirs["models"]),), data_dirs=(str(dirs["data"]),))
    return Context(config, ModelCache(1 << 30), threading.Event())


@pytest.fixture(scope="module")
def ctx(dirs: dict[str, Path]) -> Context:
    return make_ctx(dirs)


def rows(ctx: Context, *rows: tuple[Any, Any, list[Any]]) -> list[Any]:
    results = transform_rows([(*row, False) for row in rows], ctx)
    json.dumps(results)  # JSON-ready
    return results


def direct(task: str, model: Path, inputs: list[Any]) -> Any:
    """What the pipeline returns called directly (a fresh pipeline over the same files)."""
    from transformers import pipeline

    make: Any = pipeline
    return plain(make(task, model=str(model), device="cpu")(inputs))


def test_every_pipeline_task_and_alias_is_a_task() -> None:
    supported, aliases = pipeline_tasks()
    assert {"table-question-answering", "image-classification", "automatic-speech-recognition"} <= supported
    assert all(canonical_task(task) == task for task in supported)
    assert all(canonical_task(alias) == task for alias, task in aliases.items())
    assert canonical_task("text-to-speech") == "text-to-audio" and canonical_task("Table_Question_Answering")
    with pytest.raises(InvalidArgument) as info:
        canonical_task("no-such-task")
    assert info.value.sqlstate == "22023" and info.value.hint
    assert all(task in info.value.hint for task in tasks())


def test_table_question_answering_has_the_pipelines_shapes(dirs: dict[str, Path], ctx: Context) -> None:
    task = {"task": "table-question-answering", "model": str(dirs["models"] / "tapas")}
    inputs = [json.dumps({"table": TABLE, "query": query}) for query in QUERIES]
    single, double, as_objects = rows(
        ctx, (task, {}, inputs[:1]), (task, {}, inputs), (task, {}, [{"table": TABLE, "query": QUERIES[1]}])
    )  # three rows, one batched call
    expected = direct("table-question-answering", dirs["models"] / "tapas", [json.loads(i) for i in inputs])
    assert single == expected[0] and isinstance(single, dict)  # one input: the object, as the pipeline returns
    assert double == expected and as_objects == expected[1]
    assert set(single) == {"answer", "coordinates", "cells", "aggregator"}
    with pytest.raises(InvalidArgument) as info:
        rows(ctx, (task, {}, ["how many people in paris"]))
    assert info.value.sqlstate == "22023" and info.value.hint and "table" in info.value.hint


def _png(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_image_inputs_are_decoded_here(dirs: dict[str, Path], ctx: Context) -> None:
    from PIL import Image

    task = {"task": "image-classification", "model": str(dirs["models"] / "vit")}
    png = dirs["data"] / "images" / "red.png"
    references = [f"data:image/png;base64,{_png(png)}", _png(png), str(png), "images/red.png"]
    [result] = rows(ctx, (task, {}, references))
    expected = direct("image-classification", dirs["models"] / "vit", [Image.open(png)])
    assert result == expected * 4 and set(result[0][0]) == {"label", "score"}
    [top] = rows(ctx, (task, {"top_k": 1}, references[:1]))
    assert len(top) == 1 and len(top[0]) == 1


@pytest.mark.parametrize(
    ("reference", "error", "sqlstate"),
    [
        ("https://example.com/cat.png", NotSupported, "0A000"),
        ("file:///etc/passwd", NotSupported, "0A000"),
        ("OUTSIDE/red.png", PermissionDenied, "42501"),
        ("OUTSIDE/missing.png", PermissionDenied, "42501"),  # the same answer whether it exists or not
        ("../outside/red.png", PermissionDenied, "42501"),
        ("~/red.png", PermissionDenied, "42501"),
        ("images/missing.png", InvalidArgument, "22023"),
        ("data:image/png,notbase64", InvalidArgument, "22023"),
        ("data:image/png;base64," + "A" * 64, InvalidArgument, "22023"),  # not an image
    ],
)
def test_image_references_that_cannot_be_read(
    dirs: dict[str, Path], ctx: Context, reference: str, error: type[Exception], sqlstate: str
) -> None:
    task = {"task": "image-classification", "model": str(dirs["models"] / "vit")}
    with pytest.raises(error) as info:
        rows(ctx, (task, {}, [reference.replace("OUTSIDE", str(dirs["outside"]))]))
    assert getattr(info.value, "sqlstate", None) == sqlstate
    if sqlstate != "22023":
        assert getattr(info.value, "hint", None) and "data:" in str(getattr(info.value, "hint", ""))
    if sqlstate == "42501":  # decided from the text and resolved links: nothing about the file itself
        assert str(info.value).startswith("permission denied") and "No such file" not in str(info.value)


def test_structured_media_inputs_keep_text_and_decode_media_keys(dirs: dict[str, Path]) -> None:
    config = EngineConfig(data_dirs=(str(dirs["data"]),))
    message = {
        "role": "user",
        "content": [{"type": "text", "text": "what is it"}, {"type": "image", "url": "images/red.png"}],
    }
    decoded = media.Decoder(config).decode(message, media.IMAGE)
    assert decoded["content"][0] == {"type": "text", "text": "what is it"}
    assert set(decoded["content"][1]) == {"type", "image"} and decoded["content"][1]["image"].size == (20, 20)
    with pytest.raises(NotSupported):
        media.Decoder(config).decode({"image": "http://example.com/x.png", "question": "q"}, media.IMAGE)
    ctx = Context(config, ModelCache(1 << 20), threading.Event())
    args = read_args("image-text-to-text", {"images": ["images/red.png"], "max_new_tokens": 3}, ctx)
    assert args["images"][0].size == (20, 20) and args["max_new_tokens"] == 3
    with pytest.raises(NotSupported):
        read_args("image-text-to-text", {"images": "https://example.com/x.png"}, ctx)
    assert read_args("table-question-answering", {"image": "x"}, ctx) == {"image": "x"}  # text tasks open nothing


def _wav(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.repeat((samples * 32767).astype("<i2"), 2).tobytes())
    return buffer.getvalue()


def test_audio_inputs(dirs: dict[str, Path]) -> None:
    config = EngineConfig(data_dirs=(str(dirs["data"]),))
    samples = np.sin(np.linspace(0, 20, 1600)).astype(np.float32)
    (dirs["data"] / "tone.wav").write_bytes(_wav(samples, 16000))
    for reference in ("tone.wav", "data:audio/wav;base64," + base64.b64encode(_wav(samples, 16000)).decode()):
        audio = media.Decoder(config).decode(reference, media.AUDIO)
        assert audio["sampling_rate"] == 16000 and np.allclose(audio["raw"], samples, atol=1e-4)  # stereo -> mono
    raw = media.Decoder(config).decode({"raw": [0.0, 0.5], "sampling_rate": 8000}, media.AUDIO)
    assert raw["raw"].dtype == np.float32 and raw["sampling_rate"] == 8000
    (dirs["data"] / "tone.mp3").write_bytes(b"ID3\x03\x00" + bytes(64))
    with pytest.raises(NotSupported) as info:
        media.Decoder(config).decode("tone.mp3", media.AUDIO)
    assert info.value.hint and "WAV" in info.value.hint
    with pytest.raises(InvalidArgument):
        media.Decoder(config).decode({"raw": "x", "sampling_rate": 8000}, media.AUDIO)


def _chat(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "what is it"}]}]


def test_chat_content_parts_reach_the_pipeline_decoded(dirs: dict[str, Path]) -> None:
    """transformers' processors load a part's image/url/path/base64 (and image_url, a string too) themselves:
    URLs fetched, any file opened. Every such key is decoded here, other text in a media part refused."""
    config = EngineConfig(data_dirs=(str(dirs["data"]),))
    png = "data:image/png;base64," + _png(dirs["data"] / "images" / "red.png")
    wav = base64.b64encode(_wav(np.zeros(160, dtype=np.float32), 16000)).decode()
    for part in (
        {"type": "image_url", "image_url": "images/red.png"},
        {"type": "image_url", "image_url": {"url": png, "detail": "high"}},
        {"type": "input_image", "image_url": png},
        {"type": "image", "base64": _png(dirs["data"] / "images" / "red.png")},
        {"type": "image", "path": str(dirs["data"] / "images" / "red.png"), "max_pixels": 1000},
    ):
        [decoded, text] = media.Decoder(config).decode(_chat(part), media.IMAGE)[0]["content"]
        assert decoded["type"] == "image" and decoded["image"].size == (20, 20) and text["type"] == "text"
        assert set(decoded) <= {"type", "image", "max_pixels"}
    part = {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}
    [audio, _] = media.Decoder(config).decode(_chat(part), media.AUDIO)[0]["content"]
    assert set(audio) == {"type", "audio"} and isinstance(audio["audio"], np.ndarray)
    assert media.Decoder(config).decode(_chat({"type": "image"}), media.IMAGE)[0]["content"][0] == {"type": "image"}
    refused: list[tuple[dict[str, Any], str]] = [
        ({"type": "image_url", "image_url": "http://169.254.169.254/latest"}, "0A000"),
        ({"type": "image_url", "image_url": "/etc/hostname"}, "42501"),
        ({"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}, "0A000"),
        ({"type": "audio", "url": "/etc/hostname"}, "42501"),
        ({"type": "image", "base64": "/etc/hostname"}, "22023"),  # base64 only, never a path
        ({"type": "image", "image": png, "file": "/etc/hostname"}, "22023"),  # a key transformers may read later
        ({"type": "image", "image": png, "url": png}, "22023"),  # which one?
        ({"type": "image", "image": {"file": "/etc/hostname"}}, "22023"),
    ]
    for part, sqlstate in refused:
        with pytest.raises((InvalidArgument, NotSupported, PermissionDenied)) as info:
            media.Decoder(config).decode(_chat(part), media.IMAGE)
        assert info.value.sqlstate == sqlstate, part
        assert info.value.hint, part
    ctx = Context(config, ModelCache(1 << 20), threading.Event())
    args = read_args("image-text-to-text", {"text": _chat({"type": "image", "url": "images/red.png"})}, ctx)
    assert args["text"][0]["content"][0]["image"].size == (20, 20)
    with pytest.raises(NotSupported):
        read_args("image-text-to-text", {"text": _chat({"type": "image_url", "image_url": "http://x/y"})}, ctx)


def test_image_limits_and_formats(dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    config = EngineConfig(data_dirs=(str(dirs["data"]),))

    def encoded(image: Any, fmt: str = "PNG") -> str:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    big = encoded(Image.new("1", (7000, 6000)))  # 42 Mpx > MAX_PIXELS, under Pillow's own limit: refused unread
    with pytest.raises(ProgramLimitExceeded, match="million pixels"):
        media.Decoder(config).decode(big, media.IMAGE)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for side in (12, 15):  # Pillow's warning (over its limit) and its error (over twice that): both 54000
        with pytest.raises(ProgramLimitExceeded):
            media.Decoder(config).decode(encoded(Image.new("RGB", (side, side))), media.IMAGE)
    monkeypatch.undo()
    small = encoded(Image.new("RGB", (100, 100)))
    monkeypatch.setattr(media, "MAX_DECODED_BYTES", 100_000)  # 30,000 pixel bytes (and the PNG) each
    assert len(media.Decoder(config).decode([small] * 3, media.IMAGE)) == 3
    with pytest.raises(ProgramLimitExceeded, match="one pipeline call"):
        media.Decoder(config).decode([small] * 4, media.IMAGE)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(InvalidArgument, match="PNG, JPEG"):  # no Ghostscript, whatever is installed
        media.Decoder(config).decode("data:image/eps;base64," + base64.b64encode(eps).decode(), media.IMAGE)
    assert media.Decoder(config).decode(encoded(Image.new("RGB", (4, 4)), "TIFF"), media.IMAGE).size == (4, 4)


def test_media_files_must_be_regular_small_and_not_playlists(
    dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = EngineConfig(data_dirs=(str(dirs["data"]),))
    files = dirs["data"] / "files"
    files.mkdir(exist_ok=True)
    fifo = files / "fifo.png"
    if not fifo.exists():
        os.mkfifo(fifo)
    with pytest.raises(InvalidArgument, match="not a regular file"):  # and no wait for a writer
        media.Decoder(config).decode("files/fifo.png", media.IMAGE)
    with pytest.raises(InvalidArgument, match="not a regular file"):
        media.Decoder(config).decode("files", media.IMAGE)
    monkeypatch.setattr(media, "MAX_FILE_BYTES", 10)
    with pytest.raises(ProgramLimitExceeded, match="larger than"):
        media.Decoder(config).decode("images/red.png", media.IMAGE)
    monkeypatch.undo()
    (files / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    assert media.Decoder(config).decode("files/clip.mp4", media.VIDEO) == str((files / "clip.mp4").resolve())
    for name, content in (
        ("list.m3u8", b"#EXTM3U\n#EXTINF:1,\nhttp://example.com/a.ts\n"),
        ("list.txt", b"file 'clip.mp4'\n"),
        ("hidden.mp4", b"\xef\xbb\xbf#EXTM3U\nhttp://example.com/a.ts\n"),
        ("concat.mp4", b"ffconcat version 1.0\nfile /etc/hostname\n"),
    ):
        (files / name).write_bytes(content)
        with pytest.raises(NotSupported, match="playlist") as info:
            media.Decoder(config).decode(f"files/{name}", media.VIDEO)
        assert info.value.hint


def test_bare_base64_is_only_text_that_cannot_be_a_path(dirs: dict[str, Path]) -> None:
    config = EngineConfig(data_dirs=(str(dirs["data"]),))
    inside, outside = str(dirs["data"] / ("a" * 64)), str(dirs["outside"] / ("a" * 64))
    with pytest.raises(InvalidArgument, match="cannot read the media file"):  # a path, not base64
        media.Decoder(config).decode(inside, media.IMAGE)
    with pytest.raises(PermissionDenied):
        media.Decoder(config).decode(outside, media.IMAGE)
    (dirs["data"] / ("b" * 64)).write_bytes((dirs["data"] / "images" / "red.png").read_bytes())
    with pytest.raises(InvalidArgument, match=r"invalid base64|not an image"):  # no "/": base64, as documented
        media.Decoder(config).decode("b" * 64, media.IMAGE)
    slashed = base64.b64encode(bytes(range(256))).decode()
    assert "/" in slashed
    with pytest.raises(InvalidArgument, match="cannot read the media file") as info:  # a relative path
        media.Decoder(config).decode(slashed, media.IMAGE)
    assert info.value.hint and "data:" in info.value.hint


def test_audio_classification_from_wav_and_raw_samples(dirs: dict[str, Path], ctx: Context) -> None:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        classifier_proj_size=8, id2label={0: "yes", 1: "no"}, label2id={"yes": 0, "no": 1},
    )  # fmt: skip
    model = dirs["models"] / "wav2vec2"
    Wav2Vec2ForSequenceClassification(config).save_pretrained(model)
    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(model)
    samples = np.sin(np.linspace(0, 200, 1600)).astype(np.float32)
    (dirs["data"] / "sine.wav").write_bytes(_wav(samples, 16000))
    raw = json.dumps({"raw": samples.tolist(), "sampling_rate": 16000})
    [result] = rows(ctx, ({"task": "audio-classification", "model": str(model)}, {}, ["sine.wav", raw]))
    [expected] = direct("audio-classification", model, [{"raw": samples, "sampling_rate": 16000}])
    assert [[item["label"] for item in output] for output in result] == [[e["label"] for e in expected]] * 2
    for output in result:
        np.testing.assert_allclose([item["score"] for item in output], [e["score"] for e in expected], atol=1e-4)


def test_outputs_are_json_ready() -> None:
    import torch
    from PIL import Image

    out = plain({"mask": Image.new("L", (2, 2)), "depth": torch.ones(2), "score": np.float32(0.5), "raw": b"\x00"})
    assert out["mask"].startswith("data:image/png;base64,") and out["depth"] == [1.0, 1.0]
    assert out["score"] == 0.5 and type(out["score"]) is float and out["raw"] == "AA=="
    decoded = Image.open(io.BytesIO(base64.b64decode(out["mask"].split(",", 1)[1])))
    assert decoded.size == (2, 2)


def test_default_model_trust_and_cancel(dirs: dict[str, Path]) -> None:
    with pytest.raises(UnknownModel) as info:
        rows(make_ctx(dirs), ("image-classification", {}, ["images/red.png"]))
    assert "google/vit-base-patch16-224" in info.value.message  # the installed pipeline's default
    task = {"task": "image-classification", "model": str(dirs["models"] / "vit")}
    with pytest.raises(InvalidArgument, match="trust_remote_code"):
        rows(make_ctx(dirs), ({**task, "trust_remote_code": True}, {}, ["images/red.png"]))
    ctx = make_ctx(dirs)
    ctx.cancelled.set()
    with pytest.raises(Canceled):
        rows(ctx, (task, {}, ["images/red.png"]))


def test_tasks_and_splitters_through_the_proxy(dirs: dict[str, Path], proxy: ProxyProcess) -> None:
    tapas = json.dumps({"task": "table-question-answering", "model": str(dirs["models"] / "tapas")})
    vit = json.dumps({"task": "image-classification", "model": str(dirs["models"] / "vit")})
    question = json.dumps({"table": TABLE, "query": QUERIES[0]})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        [(as_text,)] = conn.execute("SELECT pgml.transform(%s::jsonb, inputs => ARRAY[%s])", [tapas, question])
        [(as_jsonb,)] = conn.execute(
            "SELECT pgml.transform(%s::jsonb, inputs => ARRAY[%s::jsonb, %s::jsonb])", [tapas, question, question]
        ).fetchall()
        assert set(as_text) == {"answer", "coordinates", "cells", "aggregator"} and as_jsonb == [as_text, as_text]
        [(labels,)] = conn.execute("SELECT pgml.transform(%s::jsonb, inputs => ARRAY['images/red.png'])", [vit])
        assert [set(label) for label in labels[0]] == [{"label", "score"}] * 2
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pgml.transform(%s::jsonb, inputs => ARRAY['/etc/hostname'])", [vit])
        with pytest.raises(psycopg.errors.InvalidParameterValue) as info:
            conn.execute("SELECT pgml.transform('no-such-task', inputs => ARRAY['x'])")
        assert info.value.diag.message_hint and "table-question-answering" in info.value.diag.message_hint
        text = "Dr. Smith went to Washington. He arrived at 5 p.m. on Monday."
        for splitter in ("nltk", "spacy"):
            chunks = conn.execute(
                'SELECT chunk_index, chunk FROM pgml.chunk(%s, %s, \'{"chunk_size": 30, "chunk_overlap": 0}\')',
                [splitter, text],
            ).fetchall()
            assert chunks == [(1, "Dr. Smith went to Washington."), (2, "He arrived at 5 p.m. on Monday.")]
