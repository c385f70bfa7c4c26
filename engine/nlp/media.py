"""Images, audio and video given to ``pgml.transform``'s non-text pipeline tasks, read without the network.

Transformers' pipelines and processors open any string they are given as a URL (fetched, redirects followed,
whatever the offline settings), a local path (any file the process can read) or base64. Nothing a client
sends reaches them as such a string: every media reference is turned into the decoded object here first.

- ``data:<type>;base64,<data>`` URIs are decoded; bare base64 too when it cannot be a path (64 characters or
  more, no ``/``: base64 holding a ``/`` must come as a ``data:`` URI);
- a path (absolute, or relative to the first ``[engine] data_dirs`` directory) is read only when it lies,
  links resolved, inside ``[engine] data_dirs`` (42501 otherwise, the same answer whether it exists or not),
  and only a regular file of at most ``MAX_FILE_BYTES`` (checked by ``stat``, then again on the descriptor
  opened with ``O_NOFOLLOW``);
- URLs (``scheme://…``) are refused (0A000): the engine fetches nothing.

Where media sit: bare strings (of the task's kind), the values of ``TYPED_KEYS`` and ``REFERENCE_KEYS`` in
JSON objects, and chat content parts whose ``type`` is one of ``PART_TYPES``. Such a part holds its media
under at most one media key (its kind, ``<kind>_url``, ``url``, ``path``, ``base64`` or its type's own key,
as a string or OpenAI's ``{"url"|"data": …}``; none: a placeholder for the args' media); any other key
holding text, a list or an object is refused (22023). It is rebuilt as ``{"type": kind, kind: decoded}``
(plus its number/boolean keys), the key transformers reads.

Images become PIL images: only ``IMAGE_FORMATS`` (no EPS/Ghostscript or other decoders), at most
``MAX_PIXELS`` each (54000; Pillow's ``DecompressionBombWarning`` is an error too). All media decoded for one
pipeline call (a :class:`Decoder`) count against ``MAX_DECODED_BYTES`` (54000). Audio is decoded from WAV
(PCM) with the standard library, or taken as ``{"raw": [samples…], "sampling_rate": n}``; other formats
would need ffmpeg, which the engine does not run (0A000); in a chat part the samples go in as they are, at
their own rate. Video is passed on as a confined regular file's path (the pipeline decodes it with PyAV, when
installed); playlists and concat lists (by ``PLAYLIST_SUFFIXES`` or ``PLAYLIST_MAGIC``) are refused (0A000),
as ffmpeg would open the files or URLs they name.

Owns: telling references apart, the confinement of media paths, the media limits, decoding.

Must not: fetch, or say anything about a path outside ``data_dirs`` that depends on what is there.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
import warnings
import wave
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.api import EngineConfig, InvalidArgument, NotSupported, PermissionDenied, ProgramLimitExceeded
from engine.runtime.paths import Roots

IMAGE, AUDIO, VIDEO = "image", "audio", "video"
# Keys of a JSON object that hold a media reference: of their own kind, or (url, path) of the task's.
TYPED_KEYS = {"image": IMAGE, "images": IMAGE, "audio": AUDIO, "audios": AUDIO, "video": VIDEO, "videos": VIDEO}
REFERENCE_KEYS = frozenset({"url", "path"})
# Chat content part types that carry media (transformers' processors, its serving code, OpenAI's API).
PART_TYPES = {
    "image": IMAGE, "image_url": IMAGE, "input_image": IMAGE,
    "video": VIDEO, "video_url": VIDEO,
    "audio": AUDIO, "audio_url": AUDIO, "input_audio": AUDIO,
}  # fmt: skip
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
MAX_PIXELS = 40_000_000  # one image (Pillow itself only refuses twice its own 89 Mpx)
MAX_FILE_BYTES = 256 << 20  # one media file read from data_dirs
MAX_DECODED_BYTES = 1 << 30  # all media decoded for one pipeline call
PLAYLIST_SUFFIXES = (".m3u8", ".m3u", ".txt", ".ffconcat")
PLAYLIST_MAGIC = (b"#EXTM3U", b"ffconcat")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_BASE64 = re.compile(r"[A-Za-z0-9+\s]+={0,2}")  # bare base64 without "/": anything with one may be a path
HINT = (
    "Pass the file as a data: URI (data:image/png;base64,…), or as base64 without '/', or ask an administrator"
    " to put it in an [engine] data_dirs directory and name it by its path there."
)
PART_HINT = (
    'A media content part carries one reference, e.g. {"type": "image", "image": "data:image/png;base64,…"} or'
    ' {"type": "image_url", "image_url": {"url": "images/cat.png"}}; other keys may hold numbers only.'
)


class Decoder:
    """Decodes the media of one pipeline call, within ``MAX_DECODED_BYTES`` for all of them together."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.used = 0

    def decode(self, value: Any, kind: str) -> Any:
        """``value`` with every media reference in it (``kind`` for bare strings) replaced by the media."""
        if isinstance(value, str):
            return self.reference(value, kind)
        if isinstance(value, list):
            return [self.decode(item, kind) for item in value]
        if isinstance(value, dict):
            if isinstance(value.get("type"), str) and value["type"] in PART_TYPES:
                return self._part(value)
            if kind == AUDIO and "raw" in value:
                return self._raw_audio(value)
            return {key: self.item(key, item, kind) for key, item in value.items()}
        return value

    def item(self, key: Any, value: Any, kind: str) -> Any:
        """The value of ``key`` in a JSON object (or of an arg): media keys decoded, other text left as text."""
        if key in TYPED_KEYS:
            return self.decode(value, TYPED_KEYS[key])
        if key in REFERENCE_KEYS:
            return self.decode(value, kind)
        if isinstance(value, dict):
            return self.decode(value, kind)
        if isinstance(value, list):
            return [self.item(None, item, kind) for item in value]
        return value

    def _part(self, part: dict[str, Any]) -> dict[str, Any]:
        """A chat content part rebuilt as ``{"type": kind, kind: decoded}``, as transformers reads it."""
        kind = PART_TYPES[part["type"]]
        media_keys = {kind, f"{kind}_url", "url", "path", part["type"]}
        refused = [key for key, value in part.items() if not _part_key(key, value, media_keys)]
        if refused:
            held = _shown(str(refused[0]))
            raise InvalidArgument(f'a "{part["type"]}" content part cannot hold "{held}"', hint=PART_HINT)
        kept = {key: value for key, value in part.items() if key not in media_keys and key not in ("type", "base64")}
        carriers = [key for key in part if key in media_keys or key == "base64"]
        if not carriers:  # a placeholder: the media come in the call's args (images=…)
            return {"type": part["type"], **kept}
        if len(carriers) > 1:
            raise InvalidArgument(f'a "{part["type"]}" content part must hold one {kind} reference', hint=PART_HINT)
        value = part[carriers[0]]
        if carriers[0] == "base64":
            media = self._base64(value, kind, "the base64 input")
        else:
            media = self._part_value(value, kind)
        return {"type": kind, **kept, kind: media["raw"] if kind == AUDIO else media}

    def _part_value(self, value: Any, kind: str) -> Any:
        if isinstance(value, str):
            return self.reference(value, kind)
        if isinstance(value, dict) and kind == AUDIO and "raw" in value:
            return self._raw_audio(value)
        if isinstance(value, dict) and isinstance(value.get("url"), str):  # OpenAI {"url": …, "detail": …}
            return self.reference(value["url"], kind)
        if isinstance(value, dict) and isinstance(value.get("data"), str):  # OpenAI input_audio {"data": b64}
            return self._base64(value["data"], kind, "the base64 input")
        raise InvalidArgument(f"a {kind} content part holds no reference this engine reads", hint=PART_HINT)

    def reference(self, text: str, kind: str) -> Any:
        """One media reference: a ``data:`` URI, bare base64, or a path inside ``data_dirs``."""
        if text.startswith("data:"):
            header, _, data = text.partition(",")
            if not header.endswith(";base64"):
                raise InvalidArgument("a data: URI input must be base64-encoded (data:<type>;base64,…)", hint=HINT)
            return self._base64(data, kind, "the data: URI")
        if _URL.match(text):
            raise NotSupported(
                f"{kind} inputs are not fetched from URLs",
                detail="pgml-proxy's engine reaches no network for transform inputs.",
                hint=HINT,
            )
        if len(text) >= 64 and _BASE64.fullmatch(text):
            return self._base64(text, kind, "the base64 input")
        path = confined(text, self.config)
        if kind == VIDEO:
            return video_path(path, text)  # the video pipeline opens it itself (PyAV)
        return self._media(read_file(path, text), kind, f'"{_shown(text)}"')

    def _base64(self, data: str, kind: str, what: str) -> Any:
        try:
            content = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidArgument(f"invalid base64 in a transform input: {exc}", hint=HINT) from exc
        return self._media(content, kind, what)

    def charge(self, size: int) -> None:
        """Counts ``size`` decoded bytes against this call's ``MAX_DECODED_BYTES``."""
        self.used += size
        if self.used > MAX_DECODED_BYTES:
            raise ProgramLimitExceeded(
                f"the media inputs of one pipeline call decode to more than {MAX_DECODED_BYTES >> 20} MiB",
                hint="Send fewer or smaller images, audio or video per statement, or a smaller batch_size.",
            )

    def _media(self, data: bytes, kind: str, what: str) -> Any:
        self.charge(len(data))
        if kind == IMAGE:
            return self._image(data, what)
        if kind == AUDIO:
            return self._wav(data, what)
        raise NotSupported(f"{kind} inputs can only be files in [engine] data_dirs", hint=HINT)

    def _image(self, data: bytes, what: str) -> Any:
        try:
            with warnings.catch_warnings():  # Pillow warns between its limit and twice that: refused here too
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_many_pixels(what) from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InvalidArgument(f"{what} is not an image of {', '.join(IMAGE_FORMATS)}: {exc}") from exc
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise _too_many_pixels(what)
        self.charge(width * height * len(image.getbands()))
        try:
            image.load()
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"{what} is not an image Pillow can read: {exc}") from exc
        return image

    def _wav(self, data: bytes, what: str) -> dict[str, Any]:
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
        self.charge(len(frames) // width * 4)
        dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
        samples = np.frombuffer(frames, dtype=dtype).astype(np.float32)
        if width == 1:
            samples -= 128.0
        samples /= float(2 ** (8 * width - 1))
        return {"raw": samples.reshape(-1, channels).mean(axis=1), "sampling_rate": rate}

    def _raw_audio(self, value: dict[str, Any]) -> dict[str, Any]:
        raw, rate = value.get("raw"), value.get("sampling_rate")
        if not isinstance(raw, list) or not isinstance(rate, int) or isinstance(rate, bool) or rate <= 0:
            raise InvalidArgument('raw audio must be {"raw": [samples…], "sampling_rate": <positive integer>}')
        self.charge(4 * len(raw))
        try:
            return {"raw": np.asarray(raw, dtype=np.float32), "sampling_rate": rate}
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"raw audio samples must be numbers: {exc}") from exc


