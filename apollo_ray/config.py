"""Typed, validated configuration: one pydantic model per component, validated once at the edge.

A run is described by a YAML file (see `configs/`) that maps onto `RunConfig`. Each component gets
its own slice (`ModelConfig` for the model, `DataConfig` for the batches, `TrainConfig` for the
loop). Errors name the YAML path of the bad field, the value given and what is allowed.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "ResourcesConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "format_validation_error",
    "load_run_config",
    "load_yaml",
    "stage_starts",
]


def stage_starts(stage_ends: list[float], total_steps: int) -> list[int]:
    """First step of each stage after the first; every stage must keep at least one step."""
    starts = [round(e * total_steps) for e in stage_ends]
    if any(b <= a for a, b in zip([0, *starts], [*starts, total_steps], strict=True)):
        raise ValueError(
            f"schedule.stage_ends {stage_ends} leave an empty stage with train.steps={total_steps}"
        )
    return starts


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message says where and what is allowed."""


Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class Strict(BaseModel):
    # unknown fields refused; a number must be finite (`.inf` and `.nan` are YAML floats)
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class ModelConfig(Strict):
    """Shape of the Transformer. `n_layer` is the full depth L that Apollo grows towards."""

    kind: Literal["bert", "gpt"] = Field(
        description="bert: bidirectional, post-LN, masked-LM head; gpt: causal, pre-LN, LM head"
    )
    n_layer: int = Field(12, ge=1, le=128, description="full depth L (layers of the final model)")
    d_model: int = Field(768, ge=8, description="hidden size")
    n_head: int = Field(12, ge=1, description="attention heads; must divide d_model")
    d_ff: int | None = Field(None, ge=8, description="feed-forward size (default 4 * d_model)")
    max_seq_len: int = Field(512, ge=8, description="number of position embeddings")
    vocab_size: int | None = Field(
        None,
        ge=8,
        description="vocabulary size (default: taken from the prepared data's tokenizer)",
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on embeddings/attention/MLP")
    layer_norm_eps: float | None = Field(
        None, gt=0.0, description="LayerNorm epsilon (default 1e-12 for bert, 1e-5 for gpt)"
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        return self

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def eps(self) -> float:
        if self.layer_norm_eps is not None:
            return self.layer_norm_eps
        return 1e-12 if self.kind == "bert" else 1e-5


class DataConfig(Strict):
    """Where the prepared shards are (a path or a pyarrow.fs URI such as s3://) and how to batch."""

    path: str = Field(description="directory written by `python -m apollo_ray.data prepare`")
    seq_len: int = Field(128, ge=8, description="tokens per training sequence")
    mlm_probability: float = Field(
        0.15, gt=0.0, lt=1.0, description="fraction of tokens masked for BERT masked-LM"
    )


class TrainConfig(Strict):
    """The optimisation loop: budget, batch, optimiser, LR schedule, precision and cadence."""

    steps: int = Field(1000, ge=1, le=10**9, description="optimizer steps (the budget)")
    micro_batch: int = Field(16, ge=1, description="sequences per micro-batch (per worker)")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    lr: float = Field(1e-4, gt=0.0, description="peak learning rate")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="final LR as a fraction of peak")
    warmup: float = Field(0.025, ge=0.0, lt=1.0, description="warmup length, fraction of steps")
    warmup_steps: int | None = Field(
        None,
        ge=0,
        description="warmup length in steps, instead of `warmup` (one warmup for every budget, "
        "as the WSD frontier's runs share)",
    )
    decay: Literal["cosine", "linear", "wsd"] = Field(
        "cosine",
        description="LR after warmup: cosine or linear decay over the rest of the run, or wsd "
        "(warmup-stable-decay: constant, then linear over the last `decay_fraction`)",
    )
    decay_fraction: float = Field(
        0.2, gt=0.0, le=1.0, description="wsd: the last fraction of the steps, decayed linearly"
    )
    weight_decay: float = Field(
        0.01, ge=0.0, description="AdamW weight decay (not on norms/biases)"
    )
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1)")
    grad_clip: float = Field(1.0, ge=0.0, description="max gradient norm (0 disables clipping)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on a GPU that supports it, else fp32"
    )
    compile: Literal["auto"] | bool = Field(
        "auto",
        description="torch.compile each layer call and the head (one shared graph for every "
        "layer, depth and growth); auto: on a GPU, not on a CPU (benchmarks/throughput.py)",
    )
    eval_every: int = Field(100, ge=1, description="evaluate every this many steps (and at end)")
    eval_batches: int = Field(
        8, ge=1, description="validation micro-batches per evaluation during training"
    )
    final_eval_tokens: int = Field(
        100_000,
        ge=1,
        description="the final evaluation reads the whole validation split, or as many of its "
        "sequences as give at least this many predicted tokens (metrics: eval_tokens)",
    )
    checkpoint_every: int = Field(500, ge=1, description="checkpoint every this many steps")
    keep_checkpoints: int = Field(2, ge=1, description="periodic checkpoints kept on disk")
    log_every: int = Field(10, ge=1, description="write train metrics every this many steps")
    branch_steps: list[int] = Field(
        [],
        description="steps at which a checkpoint is kept for a shorter run to fork from (a WSD "
        "trunk: each branch decays from its own step); changes nothing the run computes",
    )
    fork_from: str | None = Field(
        None,
        description="a branch checkpoint of a trunk (path or URI) this run starts from instead "
        "of step 0: the same run but for its steps, with the same LR up to that step (checked)",
    )


