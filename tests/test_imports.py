"""The training side imports and trains without Ray, MLflow or Optuna installed (a bare GPU
machine with torch runs it): in a child process where importing them fails as if they were
not installed. The commands start without torch, MLflow or Ray: their checks answer in a
fraction of a second, and each imports the heavy libraries only once its checks have passed."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_run

ROOT = Path(__file__).parent.parent
BLOCKED = ("ray", "mlflow", "optuna")
TRAINING_SIDE = [
    *(f"apollo_ray.method.{m}" for m in ("model", "depth", "schedule", "growth")),
    "apollo_ray.data",
    "apollo_ray.data.batches",
    *(f"apollo_ray.training.{m}" for m in ("trainer", "checkpoints", "export", "evaluation")),
    *(f"apollo_ray.yardstick.{m}" for m in ("acceleration", "scratch", "stats")),
    "apollo_ray.export",
    "benchmarks.throughput",
    "benchmarks.acceleration",
    "benchmarks.gpu_smoke",
    "benchmarks.overhead",
]

CHILD = """
import importlib, sys, traceback

BLOCKED = {blocked!r}


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            ours = [f for f in traceback.extract_stack() if "/apollo_ray/" in f.filename
                    or "/benchmarks/" in f.filename]
            where = f"{{ours[-1].filename}}:{{ours[-1].lineno}}" if ours else "?"
            raise ModuleNotFoundError(f"No module named {{name!r}} (imported at {{where}})")
        return None


sys.meta_path.insert(0, NotInstalled())
failed = []
for module in {modules!r}:
    try:
        importlib.import_module(module)
    except ImportError as e:
        failed.append(f"{{module}}: {{e}}")
        traceback.print_exc()
if failed:
    sys.exit("failed to import:\\n" + "\\n".join(failed))

from apollo_ray.config import RunConfig
from apollo_ray.training.trainer import Trainer

state = Trainer(RunConfig.model_validate_json(sys.argv[1]), "cpu", progress=False).fit()
assert state.step == 2, state
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
assert not loaded, loaded
print("trained", state.step, "steps")
"""


@pytest.mark.slow  # a process of its own
def test_training_side_needs_no_ray_mlflow_or_optuna(gpt_data, tmp_path):
    cfg = tiny_run(gpt_data, tmp_path / "run", train={"steps": 2}, schedule=None)
    script = CHILD.format(blocked=BLOCKED, modules=TRAINING_SIDE)
    child = subprocess.run(
        [sys.executable, "-c", script, cfg.model_dump_json()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-5000:]
    assert "trained 2 steps" in child.stdout
    assert (tmp_path / "run" / "checkpoints" / "step-0000002.pt").exists()


COMMANDS = ["apollo_ray.tune", "apollo_ray.train", "apollo_ray.ui", "apollo_ray.data.__main__"]


def test_commands_import_no_heavy_library_before_their_checks():
    script = (
        f"import importlib, sys\nfor m in {COMMANDS!r}: importlib.import_module(m)\n"
        "print(sorted({m.partition('.')[0] for m in sys.modules} & {'torch', 'mlflow', 'ray'}))"
    )
    child = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr[-5000:]
    assert child.stdout.strip() == "[]"
