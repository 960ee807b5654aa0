"""Study files (`search_spaces/*.yaml`): the schema, the search space and the trial configs.

    python -m apollo_ray.tune search_spaces/small.yaml

A study names an `experiment`, a `base` run (a `RunConfig` without name/out_dir) that every
trial starts from, and a `search.space` that maps dotted `RunConfig` paths to distributions:

    train.lr:            {float: [3.0e-4, 3.0e-3], log: true}
    schedule.depths:     {choice: [[1, 3, 6], [2, 6], [3, 6]]}
    schedule.stage_ends: {increasing: [0.05, 0.5]}
    schedule.tau:        {float: [0.1, 5.0], log: true, when: {schedule.sampler: lvps}}

`load_study` validates everything once: the schema, and every bound and choice substituted into
`base` as the trial would see it (so an error names `search.space.<path>`, the value and what
the field allows). `suggest` samples the space define-by-run from an Optuna trial, `materialize`
turns the sampled values into a trial's `RunConfig`, and `baseline_config` / `baseline_key`
describe the from-scratch baseline that every trial is measured against (APOLLO.md, "How
acceleration is measured").
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from apollo_ray.config import (
    ConfigError,
    RunConfig,
    Strict,
    format_validation_error,
    load_yaml,
)
from apollo_ray.data.shards import join_uri
from apollo_ray.schedule import Schedule

if TYPE_CHECKING:
    import optuna

__all__ = [
    "ChoiceParam",
    "FloatParam",
    "IncreasingParam",
    "IntParam",
    "Param",
    "PrepareConfig",
    "SamplerConfig",
    "SchedulerConfig",
    "SearchConfig",
    "StudyConfig",
    "TrackingConfig",
    "baseline_config",
    "baseline_key",
    "flatten",
    "load_study",
    "materialize",
    "suggest",
]

DEPTHS = "schedule.depths"
STAGE_ENDS = "schedule.stage_ends"
BASELINES = "baselines"  # <output_dir>/baselines/<baseline_key>/ caches the scratch baselines


# ---------------------------------------------------------------------------------------------
# Parameters of the search space
# ---------------------------------------------------------------------------------------------


class _Param(Strict):
    # The YAML keys `float`, `int`, `choice`, `increasing` are aliases (a field cannot be called
    # `float`); dumps use them too, so a dumped study validates again (the Ray boundary).
    model_config = ConfigDict(validate_by_name=True, serialize_by_alias=True)

    when: dict[str, Any] = Field(
        default_factory=dict,
        description="sample this parameter only when every named choice parameter took one of "
        "the given values: {dotted.path: value | [values]} (define-by-run)",
    )


class _Range(_Param):
    bounds: tuple[float, float]

    @property
    def low(self) -> float:
        return self.bounds[0]

    @property
    def high(self) -> float:
        return self.bounds[1]

    @model_validator(mode="after")
    def _ordered(self) -> _Range:
        if not self.low < self.high:
            raise ValueError(f"needs low < high, got [{self.low}, {self.high}]")
        if getattr(self, "log", False) and self.low <= 0:
            raise ValueError(f"log: true needs low > 0, got [{self.low}, {self.high}]")
        return self


class FloatParam(_Range):
    """A float in [low, high] (both included), uniform or log-uniform: `{float: [low, high]}`."""

    bounds: tuple[float, float] = Field(alias="float", description="[low, high]")
    log: bool = Field(False, description="sample log-uniformly (needs low > 0)")


class IntParam(_Range):
    """An integer in [low, high] (both included): `{int: [low, high]}`."""

    bounds: tuple[int, int] = Field(alias="int", description="[low, high]")
    log: bool = Field(False, description="sample log-uniformly (needs low >= 1)")


class ChoiceParam(_Param):
    """One of a list of values (scalars or lists, such as depth lists): `{choice: [...]}`."""

    choices: list[Any] = Field(alias="choice", min_length=1, description="the values to pick from")

    @property
    def encoded(self) -> list[Any]:
        """The choices as Optuna sees them: scalars as they are, lists as "1,3,6"."""
        return [_encode(c) for c in self.choices]

    def decode(self, picked: Any) -> Any:
        """The choice whose encoding Optuna returned."""
        return copy.deepcopy(self.choices[self.encoded.index(picked)])

    @model_validator(mode="after")
    def _distinct(self) -> ChoiceParam:
        encoded = self.encoded
        if len(set(encoded)) != len(encoded):
            raise ValueError(f"choices must be distinct (as Optuna sees them: {encoded})")
        return self


class IncreasingParam(_Range):
    """Stage ends for `schedule.stage_ends`: `{increasing: [low, high]}`.

    One end per stage but the last (the count follows the trial's `schedule.depths`, searched
    or not), strictly increasing, within [low, high] and at least `min_gap` apart, so that every
    stage keeps at least one step. Sampled as k uniforms in [0, 1] that place the ends by
    sequential order statistics: a uniform draw over all valid end lists (see `_place_ends`).
    """

    bounds: tuple[float, float] = Field(
        alias="increasing", description="[low, high]: 0 < low < high < 1, fractions of steps"
    )
    min_gap: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="smallest distance between consecutive ends; default (filled in by the "
        "study) 2 / train.steps, the least that keeps every stage at least one step long",
    )
    # len(base.schedule.depths) - 1, set by StudyConfig: the count when depths is not sampled
    _count: int | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _inside_unit(self) -> IncreasingParam:
        if not 0.0 < self.low < self.high < 1.0:
            raise ValueError(f"needs 0 < low < high < 1, got [{self.low}, {self.high}]")
        return self


_KINDS: dict[str, type[_Param]] = {
    "float": FloatParam,
    "int": IntParam,
    "choice": ChoiceParam,
    "increasing": IncreasingParam,
}
_PARAM_HELP = (
    "{float: [low, high]}, {int: [low, high]}, {choice: [...]} or {increasing: [low, high]}"
)


def _parse_param(value: Any, handler: Callable[[Any], Any]) -> Any:
    """Pick the parameter model by its one kind key (plain tagged unions would add the tag to
    every error's path, and plain unions would report every member's errors)."""
    if isinstance(value, _Param):
        return value
    kinds = [k for k in _KINDS if k in value] if isinstance(value, dict) else []
    if len(kinds) != 1:
        raise ValueError(f"a parameter is one of {_PARAM_HELP}")
    return _KINDS[kinds[0]].model_validate(value)


Param = Annotated[
    FloatParam | IntParam | ChoiceParam | IncreasingParam, WrapValidator(_parse_param)
]
"""One entry of `search.space`; its key (float | int | choice | increasing) picks the model."""


# ---------------------------------------------------------------------------------------------
# The study file
# ---------------------------------------------------------------------------------------------


class PrepareConfig(Strict):
    """Data to prepare into `base.data.path` (kind `base.model.kind`) when it has no manifest."""

    sources: list[str] = Field(
        min_length=1,
        description="as `python -m apollo_ray.data prepare SOURCE...`: demo, files or globs, "
        "a datasets directory, or hub:NAME[:CONFIG]",
    )
    vocab_size: int = Field(8192, ge=8, description="vocabulary size of the trained tokenizer")
    val_fraction: float = Field(
        0.01, ge=0.0, lt=1.0, description="fraction of the documents held out for validation"
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
    seed: int = Field(0, description="sampler seed: the same seed proposes the same trials")


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


class SearchConfig(Strict):
    """What to search and how: the trials, the Optuna sampler, the objective and the space."""

    trials: int = Field(ge=1, description="number of trials (Tune's num_samples)")
    max_concurrent_trials: int = Field(1, ge=1, description="trials running at the same time")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="Optuna sampler")
    objective: Literal["eval_loss", "flops_saving", "speedup", "pareto"] = Field(
        "flops_saving",
        description="eval_loss (min); flops_saving (max); speedup (max, defined even when a "
        "trial never reaches the baseline's loss); pareto: min eval_loss and min total FLOPs",
    )
    scheduler: SchedulerConfig | None = Field(
        None, description="early stopping (ASHA); null runs every trial to the end"
    )
    space: dict[str, Param] = Field(
        default_factory=dict,
        description="dotted RunConfig paths (train.lr, schedule.alpha, ...) -> distributions",
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
    search: SearchConfig = Field(description="trials, sampler, objective, scheduler, space")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking")

    @field_validator("experiment")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in {".", "..", BASELINES}:
            raise ValueError(f"{name!r} is reserved; choose another name")
        return name

    @field_validator("output_dir")
    @classmethod
    def _a_folder(cls, output_dir: str) -> str:
        if "://" in output_dir:
            raise ValueError(
                f"{output_dir!r} is a URI: output_dir holds the runs' logs and must be a folder "
                "(on a cluster, one every node sees); put checkpoints in object storage with "
                "storage_path"
            )
        return output_dir

    @field_validator("base", mode="before")
    @classmethod
    def _name_base(cls, base: Any, info: ValidationInfo) -> Any:
        if not isinstance(base, dict):
            return base
        experiment = info.data.get("experiment", "study")
        output_dir = info.data.get("output_dir", "outputs")
        derived = {"name": experiment, "out_dir": join_uri(output_dir, experiment, "base")}
        given = {k: base[k] for k in derived if k in base}
        if any(base[k] != derived[k] for k in given):
            raise ValueError(
                f"name and out_dir are set by the study (name = experiment, out_dir = "
                f"<output_dir>/<experiment>/base); remove them (got {given})"
            )
        return {**base, **derived}

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        # each stage assumes the previous ones passed (e.g. probes need valid paths)
        for check in (_check_paths, _check_conditions, _check_increasing, _check_values):
            problems = check(self.search.space, self.base)
            if problems:
                break
        problems += _check_objective(self.search)
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, _line_errors(problems))
        return self

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


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study YAML; errors are a `ConfigError` naming the file and paths."""
    data = load_yaml(path)
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None


