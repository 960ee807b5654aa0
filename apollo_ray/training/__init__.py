"""A run's training on one process (or one DDP rank), in plain PyTorch (no Ray, MLflow or Optuna).

- `trainer`: the loop: fused AdamW, warmup + decay, accumulation, clipping, evaluation, growth
- `late_read`: a queued step's loss read one step late, and the clock of training time
- `evaluation`: held-out loss: the quick one during training, the final one with its standard error
- `checkpoints`: checkpoint names, save and load (`weights_only=True`), the local and storage stores
- `runlog`: a run's `metrics.jsonl`, `resumes.jsonl` and `diverged.txt`
- `tracker`: what the loop tells a run's record (`Tracker`, `NullTracker`); MLflow implements it
- `faults`: fault injection for chaos testing (`--kill-at-step`, `--kill-after-checkpoint`)
- `export`: a checkpoint as a Hugging Face `BertForMaskedLM` / `GPT2LMHeadModel` folder
"""
