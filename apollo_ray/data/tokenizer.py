"""Tokenizers for the two model kinds, trained with Hugging Face `tokenizers` or loaded from JSON.

- `bert`: lowercasing WordPiece with `[PAD] [UNK] [CLS] [SEP] [MASK]` (as BERT's uncased
  vocabulary); its post-processor wraps a single text in `[CLS] ... [SEP]` so that the saved
  `tokenizer.json` behaves like BERT's in `transformers`.
- `gpt`: byte-level BPE with `<|endoftext|>` (as GPT-2's); no text is ever `[UNK]`.

`prepare` encodes documents without the post-processor and puts the separator (`[SEP]` or
`<|endoftext|>`) after each document itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from .sources import DataError

__all__ = ["SEPARATOR", "SPECIAL_TOKENS", "load_tokenizer", "special_ids", "train_tokenizer"]

Kind = Literal["bert", "gpt"]

# Role -> token; the order is the order of their ids in a trained vocabulary.
SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    "bert": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
    "gpt": {"eos": "<|endoftext|>"},
}
# The role of the token written after every document in the token stream.
SEPARATOR: dict[str, str] = {"bert": "sep", "gpt": "eos"}


def train_tokenizer(documents: Iterable[str], kind: Kind, vocab_size: int) -> Tokenizer:
    """Train a `kind` tokenizer of at most `vocab_size` tokens (fewer if the corpus is small)."""
    specials = list(SPECIAL_TOKENS[kind].values())
    if kind == "bert":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False
        )
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    tokenizer.train_from_iterator(documents, trainer)
    if kind == "bert":
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
    return tokenizer


def load_tokenizer(path: str | Path, kind: Kind) -> Tokenizer:
    """Read a `tokenizer.json` and check that it has the special tokens `kind` needs."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such tokenizer file")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side reports parse errors as plain Exception
        raise DataError(f"{path}: not a tokenizers JSON file: {e}") from None
    missing = [t for t in SPECIAL_TOKENS[kind].values() if tokenizer.token_to_id(t) is None]
    if missing:
        raise DataError(f"{path}: a {kind} tokenizer needs the special tokens {missing}")
    return tokenizer


def special_ids(tokenizer: Tokenizer, kind: Kind) -> dict[str, int]:
    """Role -> id of the special tokens, e.g. {"pad": 0, "unk": 1, "cls": 2, ...} for bert."""
    return {role: tokenizer.token_to_id(token) for role, token in SPECIAL_TOKENS[kind].items()}
