"""Putting runs on machines: the Ray cluster, its capacity, and a run's workers.

- `preflight`: the cheap checks before anything starts (placeholders, GPUs, storage, joining Ray)
- `capacity`: what a cluster can hold, now and grown by its autoscaler's node types
- `cluster_check`: the rules a Ray cluster launcher file is checked against before `ray up`
- `distributed`: Ray Train: `build_trainer` (a run's `TorchTrainer`), `train_worker` (one DDP rank)
- `solo`: one-worker runs without a worker group (a trial's own process, or one Ray task)
"""
