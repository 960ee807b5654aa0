"""The yardstick: how a run is read against training from scratch (docs/method.md, section 8).

- `frontier`: the scratch frontier: compute-equivalent FLOPs of a loss, speedup, bounds, ranking
- `scratch`: a study's scratch runs by budget, read as the frontier and as curves
- `acceleration`: the paper's metric (FLOPs / wall-time saving to a target loss); loss-vs-FLOPs plot
- `stats`: intervals over seeds: t-intervals on log speedup, paired by seed
"""