class ScheduleConfig(Strict):
    """The progressive schedule (docs/method.md). Default: the released Apollo recipe for L = 12.

    Stage s owns `depths[s]` physical layers and ends at `stage_ends[s]` of the step budget; each
    micro-batch runs a depth drawn by `sampler` through a `plan` that shares the physical layers;
    at a stage end the layers grow with `growth`. `depths: [L]` (one stage) trains from scratch.
    """

    depths: list[Annotated[int, Field(ge=1)]] = Field(
        [1, 3, 6, 12],
        min_length=1,
        description="physical layers per stage; the last is model.n_layer",
    )
    stage_ends: list[float] = Field(
        [0.05, 0.10, 0.25],
        description="end of each stage but the last, as a fraction of train.steps",
    )
    sampler: Literal["apollo", "lvps", "uniform", "full", "physical"] = Field(
        "apollo",
        description="depth per micro-batch: apollo = released LVPS; lvps = tempered LVPS (tau); "
        "uniform over [N, L]; full = always L; physical = always N (no sharing, e.g. StackBERT)",
    )
    tau: float | None = Field(
        None,
        gt=0,
        description="LVPS temperature (sampler: lvps); ~0.52 is closest to the released LVPS",
    )
    plan: Literal["interp", "stack"] = Field(
        "interp",
        description="how N layers make depth d: interp = consecutive repeats (Apollo), "
        "stack = cyclic (StackBERT-like)",
    )
    growth: Literal["interpolate", "stack", "random"] = Field(
        "interpolate",
        description="growth operator at a stage end: interpolate (Apollo), "
        "stack (StackBERT: copy the block on top), random (new layers freshly initialised)",
    )
    alpha: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="interpolation coefficient: 0 = copy "
        "(function-preserving), >0 blends the two neighbouring old layers",
    )
    noise: float = Field(
        0.0,
        ge=0.0,
        description="std of Gaussian noise added to grown weights, relative to each tensor's std",
    )
    optimizer_state: Literal["slot", "fresh", "copy"] = Field(
        "slot",
        description="AdamW moments of grown layers: slot = the release's (new layer j keeps old "
        "layer j's moments, layers beyond the old depth start empty), fresh = all start empty, "
        "copy = combined like the weights",
    )
    rewarmup_steps: int = Field(0, ge=0, description="linear LR re-warmup after each growth")
    lr_rewind: bool = Field(
        False,
        description="restart the LR schedule at each growth (warmup and decay over the steps "
        "that remain, as MSG); false: one global schedule (the release)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ScheduleConfig:
        if any(b <= a for a, b in itertools.pairwise(self.depths)):
            raise ValueError(f"depths must be strictly increasing, got {self.depths}")
        if len(self.stage_ends) != len(self.depths) - 1:
            raise ValueError(
                f"stage_ends needs one entry per stage but the last: {len(self.depths) - 1} for "
                f"depths {self.depths}, got {len(self.stage_ends)}"
            )
        ends = self.stage_ends
        if any(not 0 < e < 1 for e in ends) or any(b <= a for a, b in itertools.pairwise(ends)):
            raise ValueError(f"stage_ends must increase strictly within (0, 1), got {ends}")
        if self.sampler == "lvps" and self.tau is None:
            raise ValueError("sampler lvps needs a temperature: set schedule.tau (e.g. 0.52)")
        return self


class ResourcesConfig(Strict):
    """Ray Train workers of one run (data parallel; global batch = workers x micro x accum)."""

    workers: int = Field(1, ge=1, description="data-parallel Ray Train workers")
    gpus_per_worker: float = Field(0.0, ge=0.0, description="GPUs per worker (0: train on CPU)")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs reserved per worker")
    max_failures: int = Field(
        2, ge=0, description="worker failures a run survives, resuming from its last checkpoint"
    )
    worker_resources: dict[str, float] = Field(
        {},
        description="custom Ray resources each worker also needs, e.g. {accelerator_type:H100: "
        "0.001} or a node label of your own (ray start --resources), to place workers on nodes",
    )
    worker_group: Literal["auto", "always"] = Field(
        "auto",
        description="auto: a run of one worker trains in its trial's own process (or one Ray "
        "task), several in a Ray Train worker group; always: a worker group even for one",
    )
    placement: Literal["PACK", "STRICT_PACK", "SPREAD"] = Field(
        "PACK",
        description="how Ray places the workers: PACK on as few nodes as it can, STRICT_PACK on "
        "one node (NVLink between a multi-GPU trial's GPUs; it waits for a node that holds them "
        "all), SPREAD over as many as it can",
    )

    @property
    def per_worker(self) -> dict[str, float]:
        """What one worker reserves, as Ray resources: CPU, GPU and the custom ones."""
        return {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker, **self.worker_resources}


class RunConfig(Strict):
    """One training run: `python -m apollo_ray.train RUN.yaml`."""

    name: str = Field(description="run name; also the default output folder name")
    out_dir: str | None = Field(None, description="output folder (default runs/<name>)")
    seed: int = Field(0, ge=0, lt=2**32, description="seed for init, data order, masking, dropout")
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    schedule: ScheduleConfig | None = Field(
        None, description="progressive schedule; omit to train from scratch at full depth"
    )
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="after")
    def _fits_model(self) -> RunConfig:
        if self.schedule is not None:
            if self.schedule.depths[-1] != self.model.n_layer:
                raise ValueError(
                    f"schedule.depths must end at model.n_layer ({self.model.n_layer}), "
                    f"got {self.schedule.depths}"
                )
            stage_starts(self.schedule.stage_ends, self.train.steps)
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) is larger than model.max_seq_len "
                f"({self.model.max_seq_len}) allows"
            )
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir or Path("runs") / self.name).resolve()


def format_validation_error(err: ValidationError, source: str) -> str:
    """Pydantic's errors as one line, `file: yaml.path: problem (got value)`, each problem after
    the first joined with `; ` (never pydantic's documentation URL)."""
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; allowed fields are documented in --help)"
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {got!r})"
        problems.append(f"{where}: {msg}{shown}".replace("\n", " "))
    return f"{source}: " + "; ".join(problems)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML file holds; a `ConfigError` in one line for a file that is missing,
    not UTF-8 text, or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a text file (byte {e.start} is not UTF-8); a study or run is UTF-8 YAML"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: not a text file (it holds NUL bytes); a study or run is YAML")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a run YAML; `overrides` are dotted keys (`train.steps`) set on top."""
    data = load_yaml(path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None
