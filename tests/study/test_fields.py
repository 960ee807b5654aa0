"""`RunConfig` fields by dotted path: `flatten` makes a run's MLflow params."""

from conftest import EXAMPLE_STUDY

from apollo_ray.study.fields import flatten
from apollo_ray.study.schema import StudyConfig


def test_flatten_for_logging():
    flat = flatten(StudyConfig.model_validate(EXAMPLE_STUDY).base)
    assert flat["schedule.depths"] == "1,3,6" and flat["schedule.stage_ends"] == "0.1,0.25"
    assert flat["train.lr"] == 1e-3 and flat["model.kind"] == "bert" and flat["seed"] == 0
    assert flat["train.betas"] == "0.9,0.999"
    assert all(not isinstance(v, list | dict) for v in flat.values())
