"""Pre-flight of a Ray cluster launcher file, before `ray up` (which has no dry run): the rules.

    python -m apollo_ray.cluster check cluster/gpu.yaml cluster/gpu-gcp.yaml
    python -m apollo_ray.cluster check --allow-placeholders cluster/gpu.yaml
    python -m apollo_ray.cluster check cluster/gpu.yaml --study search_spaces/bert.yaml

First Ray's own validation (the launcher's `prepare_config` and `validate_config`: defaults
filled in, then its JSON schema; offline), then, on the config as Ray would run it, what a
working apollo_ray cluster needs and Ray does not check (local paths read as `ray up` run from
the repository's top folder reads them):

- credentials: every worker node type has its own AWS `IamInstanceProfile` or GCP
  `serviceAccounts` (Ray gives its default ones to the head only), not the head's;
- Ray: the image's Ray is this machine's; a pinned AMI (no `ImageId: latest_dlami`, which Ray
  resolves to an old default); GCP GPU machines with `onHostMaintenance: TERMINATE`, A3 with
  gVNIC and no pd-standard disk;
- what reaches the nodes: the package, its `pyproject.toml` and the lock mounted one by one,
  not a folder holding `.git`, `.venv` or `outputs` (Ray hashes every byte under a mount);
  no `rsync_exclude` pattern, nor one in an `rsync_filter` file, that drops a file of the
  package; `pip install` on the nodes constrained by the mounted `requirements.lock`;
- Ray token authentication on (`RAY_AUTH_MODE=token`) on the head and the workers, never
  another mode, and the token file mounted where `RAY_AUTH_TOKEN_PATH` points;
- MLflow: its artifacts in a bucket (`--artifacts-destination s3://` or `gs://`), its SQLite
  database on the shared file system (an NFS mount of `initialization_commands`);
- commands: no service on 0.0.0.0, no GPU container option for the head, no `pkill -f` (it
  kills the shell running it), no world-writable folder (`chmod 777`, `install -m 1777`);
- no password in a URI (a `${VAR}` reference is fine);
- no placeholder left (`my-apollo-bucket`, `fs-XXXXXXXX`, `YOUR_FILESTORE_IP`, ...): an error,
  or with `--allow-placeholders` a warning (the files as shipped hold them on purpose);
- with `--study`: a trial's workers fit the node types (`apollo_ray.launch.capacity`).

The rules are `apollo_ray.launch.cluster_rules`, one generator per concern. Each problem is one
line on stderr, `error: FILE:LINE: KEY: what is wrong and what to do`;
the exit status is 2 if there is any, else 0.
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from apollo_ray.config import ResourcesConfig
from apollo_ray.launch.cluster_rules import PLACEHOLDERS, Problem, dotted, problems

__all__ = ["PLACEHOLDERS", "Problem", "check", "check_file"]

PACKAGE = Path(__file__).resolve().parents[1]  # what `file_mounts` copies: must reach every node
CHECKED = (
    "Ray's validation; credentials, images, what reaches the nodes, token auth, MLflow's "
    "store, commands, no passwords in URIs, placeholders"
)


def check(
    config: dict[str, Any], package: Path = PACKAGE, study: ResourcesConfig | None = None
) -> list[Problem]:
    """The problems of a parsed cluster file: Ray's validation (nothing else if it fails),
    then our rules. `package`: the package `file_mounts` must bring to the nodes, in the
    repository whose top folder `ray up` runs from; `study`: a study's `base.resources`, whose
    trial must fit the node types."""
    try:
        # quiet: Ray's warning on single-file mounts (Docker binds them by inode, so a running
        # container keeps its first copy) is cluster/README.md's, not a problem of the file
        with contextlib.redirect_stdout(io.StringIO()):
            prepared = prepare_config(copy.deepcopy(config))
            validate_config(prepared)
    except jsonschema.ValidationError as e:
        return [Problem(tuple(e.absolute_path), f"Ray's schema: {' '.join(e.message.split())}")]
    except Exception as e:
        return [Problem((), f"Ray refuses the file: {type(e).__name__}: {e}")]
    return problems(config, prepared, package, study)


def _line_of(text: str, problem: Problem) -> int | None:
    """The line (from 1) of the YAML `text` to fix for `problem`: that of its key, or of its
    deepest part in the file, moved on to the line with `problem.needle` inside that value;
    None if not even the key's first part is in the file."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    line = None
    for part in problem.key:
        if isinstance(node, yaml.MappingNode):
            pairs = [(k, v) for k, v in node.value if k.value == str(part)]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            pairs = [(v, v) for v in node.value[part : part + 1]]
        else:
            pairs = []
        if not pairs:
            break
        at, node = pairs[0]
        line = at.start_mark.line
    if line is None:
        return None
    if problem.needle:
        lines = text.splitlines()
        for n in range(line, min(node.end_mark.line + 1, len(lines))):
            if problem.needle in lines[n]:
                return n + 1
    return line + 1


def _read(path: Path) -> tuple[str, dict[str, Any]]:
    """The text of a cluster file and its parsed content; ValueError if it has none."""
    try:
        text = path.read_text()
        config = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read it: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict):
        raise ValueError("not a YAML mapping")
    return text, config


def check_file(
    path: Path, allow_placeholders: bool = False, study: ResourcesConfig | None = None
) -> bool:
    """Check one cluster file (and that trials of `study`, a study's `base.resources`,
    fit it), one line per problem on
    stderr (`ok: ...` on stdout if none); True when it has an error (with
    `allow_placeholders`, a placeholder is only a warning)."""
    try:
        text, config = _read(path)
    except ValueError as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return True
    errors = 0
    for problem in check(config, study=study):
        line = _line_of(text, problem)
        where = f"{path}:{line}" if line else str(path)
        level = "warning" if problem.placeholder and allow_placeholders else "error"
        errors += level == "error"
        print(f"{level}: {where}: {dotted(problem.key)}: {problem.message}", file=sys.stderr)
    if not errors:
        print(f"ok: {path} ({CHECKED}{'; the study fits' if study else ''})")
    return errors > 0