# ---------------------------------------------------------------------------------------------
# Cross-field checks: each returns problems (YAML path, message, offending value)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    loc: tuple[str, ...]
    message: str
    value: Any


def _line_errors(problems: list[_Problem]) -> list[Any]:
    seen, errors = set(), []
    for p in problems:
        if (p.loc, p.message, repr(p.value)) in seen:
            continue
        seen.add((p.loc, p.message, repr(p.value)))
        kind = PydanticCustomError("study", "{message}", {"message": p.message})
        errors.append({"type": kind, "loc": p.loc, "input": p.value})
    return errors


def _space_loc(key: str, *rest: str) -> tuple[str, ...]:
    return ("search", "space", key, *rest)


def _check_paths(space: dict[str, Param], base: RunConfig) -> list[_Problem]:
    problems = []
    for key, param in space.items():
        section, _, leaf = key.rpartition(".")
        if key not in _FIELDS:
            if section in _SECTIONS:
                fields = ", ".join(k for k in _FIELDS if k.startswith(f"{section}."))
                message = f"not a RunConfig field; {section} fields are: {fields}"
            else:
                message = (
                    f"not a RunConfig field path; use <section>.<field> with a section among "
                    f"{', '.join(_SECTIONS)}, or one of: {', '.join(_TOP_LEVEL)}"
                )
            problems.append(_Problem(_space_loc(key), message, key))
        elif section == "schedule" and base.schedule is None:
            message = "base.schedule is null (a from-scratch run): give base a schedule to search"
            problems.append(_Problem(_space_loc(key), message, key))
        elif isinstance(param, IncreasingParam) and key != STAGE_ENDS:
            message = f"increasing only samples {STAGE_ENDS}; use float, int or choice"
            problems.append(_Problem(_space_loc(key), message, key))
        elif isinstance(param, FloatParam) and _is_int_field(key):
            message = f"{leaf} is an integer field: use {{int: [low, high]}}"
            problems.append(_Problem(_space_loc(key, "float"), message, list(param.bounds)))
    return problems


