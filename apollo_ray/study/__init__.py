"""The study file (`search_spaces/*.yaml`): its schema and its search space, validated once.

- `schema`: `StudyConfig` and `load_study`: the study YAML, every error naming its path
- `space`: the space's parameters (`float`, `int`, `choice`, `increasing`), `suggest`, `materialize`
- `space_checks`: whether a space fits its base run: the cross-field checks
- `fields`: `RunConfig` fields by dotted path; `flatten` (a run's MLflow params)
"""
