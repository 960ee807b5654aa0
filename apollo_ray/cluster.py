"""`python -m apollo_ray.cluster check FILE...`: a Ray cluster launcher file checked before
`ray up`; the rules are `apollo_ray.launch.cluster_check` (`--help` lists them)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from apollo_ray.config import ConfigError
from apollo_ray.launch import cluster_check
from apollo_ray.study.schema import load_study

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apollo_ray.cluster",
        description=cluster_check.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "check",
        help="check Ray cluster launcher files before `ray up`",
        description="Ray's validation of each cluster file, then apollo_ray's rules (see "
        "`python -m apollo_ray.cluster --help`); one line per problem, exit status 2 if any.",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="a cluster YAML file")
    p.add_argument(
        "--allow-placeholders",
        action="store_true",
        help="report placeholders (my-apollo-bucket, fs-XXXXXXXX, YOUR-BUCKET, ...) as "
        "warnings, not errors: for the files as shipped",
    )
    p.add_argument(
        "--study",
        type=Path,
        metavar="STUDY",
        help="a study YAML whose trials (base.resources: workers, per-worker resources, "
        "placement) must fit the node types at full growth",
    )
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study).base.resources if args.study else None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("ray.autoscaler._private.util").setLevel(logging.WARNING)  # its INFO
    failed = [cluster_check.check_file(p, args.allow_placeholders, study) for p in args.files]
    return 2 if any(failed) else 0


if __name__ == "__main__":
    sys.exit(main())
