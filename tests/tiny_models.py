"""Tiny random-weight models built on the fly (no hub): a GPT-2 (word-level, chat template), a BERT classifier,
a BERT cross-encoder (one relevance score per pair); ``tiny_gpt2_no_eos`` always generates exactly the tokens asked for.

Generation with random weights produces arbitrary tokens, so tests check shapes, counts and order only.
"""

from __future__ import annotations

from pathlib import Path

WORDS = "the a cat dog sat on mat rug hello world good day night is was red blue green one two three".split()  # noqa: SIM905
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def tiny_gpt2(directory: Path) -> Path:
    """A 1-layer GPT-2 with a word-level tokenizer and a chat template, saved to ``directory``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    # Whole words as tokens, decoded with spaces: every generated token is one streamed fragment.
    vocab = {token: i for i, token in enumerate(["<unk>", "<eos>", "<pad>", ":", "user", "assistant", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>", bos_token="<eos>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(vocab), n_positions=8192, n_embd=32, n_layer=1, n_head=2,
        bos_token_id=1, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = 2
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_bert_classifier(directory: Path, labels: tuple[str, ...] = ("negative", "positive")) -> Path:
    """A 1-layer BERT sequence classifier with a trained WordPiece tokenizer, saved to ``directory``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials)
    backend.train_from_iterator([" ".join(WORDS)] * 10, trainer)
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=backend.get_vocab_size(), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_cross_encoder(directory: Path) -> Path:
    """A 1-layer BERT with one output (``num_labels=1``): a random reranking cross-encoder, saved to ``directory``."""
    return tiny_bert_classifier(directory, labels=("LABEL_0",))


def tiny_gpt2_no_eos(directory: Path) -> Path:
    """``tiny_gpt2`` whose generation never ends early (``<eos>``, ``<pad>``, ``<unk>`` suppressed in its generation
    config): every generation yields exactly the requested number of new tokens, one word each."""
    from transformers import GenerationConfig

    tiny_gpt2(directory)
    config = GenerationConfig.from_pretrained(directory)
    config.suppress_tokens = [0, 1, 2]  # <unk>, <eos>, <pad> in tiny_gpt2's vocabulary
    config.save_pretrained(directory)
    return directory
