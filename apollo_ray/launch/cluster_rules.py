"""The rules of `python -m apollo_ray.cluster check` (listed in `apollo_ray.launch.cluster_check`):
each a generator of the problems of one concern, over the cluster file as Ray would run it."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import ray

from apollo_ray.config import ResourcesConfig
from apollo_ray.launch.capacity import from_config, shortfall
from apollo_ray.storage import redact

__all__ = ["PLACEHOLDERS", "Key", "Problem", "dotted", "problems"]

PLACEHOLDERS = re.compile(
    r"\bmy-[a-z0-9-]+|\b[a-z]+-X{4,}\b|X{4,}|\bYOUR[-_][A-Z0-9_-]+|\bACCOUNT_ID\b|123456789012"
)
AUTH_MODE = re.compile(r"RAY_AUTH_MODE=[\"']?(\w*)")
TOKEN_PATH = re.compile(r"RAY_AUTH_TOKEN_PATH=[\"']?([^\s\"';]+)")
DEFAULT_TOKEN = "~/.ray/auth_token"  # where Ray looks without RAY_AUTH_TOKEN_PATH
ARTIFACTS = re.compile(r"--artifacts-destination[=\s]+[\"']?([^\s\"']*)")
STORE = re.compile(r"--backend-store-uri[=\s]+(\"[^\"]*\"|'[^']*'|\S+)")
NFS_MOUNT = re.compile(r"\bmount\s+-t\s+nfs\S*\s+(?:-o\s+\S+\s+)?\S+\s+(/[^\s;|&)]+)")
VOLUME = re.compile(r"^-v\s+(/\S+?):(/[^\s:]+)")
CHMOD = re.compile(r"\bchmod\s+(?:-\w+\s+)*([0-7]{3,4}|[ugoa]*[+=][rwxXst]+)\b")
INSTALL_MODE = re.compile(r"\binstall\s[^;&|]*?-m\s*([0-7]{3,4})\b")
PKILL = re.compile(r"\b(?:pkill|pgrep|killall)\s+(?:-\w+\s+)*-\w*f")
PIP_INSTALL = re.compile(r"\bpip3?\s+install\b[^;&|]*")
CONSTRAINT = re.compile(r"(?:^|\s)-c\s*[\"']?(\S+?requirements\.lock)\b")
LOCK = "requirements.lock"
NOT_SYNCED = (".git", ".venv", "outputs", "mlruns")  # at the top of a mounted folder
GCP_GPU_MACHINES = ("a2-", "a3-", "a4-", "g2-")
COMMANDS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)

Key = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """What to fix at `key` of the cluster file; `needle`: the text on the line to point at."""

    key: Key
    message: str
    needle: str | None = None
    placeholder: bool = False


def problems(
    config: dict[str, Any],
    prepared: dict[str, Any],
    package: Path,
    study: ResourcesConfig | None = None,
) -> list[Problem]:
    """The rules' problems with a cluster file: `config` as written, `prepared` as Ray's
    `prepare_config` filled it in (validated); `package`, `study`: see `check`. The command
    rules read the commands as the file gives them (Ray merges setup_commands into the head's
    and the workers'); Ray's defaults for those it leaves out are a problem of their own."""
    as_run = prepared | {f: list(config.get(f) or []) for f in COMMANDS}
    return [
        *_worker_credentials(as_run),
        *_images(as_run),
        *_gcp_gpu_nodes(as_run),
        *_mounts(as_run, package),
        *_rsync_filters(as_run, package),
        *_locked_installs(as_run, package),
        *_artifacts(as_run),
        *_mlflow_store(as_run),
        *_token_auth(as_run),
        *_commands(as_run),
        *_uri_credentials(as_run),
        *_placeholders(as_run),
        *(_capacity(as_run, study) if study is not None else ()),
        *_rays_defaults(config, prepared),
    ]


def _rays_defaults(config: dict[str, Any], prepared: dict[str, Any]) -> Iterator[Problem]:
    merged = len(config.get("setup_commands") or [])
    for field in COMMANDS:
        after = merged if field in ("head_setup_commands", "worker_setup_commands") else 0
        defaults = prepared[field][after:]
        if field not in config and defaults:
            yield Problem(
                (field,),
                f"not set, so Ray runs its defaults ({'; '.join(map(str, defaults))}), "
                "outside the lock and these rules; set it (an empty list runs nothing)",
            )


def _worker_credentials(config: dict[str, Any]) -> Iterator[Problem]:
    field, example = {
        "aws": ("IamInstanceProfile", "{Arn: arn:aws:iam::ACCOUNT_ID:instance-profile/NAME}"),
        "gcp": ("serviceAccounts", "[{email: NAME@PROJECT.iam.gserviceaccount.com, scopes: ...}]"),
    }.get(config["provider"]["type"], (None, None))
    if field is None:
        return
    head = config["available_node_types"][config["head_node_type"]]["node_config"].get(field)
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue
        own = node_type["node_config"].get(field)
        if not own:
            yield Problem(
                ("available_node_types", name, "node_config"),
                f"no {field}: Ray gives its own to the head only, so these workers cannot read "
                f"data.path nor write storage_path in the bucket; set {field}: {example}",
            )
        elif own == head:
            yield Problem(
                ("available_node_types", name, "node_config", field),
                f"the head's {field}: code in a trial could launch nodes and rewrite the "
                "study's Tune state; give the workers their own (cluster/iam/)",
                needle=field,
            )


def _images(config: dict[str, Any]) -> Iterator[Problem]:
    image = str((config.get("docker") or {}).get("image", ""))
    tag = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)", image)
    if tag and tag[1] != ray.__version__:
        yield Problem(
            ("docker", "image"),
            f"{image}: the nodes would run Ray {tag[1]}, `ray up`, `ray job submit` and the "
            f"package here Ray {ray.__version__}; use rayproject/ray:{ray.__version__}-py311-gpu",
            needle="image",
        )
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


def _gcp_gpu_nodes(config: dict[str, Any]) -> Iterator[Problem]:
    """GCP refuses a GPU VM that would live-migrate; A3 machines take no pd-standard disk and
    need gVNIC (Google's A3 documentation)."""
    if config["provider"]["type"] != "gcp":
        return
    for name, node_type in config["available_node_types"].items():
        node, key = node_type["node_config"], ("available_node_types", name, "node_config")
        machine = str(node.get("machineType", ""))
        if not (machine.startswith(GCP_GPU_MACHINES) or node.get("guestAccelerators")):
            continue
        if (node.get("scheduling") or {}).get("onHostMaintenance") != "TERMINATE":
            yield Problem(
                key,
                f"{machine or 'a GPU machine'} cannot live-migrate and GCP refuses to create "
                "it so: set scheduling: {onHostMaintenance: TERMINATE}",
            )
        if not machine.startswith("a3-"):
            continue
        for i, disk in enumerate(node.get("disks") or []):
            kind = str((disk.get("initializeParams") or {}).get("diskType", ""))
            if kind.endswith("pd-standard"):
                yield Problem(
                    (*key, "disks", i, "initializeParams", "diskType"),
                    f"{machine} does not take pd-standard disks (GCP refuses the node): use "
                    "pd-balanced or pd-ssd",
                    needle="diskType",
                )
        for i, nic in enumerate(node.get("networkInterfaces") or [{}]):
            if nic.get("nicType") != "GVNIC":
                yield Problem(
                    (*key, "networkInterfaces", *((i,) if node.get("networkInterfaces") else ())),
                    f"{machine} needs Google's gVNIC: set nicType: GVNIC on its network "
                    "interface (the image must support it; Google's deep learning images do)",
                )


def _sources(config: dict[str, Any], package: Path) -> dict[str, Path]:
    """Each file mount's target: its source as `ray up`, run from the repository's top folder
    (`package`'s parent), reads it."""
    found = {}
    for target, source in (config.get("file_mounts") or {}).items():
        path = Path(str(source)).expanduser()
        found[target] = (path if path.is_absolute() else package.parent / path).resolve()
    return found


def _home(path: str) -> str:
    """A path on the nodes with `~` as the container user's home, /home/ray."""
    return re.sub(r"^(~|\$HOME|\$\{HOME\})(?=/|$)", "/home/ray", path.strip("\"'"))


def _mounts(config: dict[str, Any], package: Path) -> Iterator[Problem]:
    """Ray hashes every byte under each mounted folder (`hash_runtime_conf`, rsync_exclude or
    not) at every `ray up`, and a change there re-runs the setup: no folder holding the
    checkout's tools or outputs; the package itself must arrive."""
    reached = False
    for target, local in _sources(config, package).items():
        held = [name for name in NOT_SYNCED if (local / name).exists()]
        if local.is_dir() and held:
            yield Problem(
                ("file_mounts", target),
                f"{config['file_mounts'][target]} holds {', '.join(held)}: `ray up` reads "
                "every byte under a mounted folder, whatever rsync_exclude says, and re-runs "
                "the setup when one changes; "
                "mount apollo_ray/, search_spaces/, pyproject.toml, README.md and "
                "requirements.lock one by one (as cluster/gpu.yaml does)",
                needle=str(target),
            )
        reached = reached or local == package or local in package.parents
    if not reached:
        yield Problem(
            ("file_mounts",),
            f"no file mount brings the package ({package.name}/) to the nodes, which install "
            f'it: add "/home/ray/apollo_ray-src/{package.name}": "./{package.name}"',
        )


def _rsync_filters(config: dict[str, Any], package: Path) -> Iterator[Problem]:
    """rsync_exclude patterns, and those of the rsync_filter files at the top of the
    repository, that drop a file or folder of the package from a mount that carries it (rsync
    reads a pattern from the top of each mounted folder)."""
    tops = set(_sources(config, package).values())
    trees = [
        (top, _package_entries(package, top))
        for top in sorted(tops)
        if top == package or top in package.parents
    ]
    patterns = [
        (("rsync_exclude", i), "", str(pattern), str(pattern))
        for i, pattern in enumerate(config.get("rsync_exclude") or [])
    ]
    for i, name in enumerate(config.get("rsync_filter") or []):
        rules = package.parent / str(name)
        lines = rules.read_text().splitlines() if rules.is_file() else []
        for n, line in enumerate(lines, 1):
            pattern = line.strip()
            if pattern and not pattern.startswith(("#", ";", "!")):  # not a comment, nor !
                patterns.append((("rsync_filter", i), f"{name}, line {n}: ", pattern, None))
    for key, where, pattern, needle in patterns:
        why = next((w for top, tree in trees if (w := _drops(pattern, tree, top, package))), None)
        if why:
            yield Problem(key, where + why, needle=needle)


def _package_entries(package: Path, top: Path) -> list[tuple[str, bool]]:
    """(path from `top`, the folder a mount copies, is a folder) of the package and all in it,
    Python's caches left out; folders before what they hold."""
    found = [
        (p.relative_to(top).as_posix(), p.is_dir())
        for p in package.rglob("*")
        if "__pycache__" not in p.parts and p.suffix != ".pyc"
    ]
    itself = [(package.relative_to(top).as_posix(), True)] if top != package else []
    return [*itself, *sorted(found, key=lambda e: (e[0].count("/"), e[0]))]


def _drops(pattern: str, entries: list[tuple[str, bool]], top: Path, package: Path) -> str | None:
    """Why excluding `pattern` from the mount of `top` loses part of the package, or None."""
    hit = next((path for path, is_dir in entries if _rsync_match(pattern, path, is_dir)), None)
    if hit is None:
        return None
    anchored = "/" + pattern.lstrip("/")
    if pattern.startswith("/") or any(_rsync_match(anchored, p, d) for p, d in entries):
        fix = "narrow it"
    else:
        fix = f'anchor it at the top folder: "{anchored}"'
    shown = (top / hit).relative_to(package.parent).as_posix()
    if pattern.startswith("/"):
        mount = top.relative_to(package.parent).as_posix()
        how = f"rsync anchors it at the top of the mount of {'.' if mount == '.' else './' + mount}"
    else:
        how = "rsync matches it at any depth"
    return f'"{pattern}" also drops {shown} from the nodes ({how}); {fix}'


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


def _locked_installs(config: dict[str, Any], package: Path) -> Iterator[Problem]:
    """Every `pip install` on the nodes but torch's (the CUDA build, on its own, pinned to
    the version tested) takes the versions of `requirements.lock` (`-c`), which a file mount
    brings from the repository."""
    torch = metadata.version("torch").split("+")[0]
    lock = package.parent / LOCK
    sources = _sources(config, package).values()
    for key, text in _command_texts(config, ("setup_commands", "head_setup_commands")):
        for line in PIP_INSTALL.findall(text):
            packages = [w.strip("\"'") for w in line.split()[2:] if not w.startswith("-")]
            if packages and all(p.startswith("torch") for p in packages):
                if f"torch=={torch}" not in packages:
                    yield Problem(
                        key,
                        f"{' '.join(packages)}: the tests ran with torch=={torch}; pin it",
                        needle="torch",
                    )
            elif not CONSTRAINT.search(line):
                yield Problem(
                    key,
                    "pip install without the lock: the nodes would take whatever versions "
                    f"resolve that day; add -c PATH/{LOCK}, mounted from the repository",
                    needle="pip",
                )
            elif not any(s == lock or s in lock.parents for s in sources):
                yield Problem(
                    ("file_mounts",),
                    f"pip install -c ...{LOCK} on the nodes, but no file mount brings the "
                    f'repository\'s: add "/home/ray/apollo_ray-src/{LOCK}": "./{LOCK}"',
                )


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


def _mlflow_store(config: dict[str, Any]) -> Iterator[Problem]:
    """The MLflow server's SQLite database on the shared file system (an NFS mount of
    `initialization_commands`, seen in the container through a `-v` volume), not on the head's
    disk; a `${VAR:-default}` store is read for both the head's VAR and the default."""
    shared = _shared_folders(config)
    env = _env(config, "head_run_options")
    for key, text in _command_texts(config, ("head_start_ray_commands",)):
        if "mlflow server" not in text:
            continue
        store = STORE.search(text)
        if store is None:
            yield Problem(
                key,
                "mlflow server without --backend-store-uri: MLflow keeps its database in the "
                "folder it starts in, on the head's disk, which `ray down` deletes; give it "
                "sqlite:////mnt/shared/mlflow/mlflow.db (the shared file system) or PostgreSQL",
                needle="mlflow server",
            )
            continue
        for where, quoted in _expansions(store[1].strip("\"'"), env, key):
            uri = quoted.strip("\"'")
            path = uri.removeprefix("sqlite:///")
            if not uri.startswith("sqlite:"):
                continue
            if not any(path.startswith(f"{folder.rstrip('/')}/") for folder in shared):
                on = ", ".join(shared) or "none: no NFS mount in initialization_commands"
                yield Problem(
                    where,
                    f"MLflow's database {uri} is not on the shared "
                    f"file system ({on}): `ray down` or a new head loses every study's records; "
                    "keep it under the shared folder, or use PostgreSQL",
                    needle="sqlite",
                )


def _shared_folders(config: dict[str, Any]) -> list[str]:
    """The folders the containers see of the NFS mounts of `initialization_commands`."""
    mounted = [
        m
        for _, t in _command_texts(config, ("initialization_commands",))
        for m in NFS_MOUNT.findall(t)
    ]
    docker = config.get("docker") or {}
    if not docker.get("image"):
        return mounted
    volumes = [
        VOLUME.match(str(option))
        for option in [*(docker.get("run_options") or []), *(docker.get("head_run_options") or [])]
    ]
    return [v[2] for v in volumes if v and v[1].rstrip("/") in mounted]


def _expansions(value: str, env: dict[str, tuple[Key, str]], key: Key) -> list[tuple[Key, str]]:
    """(where it is set, value) of what a shell makes of `value`: `${VAR:-default}` is VAR
    where the head's container sets it and the default; `$VAR` or `${VAR}` is VAR."""
    m = re.fullmatch(r"\$\{(\w+)(?::?-(.*))?\}|\$(\w+)", value)
    if m is None:
        return [(key, value)]
    name = m[1] or m[3]
    found = [env[name]] if name in env else []
    return [*found, *([(key, m[2])] if m[2] else [])]


def _env(config: dict[str, Any], options: str) -> dict[str, tuple[Key, str]]:
    """NAME: (key, value) of the `--env=NAME=VALUE` docker options of every node and of
    `options` (`head_run_options` or `worker_run_options`)."""
    docker = config.get("docker") or {}
    found = {}
    for field in ("run_options", options):
        for i, option in enumerate(docker.get(field) or []):
            m = re.match(r"(?:--env[=\s]|-e\s)(\w+)=(.*)", str(option))
            if m:
                found[m[1]] = (("docker", field, i), m[2])
    return found


def _token_auth(config: dict[str, Any]) -> Iterator[Problem]:
    """Token authentication on head and workers (no other `RAY_AUTH_MODE` anywhere), and the
    token file mounted where the nodes look for it."""
    docker = config.get("docker") or {}
    others = False
    for key, text in _strings(config):
        for mode in AUTH_MODE.findall(text):
            if mode != "token":
                others = True
                yield Problem(
                    key,
                    f"RAY_AUTH_MODE={mode}: nodes started so leave Ray's ports open to whoever "
                    "reaches them, or cannot join a head that asks for the token; use "
                    "RAY_AUTH_MODE=token (or remove this one)",
                    needle="RAY_AUTH_MODE",
                )
    on = False
    for role, commands, options in (
        ("head", "head_start_ray_commands", "head_run_options"),
        ("workers", "worker_start_ray_commands", "worker_run_options"),
    ):
        texts = [
            *(config.get(commands) or []),
            *(docker.get("run_options") or []),
            *(docker.get(options) or []),
        ]
        if any(AUTH_MODE.search(str(t)) for t in texts):
            on = True
        elif not others:
            yield Problem(
                (commands,),
                f"Ray token authentication is off on the {role} (Ray {ray.__version__} leaves "
                "its ports open to whoever reaches them): add --env=RAY_AUTH_MODE=token to "
                f"docker.run_options, or RAY_AUTH_MODE=token before `ray start` in {commands}",
            )
    if not on or any("RAY_AUTH_TOKEN=" in text for _, text in _strings(config)):
        return
    paths = [(k, p) for k, text in _strings(config) for p in TOKEN_PATH.findall(text)]
    for key, path in paths or [(("file_mounts",), DEFAULT_TOKEN)]:
        if not any(_home(path) == _home(t) for t in config.get("file_mounts") or {}):
            yield Problem(
                ("file_mounts",),
                f"no file mount brings the Ray token to {path}"
                + (f" (RAY_AUTH_TOKEN_PATH, {dotted(key)})" if paths else "")
                + ": `ray start` with RAY_AUTH_MODE=token aborts when it cannot read it; add "
                f'"{path}": "~/.ray/auth_token" (`ray get-auth-token --generate` writes it)',
            )


def _commands(config: dict[str, Any]) -> Iterator[Problem]:
    """What a node's commands must not do: open a service to every address, give the CPU head
    a GPU container, kill their own shell, leave a folder writable by every user."""
    docker = config.get("docker") or {}
    for field in ("run_options", "head_run_options"):
        for i, option in enumerate(docker.get(field) or []):
            if str(option).startswith("--gpus"):
                yield Problem(
                    ("docker", field, i),
                    f"{option} on the head too: its container cannot start on a CPU node; "
                    "put GPU options in docker.worker_run_options",
                    needle="--gpus",
                )
    for key, text in [*_command_texts(config, COMMANDS), *_option_texts(config)]:
        if "0.0.0.0" in text:
            yield Problem(
                key,
                "0.0.0.0: a service open to every network the node is on; bind 127.0.0.1 and "
                "reach it through `ray attach -p` or `ray dashboard`",
                needle="0.0.0.0",
            )
        if PKILL.search(text):
            yield Problem(
                key,
                "`pkill -f` matches the shell running this very command (its command line holds "
                "the pattern) and kills it, failing `ray up`; stop the process by its pid file "
                "(as cluster/gpu.yaml stops MLflow)",
                needle="-f",
            )
        for mode in [*CHMOD.findall(text), *INSTALL_MODE.findall(text)]:
            if _world_writable(mode):
                yield Problem(
                    key,
                    f"mode {mode} lets every user of the node write there (the shared folder "
                    "holds MLflow's database and the trials' outputs); the containers' user "
                    "owns it: 0775, or 0750",
                    needle=mode,
                )


def _world_writable(mode: str) -> bool:
    if mode.isdigit():
        return int(mode[-1]) & 2 > 0
    who, perms = re.split(r"[+=]", mode, maxsplit=1)
    return ("o" in who or "a" in who) and "w" in perms


def _command_texts(config: dict[str, Any], fields: tuple[str, ...]) -> Iterator[tuple[Key, str]]:
    """(key, text) of the commands of `fields`, the node types' own included."""
    for field in fields:
        for i, text in enumerate(config.get(field) or []):
            yield (field, i), str(text)
        for name, node_type in config["available_node_types"].items():
            for i, text in enumerate(node_type.get(field) or []):
                yield ("available_node_types", name, field, i), str(text)


def _option_texts(config: dict[str, Any]) -> Iterator[tuple[Key, str]]:
    docker = config.get("docker") or {}
    for field in ("run_options", "head_run_options", "worker_run_options"):
        for i, option in enumerate(docker.get(field) or []):
            yield ("docker", field, i), str(option)


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


def _capacity(config: dict[str, Any], res: ResourcesConfig) -> Iterator[Problem]:
    """A trial of a study (its `base.resources`) fits the node types at full growth; a type
    whose resources Ray detects from the instance type (`resources: {}`) cannot be judged."""
    types = from_config(config)
    unknown = [t.name for t in types if not t.resources]
    if unknown:
        yield Problem(
            ("available_node_types", unknown[0], "resources"),
            "resources: {} (Ray detects them from the instance type at `ray up`): spell them "
            'out, e.g. {"CPU": 192, "GPU": 8}, to check that the study\'s trials fit',
            needle="resources",
        )
        return
    per_worker = res.per_worker
    one_node = res.placement == "STRICT_PACK"
    if problem := shortfall(per_worker, res.workers, {}, types, 0.0, one_node):
        yield Problem(
            ("available_node_types",),
            f"the study's trials do not fit: {problem}; lower its base.resources.workers, or "
            "raise a node type's max_workers",
        )


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


def dotted(key: Key) -> str:
    """`available_node_types.gpu_worker.node_config`, `rsync_exclude[3]`; `(file)` for ()."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in key)
    return text.lstrip(".") or "(file)"
