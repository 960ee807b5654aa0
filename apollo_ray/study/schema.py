"""Study files (`search_spaces/*.yaml`): the schema of a schedule search, validated once.

    python -m apollo_ray.tune search_spaces/small.yaml

A study names an `experiment`, a `base` run (a `RunConfig` without name/out_dir) that every
trial starts from, and a `search` whose `space` maps dotted `RunConfig` paths to distributions
(`apollo_ray.study.space`). `load_study` reads the YAML, pins local paths down (Ray runs trials in
other working directories) and validates everything once: the schema, and the space against
the base run (`apollo_ray.study.space_checks`), so an error names the YAML path, the value and what
the field allows. Downstream code receives the validated `StudyConfig`, or its dict form across
a process boundary, validated there once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from apollo_ray.config import ConfigError, RunConfig, Strict, format_validation_error, load_yaml
from apollo_ray.storage import absolute, is_uri, join_uri
from apollo_ray.study.scaling import scale_schedule
from apollo_ray.study.space import Param
from apollo_ray.study.space_checks import Problem, check_space, line_errors

__all__ = [
    "BASELINES",
    "OBJECTIVES",
    "SEARCH_STATE",
    "BaselineConfig",
    "ConfirmConfig",
    "PrepareConfig",
    "SamplerConfig",
    "SchedulerConfig",
    "SearchConfig",
    "StudyConfig",
    "TrackingConfig",
    "TransferConfig",
    "load_study",
]

BASELINES = "baselines"  # <output_dir>/baselines/<key>/ caches the scratch baselines
SEARCH_STATE = "tune"  # <storage>/tune/<experiment>/: Tune's state, which only the head writes
# objective -> (Tune metric(s), mode(s))
OBJECTIVES: dict[str, tuple[Any, Any]] = {
    "eval_loss": ("eval_loss", "min"),
    "flops_saving": ("saving", "max"),
    "speedup": ("speedup", "max"),
    "pareto": (["eval_loss", "flops"], ["min", "min"]),
}


class PrepareConfig(Strict):
    """Data to prepare into `base.data.path` (kind `base.model.kind`) when it has no manifest."""

    sources: list[str] = Field(
        min_length=1,
        description="as `python -m apollo_ray.data prepare SOURCE...`: demo, files or globs, "
        "a datasets directory, or hub:NAME[:CONFIG]",
    )
    vocab_size: int = Field(8192, ge=8, description="vocabulary size of the trained tokenizer")
    val_fraction: float = Field(
        0.01, gt=0.0, lt=1.0, description="fraction of the documents held out for validation"
    )
    test_fraction: float = Field(
        0.01,
        ge=0.0,
        lt=1.0,
        description="fraction of the documents held out for the final test, read once at the end "
        "for the reported numbers (0: no test split)",
    )
    doc_sep: Literal["blank", "line"] = Field(
        "blank",
        description="what separates the documents of a .txt file: blank lines, or each line",
    )
    text_column: str = Field("text", description="the column (jsonl: field) that holds the text")
    split: str = Field("train", description="split to read from a datasets or hub: source")


class SamplerConfig(Strict):
    """The Optuna sampler that proposes trials."""

    kind: Literal["tpe", "random", "cmaes"] = Field(
        "tpe",
        description="tpe: Optuna's TPE (multi-objective too); random; cmaes: CMA-ES on the "
        "numeric parameters (single objective only)",
    )
    seed: int = Field(
        0, ge=0, lt=2**32, description="sampler seed: the same seed proposes the same trials"
    )


class SchedulerConfig(Strict):
    """Early stopping by Tune's ASHA, comparing trials at equal cumulative training FLOPs."""

    kind: Literal["asha"] = Field("asha", description="asha: asynchronous successive halving")
    grace_fraction: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description="ASHA's grace period as a fraction of the baseline's total FLOPs",
    )
    reduction_factor: float = Field(
        3.0, ge=2.0, description="ASHA keeps 1 / reduction_factor of the trials at each rung"
    )


class ConfirmConfig(Strict):
    """Re-run the best trials with fresh seeds once the search is over, and rank them on the
    mean over those seeds (a trial that won once by luck does not stay on top)."""

    top_k: int = Field(3, ge=1, description="how many of the best trials to re-run")
    seeds: int = Field(
        3, ge=2, description="fresh seeds per trial: base.seed + 1, ..., base.seed + seeds"
    )


