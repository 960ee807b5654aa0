"""Does a study's search space fit its base run? The cross-field checks of a study file.

Each check returns `Problem`s (YAML path, message, offending value) that `StudyConfig` turns
into one validation error listing them all: every key names a RunConfig field, conditions name
choice parameters without cycles, stage ends fit, and every bound and choice substituted into
the base run as a trial would see it validates (so an error names `search.space.<path>`, the
value and what the field allows).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from apollo_ray.config import RunConfig
from apollo_ray.method.schedule import Schedule
from apollo_ray.study.fields import FIELDS, SECTIONS, TOP_LEVEL, is_int_field, substitute
from apollo_ray.study.space import (
    DEPTHS,
    STAGE_ENDS,
    ChoiceParam,
    CycleError,
    FloatParam,
    IncreasingParam,
    Param,
    candidates,
    condition_values,
    depth_options,
    end_count,
    holds,
    min_steps,
    order,
    place_ends,
    slack,
    stage_end_gap,
)

__all__ = ["Problem", "check_space", "line_errors"]


def check_space(space: dict[str, Param], base: RunConfig) -> list[Problem]:
    """What is wrong with `space` as a search over `base`; each stage of checks assumes the
    previous ones passed (e.g. probing values needs valid paths)."""
    for check in (_check_paths, _check_conditions, _check_increasing, _check_values):
        problems = check(space, base)
        if problems:
            return problems
    return []


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a study: where (YAML path), what, and the offending value."""

    loc: tuple[str, ...]
    message: str
    value: Any


def line_errors(problems: list[Problem]) -> list[Any]:
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


def _check_paths(space: dict[str, Param], base: RunConfig) -> list[Problem]:
    problems = []
    for key, param in space.items():
        section, _, leaf = key.rpartition(".")
        if key not in FIELDS:
            if section in SECTIONS:
                fields = ", ".join(k for k in FIELDS if k.startswith(f"{section}."))
                message = f"not a RunConfig field; {section} fields are: {fields}"
            else:
                message = (
                    f"not a RunConfig field path; use <section>.<field> with a section among "
                    f"{', '.join(SECTIONS)}, or one of: {', '.join(TOP_LEVEL)}"
                )
            problems.append(Problem(_space_loc(key), message, key))
        elif section == "schedule" and base.schedule is None:
            message = "base.schedule is null (a from-scratch run): give base a schedule to search"
            problems.append(Problem(_space_loc(key), message, key))
        elif isinstance(param, IncreasingParam) and key != STAGE_ENDS:
            message = f"increasing only samples {STAGE_ENDS}; use float, int or choice"
            problems.append(Problem(_space_loc(key), message, key))
        elif isinstance(param, FloatParam) and is_int_field(key):
            message = f"{leaf} is an integer field: use {{int: [low, high]}}"
            problems.append(Problem(_space_loc(key, "float"), message, list(param.bounds)))
    return problems


def _check_conditions(space: dict[str, Param], base: RunConfig) -> list[Problem]:
    problems = []
    for key, param in space.items():
        for parent, raw in param.when.items():
            loc = _space_loc(key, "when", parent)
            target = space.get(parent)
            if parent == key:
                problems.append(Problem(loc, "a parameter cannot depend on itself", parent))
            elif target is None:
                searched = ", ".join(k for k in space if k != key) or "none"
                message = f"must name another parameter of search.space; searched: {searched}"
                problems.append(Problem(loc, message, parent))
            elif not isinstance(target, ChoiceParam):
                message = f"must name a choice parameter; {parent} is not one"
                problems.append(Problem(loc, message, parent))
            else:
                for value in condition_values(target, raw):
                    if value not in target.choices:
                        message = f"not among the choices of {parent}: {target.choices}"
                        problems.append(Problem(loc, message, value))
    if not problems:
        try:
            order(space)
        except CycleError as e:
            problems.append(Problem(_space_loc(e.keys[0], "when"), str(e), e.keys[0]))
    return problems


def _check_increasing(space: dict[str, Param], base: RunConfig) -> list[Problem]:
    """Stage ends at least 2 / train.steps apart, and room for as many as each depth list needs."""
    param = space.get(STAGE_ENDS)
    if not isinstance(param, IncreasingParam) or base.schedule is None:
        return []
    least = 2.0 / min_steps(space, base)
    if param.min_gap is not None and param.min_gap < least:
        message = f"must be at least 2 / train.steps = {least:.4g} so every stage gets a step"
        return [Problem(_space_loc(STAGE_ENDS, "min_gap"), message, param.min_gap)]
    gap = stage_end_gap(param, space, base)
    for depths in depth_options(space, base):
        count = len(depths) - 1
        if count and slack(param, count, gap) < 0:
            message = (
                f"cannot hold {count} ends (for depths {depths}) at least min_gap = "
                f"{gap:.4g} apart; widen the range or lower min_gap"
            )
            return [Problem(_space_loc(STAGE_ENDS, "increasing"), message, list(param.bounds))]
    return []


def _check_values(space: dict[str, Param], base: RunConfig) -> list[Problem]:
    """Substitute every bound and choice into base, as a trial would, and validate the RunConfig
    (and its Schedule: no empty stage).

    The other parameters take representative values (low bound / first choice). A value that
    ever failed is no longer a representative, and a depth list that failed in the last round
    is no companion of stage ends, so that a bad choice is blamed on its own key only. Rounds
    repeat until the failures settle (in one round when everything is valid)."""
    ever: dict[str, list[Any]] = {}
    last: dict[str, list[Any]] = {}
    problems: list[Problem] = []
    for _ in range(6):
        representative = {
            key: next((v for v in cands if v not in ever.get(key, [])), cands[0])
            for key, param in space.items()
            if (cands := candidates(param))
        }
        problems, failed = [], {}
        for key, param in space.items():
            for forced in _probes(key, param, space, base, last):
                values = _complete(space, base, forced, representative)
                for message in _blame(_run_errors(base, values), key, space):
                    problems.append(Problem(_space_loc(key), message, forced[key]))
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
        yield from ({key: value} for value in candidates(param))
        return
    gap = stage_end_gap(param, space, base)
    for depths in depth_options(space, base):
        if depths in failed.get(DEPTHS, []):
            continue
        count = len(depths) - 1
        for u in (0.0, 1.0):  # the lowest and the highest ends
            forced = {key: place_ends(param, count, [u] * count, gap)}
            if DEPTHS in space:
                forced[DEPTHS] = depths
            if "train.steps" in space:
                forced["train.steps"] = min_steps(space, base)
            yield forced


def _complete(
    space: dict[str, Param], base: RunConfig, forced: dict[str, Any], representative: dict
) -> dict[str, Any]:
    """A full trial assignment around `forced`: its conditions met, the rest representative."""
    values = dict(forced)
    for key in forced:
        _force_parents(space, key, values)
    for key in order(space):
        param = space[key]
        if key in values or not holds(space, param, values):
            continue
        if isinstance(param, IncreasingParam):
            count = end_count(values, base)
            values[key] = place_ends(param, count, [0.5] * count, stage_end_gap(param, space, base))
        else:
            values[key] = representative.get(key, candidates(param)[0])
    return values


def _force_parents(space: dict[str, Param], key: str, values: dict[str, Any]) -> None:
    for parent, raw in space[key].when.items():
        if parent not in values:
            values[parent] = condition_values(space[parent], raw)[0]
            _force_parents(space, parent, values)


def _run_errors(base: RunConfig, values: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """(location, message) of what is wrong with base + values as a run."""
    try:
        cfg = RunConfig.model_validate(substitute(base.model_dump(), values))
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
