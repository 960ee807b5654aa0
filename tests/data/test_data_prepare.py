"""prepare: tokenizer, shards, manifest and the CLI; reading shards back (memory map and URI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pytest
from tokenizers import Tokenizer

from apollo_ray.config import DataConfig
from apollo_ray.data import (
    DataError,
    check_data,
    load_manifest,
    load_tokenizer,
    open_split,
    prepare,
)
from apollo_ray.data.__main__ import main
from apollo_ray.data.shards import TEST, TRAIN, VAL, document_splits

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards hex jolly zebras"


def write_corpus(path: Path, n_docs: int = 40, separator: str = "\n\n") -> Path:
    words = np.array(WORDS.split())
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, size=rng.integers(20, 60))) for _ in range(n_docs)]
    path.write_text(separator.join(docs) + "\n")
    return path


@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_manifest_matches_shards(kind: str, request: pytest.FixtureRequest) -> None:
    data: Path = request.getfixturevalue(f"{kind}_data")
    manifest = load_manifest(data)
    raw = json.loads((data / "manifest.json").read_text())
    assert raw["format_version"] == 1 and raw["kind"] == kind and raw["sources"] == ["demo"]
    assert manifest.dtype == "uint16" and manifest.vocab_size == 2000
    assert manifest.special_ids == (
        {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4} if kind == "bert" else {"eos": 0}
    )
    tokenizer = Tokenizer.from_file(str(data / manifest.tokenizer))
    assert tokenizer.get_vocab_size() == manifest.vocab_size
    separator = manifest.special_ids["sep" if kind == "bert" else "eos"]
    assert set(manifest.splits) == {"train", "val", "test"}
    assert sum(split.documents for split in manifest.splits.values()) == 30
    assert manifest.splits["val"].documents >= 1 and manifest.splits["test"].documents >= 1
    for name, split in manifest.splits.items():
        arrays = open_split(data, name)
        stream = np.concatenate(arrays)
        assert len(stream) == split.tokens == sum(s.tokens for s in split.shards)
        assert (stream == separator).sum() == split.documents and stream[-1] == separator
        assert stream.max() < manifest.vocab_size
        for shard in split.shards:  # one contiguous record batch per file
            assert pa.ipc.open_file(str(data / shard.file)).num_record_batches == 1


def test_local_shards_are_memory_mapped(bert_data: Path) -> None:
    before = pa.total_allocated_bytes()
    (array,) = open_split(bert_data, "train")
    assert pa.total_allocated_bytes() == before  # nothing was read into Arrow's memory pool
    assert not array.flags.writeable and not array.flags.owndata
    assert array.dtype == np.uint16


def test_file_uri_reads_the_same_tokens(bert_data: Path) -> None:
    uri = bert_data.resolve().as_uri()
    assert uri.startswith("file://")
    assert load_manifest(uri) == load_manifest(bert_data)
    before = pa.total_allocated_bytes()
    in_memory = open_split(uri, "train")  # read into memory, unlike a local path
    assert pa.total_allocated_bytes() - before >= in_memory[0].nbytes
    for split in ("train", "val"):
        from_uri, local = open_split(uri, split), open_split(bert_data, split)
        assert all(np.array_equal(a, b) for a, b in zip(from_uri, local, strict=True))


def test_missing_manifest_says_run_prepare(tmp_path: Path) -> None:
    for location in (tmp_path, tmp_path.as_uri()):
        with pytest.raises(
            DataError, match=r"run `python -m apollo_ray.data prepare SOURCES --out .*` first"
        ):
            load_manifest(location)


def test_two_sources_shards_and_a_given_tokenizer(tmp_path: Path, bert_data: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt")
    (tmp_path / "more.jsonl").write_text('{"text": "one more document"}\n{"text": "and another"}\n')
    manifest = prepare(
        [str(corpus), str(tmp_path / "*.jsonl")],
        tmp_path / "out",
        "bert",
        tokenizer=bert_data / "tokenizer.json",
        shard_tokens=500,
        val_fraction=0.2,
    )
    train = manifest.splits["train"]
    assert [s.tokens for s in train.shards[:-1]] == [500] * (len(train.shards) - 1)
    assert 0 < train.shards[-1].tokens <= 500
    assert [s.file for s in train.shards[:2]] == ["train-00000.arrow", "train-00001.arrow"]
    assert manifest.vocab_size == load_manifest(bert_data).vocab_size
    assert sum(split.documents for split in manifest.splits.values()) == 42
    assert manifest.sources == [str(corpus), f"{tmp_path}/*.jsonl"]


def test_existing_preparation_needs_overwrite(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    prepare([str(corpus)], out, "gpt", vocab_size=300, shard_tokens=200)
    n_shards = len(list(out.glob("train-*.arrow")))
    with pytest.raises(DataError, match=r"already holds prepared data.*--overwrite"):
        prepare([str(corpus)], out, "gpt", vocab_size=300)
    manifest = prepare([str(corpus)], out, "gpt", vocab_size=300, overwrite=True)
    assert n_shards > 1 and len(manifest.splits["train"].shards) == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "test-00000.arrow",
        "tokenizer.json",
        "train-00000.arrow",
        "val-00000.arrow",
    ]


def test_tokenizer_without_the_needed_special_tokens(tmp_path: Path, gpt_data: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt")
    missing = r"needs the special tokens \['\[PAD\]', '\[UNK\]', '\[CLS\]', '\[SEP\]', '\[MASK\]'\]"
    with pytest.raises(DataError, match=missing):
        prepare([str(corpus)], tmp_path / "out", "bert", tokenizer=gpt_data / "tokenizer.json")
    with pytest.raises(DataError, match="no such tokenizer file"):
        load_tokenizer(tmp_path / "nope.json", "gpt")


def test_held_out_splits_are_deterministic_and_never_empty() -> None:
    split = document_splits(100_000, seed=0, val_fraction=0.01, test_fraction=0.02)
    assert 900 < (split == VAL).sum() < 1100 and 1800 < (split == TEST).sum() < 2200
    assert np.array_equal(split, document_splits(100_000, 0, 0.01, 0.02))
    assert not np.array_equal(split, document_splits(100_000, 1, 0.01, 0.02))
    # the test split is carved out of train: the val documents do not depend on it
    assert np.array_equal(split == VAL, document_splits(100_000, 0, 0.01) == VAL)

    def counts(n: int, val: float, test: float = 0.0) -> list[int]:
        split = document_splits(n, 0, val, test)
        return [int((split == s).sum()) for s in (TRAIN, VAL, TEST)]

    assert [counts(n, 0.01) for n in (1, 2, 3)] == [[1, 0, 0], [1, 1, 0], [2, 1, 0]]
    assert [counts(n, 0.01, 0.01) for n in (2, 3, 4)] == [[1, 1, 0], [1, 1, 1], [2, 1, 1]]
    assert [counts(n, 0.99) for n in (1, 2)] == [[1, 0, 0], [1, 1, 0]]  # train keeps one
    assert counts(50, 0.0)[1:] == [0, 0]


def test_the_test_split_is_written_and_read(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    manifest = prepare(
        [str(corpus)], out, "gpt", vocab_size=300, val_fraction=0.1, test_fraction=0.2
    )
    assert set(manifest.splits) == {"train", "val", "test"} and manifest.test_fraction == 0.2
    assert sum(s.documents for s in manifest.splits.values()) == 40
    assert (out / "test-00000.arrow").exists()
    without = prepare([str(corpus)], out, "gpt", vocab_size=300, test_fraction=0.0, overwrite=True)
    assert set(without.splits) == {"train", "val"} and not (out / "test-00000.arrow").exists()
    with pytest.raises(DataError, match=r"data.path: .* has no test split; .*--test-fraction"):
        check_data(DataConfig(path=str(out), seq_len=8), "gpt", ("test",))
    with pytest.raises(DataError, match=r"test_fraction must be in \[0, 1 - val_fraction\)"):
        prepare([str(corpus)], out, "gpt", val_fraction=0.5, test_fraction=0.5, overwrite=True)


def test_cli_help_lists_every_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "apollo_ray.data", "prepare", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    options = "--out --kind --tokenizer --vocab-size --text-column --split --val-fraction"
    options += " --shard-tokens --max-documents --seed --doc-sep --overwrite"
    for option in options.split():
        assert option in result.stdout


def test_cli_prepare_and_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    argv = ["prepare", str(corpus), "--out", str(out), "--kind", "gpt", "--vocab-size", "300"]
    assert main([*argv, "--max-documents", "10", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "gpt data from" in printed and "vocab 300" in printed and "prepared" in printed
    assert main(["info", str(out)]) == 0
    assert "train" in capsys.readouterr().out
    manifest = load_manifest(out)
    assert manifest.seed == 3
    assert sum(split.documents for split in manifest.splits.values()) == 10


def test_cli_errors_exit_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path), "--kind", "bert"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such file" in err and "Traceback" not in err
    assert main(["info", str(tmp_path)]) == 2


def test_doc_sep_line_reads_one_paragraph_per_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=20, separator="\n")
    out = tmp_path / "out"
    argv = ["prepare", str(corpus), "--kind", "gpt", "--vocab-size", "300", "--val-fraction", "0.2"]
    assert main([*argv, "--out", str(out), "--doc-sep", "line"]) == 0
    manifest = load_manifest(out)
    assert sum(split.documents for split in manifest.splits.values()) == 20
    assert manifest.splits["val"].documents >= 1 and manifest.splits["val"].tokens > 0
    capsys.readouterr()

    # read as one document (blank-line separated, the default), it would leave val empty
    fresh = tmp_path / "fresh"
    assert main([*argv, "--out", str(fresh)]) == 2
    err = capsys.readouterr().err  # after the progress bar of the first pass
    [error] = [line for line in err.splitlines() if "error" in line]
    assert error.startswith("error: the validation split would be empty: only 1 document was")
    assert "pass --doc-sep line" in error and "--val-fraction 0.2 needs at least 2" in error
    assert err.endswith(f"{error}\n") and not fresh.exists()  # refused before writing anything
    before = (out / "manifest.json").read_text()
    assert main([*argv, "--out", str(out), "--overwrite"]) == 2
    assert (out / "manifest.json").read_text() == before  # the earlier preparation is intact


def test_val_fraction_zero_is_refused(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt")
    with pytest.raises(DataError, match=r"val_fraction must be in \(0, 1\), got 0.0"):
        prepare([str(corpus)], tmp_path / "out", "gpt", val_fraction=0.0)
    with pytest.raises(DataError, match=r"doc_sep must be one of \('blank', 'line'\)"):
        prepare([str(corpus)], tmp_path / "out", "gpt", doc_sep="lines")  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../x.arrow", "/etc/passwd", "sub/x.arrow", "..\\x.arrow", ".."])
@pytest.mark.parametrize("field", ["file", "tokenizer"])
def test_manifest_paths_must_be_plain_file_names(
    tmp_path: Path, bert_data: Path, field: str, name: str
) -> None:
    raw = json.loads((bert_data / "manifest.json").read_text())
    if field == "file":
        raw["splits"]["train"]["shards"][0]["file"] = name
        where = r"splits\.train\.shards\.0\.file"
    else:
        raw["tokenizer"] = name
        where = "tokenizer"
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=rf"manifest\.json: {where}: not a plain") as e:
        load_manifest(tmp_path)
    assert "\n" not in str(e.value) and "pydantic" not in str(e.value)  # one line, no URL
    assert load_manifest(bert_data).splits["train"].shards  # the prepared data still loads
