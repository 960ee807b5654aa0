"""RunConfig fields by dotted path (`train.lr`, `schedule.depths`): which paths exist, setting
them in a config dump, and flattening a run into them (its MLflow parameters)."""

from __future__ import annotations

import copy
import json
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from apollo_ray.config import RunConfig
from apollo_ray.storage import redact

__all__ = ["FIELDS", "SECTIONS", "TOP_LEVEL", "encode", "flatten", "is_int_field", "substitute"]


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


FIELDS, SECTIONS, TOP_LEVEL = _run_fields()


def is_int_field(key: str) -> bool:
    annotation = FIELDS[key].annotation
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(annotation) if union else (annotation,)
    return set(members) - {type(None)} == {int}


def substitute(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
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


def encode(value: Any) -> Any:
    """Optuna categoricals and MLflow params take scalars: lists become "1,3,6"."""
    if isinstance(value, list | tuple):
        if all(v is None or isinstance(v, bool | int | float | str) for v in value):
            return ",".join(str(v) for v in value)
        return json.dumps(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, sort_keys=True)


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """{dotted path: scalar} of a run, lists as "1,3,6": MLflow parameters, with the password
    of a URI (`s3://KEY:SECRET@...`) hidden. A from-scratch run has `schedule: None`."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            encoded = encode(value)
            flat[prefix] = redact(encoded) if isinstance(encoded, str) else encoded

    walk("", cfg.model_dump(mode="json"))
    return flat
