"""Tokenizers for the two model kinds, trained deterministically or loaded from JSON.

- `bert`: lowercasing WordPiece with `[PAD] [UNK] [CLS] [SEP] [MASK]` (as BERT's uncased
  vocabulary); its post-processor wraps a single text in `[CLS] ... [SEP]` so that the saved
  `tokenizer.json` behaves like BERT's in `transformers`.
- `gpt`: byte-level BPE with `<|endoftext|>` (as GPT-2's); no text is ever `[UNK]`.

`prepare` encodes documents without the post-processor and puts the separator (`[SEP]` or
`<|endoftext|>`) after each document itself.

Training is deterministic: the same documents, kind and vocabulary size give a byte-identical
`tokenizer.json` in every process, whatever `PYTHONHASHSEED` or the number of threads. The
trainers of Hugging Face `tokenizers` (checked with 0.23.3) are not. Its WordPiece trainer is
its BPE trainer with a `##` prefix (`models/bpe/trainer.rs`), which keeps the word counts in an
`AHashMap`, whose hash keys are drawn at random for every map. It numbers the alphabet in
code-point order, but the `##` symbols (`##a`, `##b`, ...) in the order it iterates that map
(`tokenize_words`), and it breaks ties between equally frequent pairs by those numbers (`Ord
for Merge`); so from run to run, even within one process, the `##` symbols get other ids, ties
go the other way, merged tokens get other ids and, at the vocabulary limit, other tokens make it
in. (Byte-level BPE has no `##` symbols; there only a corner we have never seen happen depends
on hash order: two queue entries for one pair with equal counts, pushed in the order of a hash
map, when a merge makes a token that already exists.) So only the model is taken from
`tokenizers`, and the training loop is here:

1. Words are counted in Python (`count_words`) with the tokenizer's own normalizer and
   pre-tokenizer: what the Rust trainer counts. Sums do not depend on the order of adding.
2. Symbols are numbered: the special tokens (ids 0, 1, ...), the alphabet (every character of
   the words; for gpt also the 256 byte-level characters) in code-point order, then for bert the
   `##` symbols of every character seen inside a word, in code-point order.
3. BPE merges the most frequent adjacent pair of symbols until the vocabulary has `vocab_size`
   tokens or no pair is left. Ties go to the smallest (left id, right id), the Rust trainer's own
   rule, now over ids that are fixed. The pair counts and the priority queue are kept up to date
   incrementally, so a merge costs time in proportion to the words that contain the pair.
4. The vocabulary (and for gpt the merges in order) are loaded into `models.WordPiece` /
   `models.BPE`, the special tokens registered as added tokens, as `train_from_iterator` does.

Words and alphabets are sorted before they are numbered; whatever else is visited in an order
that could vary (sets of word indices, the pairs to push) only adds to counts and sets, and the
queue's order is total. So the result depends on no hash seed and no thread count.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from .sources import DataError

__all__ = [
    "SEPARATOR",
    "SPECIAL_TOKENS",
    "count_words",
    "learn_bpe",
    "load_tokenizer",
    "special_ids",
    "train_tokenizer",
]

Kind = Literal["bert", "gpt"]

# Role -> token; the order is the order of their ids in a trained vocabulary.
SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    "bert": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
    "gpt": {"eos": "<|endoftext|>"},
}
# The role of the token written after every document in the token stream.
SEPARATOR: dict[str, str] = {"bert": "sep", "gpt": "eos"}
# WordPiece's mark of a token that continues a word (`##ing`).
CONTINUING_SUBWORD_PREFIX = "##"
_MAX_SYMBOLS = 0x110000  # learn_bpe keeps a token id as a character, chr(id)


def train_tokenizer(documents: Iterable[str], kind: Kind, vocab_size: int) -> Tokenizer:
    """Train a `kind` tokenizer of at most `vocab_size` tokens (fewer if the corpus is small).

    The special tokens and the alphabet are always in the vocabulary, even when they alone are
    more than `vocab_size` (as with `tokenizers`' trainers). Deterministic: see the module
    docstring.
    """
    specials = list(SPECIAL_TOKENS[kind].values())
    tokenizer = _untrained(kind)
    counts = count_words(documents, kind)
    if kind == "bert":
        prefix = CONTINUING_SUBWORD_PREFIX
        vocab, _ = learn_bpe(counts, vocab_size, specials, prefix=prefix)
        tokenizer.model = models.WordPiece(
            vocab, unk_token="[UNK]", continuing_subword_prefix=prefix
        )
    else:
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        vocab, merges = learn_bpe(counts, vocab_size, specials, alphabet)
        tokenizer.model = models.BPE(vocab, merges)
    tokenizer.add_special_tokens(specials)
    if kind == "bert":
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
    return tokenizer


def _untrained(kind: Kind) -> Tokenizer:
    """A `kind` tokenizer with its normalizer, pre-tokenizer and decoder, and an empty model."""
    if kind == "bert":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def count_words(documents: Iterable[str], kind: Kind) -> Counter[str]:
    """Occurrences of each word (pre-token) of `documents`, as a `kind` trainer counts them.

    A word is what the tokenizer's normalizer and pre-tokenizer make of a document. Each
    document is normalized and cut into pieces at places where the pre-tokenizer always splits
    and where what it makes of a piece does not depend on the text around it; the pieces are
    counted, and each distinct piece is pre-tokenized once. That gives the counts that
    pre-tokenizing every document would, several times faster.
    """
    tokenizer = _untrained(kind)
    normalizer = tokenizer.normalizer
    normalize = normalizer.normalize_str if normalizer is not None else str
    cut = _cut_at_spaces if kind == "bert" else _BYTE_LEVEL_CUT.split
    pieces: Counter[str] = Counter()
    for document in documents:
        pieces.update(cut(normalize(document)))
    pre_tokenize = tokenizer.pre_tokenizer.pre_tokenize_str
    counts: Counter[str] = Counter()
    for piece, n in pieces.items():
        for word, _ in pre_tokenize(piece):
            counts[word] += n
    return counts


def _cut_at_spaces(text: str) -> list[str]:
    """For `BertPreTokenizer`, which splits at every whitespace character and drops it."""
    return text.split(" ")


# For byte-level BPE: its pre-tokenizer, GPT-2's regex
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# (matches follow one another with no gaps), always splits before a space that follows a
# non-space: no alternative matches a non-space and then a space, so a match ends there; and
# the regex has no lookbehind, so what follows is split as it would be on its own. Its one
# lookahead cannot end a match at such a place (the character before is not a space). Both
# neighbours are visible ASCII, non-spaces for Python's `re` and Oniguruma alike.
_BYTE_LEVEL_CUT = re.compile(r"(?<=[!-~])(?= [!-~])")


def learn_bpe(
    word_counts: Mapping[str, int],
    vocab_size: int,
    specials: Sequence[str] = (),
    alphabet: Iterable[str] = (),
    prefix: str = "",
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE on `word_counts`: the vocabulary (token -> id) and the merges, in the order learned.

    With a `prefix` (`##`) a symbol after the first in a word carries it, as in WordPiece, and a
    merge drops it from the right part. Ties between pairs go to the smaller pair of ids; the
    result depends only on the arguments' values, never on hash or iteration order.
    """
    tokens: list[str] = []  # id -> token
    ids: dict[str, int] = {}  # token -> id

    def add(token: str) -> int:
        if token not in ids:
            ids[token] = len(tokens)
            tokens.append(token)
        return ids[token]

    for token in specials:
        add(token)
    words = sorted(word for word, n in word_counts.items() if word and n > 0)
    for char in sorted(set(alphabet).union(*words)):
        add(char)
    if prefix:
        for char in sorted({char for word in words for char in word[1:]}):
            add(prefix + char)
    # A word is a str with one character per symbol, chr(id), so that C string methods find
    # and replace pairs; a pair is a 2-character str, whose order is that of (left id, right id).
    seqs = [
        "".join([chr(ids[word[0]]), *[chr(ids[prefix + c]) for c in word[1:]]]) for word in words
    ]
    counts = [word_counts[word] for word in words]
    # pair -> its number of occurrences (weighted by word count); pair -> the words that may
    # hold it (a superset: merges leave stale entries).
    pair_counts: dict[str, int] = defaultdict(int)
    where: dict[str, set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for k in range(len(seq) - 1):
            pair_counts[seq[k : k + 2]] += counts[i]
            where[seq[k : k + 2]].add(i)
    # A min-heap of (-count, pair): the most frequent pair first and among those the smallest
    # (left id, right id), the Rust trainer's tie rule. Updated lazily: every pair with a
    # positive count has an entry whose count is at least its current one.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while len(tokens) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        count = pair_counts[pair]
        if count != -negative:  # it fell since the entry was pushed
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        a, b = pair
        left, right = tokens[ord(a)], tokens[ord(b)]
        if len(tokens) >= _MAX_SYMBOLS:
            raise ValueError(f"a vocabulary of more than {_MAX_SYMBOLS} tokens")
        new = chr(
            add(left + (right[len(prefix) :] if prefix and right.startswith(prefix) else right))
        )
        merges.append((left, right))
        grown: set[str] = set()
        # Each word changes only its own symbols and adds to counts and sets, so the order in
        # which the words are visited does not matter.
        for i in where.pop(pair):
            seq = seqs[i]
            k = seq.find(pair)
            if k < 0:  # a stale entry: an earlier merge took the pair from this word
                continue
            n, end, before = counts[i], len(seq) - 2, -2
            # Left to right, as the Rust trainer's `Word::merge`: per (a, b) merged, the pairs
            # with its neighbours give way to pairs with `new` (the left neighbour is `new` when
            # the pair just before was merged too).
            while k >= 0:
                pair_counts[pair] -= n
                if k > 0:
                    x = new if k == before + 2 else seq[k - 1]
                    pair_counts[x + a] -= n
                    pair_counts[x + new] += n
                    grown.add(x + new)
                    where[x + new].add(i)
                if k < end:
                    y = seq[k + 2]
                    pair_counts[b + y] -= n
                    pair_counts[new + y] += n
                    grown.add(new + y)
                    where[new + y].add(i)
                before = k
                k = seq.find(pair, k + 2)
            seqs[i] = seq.replace(pair, new)
        for pair in grown:  # pushed in any order: the heap's order is total
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
    return ids, merges


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
