"""The schedule search: Ray Tune + Optuna over a study, read against the scratch frontier.

- `tuner`: the Ray tiers side by side: `run_search` (Tuner + OptunaSearch), `trial_driver`, `score`,
  and the confirmation runs
- `baseline`: the scratch frontier's runs: their configs, their key, trained once and cached
- `sweep`: the scratch sweep's plan (wsd trunks and their branches, cosine runs) and choice
- `summary`: the trials table and ranking, the confirmed ranking, `best.yaml` and `summary.json`
- `progress`: the study driver's terminal: one line per running trial
"""
