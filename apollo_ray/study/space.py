"""The search space of a study: its parameter kinds, and how a trial samples them.

`search.space` maps dotted `RunConfig` paths to distributions:

    train.lr:            {float: [3.0e-4, 3.0e-3], log: true}
    schedule.depths:     {choice: [[1, 3, 6], [2, 6], [3, 6]]}
    schedule.stage_ends: {increasing: [0.05, 0.5]}
    schedule.tau:        {float: [0.1, 5.0], log: true, when: {schedule.sampler: lvps}}

`suggest` samples the space define-by-run from an Optuna trial, and `materialize` turns the
sampled values into the trial's `RunConfig`. Whether a space fits its base run is checked by
`apollo_ray.study.space_checks` when the study is validated.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import ConfigDict, Field, ValidationError, WrapValidator, model_validator

from apollo_ray.config import ConfigError, RunConfig, Strict, format_validation_error
from apollo_ray.study.fields import FIELDS, encode, substitute

if TYPE_CHECKING:
    import optuna

__all__ = [
    "DEPTHS",
    "STAGE_ENDS",
    "ChoiceParam",
    "CycleError",
    "FloatParam",
    "IncreasingParam",
    "IntParam",
    "Param",
    "candidates",
    "condition_values",
    "depth_options",
    "end_count",
    "holds",
    "materialize",
    "min_steps",
    "order",
    "place_ends",
    "slack",
    "stage_end_gap",
    "suggest",
]

DEPTHS = "schedule.depths"
STAGE_ENDS = "schedule.stage_ends"


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
        return [encode(c) for c in self.choices]

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
    sequential order statistics: a uniform draw over all valid end lists (see `place_ends`).
    """

    bounds: tuple[float, float] = Field(
        alias="increasing", description="[low, high]: 0 < low < high < 1, fractions of steps"
    )
    min_gap: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="smallest distance between consecutive ends; default 2 / train.steps "
        "(the fewest a trial can have), the least that keeps every stage at least one step long",
    )

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


def suggest(
    trial: optuna.trial.BaseTrial, space: dict[str, Param], base: RunConfig
) -> dict[str, Any]:
    """Sample `space` from an Optuna trial (define-by-run); returns {dotted path: value}.

    Parents before the parameters that depend on them (`when`), depths before stage ends; a
    parameter whose condition fails is skipped (the trial keeps `base`'s value). Choices that
    are lists go to Optuna as strings ("1,3,6") and come back decoded. Stage ends are sampled as
    Optuna parameters `schedule.stage_ends.<i>of<k>` (uniforms in [0, 1], k = number of ends),
    one set per k, so a coordinate always means the same thing to the sampler."""
    values: dict[str, Any] = {}
    for key in order(space):
        param = space[key]
        if not holds(space, param, values):
            continue
        if isinstance(param, FloatParam):
            values[key] = trial.suggest_float(key, param.low, param.high, log=param.log)
        elif isinstance(param, IntParam):
            values[key] = trial.suggest_int(key, param.low, param.high, log=param.log)
        elif isinstance(param, ChoiceParam):
            values[key] = param.decode(trial.suggest_categorical(key, param.encoded))
        else:
            count = end_count(values, base)
            u = [trial.suggest_float(_coordinate(key, i, count), 0.0, 1.0) for i in range(count)]
            values[key] = place_ends(param, count, u, stage_end_gap(param, space, base))
    return values


def _coordinate(key: str, i: int, count: int) -> str:
    return f"{key}.{i + 1}of{count}"


_COORDINATE = re.compile(r"^(?P<key>.+)\.\d+of\d+$")


def _is_coordinate(key: str) -> bool:
    match = _COORDINATE.match(key)
    return match is not None and match["key"] in FIELDS


def place_ends(param: IncreasingParam, count: int, u: Sequence[float], gap: float) -> list[float]:
    """Map `count` uniforms in [0, 1] to strictly increasing ends in [low, high], >= gap apart.

    With slack S = high - low - (count - 1) gap, end i is low + y_i + (i - 1) gap, where
    y_1 <= ... <= y_k are placed by sequential order statistics: y_i is the minimum of the
    k - i + 1 uniforms left on [y_{i-1}, S], whose inverse CDF is 1 - (1 - u)^(1 / (k - i + 1)).
    Independent uniform u's thus give a uniform draw over all valid end lists, and the map is a
    bijection, so TPE can model each coordinate on its own."""
    room = slack(param, count, gap)
    ends, y = [], 0.0
    for i, ui in enumerate(u):
        y += (room - y) * (1.0 - (1.0 - ui) ** (1.0 / (count - i)))
        # 10 decimals keep logged values readable and shift an end by far less than a step
        ends.append(min(param.high, max(param.low, round(param.low + y + i * gap, 10))))
    return ends