def _part_key(key: Any, value: Any, media_keys: set[str]) -> bool:
    """Whether a media content part may hold ``key``: its type, its media keys, or a number/boolean/null."""
    if key == "type" or key in media_keys:
        return True
    if key == "base64":
        return isinstance(value, str)
    return value is None or isinstance(value, (bool, int, float))


def _too_many_pixels(what: str) -> ProgramLimitExceeded:
    return ProgramLimitExceeded(
        f"{what} has more than {MAX_PIXELS // 1_000_000} million pixels", hint="Scale the image down."
    )


def confined(text: str, config: EngineConfig) -> str:
    """The resolved path of ``text`` when it lies inside ``[engine] data_dirs``; 42501 otherwise."""
    roots = Roots(config.data_dirs)
    if "\0" in text or text.startswith("~") or "\\" in text or (roots.base is None and not os.path.isabs(text)):
        raise _denied(text, roots)
    path = os.path.normpath(text if os.path.isabs(text) else os.path.join(roots.base or "", text))
    if not (roots.within(path) and roots.really_within(path)):
        raise _denied(text, roots)
    return os.path.realpath(path)


def read_file(path: str, text: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """Up to ``limit`` bytes of the confined regular file ``path`` (all of it unless ``limit`` is smaller)."""
    try:
        before = os.stat(path)
        _regular(before, text)
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK), "rb") as file:
            opened = os.fstat(file.fileno())  # the file opened is the one checked (no FIFO swapped in: no wait)
            if (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
                raise InvalidArgument(f'the media file "{_shown(text)}" changed while it was opened')
            _regular(opened, text)
            return file.read(limit)
    except OSError as exc:
        raise InvalidArgument(f'cannot read the media file "{_shown(text)}": {exc.strerror}', hint=HINT) from exc


def _regular(info: os.stat_result, text: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgument(f'the media input "{_shown(text)}" is not a regular file')
    if info.st_size > MAX_FILE_BYTES:
        raise ProgramLimitExceeded(
            f'the media file "{_shown(text)}" is larger than {MAX_FILE_BYTES >> 20} MiB', hint="Use a smaller file."
        )


def video_path(path: str, text: str) -> str:
    """``path`` for the video pipeline: a confined regular file that is no playlist or ffmpeg concat list."""
    head = read_file(path, text, limit=64).lstrip(b"\xef\xbb\xbf \t\r\n")
    if path.lower().endswith(PLAYLIST_SUFFIXES) or head.startswith(PLAYLIST_MAGIC):
        raise NotSupported(
            f'the video input "{_shown(text)}" is a playlist or concat list',
            detail="ffmpeg would open the files or URLs it names.",
            hint="Pass the video file itself.",
        )
    return path


def _denied(text: str, roots: Roots) -> PermissionDenied:
    none = "" if roots.real else ", and none are configured"
    return PermissionDenied(
        f'permission denied to read the transform input "{_shown(text)}"',
        detail=f"pgml-proxy reads input files only inside its [engine] data_dirs{none}.",
        hint=HINT,
    )


def _shown(text: str) -> str:
    return (text if text.isprintable() else repr(text)[1:-1])[:200]
