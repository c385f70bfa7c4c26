"""``pgml.rank``: reranking documents for a query with a sentence-transformers ``CrossEncoder``.

Owns: the kwargs split between the CrossEncoder and its ``rank`` call (as ``pgml.embed`` splits its own),
ranking in slices of the documents with a cancel checkpoint between them, and the ``(corpus_id, score,
text)`` rows, best first.

Must not: know about SQL or the wire protocol.
"""

from __future__ import annotations

from typing import Any

from engine.api import InvalidArgument
from engine.nlp.embed import load_sentence_model
from engine.nlp.json_args import json_object
from engine.runtime.context import Context

# CrossEncoder(...) keyword arguments; everything else goes to rank() (as embed splits its kwargs).
RANK_INIT = frozenset(
    {
        "device",
        "trust_remote_code",
        "revision",
        "token",
        "model_kwargs",
        "tokenizer_kwargs",
        "processor_kwargs",
        "config_kwargs",
        "num_labels",
        "max_length",
        "backend",
        "default_prompt_name",
        "prompts",
    }
)


def rank(rows: list[tuple[Any, ...]], ctx: Context) -> list[Any]:
    """``(transformer, query, documents, kwargs)`` rows -> per row ``[(corpus_id, score, text | None), …]``,
    best first; ``text`` only with ``{"return_documents": true}``, ``top_k`` limits the rows."""
    results: list[Any] = []
    for row in rows:
        if any(value is None for value in row):
            results.append(None)  # STRICT
            continue
        transformer, query, documents, kwargs = row
        ctx.check()
        kwargs = json_object(kwargs, "kwargs")
        if not isinstance(documents, list) or any(not isinstance(d, str) for d in documents):
            raise InvalidArgument("pgml.rank documents must be a text[] without NULLs")
        init = {key: value for key, value in kwargs.items() if key in RANK_INIT}
        call = {key: value for key, value in kwargs.items() if key not in RANK_INIT}
        encoder = _cross_encoder(transformer, init, ctx)
        results.append(_rank(encoder, query, documents, call, ctx) if documents else [])
    return results


def _rank(encoder: Any, query: str, documents: list[str], call: dict[str, Any], ctx: Context) -> list[Any]:
    """CrossEncoder.rank over slices of the documents (a checkpoint between them), merged best first.

    Scores are per (query, document) pair, so slicing changes none of them; the merge is a stable
    sort as rank's own, so equal scores keep the documents' order; ``top_k`` applies to the whole.
    """
    keep = bool(call.pop("return_documents", False))
    top_k = call.pop("top_k", None)
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise InvalidArgument(f"invalid kwargs for rank: top_k must be a non-negative integer, not {top_k!r}")
    call["batch_size"] = ctx.batch_size(call.get("batch_size"))
    step = max(4 * call["batch_size"], 64)
    ranked: list[Any] = []
    for start in range(0, len(documents), step):
        ctx.check()
        try:
            part = encoder.rank(query, documents[start : start + step], return_documents=keep,
                                show_progress_bar=False, **call)  # fmt: skip
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"invalid kwargs for rank: {exc}") from exc
        ranked += [(int(r["corpus_id"]) + start, float(r["score"]), r["text"] if keep else None) for r in part]
    ranked.sort(key=lambda r: r[1], reverse=True)
    return ranked if top_k is None else ranked[:top_k]


def _cross_encoder(name: str, init: dict[str, Any], ctx: Context) -> Any:
    # load_sentence_model checks the kwargs (confine_kwargs: trust_remote_code at any depth, locations)
    if "tokenizer_kwargs" in init:  # sentence-transformers 5+ calls them processor_kwargs
        init = dict(init)
        init.setdefault("processor_kwargs", init.pop("tokenizer_kwargs"))
    return load_sentence_model("CrossEncoder", name, init, ctx)
