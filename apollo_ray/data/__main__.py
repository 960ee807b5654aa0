"""Command line for the data pipeline.

    python -m apollo_ray.data prepare demo --out data/bert --kind bert
    python -m apollo_ray.data prepare 'corpus/*.jsonl' hub:bookcorpus/bookcorpus --out data/gpt \\
        --kind gpt --vocab-size 32768
    python -m apollo_ray.data prepare corpus.txt --out data/mine --kind gpt --doc-sep line
    python -m apollo_ray.data info data/bert
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from typing import get_args

from .shards import Manifest, load_manifest, prepare
from .sources import DataError, DocSep

__all__ = ["describe", "main"]

DEFAULTS = {name: p.default for name, p in inspect.signature(prepare).parameters.items()}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "info":
            print(describe(load_manifest(args.dir)))
            return 0
        start = time.perf_counter()
        manifest = prepare(
            args.sources,
            args.out,
            args.kind,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            text_column=args.text_column,
            split=args.split,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            shard_tokens=args.shard_tokens,
            seed=args.seed,
            max_documents=args.max_documents,
            overwrite=args.overwrite,
            doc_sep=args.doc_sep,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(manifest))
    print(f"prepared {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def describe(manifest: Manifest) -> str:
    """A few lines summarising prepared data: kind, vocabulary, and per split its size."""
    lines = [
        f"{manifest.kind} data from {', '.join(manifest.sources)}",
        f"  tokenizer {manifest.tokenizer}: vocab {manifest.vocab_size}, {manifest.dtype}, "
        f"special {manifest.special_ids}",
    ]
    for name, split in manifest.splits.items():
        lines.append(
            f"  {name:5s} {split.documents:>9,} documents {split.tokens:>14,} tokens "
            f"in {len(split.shards)} shards"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m apollo_ray.data", description="Prepare and inspect pretraining data."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "prepare",
        help="tokenize text sources into Arrow shards with a manifest",
        description="Train (or load) a tokenizer and write token shards plus manifest.json.",
    )
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="'demo' (embedded Wikipedia excerpt), 'sotu' (embedded State of the Union "
        "addresses), a .txt/.jsonl/.parquet file or glob "
        "(quote it), a datasets.save_to_disk directory, or hub:NAME[:CONFIG]",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--kind",
        required=True,
        choices=["bert", "gpt"],
        help="bert: WordPiece tokenizer, [SEP] after each document; "
        "gpt: byte-level BPE, <|endoftext|> after each document",
    )
    p.add_argument(
        "--tokenizer", metavar="PATH", help="use this tokenizer.json instead of training one"
    )
    options = {  # flag: (type, metavar, help); defaults come from `prepare`
        "--vocab-size": (int, "N", "vocabulary size of a trained tokenizer (not with --tokenizer)"),
        "--text-column": (str, "NAME", "the column (jsonl: field) that holds the text"),
        "--split": (str, "NAME", "split to read from a datasets directory or hub: source"),
        "--val-fraction": (float, "F", "fraction of the documents held out for validation"),
        "--test-fraction": (
            float,
            "F",
            "fraction of the documents held out for the final test (0: no test split)",
        ),
        "--shard-tokens": (int, "N", "tokens per shard file"),
        "--max-documents": (int, "N", "read at most this many documents, all sources together"),
        "--seed": (int, "N", "seed that picks the validation and test documents"),
    }
    for flag, (kind, metavar, text) in options.items():
        default = DEFAULTS[flag.removeprefix("--").replace("-", "_")]
        shown = "all" if default is None else default
        p.add_argument(
            flag, type=kind, default=default, metavar=metavar, help=f"{text} (default: {shown})"
        )
    p.add_argument(
        "--doc-sep",
        choices=get_args(DocSep),
        default=DEFAULTS["doc_sep"],
        help="what separates the documents of a plain text (.txt) file: blank = blank lines, "
        "line = every non-empty line is a document; other sources are not affected "
        f"(default: {DEFAULTS['doc_sep']})",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace prepared data already in --out"
    )
    info = commands.add_parser("info", help="summarise prepared data")
    info.add_argument("dir", help="directory (or pyarrow.fs URI) written by prepare")
    return parser


if __name__ == "__main__":
    sys.exit(main())