class SearchConfig(Strict):
    """What to search and how: the trials, the Optuna sampler, the objective and the space."""

    trials: int = Field(ge=1, description="number of trials (Tune's num_samples)")
    max_concurrent_trials: int = Field(1, ge=1, description="trials running at the same time")
    synchronous: bool = Field(
        True,
        description="with max_concurrent_trials above 1: trials start in batches of that many, "
        "each batch suggested once the one before has ended, so no suggestion depends on which "
        "trial finished first (the search is reproducible); false: a trial starts as soon as "
        "one ends (faster when trials differ in length)",
    )
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="Optuna sampler")
    objective: Literal["eval_loss", "flops_saving", "speedup", "pareto"] = Field(
        "flops_saving",
        description="read against the scratch frontier: speedup = the FLOPs scratch needs for "
        "the trial's final loss / the trial's FLOPs (max); flops_saving = 1 - 1/speedup (max, "
        "the same ranking); eval_loss (min); pareto: min eval_loss and min total FLOPs",
    )
    scheduler: SchedulerConfig | None = Field(
        None, description="early stopping (ASHA); null runs every trial to the end"
    )
    space: dict[str, Param] = Field(
        default_factory=dict,
        description="dotted RunConfig paths (train.lr, schedule.alpha, ...) -> distributions",
    )
    confirm: ConfirmConfig | None = Field(
        None,
        description="re-run the top_k trials with fresh seeds and rank them on the means; "
        "best.yaml, the summary and the registered model follow that ranking",
    )


class TrackingConfig(Strict):
    """Where trials are tracked (MLflow) and which checkpoints are logged."""

    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI; null: a local SQLite store under output_dir; on a "
        "cluster the head node's server, e.g. http://127.0.0.1:5000",
    )
    checkpoints: Literal["all", "last", "none"] = Field(
        "last", description="Train checkpoints logged to MLflow: all, the last one, or none"
    )


class BaselineConfig(Strict):
    """How scratch is tuned for the frontier, as hard as the method (issue 26): per budget, the
    best of a sweep of peak LRs and schedule families, chosen on the validation split on a seed
    of its own; the base seed then trains the chosen setting (`apollo_ray/search/sweep.py`)."""

    lrs: list[float] | None = Field(
        None,
        min_length=1,
        description="peak LRs swept with wsd; null: base.train.lr x 1/2, 1, 2, 4; a budget that "
        "chooses one at an edge extends the sweep by a factor of 2 (`extend` times at most)",
    )
    cosine: bool = Field(
        True,
        description="also train cosine at the LR wsd chose, for the budgets from 1/4 to 1x, "
        "kept where it ends lower",
    )
    sweep_seed: int = Field(
        1000, ge=0, lt=2**32, description="the seed the sweep trains on (not a reading seed)"
    )
    warmup_steps: int | None = Field(
        None,
        ge=0,
        description="warmup of every run, in steps; null: base's at 1x (train.warmup_steps, or "
        "train.warmup of its steps)",
    )
    decay_fraction: float = Field(
        0.2, gt=0.0, le=1.0, description="wsd: the last fraction of the steps, decayed to zero"
    )
    extend: int = Field(2, ge=0, description="times a chosen LR at an edge extends the sweep")

    @field_validator("lrs")
    @classmethod
    def _positive(cls, lrs: list[float] | None) -> list[float] | None:
        if lrs is not None and (any(lr <= 0 for lr in lrs) or len(set(lrs)) != len(lrs)):
            raise ValueError(f"must be distinct positive learning rates, got {lrs}")
        return lrs


class TransferConfig(Strict):
    """Search small, train big: the proxy's schedules carried to the target size once the
    search (and its confirmation) has ended (`apollo_ray.search.transfer`), each trained there
    against the target's own tuned scratch frontier, and the two rankings compared."""

    base: dict[str, Any] = Field(
        min_length=1,
        description="the target's overrides of base, section by section, e.g. {model: "
        "{n_layer: 8, d_model: 48, n_head: 3}, train: {steps: 1215}}; a section's fields not "
        "named keep base's",
    )
    carry: int = Field(
        6,
        ge=2,
        description="how many of the proxy's finished trials to carry: the best, the worst and "
        "evenly between in the proxy's ranking (all of them when fewer finished)",
    )
    release: bool = Field(
        True, description="also carry base.schedule (the released recipe) as a fixed reference"
    )
    seeds: int = Field(
        1, ge=1, description="seeds of each carried trial at the target: base.seed + 1, ..."
    )
    best_seeds: int = Field(
        3,
        ge=1,
        description="seeds of the proxy's best trial and of the release at the target (and of "
        "the release at the proxy, which the search did not train)",
    )
    lr: Literal["scratch", "carried"] = Field(
        "scratch",
        description="the LR and LR schedule family at the target: scratch = those the target's "
        "tuned scratch chose for the full budget (the proxy's LR need not suit a wider model); "
        "carried = each trial's own, as searched on the proxy",
    )
    frontier: list[float] | None = Field(
        None, description="the target's scratch budgets (null: the study's frontier)"
    )
    baseline: BaselineConfig | None = Field(
        default_factory=BaselineConfig,
        description="how the target's scratch is tuned per budget (its own LR sweep around the "
        "target's train.lr); null: untuned",
    )

    @field_validator("base")
    @classmethod
    def _sections(cls, base: dict[str, Any]) -> dict[str, Any]:
        allowed = {"seed", "model", "data", "train", "resources"}
        unknown = sorted(set(base) - allowed)
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)}: not a section the target overrides (allowed: "
                f"{', '.join(sorted(allowed))}; its schedules are the proxy's, scaled)"
            )
        return base


