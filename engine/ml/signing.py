"""Signatures of model artifacts: HMAC-SHA256 with a key only the proxy holds.

Owns: the signed message (a version label, the database name, the project id,
the model id, the file path — which carries the format tag, ``estimator.skops``
— and the file's bytes, each length-prefixed so no two identities encode the
same), signing and constant-time verification, and the key file: its default
location, creation with 0600 permissions, checks on load, one cached key per path.

The key file holds the key as hex (what :func:`ensure_key` writes: 32 random
bytes, 64 hex digits and a newline; ``openssl rand -hex 32`` makes one too) or,
when its content is not hex, the raw bytes. Either way it must give at least
32 bytes. A file that other users may write, or that anyone but its owner's
group may read, is refused (PostgreSQL's rule for its TLS key); group-readable
is accepted with a warning. A key is read once per path and process: rotating it
means restarting the proxy (see ``pgml-proxy resign``).

Must not: touch the database (``engine.pg.registry`` stores signatures,
``proxy.cli`` re-signs) or log a key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from engine.api import UntrustedArtifact

log = logging.getLogger("pgml-proxy.engine")

VERSION = b"pgml-proxy artifact v1"
KEY_BYTES = 32
DEFAULT_FILE_NAME = ".pgml-proxy-artifact.key"  # next to an embedded data directory

_keys: dict[str, bytes] = {}
_lock = threading.Lock()


def message(database: str, project_id: int, model_id: int, path: str, data: bytes) -> bytes:
    """The bytes a signature covers: every field as an 8-byte big-endian length and its bytes."""
    return _head(database, project_id, model_id, path, len(data)) + bytes(data)


def _head(database: str, project_id: int, model_id: int, path: str, size: int) -> bytes:
    """:func:`message` up to the artifact's bytes (its length word included)."""
    fields = (VERSION, database.encode(), str(int(project_id)).encode(), str(int(model_id)).encode(), path.encode())
    return b"".join(len(f).to_bytes(8, "big") + f for f in fields) + size.to_bytes(8, "big")


def sign(key: bytes, database: str, project_id: int, model_id: int, path: str, data: bytes) -> bytes:
    """HMAC-SHA256 of :func:`message`, fed in two parts so a large artifact is not copied."""
    mac = hmac.new(key, _head(database, project_id, model_id, path, len(data)), hashlib.sha256)
    mac.update(data)
    return mac.digest()


def verify(
    key: bytes, database: str, project_id: int, model_id: int, path: str, data: bytes, signature: bytes | None
) -> bool:
    """True only when ``signature`` is the artifact's signature under ``key`` (compared in constant time)."""
    if signature is None:
        return False
    return hmac.compare_digest(sign(key, database, project_id, model_id, path, data), bytes(signature))


@dataclass(frozen=True)
class Signer:
    """A key and the database whose artifacts it signs."""

    key: bytes = field(repr=False)
    database: str

    def sign(self, project_id: int, model_id: int, path: str, data: bytes) -> bytes:
        return sign(self.key, self.database, project_id, model_id, path, data)

    def verify(self, project_id: int, model_id: int, path: str, data: bytes, signature: bytes | None) -> bool:
        return verify(self.key, self.database, project_id, model_id, path, data, signature)


def signer(key_file: str, database: str) -> Signer:
    """The signer for ``database`` with the key in ``key_file`` (``[engine] artifact_key_file``)."""
    if not key_file:
        raise UntrustedArtifact(
            "no artifact signing key is configured",
            hint="Set [engine] artifact_key_file (pgml-proxy sets a default at start-up).",
        )
    return Signer(load_key(key_file), database)


# --------------------------------------------------------------------------- #
# Key files
# --------------------------------------------------------------------------- #


def default_key_file(embedded_data_dir: str | None) -> Path:
    """Where the key lives unless configured: beside the embedded data directory, else the user's config dir."""
    if embedded_data_dir:
        return Path(embedded_data_dir).expanduser().absolute().parent / DEFAULT_FILE_NAME
    config_home = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(config_home) if os.path.isabs(config_home) else Path.home() / ".config"
    return base / "pgml-proxy" / "artifact.key"


def ensure_key(path: str | os.PathLike[str]) -> bool:
    """Create the key file with a fresh random key (mode 0600, parents 0700) unless it exists; True if created.

    The key is written to a private temporary file first and linked into place, so a second
    process starting at the same moment sees either no file or the whole key, never a partial one.
    """
    target = Path(path).expanduser()
    if target.exists():
        return False
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    content = (secrets.token_bytes(KEY_BYTES).hex() + "\n").encode()
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    _write_new(temporary, content)
    try:
        os.link(temporary, target)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: create it in place
        try:
            _write_new(target, content)
            return True
        except FileExistsError:
            return False
    finally:
        temporary.unlink(missing_ok=True)


def _write_new(path: Path, content: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)


def load_key(path: str | os.PathLike[str]) -> bytes:
    """The key in ``path`` (read once per path and process); UntrustedArtifact naming the file when unusable."""
    name = str(Path(path).expanduser().absolute())
    with _lock:
        key = _keys.get(name)
        if key is None:
            key = _keys[name] = _read_key(Path(name))
    return key


def _read_key(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise _key_error(path, f"cannot open it: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _key_error(path, "it is not a regular file")
        if mode & 0o027:
            raise _key_error(
                path, f"its permissions ({stat.filemode(mode)}) let other users read or change it; chmod 600 it"
            )
        if mode & 0o040:
            log.warning("artifact key file %s is readable by its group", path)
        raw = b""
        while chunk := os.read(fd, 4096):
            raw += chunk
            if len(raw) > 64 * 1024:
                raise _key_error(path, "it is larger than 64 KiB")
    finally:
        os.close(fd)
    key = _decode(raw)
    if len(key) < KEY_BYTES:
        raise _key_error(path, f"it holds {len(key)} bytes; a key needs at least {KEY_BYTES}")
    return key


def _decode(raw: bytes) -> bytes:
    text = raw.strip()
    try:
        return bytes.fromhex(text.decode("ascii")) if text else b""
    except (UnicodeDecodeError, ValueError):
        return raw


def _key_error(path: Path, why: str) -> UntrustedArtifact:
    return UntrustedArtifact(f"cannot use the artifact signing key file {path}: {why}")
