"""Images, audio and video given to ``pgml.transform``'s non-text pipeline tasks, read without the network.

Transformers' pipelines open any string they are given as a URL (fetched) or a local path (any file the
process can read). Nothing a client sends reaches them as such a string: every media reference is turned
into the decoded object here first.

- ``data:<type>;base64,<data>`` URIs and bare base64 are decoded;
- a path (absolute, or relative to the first ``[engine] data_dirs`` directory) is read only when it lies,
  links resolved, inside ``[engine] data_dirs`` (42501 otherwise, the same answer whether it exists or not);
- URLs (``scheme://…``) are refused (0A000): the engine fetches nothing.

Images become PIL images (Pillow's decompression-bomb limit applies). Audio is decoded from WAV (PCM) with
the standard library, or taken as ``{"raw": [samples…], "sampling_rate": n}``; other formats would need
ffmpeg, which the engine does not run (0A000). Video is passed on as a confined path (the pipeline decodes it
with PyAV, when installed).

Owns: telling references apart, the confinement of media paths, decoding.

Must not: fetch, or say anything about a path outside ``data_dirs`` that depends on what is there.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import wave
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.api import EngineConfig, InvalidArgument, NotSupported, PermissionDenied
from engine.runtime.paths import Roots

IMAGE, AUDIO, VIDEO = "image", "audio", "video"
# Keys of a structured input (a JSON object, a chat message's content part) that hold a media reference: of
# their own kind, or (url, path) of the task's.
TYPED_KEYS = {"image": IMAGE, "images": IMAGE, "audio": AUDIO, "audios": AUDIO, "video": VIDEO, "videos": VIDEO}
REFERENCE_KEYS = frozenset({"url", "path"})
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_BASE64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}")
HINT = (
    "Pass the file as a data: URI (data:image/png;base64,…) or as base64, or ask an administrator to put it in"
    " an [engine] data_dirs directory and name it by its path there."
)


def decode(value: Any, kind: str, config: EngineConfig) -> Any:
    """``value`` with every media reference in it (``kind`` for bare strings) replaced by the decoded media."""
    if isinstance(value, str):
        return _reference(value, kind, config)
    if isinstance(value, list):
        return [decode(item, kind, config) for item in value]
    if isinstance(value, dict):
        if kind == AUDIO and "raw" in value:
            return _raw_audio(value)
        return {key: _item(key, item, kind, config) for key, item in value.items()}
    return value


def _item(key: Any, value: Any, kind: str, config: EngineConfig) -> Any:
    if key in TYPED_KEYS:
        return decode(value, TYPED_KEYS[key], config)
    if key in REFERENCE_KEYS:
        return decode(value, kind, config)
    return _nested(value, kind, config)


def _nested(value: Any, kind: str, config: EngineConfig) -> Any:
    """Text stays text; inside lists and objects (chat content parts) media keys are still decoded."""
    if isinstance(value, dict):
        return decode(value, kind, config)
    if isinstance(value, list):
        return [_nested(item, kind, config) for item in value]
    return value


def _reference(text: str, kind: str, config: EngineConfig) -> Any:
    if text.startswith("data:"):
        header, _, data = text.partition(",")
        if not header.endswith(";base64"):
            raise InvalidArgument("a data: URI input must be base64-encoded (data:<type>;base64,…)", hint=HINT)
        return _media(_b64(data), kind, "the data: URI")
    if _URL.match(text):
        raise NotSupported(
            f"{kind} inputs are not fetched from URLs",
            detail="pgml-proxy's engine reaches no network for transform inputs.",
            hint=HINT,
        )
    if len(text) >= 64 and _BASE64.fullmatch(text):
        return _media(_b64(text), kind, "the base64 input")
    path = confined(text, config)
    if kind == VIDEO:
        return path  # the video pipeline opens it itself (PyAV)
    try:
        with open(path, "rb") as file:
            content = file.read()
    except OSError as exc:
        raise InvalidArgument(f'cannot read the {kind} file "{_shown(text)}": {exc.strerror}') from exc
    return _media(content, kind, f'"{_shown(text)}"')


def confined(text: str, config: EngineConfig) -> str:
    """The resolved path of ``text`` when it lies inside ``[engine] data_dirs``; 42501 otherwise."""
    roots = Roots(config.data_dirs)
    if "\0" in text or text.startswith("~") or "\\" in text or (roots.base is None and not os.path.isabs(text)):
        raise _denied(text, roots)
    path = os.path.normpath(text if os.path.isabs(text) else os.path.join(roots.base or "", text))
    if not (roots.within(path) and roots.really_within(path)):
        raise _denied(text, roots)
    return os.path.realpath(path)


def _denied(text: str, roots: Roots) -> PermissionDenied:
    none = "" if roots.real else ", and none are configured"
    return PermissionDenied(
        f'permission denied to read the transform input "{_shown(text)}"',
        detail=f"pgml-proxy reads input files only inside its [engine] data_dirs{none}.",
        hint=HINT,
    )


def _shown(text: str) -> str:
    return (text if text.isprintable() else repr(text)[1:-1])[:200]


def _b64(data: str) -> bytes:
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument(f"invalid base64 in a transform input: {exc}", hint=HINT) from exc


def _media(data: bytes, kind: str, what: str) -> Any:
    if kind == IMAGE:
        return _image(data, what)
    if kind == AUDIO:
        return _wav(data, what)
    raise NotSupported(f"{kind} inputs can only be files in [engine] data_dirs", hint=HINT)


def _image(data: bytes, what: str) -> Any:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise InvalidArgument(f"{what} is not an image Pillow can read: {exc}") from exc
    return image


def _wav(data: bytes, what: str) -> dict[str, Any]:
    """WAV (PCM, any channels: averaged to mono) -> ``{"raw": float32 samples in [-1, 1], "sampling_rate"}``."""
    try:
        with wave.open(io.BytesIO(data)) as audio:
            width, channels, rate = audio.getsampwidth(), audio.getnchannels(), audio.getframerate()
            frames = audio.readframes(audio.getnframes())
    except (wave.Error, EOFError) as exc:
        raise NotSupported(
            f"{what} is not WAV (PCM) audio: {exc}",
            detail="Other audio formats need ffmpeg, which pgml-proxy's engine does not run.",
            hint='Convert it to WAV, or pass {"raw": [samples…], "sampling_rate": n}.',
        ) from exc
    if width not in (1, 2, 4):
        raise NotSupported(f"{what}: {8 * width}-bit WAV is not supported", hint="Use 8-, 16- or 32-bit PCM.")
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    samples = np.frombuffer(frames, dtype=dtype).astype(np.float32)
    if width == 1:
        samples -= 128.0
    samples /= float(2 ** (8 * width - 1))
    return {"raw": samples.reshape(-1, channels).mean(axis=1), "sampling_rate": rate}


def _raw_audio(value: dict[str, Any]) -> dict[str, Any]:
    raw, rate = value.get("raw"), value.get("sampling_rate")
    if not isinstance(raw, list) or not isinstance(rate, int) or isinstance(rate, bool) or rate <= 0:
        raise InvalidArgument('raw audio must be {"raw": [samples…], "sampling_rate": <positive integer>}')
    try:
        return {"raw": np.asarray(raw, dtype=np.float32), "sampling_rate": rate}
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"raw audio samples must be numbers: {exc}") from exc