def stage_end_gap(param: IncreasingParam, space: dict[str, Param], base: RunConfig) -> float:
    """The least distance between stage ends: `min_gap`, or by default 2 / the fewest
    train.steps a trial can have (x and x + 2 / steps always round to different steps)."""
    return param.min_gap if param.min_gap is not None else 2.0 / min_steps(space, base)


def slack(param: IncreasingParam, count: int, gap: float) -> float:
    """Room left in [low, high] once `count` ends sit `gap` apart (negative: they do not fit)."""
    return param.high - param.low - (count - 1) * gap


def end_count(values: dict[str, Any], base: RunConfig) -> int:
    """How many stage ends a trial has: one per stage but the last, of its sampled depths or
    else of base's."""
    if DEPTHS in values:
        return len(values[DEPTHS]) - 1
    return len(base.schedule.depths) - 1


def condition_values(parent: Param, raw: Any) -> list[Any]:
    """`when` values: a list means several values, unless the list itself is one of the
    parent's choices (`when: {schedule.depths: [1, 3, 6]}`)."""
    choices = parent.choices if isinstance(parent, ChoiceParam) else []
    if isinstance(raw, list) and raw not in choices:
        return raw
    return [raw]


def holds(space: dict[str, Param], param: Param, values: dict[str, Any]) -> bool:
    return all(
        parent in values and values[parent] in condition_values(space[parent], raw)
        for parent, raw in param.when.items()
    )


class CycleError(ValueError):
    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        super().__init__(f"conditions form a cycle: {' -> '.join(keys)}")


def order(space: dict[str, Param]) -> list[str]:
    """Space keys in sampling order: file order, each after the keys it depends on."""

    def needs(key: str) -> list[str]:
        deps = list(space[key].when)
        if isinstance(space[key], IncreasingParam) and DEPTHS in space:
            deps.append(DEPTHS)
        return [d for d in deps if d in space and d != key]

    ordered: list[str] = []
    active: list[str] = []

    def visit(key: str) -> None:
        if key in ordered:
            return
        if key in active:
            raise CycleError([*active[active.index(key) :], key])
        active.append(key)
        for dep in needs(key):
            visit(dep)
        active.pop()
        ordered.append(key)

    for key in space:
        visit(key)
    return ordered


def depth_options(space: dict[str, Param], base: RunConfig) -> list[list[int]]:
    """The depth lists a trial can have: the searched choices, and base's when not always
    searched."""
    param = space.get(DEPTHS)
    options = []
    if isinstance(param, ChoiceParam):
        options += [c for c in param.choices if isinstance(c, list)]
    if (param is None or param.when) and base.schedule is not None:
        options.append(base.schedule.depths)
    return options


def candidates(param: Param) -> list[Any]:
    """The values that stand for a parameter in checks: its choices, or its two bounds."""
    if isinstance(param, ChoiceParam):
        return param.choices
    if isinstance(param, FloatParam | IntParam):
        return list(param.bounds)
    return []


def min_steps(space: dict[str, Param], base: RunConfig) -> int:
    """The fewest train.steps a trial can have (the stage-end gap is derived from it)."""
    steps = [base.train.steps]
    if "train.steps" in space:
        steps += [int(s) for s in candidates(space["train.steps"]) if isinstance(s, int | float)]
    return max(1, min(steps))


def materialize(base: RunConfig, params: dict[str, Any], name: str, out_dir: str) -> RunConfig:
    """A trial's RunConfig: base with the dotted `params` substituted, validated.

    Keys that are Optuna's stage-end coordinates (`schedule.stage_ends.1of3`, which Tune puts in
    a trial's config next to the decoded values) are ignored; any other unknown key is an error."""
    unknown = [k for k in params if k not in FIELDS and not _is_coordinate(k)]
    if unknown:
        raise ConfigError(f"trial {name}: not RunConfig fields: {', '.join(unknown)}")
    values = {k: v for k, v in params.items() if k in FIELDS}
    data = substitute(base.model_dump(), {**values, "name": name, "out_dir": out_dir})
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"trial {name}")) from None
