"""The method: Apollo as the paper describes it, in plain PyTorch (no Ray, MLflow or Optuna).

- `model`: BERT / GPT with a bank of physical layers run by an explicit layer plan; FLOPs formula
- `depth`: depth samplers: released LVPS (`apollo`), tempered `lvps`, `uniform`, `full`, `physical`
- `schedule`: layer plans (`interp_plan`, `stack_plan`); stage, depth and plan of every micro-batch
- `growth`: growth operators (`interpolate`, `stack`, `random`) and optimizer-state policies
"""
