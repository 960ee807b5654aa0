"""The records: everything MLflow holds of runs and studies (the only layer that writes to it).

- `mlflow_server`: the local MLflow store and its server on 127.0.0.1
- `mirror`: rank 0's `RunMirror` (rows, checkpoints; buffered on disk when MLflow is down); `sync`
- `tracking`: the study's MLflow runs from the drivers: parent and child runs, always ended
- `results`: what a finished run or study adds: scores, plots, the registered best model
- `plots`: depth histogram per stage; Optuna's plots of a finished search
"""
