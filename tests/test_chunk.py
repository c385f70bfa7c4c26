"""pgml.chunk's nltk and spacy splitters, offline: NLTK's Punkt data from the pinned PyPI package (pickle-free,
digest-checked), spaCy's rule-based sentencizer by default; what they may load is confined."""

from __future__ import annotations

import threading

import pytest

from engine.api import EngineConfig, InvalidArgument, NotSupported
from engine.nlp import punkt
from engine.nlp.chunk import chunk
from engine.runtime.context import Context

PARAGRAPH = "Dr. Smith went to Washington. He arrived at 5 p.m. on Monday."
SENTENCES = ["Dr. Smith went to Washington.", "He arrived at 5 p.m. on Monday."]


def _chunks(name: str, text: str, kwargs: dict[str, object]) -> list[str]:
    ctx = Context(EngineConfig(), None, threading.Event())  # type: ignore[arg-type]
    [rows] = chunk([(name, text, kwargs)], ctx)
    assert [i for i, _ in rows] == list(range(1, len(rows) + 1))
    return [piece for _, piece in rows]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name", ["nltk", "spacy"])
def test_sentence_splitters_keep_abbreviations(name: str) -> None:
    # PostgresML's defaults (NLTKTextSplitter(), SpacyTextSplitter()): sentences merged up to 4000 characters
    assert _chunks(name, PARAGRAPH, {}) == ["\n\n".join(SENTENCES)]
    assert _chunks(name, PARAGRAPH, {"chunk_size": 30, "chunk_overlap": 0}) == SENTENCES


def test_nltk_splits_as_punkt_english() -> None:
    text = "The U.S. economy grew 3.5% in Q2, e.g. in tech. Mr. Jones, Ph.D., disagreed."
    # NLTK's english model knows "U.S." and "Ph.D." but not "e.g." (a well-known Punkt trait, kept as is)
    expected = ["The U.S. economy grew 3.5% in Q2, e.g.", "in tech.", "Mr. Jones, Ph.D., disagreed."]
    assert _chunks("nltk", text, {"chunk_size": 10, "chunk_overlap": 0}) == expected
    german = "Das ist z.B. ein Satz. Hier ist noch einer."
    assert _chunks("nltk", german, {"language": "german", "chunk_size": 10, "chunk_overlap": 0}) == [
        "Das ist z.B. ein Satz.",
        "Hier ist noch einer.",
    ]


def test_spacy_sentencizer_is_rule_based() -> None:
    # Where the sentencizer differs from en_core_web_sm: an abbreviation spaCy's tokenizer does not know ends a
    # sentence, an ellipsis does not, and nothing splits without punctuation.
    text = "See Fig. 3 for details. Results were good... However, costs rose!"
    assert _chunks("spacy", text, {"chunk_size": 10, "chunk_overlap": 0}) == [
        "See Fig.",
        "3 for details.",
        "Results were good... However, costs rose!",
    ]
    assert _chunks("spacy", PARAGRAPH, {"pipeline": "sentencizer", "chunk_size": 30, "chunk_overlap": 0}) == SENTENCES


@pytest.mark.parametrize("pipeline", ["en_core_web_sm", "/tmp/model", "../x", ["sentencizer"]])
def test_spacy_loads_only_installed_pipeline_packages(pipeline: object) -> None:
    with pytest.raises(NotSupported) as info:
        _chunks("spacy", PARAGRAPH, {"pipeline": pipeline})
    assert info.value.sqlstate == "0A000" and info.value.hint and "sentencizer" in info.value.hint


@pytest.mark.parametrize("language", ["klingon", "../english", "english_web", 3])
def test_nltk_languages_are_the_packaged_models(language: object) -> None:
    with pytest.raises(NotSupported) as info:
        _chunks("nltk", PARAGRAPH, {"language": language})
    assert info.value.sqlstate == "0A000" and info.value.hint and "english" in info.value.hint


def test_punkt_data_must_match_the_pinned_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(punkt.DIGESTS, "danish", "0" * 43)
    with pytest.raises(NotSupported, match="pinned"):
        _chunks("nltk", PARAGRAPH, {"language": "danish"})


def test_nltk_bad_kwargs() -> None:
    with pytest.raises(InvalidArgument):
        _chunks("nltk", PARAGRAPH, {"use_span_tokenize": True})  # needs separator ""


def test_rows_with_the_same_kwargs_share_a_splitter() -> None:
    ctx = Context(EngineConfig(), None, threading.Event())  # type: ignore[arg-type]
    kwargs = {"chunk_size": 30, "chunk_overlap": 0}
    rows = [("spacy", PARAGRAPH, kwargs)] * 3 + [("spacy", PARAGRAPH, {}), ("nltk", PARAGRAPH, kwargs)]
    *same, merged, nltk = chunk(rows, ctx)
    assert same == [[(1, SENTENCES[0]), (2, SENTENCES[1])]] * 3 and nltk == same[0]
    assert merged == [(1, "\n\n".join(SENTENCES))]


def test_the_punkt_tab_written_is_the_packaged_model() -> None:
    import nltk
    from nltk.tokenize.punkt import load_punkt_params

    punkt.ensure("english")
    params = load_punkt_params(nltk.data.find("tokenizers/punkt_tab/english/"))  # NLTK's pickle-free loader
    model = punkt.packaged("english")
    assert params.abbrev_types == set(model["ABBREV_TYPES"]) and "p.m" in params.abbrev_types
    assert params.collocations == set(model["COLLOCATIONS"]) and params.sent_starters == set(model["SENT_STARTERS"])
    assert dict(params.ortho_context) == model["ORTHO_CONTEXT"]
