"""Pre-flight of a Ray cluster launcher file, before `ray up` (which has no dry run): the rules.

    python -m apollo_ray.cluster check cluster/gpu.yaml cluster/gpu-gcp.yaml
    python -m apollo_ray.cluster check --allow-placeholders cluster/gpu.yaml

First Ray's own validation (the launcher's `prepare_config` and `validate_config`: defaults
filled in, then its JSON schema; offline), then, on the config as Ray would run it, what a
working apollo_ray cluster needs and Ray does not check:

- worker credentials: every worker node type has its own AWS `IamInstanceProfile` or GCP
  `serviceAccounts` (Ray gives its default ones to the head only);
- a pinned AMI: no `ImageId: latest_dlami` (or none), which Ray resolves to an old default;
- anchored rsync filters: no `rsync_exclude` pattern, nor one in an `rsync_filter` file at the
  top of the repository, drops a file of the package from the nodes;
- MLflow artifacts in a bucket: the file's `--artifacts-destination` is `s3://` or `gs://`;
- Ray token authentication on (`RAY_AUTH_MODE=token`) on the head and the workers, with a
  token that reaches them;
- no password in a URI (a `${VAR}` reference is fine);
- no placeholder left (`my-apollo-bucket`, `fs-XXXXXXXX`, `YOUR-BUCKET`, ...): an error, or
  with `--allow-placeholders` a warning (the files as shipped hold them on purpose).

Each problem is one line on stderr, `error: FILE:LINE: KEY: what is wrong and what to do`;
the exit status is 2 if there is any, else 0.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from apollo_ray.storage import redact

__all__ = ["PLACEHOLDERS", "Problem", "check", "check_file"]

PACKAGE = Path(__file__).resolve().parents[1]  # what `file_mounts` copies: must reach every node
PLACEHOLDERS = re.compile(
    r"\bmy-[a-z0-9-]+|\b[a-z]+-X{4,}\b|X{4,}|\bYOUR[-_][A-Z0-9_-]+|\bACCOUNT_ID\b|123456789012"
)
TOKEN_AUTH = re.compile(r"RAY_AUTH_MODE=[\"']?token\b")
TOKEN_SOURCE = re.compile(r"RAY_AUTH_TOKEN|auth_token")
ARTIFACTS = re.compile(r"--artifacts-destination[=\s]+[\"']?([^\s\"']*)")
CHECKED = (
    "Ray's validation; worker credentials, pinned AMI, rsync filters, artifacts in a bucket, "
    "token auth, no passwords in URIs, placeholders"
)

Key = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """What to fix at `key` of the cluster file; `needle`: the text on the line to point at."""

    key: Key
    message: str
    needle: str | None = None
    placeholder: bool = False


def check(config: dict[str, Any], package: Path = PACKAGE) -> list[Problem]:
    """The problems of a parsed cluster file: Ray's validation (nothing else if it fails),
    then our rules. `package`: the folder that `file_mounts` brings to the nodes."""
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        return [Problem(tuple(e.absolute_path), f"Ray's schema: {' '.join(e.message.split())}")]
    except Exception as e:
        return [Problem((), f"Ray refuses the file: {type(e).__name__}: {e}")]
    return [
        *_worker_credentials(prepared),
        *_images(prepared),
        *_rsync_filters(prepared, package),
        *_artifacts(prepared),
        *_token_auth(prepared),
        *_uri_credentials(prepared),
        *_placeholders(prepared),
    ]


def _worker_credentials(config: dict[str, Any]) -> Iterator[Problem]:
    field, example = {
        "aws": ("IamInstanceProfile", "{Arn: arn:aws:iam::ACCOUNT_ID:instance-profile/NAME}"),
        "gcp": ("serviceAccounts", "[{email: NAME@PROJECT.iam.gserviceaccount.com, scopes: ...}]"),
    }.get(config["provider"]["type"], (None, None))
    if field is None:
        return
    for name, node_type in config["available_node_types"].items():
        if name != config["head_node_type"] and not node_type["node_config"].get(field):
            yield Problem(
                ("available_node_types", name, "node_config"),
                f"no {field}: Ray gives its own to the head only, so these workers cannot read "
                f"data.path nor write storage_path in the bucket; set {field}: {example}",
            )


def _images(config: dict[str, Any]) -> Iterator[Problem]:
    if config["provider"]["type"] != "aws":
        return
    from ray.autoscaler._private.aws.config import DEFAULT_AMI, DEFAULT_AMI_NAME  # needs boto3

    region = config["provider"].get("region")
    for name, node_type in config["available_node_types"].items():
        image = str(node_type["node_config"].get("ImageId", ""))
        if image.lower() in {"", "latest_dlami"}:
            yield Problem(
                ("available_node_types", name, "node_config", "ImageId"),
                f"{image or 'no ImageId'}: Ray {ray.__version__} launches its DEFAULT_AMI "
                f"(ray/autoscaler/_private/aws/config.py) for {region}, "
                f"{DEFAULT_AMI.get(region, 'none')}, {DEFAULT_AMI_NAME}; pin a current GPU AMI",
                needle="ImageId",
            )


def _rsync_filters(config: dict[str, Any], package: Path) -> Iterator[Problem]:
    """rsync_exclude patterns, and those of the rsync_filter files at the top of the
    repository, that drop a file or folder of the package."""
    entries = _package_entries(package)
    for i, pattern in enumerate(config.get("rsync_exclude") or []):
        if why := _drops(str(pattern), entries):
            yield Problem(("rsync_exclude", i), why, needle=str(pattern))
    for i, name in enumerate(config.get("rsync_filter") or []):
        rules = package.parent / str(name)
        lines = rules.read_text().splitlines() if rules.is_file() else []
        for n, line in enumerate(lines, 1):
            pattern = line.strip()
            rule = pattern and not pattern.startswith(("#", ";", "!"))  # not a comment, nor !
            if rule and (why := _drops(pattern, entries)):
                yield Problem(("rsync_filter", i), f"{name}, line {n}: {why}")


def _package_entries(package: Path) -> list[tuple[str, bool]]:
    """(path from the package's parent, is a folder) of the package and all in it, Python's
    caches left out; folders before what they hold."""
    root = package.parent
    found = [
        (p.relative_to(root).as_posix(), p.is_dir())
        for p in package.rglob("*")
        if "__pycache__" not in p.parts and p.suffix != ".pyc"
    ]
    return [(package.name, True), *sorted(found, key=lambda e: (e[0].count("/"), e[0]))]


def _drops(pattern: str, entries: list[tuple[str, bool]]) -> str | None:
    """Why excluding `pattern` loses part of the package, or None."""
    hit = next((path for path, is_dir in entries if _rsync_match(pattern, path, is_dir)), None)
    if hit is None:
        return None
    anchored = "/" + pattern.lstrip("/")
    if pattern.startswith("/") or any(_rsync_match(anchored, p, d) for p, d in entries):
        fix = "narrow it"
    else:
        fix = f'anchor it at the top folder: "{anchored}"'
    return f'"{pattern}" also drops {hit} from the nodes (rsync matches it at any depth); {fix}'


def _rsync_match(pattern: str, path: str, is_dir: bool) -> bool:
    """rsync's exclude rule on one path from the transfer's top, fnmatch standing in for its
    wildcards: a leading / anchors the pattern at the top, a trailing / matches folders only,
    a pattern with a / (or **) matches a tail of the path, one without the last name."""
    if pattern.endswith("/"):
        if not is_dir:
            return False
        pattern = pattern.rstrip("/")
    if pattern.startswith("/"):
        return fnmatch.fnmatchcase(path, pattern[1:])
    parts = path.split("/")
    if "/" not in pattern and "**" not in pattern:
        return fnmatch.fnmatchcase(parts[-1], pattern)
    return any(fnmatch.fnmatchcase("/".join(parts[i:]), pattern) for i in range(len(parts)))


def _artifacts(config: dict[str, Any]) -> Iterator[Problem]:
    found = False
    for key, text in _strings(config):
        for destination in ARTIFACTS.findall(text):
            found = True
            if not re.match(r"(s3|gs)://[^/]", destination):
                yield Problem(
                    key,
                    f"--artifacts-destination {destination or '(empty)'}: MLflow's artifacts "
                    "(checkpoints, plots) belong in a bucket, s3://BUCKET/... or gs://BUCKET/..., "
                    "not on the head's disk, which `ray down` deletes",
                    needle="--artifacts-destination",
                )
    if not found:
        yield Problem(
            ("head_start_ray_commands",),
            "no `mlflow server ... --artifacts-destination s3://BUCKET/...` (or gs://): MLflow "
            "would keep its artifacts on the head's disk, which `ray down` deletes",
        )


def _token_auth(config: dict[str, Any]) -> Iterator[Problem]:
    docker = config.get("docker") or {}
    for role, commands, options in (
        ("head", "head_start_ray_commands", "head_run_options"),
        ("workers", "worker_start_ray_commands", "worker_run_options"),
    ):
        texts = [
            *(config.get(commands) or []),
            *(docker.get("run_options") or []),
            *(docker.get(options) or []),
        ]
        if not any(TOKEN_AUTH.search(str(t)) for t in texts):
            yield Problem(
                (commands,),
                f"Ray token authentication is off on the {role} (Ray {ray.__version__} leaves "
                "its ports open to whoever reaches them): add --env=RAY_AUTH_MODE=token to "
                f"docker.run_options, or RAY_AUTH_MODE=token before `ray start` in {commands}",
            )
    texts = [*(text for _, text in _strings(config)), *(config.get("file_mounts") or {})]
    if not any(TOKEN_SOURCE.search(text) for text in texts):
        yield Problem(
            ("file_mounts",),
            "no Ray token reaches the nodes (with RAY_AUTH_MODE=token, `ray start` needs one): "
            "mount the one `ray get-auth-token --generate` writes, e.g. "
            '"/home/ray/.ray/auth_token": "~/.ray/auth_token", or set RAY_AUTH_TOKEN_PATH',
        )


def _uri_credentials(config: dict[str, Any]) -> Iterator[Problem]:
    for key, text in _strings(config):
        for word in text.split():
            if redact(word) != word:
                yield Problem(
                    key,
                    f"a password in a URI, {redact(word)}: it would be copied to every node, "
                    "the logs and MLflow; take it from an environment variable (${VAR})",
                    needle=word,
                )


def _placeholders(config: dict[str, Any]) -> Iterator[Problem]:
    for key, text in _strings(config):
        for placeholder in dict.fromkeys(PLACEHOLDERS.findall(text)):
            yield Problem(key, f"replace {placeholder}", needle=placeholder, placeholder=True)


def _strings(value: Any, key: Key = ()) -> Iterator[tuple[Key, str]]:
    """(key, text) of every string value in a parsed file."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, (*key, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, (*key, i))
    elif isinstance(value, str):
        yield key, value


def _dotted(key: Key) -> str:
    """`available_node_types.gpu_worker.node_config`, `rsync_exclude[3]`; `(file)` for ()."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in key)
    return text.lstrip(".") or "(file)"


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


def check_file(path: Path, allow_placeholders: bool = False) -> bool:
    """Check one cluster file, one line per problem on stderr (`ok: ...` on stdout if none);
    True when it has an error (with `allow_placeholders`, a placeholder is only a warning)."""
    try:
        text, config = _read(path)
    except ValueError as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return True
    errors = 0
    for problem in check(config):
        line = _line_of(text, problem)
        where = f"{path}:{line}" if line else str(path)
        level = "warning" if problem.placeholder and allow_placeholders else "error"
        errors += level == "error"
        print(f"{level}: {where}: {_dotted(problem.key)}: {problem.message}", file=sys.stderr)
    if not errors:
        print(f"ok: {path} ({CHECKED})")
    return errors > 0
