"""Prepared data on disk: tokenize sources into Arrow shards with a manifest, and read them back.

`prepare` (what `python -m apollo_ray.data prepare` runs) makes two passes over the corpus: the
first trains the tokenizer (or, with a given tokenizer, only counts documents), the second
encodes. Documents are assigned to the splits by a seeded hash of their index: `val` (what
training evaluates on and a search selects on), `test` (read once at the end, for the numbers a
person reads; nothing is selected on it) and `train`. Each split is one token stream, documents
concatenated with a separator after each (`[SEP]` for bert, `<|endoftext|>` for gpt), cut into
Arrow IPC files of `shard_tokens` tokens:

    out_dir/
      tokenizer.json
      train-00000.arrow, train-00001.arrow, ...   one uint16/uint32 column `tokens`,
      val-00000.arrow, test-00000.arrow           one contiguous record batch per file
      manifest.json                               written last: its presence means complete

Readers memory-map local shards (zero-copy, read-only numpy views) and load shards behind a
`pyarrow.fs` URI (`s3://`, `gs://`, `file://`, ...) into memory (`read_shard`, which checks
each against the manifest). The pre-flight of a run or study is `checks.check_data`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
import pyarrow.ipc
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError
from tokenizers import Tokenizer
from tqdm import tqdm

from ..config import format_validation_error
from ..storage import filesystem, is_uri, join_uri, read_bytes
from .sources import DataError, DocSep, Source, iter_documents, resolve_source
from .tokenizer import SEPARATOR, Kind, load_tokenizer, special_ids, train_tokenizer

__all__ = [
    "MANIFEST",
    "Manifest",
    "ShardInfo",
    "SplitInfo",
    "document_splits",
    "load_manifest",
    "open_split",
    "prepare",
    "read_shard",
]

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
Split = Literal["train", "val", "test"]
TRAIN, VAL, TEST = range(3)  # a document's split, as `document_splits` gives it
ENCODE_BATCH = 512  # documents per `encode_batch` call (it encodes in parallel)


def _file_name(value: str) -> str:
    """A name in the data folder: a manifest cannot point outside it (`../`, `/etc/...`)."""
    if not value or "/" in value or "\\" in value or value in {".", ".."}:
        raise ValueError("not a plain file name in the data folder")  # the value follows
    return value


FileName = Annotated[str, AfterValidator(_file_name)]


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: FileName
    tokens: int


class SplitInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    documents: int
    tokens: int
    shards: list[ShardInfo]


class Manifest(BaseModel):
    """`manifest.json`: what was prepared, from what, and where each split's tokens are."""

    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = FORMAT_VERSION
    kind: Kind
    tokenizer: FileName = TOKENIZER
    vocab_size: int
    special_ids: dict[str, int]
    dtype: Literal["uint16", "uint32"]
    splits: dict[Split, SplitInfo]  # `test` only when test_fraction > 0
    sources: list[str]
    seed: int
    val_fraction: float
    test_fraction: float = 0.0  # data prepared before the test split had none