def _check_conditions(space: dict[str, Param], base: RunConfig) -> list[_Problem]:
    problems = []
    for key, param in space.items():
        for parent, raw in param.when.items():
            loc = _space_loc(key, "when", parent)
            target = space.get(parent)
            if parent == key:
                problems.append(_Problem(loc, "a parameter cannot depend on itself", parent))
            elif target is None:
                searched = ", ".join(k for k in space if k != key) or "none"
                message = f"must name another parameter of search.space; searched: {searched}"
                problems.append(_Problem(loc, message, parent))
            elif not isinstance(target, ChoiceParam):
                message = f"must name a choice parameter; {parent} is not one"
                problems.append(_Problem(loc, message, parent))
            else:
                for value in _condition_values(target, raw):
                    if value not in target.choices:
                        message = f"not among the choices of {parent}: {target.choices}"
                        problems.append(_Problem(loc, message, value))
    if not problems:
        try:
            _order(space)
        except _CycleError as e:
            problems.append(_Problem(_space_loc(e.keys[0], "when"), str(e), e.keys[0]))
    return problems


def _check_increasing(space: dict[str, Param], base: RunConfig) -> list[_Problem]:
    """Derive each IncreasingParam's count and gap from base, and check that the ends fit."""
    param = space.get(STAGE_ENDS)
    if not isinstance(param, IncreasingParam) or base.schedule is None:
        return []
    param._count = len(base.schedule.depths) - 1
    least = 2.0 / _min_steps(space, base)  # x, x + 2 always round to different steps
    if param.min_gap is None:
        param.min_gap = least
    elif param.min_gap < least:
        message = f"must be at least 2 / train.steps = {least:.4g} so every stage gets a step"
        return [_Problem(_space_loc(STAGE_ENDS, "min_gap"), message, param.min_gap)]
    for depths in _depth_options(space, base):
        count = len(depths) - 1
        if count and _slack(param, count) < 0:
            message = (
                f"cannot hold {count} ends (for depths {depths}) at least min_gap = "
                f"{param.min_gap:.4g} apart; widen the range or lower min_gap"
            )
            return [_Problem(_space_loc(STAGE_ENDS, "increasing"), message, list(param.bounds))]
    return []


