"""The pre-flight of prepared data: what a run or study checks before anything starts, from the
manifest (each split holds a sequence of the run's length) and, for local data, from the files
themselves, read cheaply (`check_files`); and the sequence windows both the checks and
`batches` count with."""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from ..storage import is_uri
from .shards import MANIFEST, Manifest, Split, load_manifest, read_shard
from .sources import DataError
from .tokenizer import Kind, load_tokenizer

__all__ = ["check_data", "check_files", "sequences", "window"]

MIN_SEQ_LEN = DataConfig.model_fields["seq_len"].metadata[0].ge
SAMPLE = 1 << 16  # tokens per part of a shard whose largest id `check_files` reads


def check_data(
    config: DataConfig,
    kind: Kind,
    splits: tuple[Split, ...] = ("train", "val"),
    field: str = "data.path",
    files: bool = True,
) -> Manifest:
    """The manifest of `config.path`, checked: the data was prepared for `kind`, and each of
    `splits` holds at least one sequence of `config.seq_len` (counted from the manifest; one is
    enough: evaluation reads the val split's sequences over again when it wants more than there
    are). With `files`, local data is read as a run will read it, cheaply (`check_files`: the
    pre-flight; `Batches`, which checks each shard it opens, passes False). A `DataError` names
    `field`, the YAML field of the path."""
    try:
        manifest = load_manifest(config.path)
        if manifest.kind != kind:
            raise DataError(
                f"{config.path} was prepared for {manifest.kind}, not {kind}; "
                f"prepare it again with --kind {kind}"
            )
        span, stride = window(kind, config.seq_len)
        for split in splits:
            if split not in manifest.splits:
                raise DataError(
                    f"{config.path} has no {split} split; prepare it again with "
                    f"--test-fraction (e.g. 0.1)"
                )
            shard_tokens = [shard.tokens for shard in manifest.splits[split].shards]
            if not sum(sequences(shard_tokens, span, stride)):
                raise DataError(_too_short(config, kind, split, shard_tokens))
        if files and not is_uri(config.path):
            check_files(Path(config.path), manifest)
    except DataError as e:
        raise DataError(f"{field}: {e}") from None
    return manifest


def check_files(folder: Path, manifest: Manifest) -> None:
    """The files of prepared data at `folder` as its `manifest` lists them, read cheaply: the
    tokenizer (parsed, its vocabulary the manifest's), each shard's Arrow footer (`read_shard`),
    and the largest token id in a sample of every shard (its first, middle and last `SAMPLE`
    tokens) below the vocabulary size."""
    tokenizer = load_tokenizer(folder / manifest.tokenizer, manifest.kind)
    if tokenizer.get_vocab_size() != manifest.vocab_size:
        raise DataError(
            f"{folder / MANIFEST}: vocab_size {manifest.vocab_size}, but its tokenizer "
            f"{manifest.tokenizer} has {tokenizer.get_vocab_size()} tokens; prepare again"
        )
    for split in manifest.splits.values():
        for shard in split.shards:
            tokens = read_shard(folder, manifest, shard)
            middle = max(0, len(tokens) // 2 - SAMPLE // 2)
            parts = (tokens[:SAMPLE], tokens[middle : middle + SAMPLE], tokens[-SAMPLE:])
            largest = max((int(p.max()) for p in parts if len(p)), default=-1)
            if largest >= manifest.vocab_size:
                raise DataError(
                    f"{folder / shard.file}: token id {largest}, beyond the vocab_size "
                    f"{manifest.vocab_size} of {MANIFEST}; prepare again"
                )


def window(kind: Kind, seq_len: int) -> tuple[int, int]:
    """(span, stride): stream tokens per sequence, and the distance between consecutive ones."""
    if kind == "bert":  # [CLS] + seq_len - 1 stream tokens
        return seq_len - 1, seq_len - 1
    return seq_len + 1, seq_len  # the inputs and, shifted by one, the labels


def sequences(shard_tokens: list[int], span: int, stride: int) -> list[int]:
    """How many sequences each shard holds (a sequence never crosses a shard boundary)."""
    return [max(0, (n - span) // stride + 1) for n in shard_tokens]


def _too_short(config: DataConfig, kind: Kind, split: Split, shard_tokens: list[int]) -> str:
    span = window(kind, config.seq_len)[0]
    longest = max(shard_tokens, default=0)
    largest = longest + 1 if kind == "bert" else longest - 1  # the seq_len whose span fits
    larger = {"val": " (or a larger --val-fraction)", "test": " (or a larger --test-fraction)"}
    more = "prepare more data" + larger.get(split, "")
    advice = (
        f"the largest seq_len that works is {largest}, or {more}"
        if largest >= MIN_SEQ_LEN
        else more
    )
    reader = "training" if split == "train" else "evaluation"
    return (
        f"{config.path}: the {split} split has {sum(shard_tokens)} tokens (longest shard "
        f"{longest}) but {reader} needs at least {span} in one shard for one sequence of "
        f"data.seq_len {config.seq_len}; {advice}"
    )