def prepare(
    sources: Sequence[str],
    out_dir: str | Path,
    kind: Kind,
    *,
    tokenizer: str | Path | None = None,
    vocab_size: int = 8192,
    text_column: str = "text",
    split: str = "train",
    val_fraction: float = 0.01,
    test_fraction: float = 0.01,
    shard_tokens: int = 16_000_000,
    seed: int = 0,
    max_documents: int | None = None,
    overwrite: bool = False,
    doc_sep: DocSep = "blank",
) -> Manifest:
    """Tokenize `sources` into `out_dir` and return the manifest written there.

    `tokenizer` is a `tokenizer.json` to use as is; without it one is trained (`vocab_size`).
    About `val_fraction` and `test_fraction` of the documents, chosen by a hash of (seed,
    document index), form the val and test splits (`document_splits`; with `test_fraction` 0
    there is no test split). `doc_sep` says how `.txt` files split into documents (see
    `resolve_source`). A val or test split that would be empty is refused before anything is
    written.
    """
    if not sources:
        raise DataError("no sources given")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(
            f"val_fraction must be in (0, 1), got {val_fraction}: training evaluates on the "
            "val split"
        )
    if not 0.0 <= test_fraction < 1.0 - val_fraction:
        raise DataError(
            f"test_fraction must be in [0, 1 - val_fraction), got {test_fraction} with "
            f"val_fraction {val_fraction}: train keeps the rest"
        )
    if shard_tokens < 1 or vocab_size < 8 or (max_documents is not None and max_documents < 1):
        raise DataError("shard_tokens and max_documents must be >= 1 and vocab_size >= 8")
    out = Path(out_dir)
    if (out / MANIFEST).exists() and not overwrite:
        raise DataError(f"{out} already holds prepared data ({MANIFEST}); pass --overwrite")
    resolved = [
        resolve_source(s, text_column=text_column, split=split, doc_sep=doc_sep) for s in sources
    ]
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer, kind)
        n_docs = sum(1 for _ in _progress(resolved, max_documents, "counting documents"))
    else:
        counter = _Counter(_progress(resolved, max_documents, "training tokenizer"))
        tok = train_tokenizer(counter, kind, vocab_size)
        n_docs = counter.count
    if n_docs == 0:
        raise DataError(f"no non-empty document in {list(sources)}")
    split_of = document_splits(n_docs, seed, val_fraction, test_fraction)
    if not (split_of == VAL).any():
        hint = (
            " (a .txt file without blank lines reads as one document: pass --doc-sep line to "
            "read one document per line)"
            if doc_sep == "blank"
            else ""
        )
        raise DataError(
            f"the validation split would be empty: only {n_docs} document was read from "
            f"{', '.join(sources)}{hint}; --val-fraction {val_fraction} needs at least 2 "
            "documents, one for train and one for validation"
        )
    if test_fraction > 0 and not (split_of == TEST).any():
        raise DataError(
            f"the test split would be empty: only {n_docs} documents were read from "
            f"{', '.join(sources)}; --test-fraction {test_fraction} needs at least 3 documents "
            "(one each for train, validation and test), or pass --test-fraction 0"
        )
    _clear(out)
    tok.save(str(out / TOKENIZER))
    names = SPLITS if test_fraction > 0 else SPLITS[:2]
    splits = _write_splits(resolved, out, tok, kind, split_of, names, shard_tokens, max_documents)
    manifest = Manifest(
        kind=kind,
        vocab_size=tok.get_vocab_size(),
        special_ids=special_ids(tok, kind),
        dtype=_dtype(tok.get_vocab_size()),
        splits=splits,
        sources=list(sources),
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )
    _write_atomically(out / MANIFEST, manifest.model_dump_json(indent=2))
    return manifest


def document_splits(
    n: int, seed: int, val_fraction: float, test_fraction: float = 0.0
) -> np.ndarray:
    """The split of each document 0..n-1 (`TRAIN`, `VAL` or `TEST`), from one uniform draw per
    document (a hash of seed and index): below `val_fraction` val, then up to `val_fraction +
    test_fraction` test, the rest train. Each split asked for gets at least one document when
    there are enough (val from 2 documents, test from 3), and train always keeps one. A test
    split is carved out of what would be train: the val documents do not depend on it."""
    u = _uniform(np.arange(n, dtype=np.uint64), seed)
    split = np.full(n, TRAIN, dtype=np.int8)
    split[u < val_fraction] = VAL
    if val_fraction > 0 and n >= 2 and not (split == VAL).any():
        split[np.argmin(u)] = VAL
    split[(split == TRAIN) & (u < val_fraction + test_fraction)] = TEST
    if test_fraction > 0 and n >= 3 and not (split == TEST).any():
        split[np.argmin(np.where(split == TRAIN, u, np.inf))] = TEST
    if n and not (split == TRAIN).any():  # train keeps at least one document
        split[np.argmax(u)] = TRAIN
    return split


def _uniform(index: np.ndarray, seed: int) -> np.ndarray:
    """Output `index` of a splitmix64 generator seeded with `seed`, mapped to [0, 1)."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = np.uint64(seed % 2**64) + (index + np.uint64(1)) * golden
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


class _Counter:
    """Passes documents through and counts them (the tokenizer trainer consumes the iterator)."""

    def __init__(self, documents: Iterator[str]) -> None:
        self.documents, self.count = documents, 0

    def __iter__(self) -> Iterator[str]:
        for doc in self.documents:
            self.count += 1
            yield doc


def _progress(sources: list[Source], max_documents: int | None, what: str) -> Iterator[str]:
    return tqdm(
        iter_documents(sources, max_documents),
        what,
        max_documents,
        unit=" docs",
        disable=None,  # on a terminal only: elsewhere each redraw would be a line of a log
    )


def _dtype(vocab_size: int) -> Literal["uint16", "uint32"]:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _clear(out: Path) -> None:
    """Make `out` ready for writing: create it, or remove an earlier preparation's files."""
    out.mkdir(parents=True, exist_ok=True)
    # The manifest goes first, so a crash from here on never looks like a complete preparation.
    shards = [shard for split in SPLITS for shard in out.glob(f"{split}-*.arrow")]
    for stale in [out / MANIFEST, *shards]:
        stale.unlink(missing_ok=True)


