"""`python -m apollo_ray.export CHECKPOINT OUT_DIR [--tokenizer PATH]`: a checkpoint as a Hugging
Face model folder (`BertForMaskedLM` or `GPT2LMHeadModel`, with its tokenizer) that
`from_pretrained` reads. The conversion is `apollo_ray.training.export`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from apollo_ray.training.export import ExportError, export_checkpoint

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apollo_ray.export",
        description="Export an apollo_ray checkpoint to a Hugging Face model folder.",
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint file written by training")
    parser.add_argument("out_dir", type=Path, help="output folder (created if missing)")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="tokenizer.json (or its folder) to include; default: the one the checkpoint names",
    )
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.tokenizer)
    except (ExportError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
