"""Tokenizer training and `prepare` are reproducible.

The same input and options give byte-identical `tokenizer.json`, shards and `manifest.json` in
separate processes, whatever `PYTHONHASHSEED` and the number of Rust threads; and the training
loop counts words and breaks ties as documented (see `apollo_ray.data.tokenizer`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import apollo_ray
from apollo_ray.data.tokenizer import count_words, learn_bpe, train_tokenizer

# Where the package under test lives: the subprocesses import it from there, not from whatever
# else is installed.
PACKAGE_ROOT = Path(apollo_ray.__file__).resolve().parents[1]
# Text that exercises the pre-tokenizers' corners: contractions, runs of spaces, tabs and line
# breaks, non-ASCII spaces, digits, accents (composed and combining), CJK, emoji, controls.
TRICKY = [
    "It's  the cat's toy; they'll say 'no'.\tTabs\t\tand\nlines\r\n  lead and trail  ",
    "Naïve cafe\u0301 \u00a0non-breaking\u2003em\u3000ideographic 漢字かな 🙂🙂 x\x1cy 42 4 2 3.14",
    "  'quoted' ' spaced'  a '' b  c's d'll e're f've g'm h'd I'D \u0085 end.",
]


def write_texts(folder: Path) -> str:
    """Three .txt files of made-up words (many equally frequent pairs); returns a glob."""
    rng = np.random.default_rng(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "Ze", "qu", "é", "ß", "7", "'s"]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(200)]
    folder.mkdir()
    for part in range(3):
        docs = [
            " ".join(rng.choice(words, size=rng.integers(5, 40))) + rng.choice([".", "!", " 42."])
            for _ in range(30)
        ]
        text = "\n\n".join([*docs, *TRICKY]) + "\n"
        (folder / f"part{part}.txt").write_text(text, encoding="utf-8")
    return str(folder / "*.txt")


def prepare_twice(tmp_path: Path, source: str, kind: str) -> list[dict[str, bytes]]:
    """Run `prepare` in two processes at once, with other hash seeds and thread counts."""
    options = ["--kind", kind, "--vocab-size", "1000", "--shard-tokens", "1000"]
    options += ["--val-fraction", "0.2"]
    if source == "demo":  # its first documents are enough: each is a long article
        options += ["--max-documents", "5"]
    path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    runs = []
    for hash_seed, threads in ((1, 1), (2, 2)):
        out = tmp_path / f"{kind}-{hash_seed}"
        env = {
            **os.environ,
            "PYTHONPATH": path,
            "PYTHONHASHSEED": str(hash_seed),
            "RAYON_NUM_THREADS": str(threads),
        }
        command = [sys.executable, "-m", "apollo_ray.data", "prepare", source, "--out", str(out)]
        process = subprocess.Popen(
            [*command, *options],
            cwd=tmp_path,  # not the repository, which would come first on sys.path
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs.append((out, process))
    files = []
    for out, process in runs:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-2000:]
        files.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    return files


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "gpt"])
@pytest.mark.parametrize("corpus", ["demo", "files"])
def test_prepare_is_byte_identical_across_processes(tmp_path: Path, corpus: str, kind: str) -> None:
    source = "demo" if corpus == "demo" else write_texts(tmp_path / "texts")
    first, second = prepare_twice(tmp_path, source, kind)
    assert {"tokenizer.json", "manifest.json", "train-00000.arrow", "val-00000.arrow"} <= set(first)
    assert len([name for name in first if name.startswith("train-")]) > 1  # several shards
    assert sorted(first) == sorted(second)
    differ = [name for name in first if first[name] != second[name]]
    assert not differ, f"{kind} on {corpus}: {len(differ)} files differ, e.g. {differ[:4]}"


def test_training_twice_in_one_process_gives_the_same_tokenizer() -> None:
    # `tokenizers`' trainers differed even here: every AHashMap draws its own hash keys.
    docs = [text for text in TRICKY for _ in range(3)] + ["low lower lowest newer newest wider"]
    for kind in ("bert", "gpt"):
        first, second = (train_tokenizer(docs, kind, 300).to_str() for _ in range(2))
        assert first == second, kind


def test_ties_go_to_the_smaller_pair_of_ids() -> None:
    # a, b, c, d get ids 1..4 after the special token; (a, b) and (c, d) are equally frequent.
    counts = {"cd": 2, "ab": 2, "abcd": 1}
    vocab, merges = learn_bpe(counts, 100, specials=["<s>"])
    assert merges[:2] == [("a", "b"), ("c", "d")] and merges[2] == ("ab", "cd")
    assert vocab == {"<s>": 0, "a": 1, "b": 2, "c": 3, "d": 4, "ab": 5, "cd": 6, "abcd": 7}
    assert learn_bpe(dict(reversed(counts.items())), 100, specials=["<s>"]) == (vocab, merges)
    # WordPiece: symbols after the first carry "##", numbered after the alphabet; a merge
    # drops the right part's prefix.
    vocab, merges = learn_bpe({"ba": 3, "ab": 3}, 100, prefix="##")
    assert vocab == {"a": 0, "b": 1, "##a": 2, "##b": 3, "ab": 4, "ba": 5}
    assert merges == [("a", "##b"), ("b", "##a")]
    # The vocabulary stops at vocab_size, but always holds the alphabet.
    assert len(learn_bpe({"abcabc": 5}, 5)[0]) == 5
    assert len(learn_bpe({"abcabc": 5}, 2)[0]) == 3


@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_words_are_counted_as_by_pre_tokenizing_whole_documents(kind: str) -> None:
    # count_words cuts documents into pieces and pre-tokenizes each distinct piece once.
    rng = np.random.default_rng(0)
    pieces = [*"ab Z9.,!-#$'", "'s", "'ll", "  ", " '", "\t", "\n", "\u00a0", "é", "漢", "🙂"]
    docs = [*TRICKY, *("".join(rng.choice(pieces, size=80)) for _ in range(300))]
    tokenizer = train_tokenizer(docs, kind, 300)
    normalize = tokenizer.normalizer.normalize_str if kind == "bert" else str
    split = tokenizer.pre_tokenizer.pre_tokenize_str
    assert count_words(docs, kind) == Counter(
        word for doc in docs for word, _ in split(normalize(doc))
    )


def test_byte_level_bpe_matches_the_rust_trainer() -> None:
    # For byte-level BPE the Rust trainer numbers every symbol in code-point order and breaks
    # ties by those numbers, as we do: where it does not hit its rare order-dependent cases,
    # its tokenizer.json is ours byte for byte. (Its WordPiece numbers "##" symbols in hash
    # order, so there is nothing to compare with.)
    docs = [*TRICKY, "the quick brown fox jumps over the lazy dog " * 3, "lower newer wider"]
    ours = train_tokenizer(docs, "gpt", 400)
    theirs = Tokenizer(models.BPE())
    theirs.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    theirs.decoder = ours.decoder
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    theirs.train_from_iterator(docs, trainer)
    assert ours.to_str() == theirs.to_str()