class StudyConfig(Strict):
    """One study: `python -m apollo_ray.tune STUDY.yaml`.

    `base` is a full `RunConfig` but for name/out_dir, which the study sets (name = experiment,
    out_dir = <output_dir>/<experiment>/base); trials get theirs from `materialize`."""

    experiment: str = Field(
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="study name ([A-Za-z0-9_.-]+): the MLflow experiment and the output folder",
    )
    output_dir: str = Field(
        "outputs",
        min_length=1,
        description="studies live in <output_dir>/<experiment>/, the baseline cache in "
        "<output_dir>/baselines/: a folder (on a multi-node cluster, one every node sees)",
    )
    storage_path: str | None = Field(
        None,
        min_length=1,
        description="Ray Train checkpoints and Tune's search state: a folder or an s3:// / gs:// "
        "URI every node reaches, laid out like output_dir; null: in output_dir",
    )
    prepare: PrepareConfig | None = Field(
        None, description="data to prepare when base.data.path has no manifest.json yet"
    )
    base: RunConfig = Field(
        description="the run every trial starts from: model, data, train, resources, seed, "
        "schedule (the defaults of the searched values)"
    )
    frontier: list[float] = Field(
        [0.25, 0.5, 1.0, 2.0],
        min_length=2,
        description="the scratch frontier every trial is read against: budgets of from-scratch "
        "runs, as multiples of base.train.steps, each with its own warmup and decay; 1.0 (the "
        "trials' own budget) must be one of them",
    )
    baseline: BaselineConfig | None = Field(
        default_factory=BaselineConfig,
        description="how scratch is tuned per budget (LR and schedule family) before the "
        "frontier is read (default: the sweep below); null: each budget one run at base's LR "
        "and decay, untuned (quicker, and a saving read against it may be the baseline's)",
    )
    search: SearchConfig = Field(description="trials, sampler, objective, scheduler, space")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking")
    transfer: TransferConfig | None = Field(
        None,
        description="after the search (and confirm): carry its schedules to a larger target and "
        "measure whether the ranking holds there (python -m apollo_ray.tune STUDY "
        "--transfer-only on a finished search)",
    )

    @field_validator("experiment")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in {".", "..", BASELINES, SEARCH_STATE}:
            raise ValueError(f"{name!r} is reserved; choose another name")
        return name

    @field_validator("frontier")
    @classmethod
    def _budgets(cls, budgets: list[float]) -> list[float]:
        if any(b <= 0 for b in budgets) or len(set(budgets)) != len(budgets):
            raise ValueError(f"budgets must be distinct and positive, got {budgets}")
        if 1.0 not in budgets:
            raise ValueError(f"must include 1.0 (the trials' own budget), got {budgets}")
        return sorted(budgets)

    @field_validator("output_dir")
    @classmethod
    def _a_folder(cls, output_dir: str) -> str:
        if is_uri(output_dir):
            raise ValueError(
                f"{output_dir!r} is a URI: output_dir holds the runs' logs and must be a folder "
                "(on a cluster, one every node sees); put checkpoints in object storage with "
                "storage_path"
            )
        return absolute(output_dir)

    @field_validator("storage_path")
    @classmethod
    def _pinned(cls, storage_path: str | None) -> str | None:
        return None if storage_path is None else absolute(storage_path)

    @field_validator("base", mode="before")
    @classmethod
    def _name_base(cls, base: Any, info: ValidationInfo) -> Any:
        if not isinstance(base, dict):
            return base
        experiment = info.data.get("experiment", "study")
        output_dir = info.data.get("output_dir", "outputs")
        derived = {"name": experiment, "out_dir": join_uri(output_dir, experiment, "base")}
        data = base.get("data")
        if isinstance(data, dict) and isinstance(data.get("path"), str):
            base = {**base, "data": {**data, "path": absolute(data["path"])}}
        given = {k: base[k] for k in derived if k in base}
        if any(base[k] != derived[k] for k in given):
            raise ValueError(
                f"name and out_dir are set by the study (name = experiment, out_dir = "
                f"<output_dir>/<experiment>/base); remove them (got {given})"
            )
        return {**base, **derived}

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        problems = check_space(self.search.space, self.base) + _check_objective(self.search)
        smallest = round(self.frontier[0] * self.base.train.steps)
        if smallest < 2:
            message = f"the smallest budget gives {smallest} steps of base.train.steps; raise it"
            problems.append(Problem(("frontier",), message, self.frontier))
        if self.transfer is not None and not problems:
            try:
                self.target()
            except ValidationError as e:
                for err in e.errors():
                    at = tuple(str(x) for x in err["loc"])
                    where = ("transfer", *at) if at[:1] == ("base",) else ("transfer", "base", *at)
                    problems.append(Problem(where, f"at the target: {err['msg']}", None))
            except ValueError as e:
                problems.append(Problem(("transfer", "base"), str(e), None))
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, line_errors(problems))
        return self

    def fresh_seeds(self, n: int) -> range:
        """The seeds of re-runs (confirmation, transfer): base.seed + 1, ..., base.seed + n."""
        return range(self.base.seed + 1, self.base.seed + 1 + n)

    def target(self) -> StudyConfig:
        """The study at the target size (`transfer`): base with the target's overrides and the
        base schedule scaled to it (`scaling.scale_schedule`), the target's frontier and
        scratch tuning, experiment `<experiment>-target`; no search of its own."""
        assert self.transfer is not None
        t = self.transfer
        base = self.base.model_dump(mode="json", exclude={"name", "out_dir"})
        for section, values in t.base.items():
            if isinstance(values, dict) and isinstance(base.get(section), dict):
                base[section] = {**base[section], **values}
            else:
                base[section] = values
        if self.base.schedule is not None:
            layers = base["model"]["n_layer"]
            base["schedule"] = scale_schedule(base["schedule"], self.base.model.n_layer, layers)
        data = self.model_dump(mode="json", exclude={"transfer", "base", "baseline", "search"})
        return StudyConfig.model_validate(
            {
                **data,
                "experiment": f"{self.experiment}-target",
                "base": base,
                "frontier": t.frontier or self.frontier,
                "baseline": None if t.baseline is None else t.baseline.model_dump(mode="json"),
                "search": {"trials": 1, "objective": self.search.objective},
            }
        )

    @property
    def study_dir(self) -> str:
        """<output_dir>/<experiment>: the study's own outputs."""
        return join_uri(self.output_dir, self.experiment)

    @property
    def baselines_dir(self) -> str:
        """<output_dir>/baselines: scratch baselines, shared by studies, keyed by `baseline_key`."""
        return join_uri(self.output_dir, BASELINES)

    def storage(self, *parts: str) -> str:
        """Where Ray keeps checkpoints and search state for `<output_dir>/<parts>`: the same
        place, or the same layout under `storage_path`."""
        return join_uri(self.storage_path or self.output_dir, *parts)

    def search_state(self, *parts: str) -> str:
        """Where Tune keeps this study's state (`<storage>/tune/<experiment>/<parts>`: the
        searcher, the trials' records; what `--resume` unpickles), under a prefix of its own,
        apart from all the trials' and baselines' workers write: a bucket policy can give that
        prefix to the head alone (cluster/iam/)."""
        return self.storage(SEARCH_STATE, self.experiment, *parts)


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study YAML (local paths made absolute); errors are a `ConfigError`
    naming the file and the YAML paths."""
    data = load_yaml(path)
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None


def _check_objective(search: SearchConfig) -> list[Problem]:
    problems = []
    if search.objective == "pareto" and search.scheduler is not None:
        # ASHA ranks trials by one metric, and a stopped trial would reach Optuna with its
        # truncated FLOPs: a cheap-looking point on the front that no finished run achieves.
        message = (
            "objective pareto cannot be combined with a scheduler (an early-stopped trial's "
            "truncated FLOPs would enter the Pareto front); set scheduler: null"
        )
        problems.append(Problem(("search", "scheduler"), message, search.scheduler.kind))
    if search.objective == "pareto" and search.confirm is not None:
        message = "confirm ranks trials by one figure; objective pareto has two: set confirm: null"
        problems.append(Problem(("search", "confirm"), message, "pareto"))
    if search.objective == "pareto" and search.sampler.kind == "cmaes":
        message = "cmaes is single-objective; objective pareto needs tpe or random"
        problems.append(Problem(("search", "sampler", "kind"), message, "cmaes"))
    return problems