def _check_objective(search: SearchConfig) -> list[_Problem]:
    problems = []
    if search.objective == "pareto" and search.scheduler is not None:
        # ASHA ranks trials by one metric, and a stopped trial would reach Optuna with its
        # truncated FLOPs: a cheap-looking point on the front that no finished run achieves.
        message = (
            "objective pareto cannot be combined with a scheduler (an early-stopped trial's "
            "truncated FLOPs would enter the Pareto front); set scheduler: null"
        )
        problems.append(_Problem(("search", "scheduler"), message, search.scheduler.kind))
    if search.objective == "pareto" and search.sampler.kind == "cmaes":
        message = "cmaes is single-objective; objective pareto needs tpe or random"
        problems.append(_Problem(("search", "sampler", "kind"), message, "cmaes"))
    return problems


def _check_values(space: dict[str, Param], base: RunConfig) -> list[_Problem]:
    """Substitute every bound and choice into base, as a trial would, and validate the RunConfig
    (and its Schedule: no empty stage).

    The other parameters take representative values (low bound / first choice). A value that
    ever failed is no longer a representative, and a depth list that failed in the last round
    is no companion of stage ends, so that a bad choice is blamed on its own key only. Rounds
    repeat until the failures settle (in one round when everything is valid)."""
    ever: dict[str, list[Any]] = {}
    last: dict[str, list[Any]] = {}
    problems: list[_Problem] = []
    for _ in range(6):
        representative = {
            key: next((v for v in cands if v not in ever.get(key, [])), cands[0])
            for key, param in space.items()
            if (cands := _candidates(param))
        }
        problems, failed = [], {}
        for key, param in space.items():
            for forced in _probes(key, param, space, base, last):
                values = _complete(space, base, forced, representative)
                for message in _blame(_run_errors(base, values), key, space):
                    problems.append(_Problem(_space_loc(key), message, forced[key]))
                    failed.setdefault(key, []).append(forced[key])
        if failed == last:
            break
        for key, values in failed.items():
            known = ever.setdefault(key, [])
            known += [v for v in values if v not in known]
        last = failed
    return problems


