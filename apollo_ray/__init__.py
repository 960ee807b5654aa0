"""apollo_ray: Apollo progressive training on Ray, its schedule searched with Tune + Optuna,
recorded in MLflow.

The package in layers, each importing only those below it (checked by `lint-imports`, the
contracts in pyproject.toml):

- the commands: `tune`, `train`, `export`, `report`, `ui`, `cluster` (`python -m apollo_ray.X`)
  and `data` (`python -m apollo_ray.data`)
- `search`: the schedule search (Tune + Optuna), the scratch frontier's runs, the summary
- `launch`: the cluster and a run's workers (Ray Train, or one process)
- `records`: MLflow: the store, rank 0's mirror, the study's runs, results and plots
- `study` (the study file), `training` (the loop on one process), `yardstick` (read against scratch)
- `data` (corpora, tokenizer, shards, batches) and `method` (model, depth, schedule, growth)
- `config` (a run's schema) and `storage` (paths and URIs), used by every layer
"""