def _write_splits(
    sources: list[Source],
    out: Path,
    tok: Tokenizer,
    kind: Kind,
    split_of: np.ndarray,
    names: tuple[Split, ...],
    shard_tokens: int,
    max_documents: int | None,
) -> dict[Split, SplitInfo]:
    """Second pass: encode every document and append it (plus separator) to its split."""
    dtype = np.dtype(_dtype(tok.get_vocab_size()))
    separator = special_ids(tok, kind)[SEPARATOR[kind]]
    writers = {name: _ShardWriter(out, name, shard_tokens) for name in names}
    tok.encode_special_tokens = True  # "[SEP]" inside a text is text, not a separator
    documents = iter_documents(sources, max_documents)
    bar = tqdm(desc="tokenizing", unit=" docs", total=len(split_of), disable=None)
    index = 0
    while batch := list(islice(documents, ENCODE_BATCH)):
        for encoding in tok.encode_batch(batch, add_special_tokens=False):
            ids = np.array([*encoding.ids, separator], dtype=dtype)
            writers[SPLITS[split_of[index]]].append(ids)
            index += 1
        bar.update(len(batch))
        bar.set_postfix(
            tokens=sum(w.tokens for w in writers.values()),
            shards=sum(len(w.shards) for w in writers.values()),
        )
    bar.close()
    return {name: writer.close() for name, writer in writers.items()}


class _ShardWriter:
    """Appends token arrays to one split and writes a shard file each `shard_tokens` tokens."""

    def __init__(self, out: Path, split: str, shard_tokens: int) -> None:
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.tokens = self.documents = 0
        self.shards: list[ShardInfo] = []

    def append(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.pending_tokens += len(ids)
        self.tokens += len(ids)
        self.documents += 1
        while self.pending_tokens >= self.shard_tokens:
            stream = np.concatenate(self.pending)
            self._write(stream[: self.shard_tokens])
            rest = stream[self.shard_tokens :]
            self.pending, self.pending_tokens = [rest], len(rest)

    def close(self) -> SplitInfo:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0
        return SplitInfo(documents=self.documents, tokens=self.tokens, shards=self.shards)

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.split}-{len(self.shards):05d}.arrow"
        batch = pa.record_batch([pa.array(tokens)], names=["tokens"])
        # One record batch per file, so a memory map sees one contiguous array.
        with pa.ipc.new_file(str(self.out / name), batch.schema) as writer:
            writer.write_batch(batch)
        self.shards.append(ShardInfo(file=name, tokens=len(tokens)))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- reading ---------------------------------------------------------------------------------


def load_manifest(location: str | Path) -> Manifest:
    """The manifest of prepared data at a local directory or a `pyarrow.fs` URI."""
    try:
        text = read_bytes(join_uri(str(location), MANIFEST))
    except OSError:
        raise DataError(
            f"{location}: no {MANIFEST}, so no prepared data here; run `python -m "
            f"apollo_ray.data prepare SOURCES --out {location}` first"
        ) from None
    try:
        return Manifest.model_validate(json.loads(text.decode()))
    except ValidationError as e:
        problems = format_validation_error(e, f"{location}/{MANIFEST}")
        raise DataError(f"{problems}; prepare again") from None
    except ValueError as e:  # not JSON
        raise DataError(
            f"{location}/{MANIFEST}: not a valid manifest ({e}); prepare again"
        ) from None


def open_split(
    location: str | Path, split: Split, manifest: Manifest | None = None
) -> list[np.ndarray]:
    """The token stream of `split` as one read-only numpy array per shard (`read_shard`)."""
    manifest = manifest or load_manifest(location)
    return [read_shard(location, manifest, shard) for shard in manifest.splits[split].shards]


def read_shard(location: str | Path, manifest: Manifest, shard: ShardInfo) -> np.ndarray:
    """The tokens of `shard`, read-only, checked against the manifest (one Arrow batch of its
    length and dtype); a shard missing, damaged or not the manifest's is a `DataError` ending in
    `prepare again`. Local shards are memory-mapped (no copy, nothing read until used); shards
    behind a URI are read into memory."""
    where = f"{location}/{shard.file}"
    try:
        if is_uri(location):
            fs, path = filesystem(join_uri(str(location), shard.file))
            with fs.open_input_file(path) as f:
                source = pa.BufferReader(f.read_buffer())
        else:
            source = pa.memory_map(str(Path(location) / shard.file), "r")
        reader = pa.ipc.open_file(source)
        column = reader.get_batch(0).column(0) if reader.num_record_batches == 1 else None
    except FileNotFoundError:
        raise DataError(f"{where}: missing; prepare again") from None
    except OSError as e:
        raise DataError(f"{where}: cannot read the shard ({e}); prepare again") from None
    except pa.ArrowException as e:
        why = " ".join(str(e).split())
        raise DataError(f"{where}: not an Arrow shard ({why}); prepare again") from None
    if column is None or len(column) != shard.tokens or str(column.type) != manifest.dtype:
        raise DataError(f"{where}: does not match {MANIFEST}; prepare again")
    return column.to_numpy(zero_copy_only=True)