def _probes(
    key: str, param: Param, space: dict[str, Param], base: RunConfig, failed: dict
) -> Iterator[dict[str, Any]]:
    """The values of `key` to check, each with the companions it needs: stage ends come with
    each good depth list (and the fewest steps, where the gap matters most)."""
    if not isinstance(param, IncreasingParam):
        yield from ({key: value} for value in _candidates(param))
        return
    for depths in _depth_options(space, base):
        if depths in failed.get(DEPTHS, []):
            continue
        count = len(depths) - 1
        for u in (0.0, 1.0):  # the lowest and the highest ends
            forced = {key: _place_ends(param, count, [u] * count)}
            if DEPTHS in space:
                forced[DEPTHS] = depths
            if "train.steps" in space:
                forced["train.steps"] = _min_steps(space, base)
            yield forced


def _candidates(param: Param) -> list[Any]:
    if isinstance(param, ChoiceParam):
        return param.choices
    if isinstance(param, FloatParam | IntParam):
        return list(param.bounds)
    return []


def _complete(
    space: dict[str, Param], base: RunConfig, forced: dict[str, Any], representative: dict
) -> dict[str, Any]:
    """A full trial assignment around `forced`: its conditions met, the rest representative."""
    values = dict(forced)
    for key in forced:
        _force_parents(space, key, values)
    for key in _order(space):
        param = space[key]
        if key in values or not _holds(space, param, values):
            continue
        if isinstance(param, IncreasingParam):
            count = _count(param, values)
            values[key] = _place_ends(param, count, [0.5] * count)
        else:
            values[key] = representative.get(key, _candidates(param)[0])
    return values


def _force_parents(space: dict[str, Param], key: str, values: dict[str, Any]) -> None:
    for parent, raw in space[key].when.items():
        if parent not in values:
            values[parent] = _condition_values(space[parent], raw)[0]
            _force_parents(space, parent, values)


