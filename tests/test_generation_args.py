"""OpenAI-style generation arguments (Korvus, hosted PostgresML) mapped to Hugging Face ``generate``.

Through a real proxy with psycopg (and Korvus itself): ``pgml.transform`` (text-generation and the chat form),
``pgml.transform_stream`` through a cursor as Korvus reads it; ``pgml.generate`` on the engine with a tuned
model's files; and the mapping (``engine.nlp.generation_args``) on its own. A tiny random GPT-2
(tests/tiny_models.py) generates: tests compare outputs of one model under different args (token counts,
equal or cut texts), never generated text fixed in advance. Its special tokens (<unk>, <eos>, <pad>: ids 0-2)
are suppressed where a test counts tokens, so every generated token is a word.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.types.json import Jsonb

from engine.api import EngineConfig, InvalidArgument
from engine.nlp import decoding, generation_args
from engine.nlp.finetune import tuned
from engine.nlp.generation_args import GenerationArgs, cut, first_stop, held_back, parse
from engine.runtime.cache import ModelCache
from tests.conftest import ProxyProcess
from tests.tiny_models import WORDS, tiny_gpt2

MODEL = "tiny-gpt2"
T5 = "tiny-t5-genargs"
TASK = Jsonb({"task": "text-generation", "model": MODEL})
CHAT = Jsonb({"task": "conversational", "model": MODEL})
TEXT2TEXT = Jsonb({"task": "text2text-generation", "model": T5})
PROMPT = "the cat sat"
WORDS_ONLY = {"suppress_tokens": [0, 1, 2]}  # no <unk>/<eos>/<pad>: each new token is one word
MESSAGES = [Jsonb({"role": "system", "content": "you are a cat"}), Jsonb({"role": "user", "content": "hello"})]
TRANSFORM = "SELECT pgml.transform(task => %s, inputs => %s::text[], args => %s)"  # Korvus binds text[]
CHAT_TRANSFORM = "SELECT pgml.transform(task => %s, inputs => %s, args => %s)"  # a list of Jsonb: jsonb[]


@pytest.fixture(scope="module")
def gpt2(model_dir: Path) -> Path:
    target = model_dir / MODEL
    if not target.exists():
        tiny_gpt2(target)
    return target


def tiny_t5(directory: Path) -> Path:
    """A 1-layer T5 with a word-level tokenizer (<pad>, </s>, <unk> are ids 0-2), saved to ``directory``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    vocab = {token: i for i, token in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    T5ForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def t5(model_dir: Path) -> Path:
    target = model_dir / T5
    if not target.exists():
        tiny_t5(target)
    return target


@pytest.fixture(scope="module")
def tokenizer(gpt2: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2)


@pytest.fixture
def conn(proxy: ProxyProcess, gpt2: Path) -> Iterator[psycopg.Connection]:
    with psycopg.connect(proxy.dsn(), autocommit=True) as connection:
        yield connection


def tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def complete(conn: psycopg.Connection, args: dict[str, Any], inputs: list[str] | None = None) -> Any:
    (result,) = conn.execute(TRANSFORM, [TASK, inputs or [PROMPT], Jsonb(args)]).fetchone() or (None,)
    return result


def continuation(conn: psycopg.Connection, args: dict[str, Any]) -> str:
    """The new text of one text-generation (the pipeline's ``generated_text`` holds the prompt first)."""
    [[output]] = complete(conn, args)
    text = output["generated_text"]
    assert isinstance(text, str) and text.startswith(PROMPT)
    return text[len(PROMPT) :]


def chat(conn: psycopg.Connection, args: dict[str, Any]) -> list[str]:
    (result,) = conn.execute(CHAT_TRANSFORM, [CHAT, MESSAGES, Jsonb(args)]).fetchone() or (None,)
    assert isinstance(result, list) and all(isinstance(text, str) for text in result), result
    return result


def stream(proxy: ProxyProcess, task: Jsonb, value: Any, args: dict[str, Any]) -> list[list[str]]:
    """All fragments of a transform_stream, read as Korvus does: DECLARE with named args, FETCH until empty."""
    column, cast = ("inputs", "") if isinstance(value, list) else ("input", "::text")  # Korvus: jsonb[] or text
    with psycopg.connect(proxy.dsn()) as c:
        c.execute(
            f"DECLARE c CURSOR FOR SELECT pgml.transform_stream(task => %s, {column} => %s{cast}, args => %s)",
            [task, value, Jsonb(args)],
        )
        rows: list[list[str]] = []
        while batch := c.execute("FETCH 1 FROM c").fetchall():
            rows += [value for (value,) in batch]
        c.commit()
    return rows


# --------------------------------------------------------------------------- #
# pgml.transform through the proxy
# --------------------------------------------------------------------------- #


def test_max_tokens_limits_the_new_tokens(conn: psycopg.Connection, tokenizer: Any) -> None:
    for limit in (1, 4):
        assert tokens(tokenizer, continuation(conn, {"max_tokens": limit, **WORDS_ONLY})) == limit
    assert tokens(tokenizer, continuation(conn, {"max_tokens": 3})) <= 3  # the model may also end earlier
    # the native name and the OpenAI one are the same argument; Korvus sends integers as JSON floats from JS
    native = continuation(conn, {"max_new_tokens": 5, **WORDS_ONLY})
    assert continuation(conn, {"max_tokens": 5, **WORDS_ONLY}) == native
    assert continuation(conn, {"max_tokens": 5.0, **WORDS_ONLY}) == native
    assert continuation(conn, {"max_completion_tokens": 5, **WORDS_ONLY}) == native


def test_a_limit_beyond_the_context_ends_there(conn: psycopg.Connection, tokenizer: Any, gpt2: Path) -> None:
    """Korvus's rag asks for max_tokens 1,000,000 by default: generation ends where the context does."""
    context = json.loads((gpt2 / "config.json").read_text())["n_positions"]
    prompt = " ".join(["the"] * (context - 3))
    [[output]] = complete(conn, {"max_tokens": 1_000_000, **WORDS_ONLY}, [prompt])
    assert tokens(tokenizer, output["generated_text"][len(prompt) :]) == 3


def test_n_returns_n_sequences_as_num_return_sequences(conn: psycopg.Connection) -> None:
    args = {"max_tokens": 3, "temperature": 1.0, "seed": 7}
    result = complete(conn, {**args, "n": 3}, [PROMPT, "a dog"])
    assert [len(per_input) for per_input in result] == [3, 3]  # PostgresML's [[{generated_text}, …] per input]
    assert all(set(output) == {"generated_text"} for per_input in result for output in per_input)
    native = complete(conn, {**args, "num_return_sequences": 3}, [PROMPT, "a dog"])
    assert native == result
    assert len(complete(conn, {"max_tokens": 3, "n": 2})[0]) == 2  # n alone samples, as OpenAI's default does
    assert len(chat(conn, {"max_tokens": 3, "n": 2, "temperature": 0.8})) == 2  # Korvus: one choice each


def test_seed_reproduces_a_sample(conn: psycopg.Connection) -> None:
    args = {"max_tokens": 8, "temperature": 1.0, **WORDS_ONLY}
    first = continuation(conn, {**args, "seed": 11})
    assert continuation(conn, {**args, "seed": 11}) == first
    assert len({continuation(conn, {**args, "seed": seed}) for seed in range(5)}) > 1
    assert chat(conn, {**args, "seed": 3}) == chat(conn, {**args, "seed": 3})
    # top_p alone turns sampling on too
    assert continuation(conn, {"max_tokens": 8, "top_p": 0.9, "seed": 5}) == continuation(
        conn, {"max_tokens": 8, "top_p": 0.9, "seed": 5}
    )


def test_stop_cuts_the_text_before_the_stop_string(conn: psycopg.Connection) -> None:
    args = {"max_tokens": 12, "temperature": 1.0, "seed": 2, **WORDS_ONLY}
    full = continuation(conn, args)
    words = full.split()
    assert len(words) == 12
    stop = next(word for word in words[2:] if word not in words[:2] and word not in PROMPT)
    expected = full[: full.index(stop)]
    assert continuation(conn, {**args, "stop": stop}) == expected
    assert continuation(conn, {**args, "stop": [stop, "no such words"]}) == expected
    assert continuation(conn, {**args, "stop": "no such words"}) == full
    assert continuation(conn, {**args, "stop": None}) == full  # OpenAI: null is the default
    assert PROMPT not in full
    assert continuation(conn, {**args, "stop": PROMPT}) == full  # searched in the new text only
    replies = chat(conn, args)
    stop = replies[0].split()[3]
    assert chat(conn, {**args, "stop": [stop]}) == [replies[0][: replies[0].index(stop)]]


def test_temperature_zero_is_greedy(conn: psycopg.Connection) -> None:
    greedy = continuation(conn, {"max_new_tokens": 6, "do_sample": False})
    assert continuation(conn, {"max_tokens": 6, "temperature": 0}) == greedy
    assert continuation(conn, {"max_tokens": 6, "temperature": 0, "top_p": 0.5, "seed": 9}) == greedy
    assert continuation(conn, {"max_tokens": 6}) == greedy  # the model's own default: greedy


def test_penalties_change_what_is_generated(conn: psycopg.Connection, tokenizer: Any) -> None:
    """OpenAI's penalties are applied, not dropped: greedy text of a tiny model repeats itself, a penalty on
    repeated tokens makes it repeat less (frequency) or not at all within 8 of 26 words (presence 2)."""
    greedy = continuation(conn, {"max_tokens": 8, "temperature": 0, **WORDS_ONLY}).split()
    assert len(set(greedy)) < len(greedy)  # the tiny model repeats itself greedily
    penalized = continuation(conn, {"max_tokens": 8, "temperature": 0, "presence_penalty": 2, **WORDS_ONLY}).split()
    assert len(penalized) == 8 and len(set(penalized)) > len(set(greedy))
    frequency = continuation(conn, {"max_tokens": 8, "temperature": 0, "frequency_penalty": 2, **WORDS_ONLY})
    assert len(set(frequency.split())) > len(set(greedy))


def test_logit_bias_and_echo(conn: psycopg.Connection, tokenizer: Any) -> None:
    dog = tokenizer.get_vocab()["dog"]
    biased = continuation(conn, {"max_tokens": 4, "temperature": 1.0, "seed": 1, "logit_bias": {str(dog): 100}})
    assert biased.split() == ["dog"] * 4  # +100 on one token's logit: OpenAI's "exclusive selection"
    banned = continuation(conn, {"max_tokens": 6, "temperature": 0, "logit_bias": {str(dog): -100}, **WORDS_ONLY})
    assert len(banned.split()) == 6 and "dog" not in banned.split()
    [[new_only]] = complete(conn, {"max_tokens": 3, "echo": False, **WORDS_ONLY})
    assert new_only["generated_text"] == continuation(conn, {"max_tokens": 3, **WORDS_ONLY})
    [[with_stop]] = complete(conn, {"max_tokens": 3, "echo": False, "stop": "no such words", **WORDS_ONLY})
    assert with_stop == new_only


def test_unknown_arg_is_22023_and_the_session_goes_on(conn: psycopg.Connection) -> None:
    with pytest.raises(errors.InvalidParameterValue) as info:
        complete(conn, {"max_tokens": 3, "max_token": 4})
    assert '"max_token"' in info.value.diag.message_primary
    detail = info.value.diag.message_detail or ""
    assert "max_tokens" in detail and "max_new_tokens" in detail and "return_full_text" in detail
    assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(errors.InvalidParameterValue):
        chat(conn, {"max_tokens": 3, "temprature": 0.5})
    for bad in ({"max_tokens": 0}, {"n": "two"}, {"stop": [""]}, {"temperature": -1}, {"top_p": 2}):
        with pytest.raises(errors.InvalidParameterValue):
            complete(conn, bad)
    with pytest.raises(errors.InvalidParameterValue):  # OpenAI's name and its HF twin disagree
        complete(conn, {"max_tokens": 3, "max_new_tokens": 4})
    assert conn.execute("SELECT 2").fetchone() == (2,)
    with psycopg.connect(conn.info.dsn) as c:  # in a transaction: ROLLBACK, then it goes on
        with pytest.raises(errors.InvalidParameterValue):
            c.execute(TRANSFORM, [TASK, [PROMPT], Jsonb({"foo": 1})])
        c.rollback()
        assert c.execute("SELECT 3").fetchone() == (3,)


def test_an_arg_that_cannot_be_honoured_says_so_once(conn: psycopg.Connection) -> None:
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    rows = conn.execute(
        "SELECT pgml.transform(task => %s, inputs => ARRAY[t], args => %s) FROM unnest(%s::text[]) AS t",
        [TASK, Jsonb({"max_tokens": 2, "logprobs": True}), [PROMPT, "a dog", "the mat"]],
    ).fetchall()
    assert len(rows) == 3
    assert [n for n in notices if "logprobs" in n] == [
        'the generation arg "logprobs" is ignored: PostgresML results hold text only'
    ]


def test_the_warning_follows_a_later_set_client_min_messages(conn: psycopg.Connection) -> None:
    """As the server's own WARNINGs: none at client_min_messages = error, set after the startup packet."""
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    statement = "SELECT pgml.transform(task => %s, inputs => ARRAY[%s], args => %s)"
    args = [TASK, PROMPT, Jsonb({"max_tokens": 1, "logprobs": True})]
    conn.execute("SET client_min_messages = error")
    conn.execute(statement, args)
    assert notices == []
    conn.execute("RESET client_min_messages")
    conn.execute(statement, args)
    assert notices == ['the generation arg "logprobs" is ignored: PostgresML results hold text only']


# --------------------------------------------------------------------------- #
# pgml.transform_stream through the proxy (cursors, as Korvus reads them)
# --------------------------------------------------------------------------- #


def test_stream_with_max_tokens(proxy: ProxyProcess, tokenizer: Any) -> None:
    rows = stream(proxy, TASK, PROMPT, {"max_tokens": 4, **WORDS_ONLY})
    assert all(isinstance(row, list) and len(row) == 1 for row in rows)
    text = "".join(row[0] for row in rows)  # text-generation streams the prompt too (PostgresML's streamer)
    assert tokens(tokenizer, text) == tokens(tokenizer, PROMPT) + 4
    echo_off = stream(proxy, TASK, PROMPT, {"max_tokens": 4, "echo": False, **WORDS_ONLY})
    assert tokens(tokenizer, "".join(row[0] for row in echo_off)) == 4


def test_chat_stream_with_max_tokens_n_and_stop(proxy: ProxyProcess, conn: psycopg.Connection, tokenizer: Any) -> None:
    args = {"max_tokens": 6, "temperature": 0.8, "seed": 4, **WORDS_ONLY}
    rows = stream(proxy, CHAT, MESSAGES, args)
    text = "".join(row[0] for row in rows)
    assert tokens(tokenizer, text) == 6
    assert text.strip() == chat(conn, args)[0].strip()  # the stream and transform sample alike
    many = stream(proxy, CHAT, MESSAGES, {**args, "n": 2})
    assert all(len(row) == 2 for row in many)  # one fragment per sequence, as Korvus's choices
    stop = text.split()[2]
    cut_rows = stream(proxy, CHAT, MESSAGES, {**args, "stop": stop})
    assert "".join(row[0] for row in cut_rows) == text[: text.index(stop)]


def test_chat_with_max_tokens(conn: psycopg.Connection, tokenizer: Any) -> None:
    [reply] = chat(conn, {"max_tokens": 3, **WORDS_ONLY})
    assert tokens(tokenizer, reply) == 3
    [long_reply] = chat(conn, {"max_tokens": 7, **WORDS_ONLY})
    assert tokens(tokenizer, long_reply) == 7


def test_text2text_takes_openai_args(conn: psycopg.Connection, t5: Path) -> None:
    from transformers import AutoTokenizer

    t5_tokens = AutoTokenizer.from_pretrained(t5)

    def run(args: dict[str, Any], inputs: list[str] | None = None) -> Any:
        (result,) = conn.execute(TRANSFORM, [TEXT2TEXT, inputs or [PROMPT], Jsonb(args)]).fetchone() or (None,)
        return result

    words_only = {"max_tokens": 6, "suppress_tokens": [0, 1, 2]}
    [output] = run(words_only)  # one sequence per input: PostgresML's flat [{generated_text}, …]
    assert tokens(t5_tokens, output["generated_text"]) == 6
    sampled = {**words_only, "temperature": 1.0, "seed": 8}
    [[first, second]] = run({**sampled, "n": 2})  # n per input: nested, as the old pipeline
    assert run({**sampled, "n": 2}) == [[first, second]]
    [full] = run(sampled)
    stop = full["generated_text"].split()[3]
    assert run({**sampled, "stop": stop}) == [
        {"generated_text": full["generated_text"][: full["generated_text"].index(stop)]}
    ]
    with pytest.raises(errors.InvalidParameterValue):
        run({"max_tokens": 2, "return_full_text": True})  # a text-generation pipeline arg, not text2text's


# --------------------------------------------------------------------------- #
# Korvus itself
# --------------------------------------------------------------------------- #


async def test_korvus_transformer_pipeline_and_open_source_ai(proxy: ProxyProcess, gpt2: Path, tokenizer: Any) -> None:
    import korvus

    pipeline = korvus.TransformerPipeline("text-generation", MODEL, None, proxy.dsn())
    [[output]] = await pipeline.transform([PROMPT], {"max_tokens": 3, **WORDS_ONLY})
    assert tokens(tokenizer, output["generated_text"][len(PROMPT) :]) == 3
    # Korvus turns max_new_tokens into max_tokens itself
    [[native]] = await pipeline.transform([PROMPT], {"max_new_tokens": 3, **WORDS_ONLY})
    assert native == output
    fragments = [f async for f in await pipeline.transform_stream(PROMPT, {"max_tokens": 2, **WORDS_ONLY})]
    assert tokens(tokenizer, "".join(f[0] for f in fragments)) == tokens(tokenizer, PROMPT) + 2
    # A pool of its own: the same SQL text prepared above with text[] inputs and then bound with the chat's
    # jsonb[] fails through the proxy ("binary data has array element type 3802"), not on a real server:
    # a proxy bug of its own (reported), not about generation args
    ai = korvus.OpenSourceAI(proxy.dsn(application_name="korvus-chat"))
    messages = [{"role": "user", "content": "hello"}]
    completion = await ai.chat_completions_create_async(MODEL, messages, 4, 0.8)  # max_tokens, temperature
    [choice] = completion["choices"]
    assert choice["message"]["role"] == "assistant" and tokens(tokenizer, choice["message"]["content"]) <= 4
    chunks = [c async for c in await ai.chat_completions_create_stream_async(MODEL, messages, 4, 0.8)]
    assert chunks and tokens(tokenizer, "".join(c["choices"][0]["delta"]["content"] for c in chunks)) <= 4


# --------------------------------------------------------------------------- #
# pgml.generate (a tuned model's files, on the engine)
# --------------------------------------------------------------------------- #


def test_pgml_generate_takes_openai_args(gpt2: Path, tokenizer: Any) -> None:
    files = {str(p.relative_to(gpt2)): p.read_bytes() for p in gpt2.rglob("*") if p.is_file()}
    files[tuned.MANIFEST] = json.dumps({"kind": "causal", "task": "text-generation"}).encode()
    config, cache = EngineConfig(device="cpu"), ModelCache(1 << 30)

    def run(args: dict[str, Any], notices: list[str] | None = None) -> str:
        [text] = tuned.generate_tuned(files, "tuned", [PROMPT], args, config, cache, threading.Event(), notices)
        return text

    assert tokens(tokenizer, run({"max_tokens": 5, **WORDS_ONLY})) == 5
    sampled = run({"max_tokens": 9, "temperature": 1.0, "seed": 1, **WORDS_ONLY})
    assert run({"max_tokens": 9, "temperature": 1.0, "seed": 1, **WORDS_ONLY}) == sampled
    stop = sampled.split()[4]
    assert run({"max_tokens": 9, "temperature": 1.0, "seed": 1, "stop": stop, **WORDS_ONLY}) == (
        sampled[: sampled.index(stop)].strip()
    )
    with pytest.raises(InvalidArgument):
        run({"max_tokens": 2, "n": 2})  # one text per input
    with pytest.raises(InvalidArgument):
        run({"maxtokens": 2})
    notices: list[str] = []
    run({"max_tokens": 1, "top_logprobs": 2}, notices)
    assert len(notices) == 1 and "top_logprobs" in notices[0]


# --------------------------------------------------------------------------- #
# The mapping on its own
# --------------------------------------------------------------------------- #


def test_openai_names_map_to_hugging_face_names() -> None:
    mapped = parse({"max_tokens": 10, "n": 2, "temperature": 0.7, "top_p": 0.9, "seed": 5})
    assert mapped.kwargs == {
        "max_new_tokens": 10, "num_return_sequences": 2, "temperature": 0.7, "top_p": 0.9, "do_sample": True,
    }  # fmt: skip
    assert (mapped.seed, mapped.sequences) == (5, 2)
    assert parse({"max_completion_tokens": 3}).kwargs == {"max_new_tokens": 3}
    assert parse({"n": 3}).kwargs == {"num_return_sequences": 3, "do_sample": True}  # OpenAI samples by default
    assert parse({"n": 1}).kwargs == {"num_return_sequences": 1}
    assert parse({"temperature": 0, "top_p": 0.5}).kwargs == {"do_sample": False}
    assert parse({"temperature": 0.5, "do_sample": False}).kwargs == {"temperature": 0.5, "do_sample": False}
    assert parse({"stop": "\n"}).stop == ("\n",) and parse({"stop": ["a", "b", "a"]}).stop == ("a", "b")
    assert parse({"stop": None, "max_tokens": None}).kwargs == {}
    assert parse({"seed": -1}).seed == 2**64 - 1
    assert parse({"logit_bias": {"5": -100, "7": 2.5}}).kwargs == {"sequence_bias": [[[5], -100.0], [[7], 2.5]]}
    penalties = parse({"presence_penalty": 0.5, "frequency_penalty": -1})
    assert (penalties.presence_penalty, penalties.frequency_penalty, penalties.kwargs) == (0.5, -1.0, {})
    assert parse({"echo": False}, prompt_in_output=True).echo is False


def test_native_names_pass_unchanged() -> None:
    native = {"max_new_tokens": 5, "do_sample": True, "top_k": 3, "repetition_penalty": 1.2, "num_beams": 1}
    assert parse(native).kwargs == native
    assert parse({"max_tokens": 4, "max_new_tokens": 4}).kwargs == {"max_new_tokens": 4}  # twins that agree
    assert parse({"chat_template": "x", "batch_size": 2}, {"chat_template", "batch_size"}).kwargs == {
        "chat_template": "x", "batch_size": 2,
    }  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [
        {"max_tokens": 0}, {"max_tokens": 1.5}, {"max_tokens": True}, {"max_tokens": "10"}, {"n": 0},
        {"n": generation_args.MAX_N + 1}, {"temperature": -0.1}, {"temperature": "hot"}, {"top_p": 0},
        {"top_p": 1.5}, {"presence_penalty": 3}, {"frequency_penalty": -2.5}, {"seed": 1.5}, {"stop": ""},
        {"stop": ["a", 1]}, {"stop": {"a": 1}}, {"logit_bias": {"cat": 1}}, {"logit_bias": {"1": 101}},
        {"echo": "yes"}, {"n": 2, "num_return_sequences": 3}, {"max_tokens": 2, "max_new_tokens": 3},
        {"n": 2, "temperature": 0}, {"logit_bias": {"1": 1}, "sequence_bias": []}, {"return_dict_in_generate": True},
    ],
)  # fmt: skip
def test_bad_values_are_22023(args: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse(args)
    assert info.value.sqlstate == "22023"


def test_an_unknown_name_lists_the_accepted_ones() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse({"max_tokens": 3, "foo": 1, "bar": 2}, {"chat_template"})
    error = info.value
    assert error.sqlstate == "22023" and str(error) == 'unknown generation args "bar", "foo"'
    assert error.detail is not None and error.hint is not None
    for name in (*generation_args.OPENAI_ARGS, "max_new_tokens", "num_return_sequences", "top_k", "chat_template"):
        assert name in error.detail, name
    assert "max_tokens -> max_new_tokens" in error.hint


def test_notices_for_what_cannot_be_honoured() -> None:
    quiet = parse(
        {"logprobs": False, "top_logprobs": 0, "response_format": {"type": "text"}, "best_of": 1, "user": "u"}
    )
    assert quiet.notices == () and quiet.kwargs == {}
    loud = parse({"logprobs": True, "response_format": {"type": "json_object"}, "best_of": 3, "echo": True})
    assert len(loud.notices) == 4
    assert parse({"echo": True}, prompt_in_output=True).notices == ()
    channel = ["earlier"]
    loud.report(channel)
    loud.report(channel)
    assert channel == ["earlier", *loud.notices]  # each once


def test_cut_at_the_first_stop() -> None:
    assert cut("a b STOP c END", ("END", "STOP")) == "a b "
    assert cut("no stop here", ("STOP",)) == "no stop here"
    assert cut("STOP prompt, then STOP", ("STOP",), start=4) == "STOP prompt, then "
    assert first_stop("abc", ()) == -1
    assert held_back("text ending in ST", ("STOP",)) == 2  # "ST" may begin "STOP"
    assert held_back("text ending in S", ("STOP", "Sx")) == 1
    assert held_back("nothing", ("STOP",)) == 0
    assert held_back("ST", ("STOP",), start=1) == 0  # not before the generated text


def _model(positions: int) -> Any:
    """A model's configuration without weights: what ``call_kwargs`` reads (context length, generation config)."""
    from transformers import GenerationConfig, GPT2Config

    return SimpleNamespace(config=GPT2Config(n_positions=positions), generation_config=GenerationConfig())


def test_call_kwargs_cap_the_new_tokens_at_the_context() -> None:
    model = _model(64)
    assert parse({"max_tokens": 1_000_000}).call_kwargs(model, None, 10)["max_new_tokens"] == 54
    assert parse({"max_tokens": 20}).call_kwargs(model, None, 10)["max_new_tokens"] == 20
    assert parse({"max_new_tokens": 100}).call_kwargs(model, None, lambda: 60)["max_new_tokens"] == 4
    assert "max_new_tokens" not in parse({}).call_kwargs(model, None, 10)


def test_call_kwargs_seeded_sampling_owns_the_sampling_parameters() -> None:
    model = _model(64)
    call = parse({"temperature": 0.5, "top_p": 0.8, "seed": 3}).call_kwargs(model, None, 1)
    [sampler] = call["logits_processor"]
    assert isinstance(sampler, decoding.SeededSampler)
    assert (sampler.sampling["temperature"], sampler.sampling["top_p"], sampler.sampling["top_k"]) == (0.5, 0.8, 50)
    assert (call["temperature"], call["top_p"], call["top_k"], call["do_sample"]) == (1.0, 1.0, 0, True)
    assert "logits_processor" not in parse({"temperature": 0, "seed": 3}).call_kwargs(model, None, 1)  # greedy
    piped = parse({"do_sample": True}).call_kwargs(model, None, 1, pipeline=True)
    assert (piped["temperature"], piped["top_k"]) == (1.0, 50)  # the model's config, not the pipeline's 0.7
    with pytest.raises(InvalidArgument):
        parse({"temperature": 1, "seed": 1, "num_beams": 2}).call_kwargs(model, None, 1)


def test_seeded_sampler_draws_alike_for_a_seed() -> None:
    import torch

    scores = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(3, 5, dtype=torch.long)

    def draws(seed: int) -> list[list[int]]:
        sampler = decoding.SeededSampler(seed, {"temperature": 1.5, "top_k": 30})
        out = []
        for step in range(6):  # one generation: the input grows by a token per step
            result = sampler(torch.cat([ids, torch.zeros(3, step, dtype=torch.long)], dim=1), scores.clone())
            assert bool((torch.isfinite(result).sum(dim=1) == 1).all())  # only the drawn token is left
            out.append(result.argmax(dim=1).tolist())
        return out

    assert draws(1) == draws(1)
    assert len({json.dumps(draws(seed)) for seed in range(4)}) > 1


def test_openai_penalties_formula() -> None:
    import torch

    penalties = decoding.OpenAIPenalties(presence=0.5, frequency=0.25)
    prompt = torch.tensor([[3, 3, 4]])
    scores = torch.zeros(1, 6)
    assert torch.equal(penalties(prompt, scores), scores)  # the prompt's tokens are not penalized
    generated = torch.tensor([[3, 3, 4, 1, 1, 2]])
    penalties(torch.tensor([[3, 3, 4, 1]]), scores)
    penalties(torch.tensor([[3, 3, 4, 1, 1]]), scores)
    out = penalties(generated, scores)[0].tolist()
    # token 1 twice, token 2 once, the prompt's 3 and 4 not at all
    assert out == [0.0, -(0.5 + 2 * 0.25), -(0.5 + 0.25), 0.0, 0.0, 0.0]


def test_stop_criterion_ends_a_sequence_at_its_stop(tokenizer: Any) -> None:
    import torch

    criterion = decoding.StopAtStrings(tokenizer, ("dog",))
    vocab = tokenizer.get_vocab()
    prompt = [vocab["the"], vocab["dog"]]  # the prompt's "dog" does not count
    rows = torch.tensor([[*prompt, vocab["cat"]], [*prompt, vocab["mat"]]])
    assert criterion(rows, None).tolist() == [False, False]
    rows = torch.cat([rows, torch.tensor([[vocab["dog"]], [vocab["sat"]]])], dim=1)
    assert criterion(rows, None).tolist() == [True, False]


def test_sequences_per_call_and_task_defaults() -> None:
    mapped = GenerationArgs({"max_new_tokens": 2, "num_return_sequences": 4})
    assert mapped.per_call(10) == 2 and mapped.per_call(3) == 1  # at most batch_size sequences per call
    assert mapped.with_defaults({"num_beams": 4, "max_new_tokens": 9}).kwargs == {
        "num_beams": 4, "max_new_tokens": 2, "num_return_sequences": 4,
    }  # fmt: skip
