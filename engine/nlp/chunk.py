"""``pgml.chunk``: splitting text with LangChain's splitters.

Owns: the splitter table (PostgresML's names -> LangChain classes) and the ``(chunk_index, chunk)`` rows,
indexed from 1.

Must not: know about SQL or the wire protocol.
"""

from __future__ import annotations

from typing import Any

from engine.api import InvalidArgument, NotSupported
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


def chunk(rows: list[tuple[Any, ...]], ctx: Context) -> list[Any]:
    """``(splitter, text, kwargs)`` rows -> ``[(chunk_index, chunk), ...]`` per row, index from 1."""
    import langchain_text_splitters as splitters  # lazy: LangChain imports much at start-up

    results: list[Any] = []
    for name, text, kwargs in rows:
        if name is None or text is None or kwargs is None:
            results.append(None)
            continue
        if name not in SPLITTERS:
            raise InvalidArgument(f"Unknown splitter: {name}", hint=f"Use one of: {', '.join(sorted(SPLITTERS))}.")
        try:
            splitter = getattr(splitters, SPLITTERS[name])(**kwargs_object(kwargs))
            pieces = splitter.split_text(text)
        except (ImportError, LookupError, OSError) as exc:
            raise NotSupported(
                f"the {name} splitter is not available: {exc}",
                hint="The nltk splitter needs the nltk package and its punkt data; spacy needs spacy and a model.",
            ) from exc
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"invalid kwargs for the {name} splitter: {exc}") from exc
        results.append([(i + 1, piece) for i, piece in enumerate(pieces)])
    return results