def _run_errors(base: RunConfig, values: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """(location, message) of what is wrong with base + values as a run."""
    try:
        cfg = RunConfig.model_validate(_substitute(base.model_dump(), values))
    except ValidationError as e:
        return [
            (tuple(str(p) for p in err["loc"]), err["msg"].removeprefix("Value error, "))
            for err in e.errors()
        ]
    if cfg.schedule is not None:
        try:
            Schedule(cfg.schedule, cfg.model.n_layer, cfg.train.steps, cfg.seed)
        except ValueError as e:
            return [((), str(e))]
    return []


def _blame(errors: list[tuple[tuple[str, ...], str]], key: str, space: dict) -> list[str]:
    """The errors that belong to `key`: at its own path, or run-level (not at another key's)."""
    own = tuple(key.split("."))
    others = [tuple(k.split(".")) for k in space if k != key]
    messages = []
    for loc, message in errors:
        if loc[: len(own)] == own:
            rest = loc[len(own) :]
            messages.append(f"item {'.'.join(rest)}: {message}" if rest else message)
        elif not any(loc[: len(o)] == o for o in others):
            messages.append(f"{'.'.join(loc)}: {message}" if loc else message)
    return messages


# ---------------------------------------------------------------------------------------------
# Sampling (define-by-run)
# ---------------------------------------------------------------------------------------------


def suggest(trial: optuna.trial.BaseTrial, space: dict[str, Param]) -> dict[str, Any]:
    """Sample `space` from an Optuna trial (define-by-run); returns {dotted path: value}.

    Parents before the parameters that depend on them (`when`), depths before stage ends; a
    parameter whose condition fails is skipped (the trial keeps base's value). Choices that are
    lists go to Optuna as strings ("1,3,6") and come back decoded. Stage ends are sampled as
    Optuna parameters `schedule.stage_ends.<i>of<k>` (uniforms in [0, 1], k = number of ends),
    one set per k, so a coordinate always means the same thing to the sampler."""
    values: dict[str, Any] = {}
    for key in _order(space):
        param = space[key]
        if not _holds(space, param, values):
            continue
        if isinstance(param, FloatParam):
            values[key] = trial.suggest_float(key, param.low, param.high, log=param.log)
        elif isinstance(param, IntParam):
            values[key] = trial.suggest_int(key, param.low, param.high, log=param.log)
        elif isinstance(param, ChoiceParam):
            values[key] = param.decode(trial.suggest_categorical(key, param.encoded))
        else:
            count = _count(param, values)
            u = [trial.suggest_float(_coordinate(key, i, count), 0.0, 1.0) for i in range(count)]
            values[key] = _place_ends(param, count, u)
    return values


def _coordinate(key: str, i: int, count: int) -> str:
    return f"{key}.{i + 1}of{count}"


_COORDINATE = re.compile(r"^(?P<key>.+)\.\d+of\d+$")


def _place_ends(param: IncreasingParam, count: int, u: Sequence[float]) -> list[float]:
    """Map `count` uniforms in [0, 1] to strictly increasing ends in [low, high], >= gap apart.

    With slack S = high - low - (count - 1) gap, end i is low + y_i + (i - 1) gap, where
    y_1 <= ... <= y_k are placed by sequential order statistics: y_i is the minimum of the
    k - i + 1 uniforms left on [y_{i-1}, S], whose inverse CDF is 1 - (1 - u)^(1 / (k - i + 1)).
    Independent uniform u's thus give a uniform draw over all valid end lists, and the map is a
    bijection, so TPE can model each coordinate on its own."""
    gap = _gap(param)
    slack = _slack(param, count)
    ends, y = [], 0.0
    for i, ui in enumerate(u):
        y += (slack - y) * (1.0 - (1.0 - ui) ** (1.0 / (count - i)))
        # 10 decimals keep logged values readable and shift an end by far less than a step
        ends.append(min(param.high, max(param.low, round(param.low + y + i * gap, 10))))
    return ends


def _gap(param: IncreasingParam) -> float:
    # a study always fills min_gap in; a bare space gets 0.1% of the range between ends
    return param.min_gap if param.min_gap is not None else (param.high - param.low) * 1e-3


def _slack(param: IncreasingParam, count: int) -> float:
    return param.high - param.low - (count - 1) * _gap(param)


def _count(param: IncreasingParam, values: dict[str, Any]) -> int:
    if DEPTHS in values:
        return len(values[DEPTHS]) - 1
    if param._count is None:
        raise ValueError(
            f"{STAGE_ENDS}: the number of ends follows schedule.depths; search it too, or load "
            "the space from a study (which takes the count from base.schedule.depths)"
        )
    return param._count


def _condition_values(parent: Param, raw: Any) -> list[Any]:
    """`when` values: a list means several values, unless the list itself is one of the
    parent's choices (`when: {schedule.depths: [1, 3, 6]}`)."""
    choices = parent.choices if isinstance(parent, ChoiceParam) else []
    if isinstance(raw, list) and raw not in choices:
        return raw
    return [raw]


def _holds(space: dict[str, Param], param: Param, values: dict[str, Any]) -> bool:
    return all(
        parent in values and values[parent] in _condition_values(space[parent], raw)
        for parent, raw in param.when.items()
    )


class _CycleError(ValueError):
    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        super().__init__(f"conditions form a cycle: {' -> '.join(keys)}")


def _order(space: dict[str, Param]) -> list[str]:
    """Space keys in sampling order: file order, each after the keys it depends on."""

    def needs(key: str) -> list[str]:
        deps = list(space[key].when)
        if isinstance(space[key], IncreasingParam) and DEPTHS in space:
            deps.append(DEPTHS)
        return [d for d in deps if d in space and d != key]

    order: list[str] = []
    active: list[str] = []

    def visit(key: str) -> None:
        if key in order:
            return
        if key in active:
            raise _CycleError([*active[active.index(key) :], key])
        active.append(key)
        for dep in needs(key):
            visit(dep)
        active.pop()
        order.append(key)

    for key in space:
        visit(key)
    return order


def _depth_options(space: dict[str, Param], base: RunConfig) -> list[list[int]]:
    """The depth lists a trial can have: the searched choices, and base's when not always
    searched."""
    param = space.get(DEPTHS)
    options = []
    if isinstance(param, ChoiceParam):
        options += [c for c in param.choices if isinstance(c, list)]
    if (param is None or param.when) and base.schedule is not None:
        options.append(base.schedule.depths)
    return options


def _min_steps(space: dict[str, Param], base: RunConfig) -> int:
    """The fewest train.steps a trial can have (the stage-end gap is derived from it)."""
    steps = [base.train.steps]
    if "train.steps" in space:
        steps += [int(s) for s in _candidates(space["train.steps"]) if isinstance(s, int | float)]
    return max(1, min(steps))


# ---------------------------------------------------------------------------------------------
# Trial configs, logging and the baseline
# ---------------------------------------------------------------------------------------------


def materialize(base: RunConfig, params: dict[str, Any], name: str, out_dir: str) -> RunConfig:
    """A trial's RunConfig: base with the dotted `params` substituted, validated.

    Keys that are Optuna's stage-end coordinates (`schedule.stage_ends.1of3`, which Tune puts in
    a trial's config next to the decoded values) are ignored; any other unknown key is an error."""
    unknown = [k for k in params if k not in _FIELDS and not _is_coordinate(k)]
    if unknown:
        raise ConfigError(f"trial {name}: not RunConfig fields: {', '.join(unknown)}")
    values = {k: v for k, v in params.items() if k in _FIELDS}
    data = _substitute(base.model_dump(), {**values, "name": name, "out_dir": out_dir})
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"trial {name}")) from None


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """{dotted path: scalar} of a run, lists as "1,3,6": MLflow parameters. A from-scratch run
    has `schedule: None`."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = _encode(value)

    walk("", cfg.model_dump(mode="json"))
    return flat


def baseline_config(study: StudyConfig) -> RunConfig:
    """The scratch baseline of a study: base without a schedule (full depth from step 0), named
    "baseline", in <output_dir>/baselines/<baseline_key>."""
    out_dir = join_uri(study.baselines_dir, baseline_key(study.base))
    data = {**study.base.model_dump(), "schedule": None, "name": "baseline", "out_dir": out_dir}
    return RunConfig.model_validate(data)


def baseline_key(cfg: RunConfig) -> str:
    """A short stable hash of what determines the baseline's curve: model, data, train, seed and
    the number of workers (the global batch). Not name, out_dir, schedule or max_failures."""
    determines = {
        "model": cfg.model.model_dump(mode="json"),
        "data": cfg.data.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json"),
        "seed": cfg.seed,
        "workers": cfg.resources.workers,
    }
    canonical = json.dumps(determines, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# RunConfig paths
# ---------------------------------------------------------------------------------------------


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a RunConfig section field (`ScheduleConfig | None` -> ScheduleConfig)."""
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _run_fields() -> tuple[dict[str, FieldInfo], list[str], list[str]]:
    fields: dict[str, FieldInfo] = {}
    sections, top = [], []
    for name, info in RunConfig.model_fields.items():
        if name in {"name", "out_dir"}:  # set per trial
            continue
        model = _section_model(info.annotation)
        if model is None:
            fields[name] = info
            top.append(name)
        else:
            sections.append(name)
            fields.update({f"{name}.{leaf}": f for leaf, f in model.model_fields.items()})
    return fields, sections, top


_FIELDS, _SECTIONS, _TOP_LEVEL = _run_fields()


def _is_int_field(key: str) -> bool:
    annotation = _FIELDS[key].annotation
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(annotation) if union else (annotation,)
    return set(members) - {type(None)} == {int}


def _is_coordinate(key: str) -> bool:
    match = _COORDINATE.match(key)
    return match is not None and match["key"] in _FIELDS


def _substitute(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """`data` (a RunConfig dump) with dotted `values` set; a null section starts empty."""
    data = copy.deepcopy(data)
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
        node[leaf] = copy.deepcopy(value)
    return data


def _encode(value: Any) -> Any:
    """Optuna categoricals and MLflow params take scalars: lists become "1,3,6"."""
    if isinstance(value, list | tuple):
        if all(v is None or isinstance(v, bool | int | float | str) for v in value):
            return ",".join(str(v) for v in value)
        return json.dumps(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, sort_keys=True)
