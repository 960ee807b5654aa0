"""What a study prints while its trials run: one line per running trial, fed by the reports
Tune already hands the study driver, instead of Tune's status tables and the workers' logs.

`TrialProgress` is a Tune callback in the driver. On a terminal it keeps one live line per
running trial (step/steps, stage, depth, loss, tokens/s averaged over its last reports, time
left from its mean step time) and
redraws them in place; elsewhere (CI, `| tee`, a log file) it prints one line when a trial
starts and one when it ends, finished, stopped early by the scheduler, diverged (with why and
where) or failed (with the last line of its error, Tune's error file and the run's
folder), and nothing per step.
`calm_driver` turns the rest down: Tune's own reporter and trial tracebacks, Ray's INFO logs and
the workers' output forwarded to the driver (all still in /tmp/ray/session_latest/logs), unless
`python -m apollo_ray.tune --verbose`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import statistics
import sys
import textwrap
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, TextIO

from ray.tune.callback import Callback

from apollo_ray.records.tracking import trial_name
from apollo_ray.storage import join_uri
from apollo_ray.training.runlog import DIVERGED_KEY

__all__ = ["RAY_LOGS", "TrialProgress", "calm_driver", "duration", "last_error_line"]

RAY_LOGS = "/tmp/ray/session_latest/logs"  # on the head node: every worker's stdout/stderr
ERROR_FILE = "error.txt"  # Tune's, in the trial's folder
WIDTH = 100  # a trial's start line wraps at this many columns


def duration(seconds: float) -> str:
    """`45s`, `3m05s`, `1h02m`."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def last_error_line(text: str) -> str:
    """The last non-empty line of a traceback, without the exception's module path
    (`apollo_ray.training.runlog.NonFiniteLossError: ...` -> `NonFiniteLossError: ...`)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=\w+(?:Error|Exception|Interrupt)\b)", "", lines[-1])


def _number(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _rate(tokens_per_s: float | None) -> str:
    if tokens_per_s is None:
        return "- tok/s"
    for factor, unit in ((1e6, "M"), (1e3, "k")):
        if tokens_per_s >= factor:
            return f"{tokens_per_s / factor:.1f}{unit} tok/s"
    return f"{tokens_per_s:.0f} tok/s"


class _Run:
    """What the driver knows of one running trial."""

    RATES = 5  # the tokens/s shown: the mean of this many last reports

    def __init__(self, steps: int, stages: int | None, now: float) -> None:
        self.steps, self.stages, self.started = steps, stages, now
        self.row: dict[str, Any] = {}  # the newest value of each field reported
        self.first: tuple[float, int] | None = None  # (time, step) of the first step reported
        self.last: tuple[float, int] | None = None  # (time, step) of the newest one
        self.rates: deque[float] = deque(maxlen=self.RATES)

    def update(self, result: dict[str, Any], now: float) -> None:
        self.row.update({k: v for k, v in result.items() if v is not None})
        step = result.get("step")
        if isinstance(step, int):
            self.first = self.first or (now, step)
            self.last = (now, step)
        if result.get("tokens_per_s") is not None:
            self.rates.append(result["tokens_per_s"])

    def left(self, now: float) -> float | None:
        """Seconds to the last step: the steps left at the mean step time between the first
        step reported and the newest (from the trial's start while there is only one), less the
        time since the newest, so that it falls while a step runs."""
        if self.last is None or self.last[1] <= 0:
            return None
        t1, step = self.last
        t0, s0 = self.first if step > self.first[1] else (self.started, 0)
        if t1 <= t0:
            return None
        return max(0.0, (self.steps - step) * (t1 - t0) / (step - s0) - (now - t1))

    def live(self, name: str, now: float) -> str:
        r = self.row
        if "step" not in r:
            return f"{name}: starting ({duration(now - self.started)})"
        stage = r.get("stage")
        stage_text = "-" if stage is None else f"{stage + 1}"
        if stage is not None and self.stages:
            stage_text += f"/{self.stages}"
        left = self.left(now)
        return (
            f"{name}: step {r['step']}/{self.steps} stage {stage_text} "
            f"depth {r.get('n_physical', '-')} loss {_number(r.get('loss'), '.3f')} "
            f"{_rate(statistics.fmean(self.rates) if self.rates else None)} "
            + ("time left ?" if left is None else f"{duration(left)} left")
        )


class TrialProgress(Callback):
    """One line per running trial (see the module's docstring). `steps` is the trials' budget
    and `stages` their number of stages, unless a trial's config searches `train.steps` or
    `schedule.depths`; `runs` names what each confirmation trial re-runs (its config's `run`
    indexes it); `storage` is the Tune experiment's folder (where Tune writes each trial's
    `error.txt`) and `run_root` the folder of the runs' own files (`<study_dir>/trials`).
    `live`: redraw in place (default: when `stream`, default stdout, is a terminal). Tune
    pickles its callbacks with the search: nothing here holds the stream or the trials."""

    def __init__(
        self,
        steps: int,
        *,
        stages: int | None = None,
        kind: str = "trial",
        runs: list[dict[str, Any]] | None = None,
        storage: str | None = None,
        run_root: str | None = None,
        live: bool | None = None,
        stream: TextIO | None = None,
        clock=time.monotonic,
    ) -> None:
        self.steps, self.stages, self.kind, self.runs = steps, stages, kind, runs
        self.storage, self.run_root = storage, run_root
        self.want_live, self.stream, self.clock = live, stream, clock
        self._reset()

    def _reset(self) -> None:
        self.running: dict[str, _Run] = {}
        self.started: dict[str, float] = {}  # a trial's first start here (a retry starts again)
        self.errors: dict[str, str] = {}  # the last error said of each trial
        self.drawn = 0  # live lines on the screen below which the cursor stands
        self.last_draw = 0.0

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("running", "started")}
        state.pop("errors", None)
        state |= {"stream": None, "clock": time.monotonic, "drawn": 0}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    # ------------------------------------------------------------------ output

    @property
    def out(self) -> TextIO:
        return self.stream or sys.stdout

    @property
    def live(self) -> bool:
        if self.want_live is not None:
            return self.want_live
        isatty = getattr(self.out, "isatty", None)
        return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"

    def _emit(self, lines: list[str]) -> None:
        """Print `lines` for good: above the live lines on a terminal (redrawn below them)."""
        if self.live:
            self._draw(lines)
        else:
            self.out.write("".join(line + "\n" for line in lines))
            self.out.flush()

    def _draw(self, above: list[str] | None = None) -> None:
        now = self.clock()
        width = max(20, shutil.get_terminal_size().columns - 1)
        live = [r.live(self._name(t), now)[:width] for t, r in self.running.items()]
        text = f"\x1b[{self.drawn}F" if self.drawn else ""  # up to the first live line
        text += "\x1b[J" + "".join(f"{line}\n" for line in [*(above or []), *live])
        self.out.write(text)
        self.out.flush()
        self.drawn, self.last_draw = len(live), now

    def _name(self, name: str) -> str:
        return f"{self.kind} {name}"

    # ------------------------------------------------------------------ what a trial is

    def _what(self, trial) -> str:
        config = trial.config or {}
        if self.runs is not None and "run" in config:
            return ""  # its name says which trial it re-runs, with which seed
        shown = {k: v for k, v in config.items() if not INTERNAL.search(k)}
        return ", ".join(f"{k.removeprefix('schedule.')}={_short(v)}" for k, v in shown.items())

    def _steps(self, trial) -> int:
        config = trial.config or {}
        if self.runs is not None and "run" in config:
            config = self.runs[config["run"]].get("params", {})
        return int(config.get("train.steps", self.steps))

    def _stages(self, trial) -> int | None:
        config = trial.config or {}
        if self.runs is not None and "run" in config:
            config = self.runs[config["run"]].get("params", {})
        depths = config.get("schedule.depths")
        return len(depths) if isinstance(depths, list) else self.stages

    def _where(self, trial) -> str:
        """Tune's error file of the trial (in the experiment's storage) and the run's folder."""
        folder = getattr(trial, "path", None) or getattr(trial, "local_path", None) or ""
        if self.storage:  # the same folder, written as the study names its storage (URI or path)
            folder = join_uri(self.storage, Path(folder).name)
        where = f"error: {join_uri(folder, ERROR_FILE)}"
        if self.run_root:
            where += f"; run folder: {join_uri(self.run_root, trial_name(trial))}"
        return where

    def _error(self, trial) -> str:
        folder = getattr(trial, "path", None)
        for path in (getattr(trial, "error_file", None), folder and Path(folder, ERROR_FILE)):
            try:
                return last_error_line(Path(path).read_text())
            except (OSError, TypeError):
                continue
        return "see the error file"

    # ------------------------------------------------------------------ Tune's calls

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        now, key = self.clock(), trial_name(trial)
        self.running[key] = _Run(self._steps(trial), self._stages(trial), now)
        if self.live:
            self._draw()
        elif key not in self.started:  # a retry said so when it failed
            what = self._what(trial)
            line = f"{self._name(key)} started" + (f": {what}" if what else "")
            self._emit(textwrap.wrap(line, WIDTH, subsequent_indent="    ", break_on_hyphens=False))
        self.started.setdefault(key, now)

    def _took(self, name: str, word: str) -> str:
        started = self.started.get(name)
        return "" if started is None else f" {word} {duration(self.clock() - started)}"

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        key = trial_name(trial)
        run = self.running.get(key)
        if run is None:  # a result without a start: Tune resumed a running trial
            run = self.running[key] = _Run(self._steps(trial), self._stages(trial), self.clock())
        run.update(result, self.clock())
        if self.live:
            self._draw()

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        # the time left and "starting (12s)" move on between reports; at most once a second
        if self.live and self.running and self.clock() - self.last_draw >= 1.0:
            self._draw()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        key = trial_name(trial)
        run = self.running.pop(key, None)
        row = {**(getattr(trial, "last_result", None) or {}), **(run.row if run else {})}
        took, name = self._took(key, "in"), self._name(key)
        if DIVERGED_KEY in row:  # its loss went NaN/inf (the reason names its folder): not retried
            self._emit([f"{name} diverged{took}: {row[DIVERGED_KEY]}"])
            return
        if "speedup" in row:  # scored: the trial's last report
            bound = {"lower": ">= ", "upper": "<= "}.get(row.get("bound") or "", "")
            line = (
                f"{name} finished{took}: eval loss {_number(row.get('eval_loss'), '.4f')}, "
                f"speedup {bound}{_number(row.get('speedup'), '.3g')}"
            )
        else:  # stopped by the scheduler (ASHA) before its end
            steps = run.steps if run else self.steps
            line = (
                f"{name} stopped early by the scheduler at step {row.get('step', '-')}/{steps}"
                f"{took} (eval loss {_number(row.get('eval_loss'), '.4f')})"
            )
        self._emit([line])

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        """A failure that Tune retries (`resources.max_failures`): its error once, not again
        while it stays the same."""
        key = trial_name(trial)
        run = self.running.pop(key, None)
        at = f" at step {run.row['step']}" if run and "step" in run.row else ""
        error = self._error(trial)
        said = self.errors.get(key) == error
        self.errors[key] = error
        why = " again (the same error)" if said else f": {error}"
        self._emit([f"{self._name(key)} failed{at}{why}; retrying"])

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        key = trial_name(trial)
        run = self.running.pop(key, None)
        at = f" at step {run.row['step']}/{run.steps}" if run and "step" in run.row else ""
        took, name = self._took(key, "after"), self._name(key)
        self._emit([f"{name} failed{took}{at}: {self._error(trial)}", f"  {self._where(trial)}"])

    def on_experiment_end(self, trials: list, **info) -> None:
        if self.live and self.drawn:
            self.running.clear()
            self._draw()


INTERNAL = re.compile(r"\.\d+of\d+$")  # the sampler's coordinates of a searched list


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(_short, value)) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------- the driver


class _Drop(logging.Filter):
    """Drops Tune's records that the progress lines say better: a failed trial's traceback
    (its error file keeps it), the closing list of trials that did not finish, and Ctrl-C's
    notes (the study says how to go on: `--resume`, not `Tuner.restore`)."""

    PREFIXES = (
        "Trial task failed for trial",
        "Trials did not complete",
        "Stop signal received",
        "Experiment has been interrupted",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


def calm_driver(verbose: bool = False) -> dict[str, Any]:
    """Quiet the study driver's terminal (unless `verbose`) and return the `ray.init` keywords
    that go with it: Ray's loggers at WARNING, the workers' output left in Ray's log files
    (`log_to_driver=False`), Tune's trial tracebacks off (the progress lines say what failed
    and where its error file is), Optuna's and MLflow's INFO lines and the plotting warnings of
    the study's end off, and no Hugging Face progress bar when the best model is exported.
    Tune's status tables are off in any case (`search._run_config`)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the engine that verbose=0 silences
    if verbose:
        return {}
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("ray", "ray.tune", "ray.train", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    drop = _Drop()
    for name in ("ray.tune.tune", "ray.tune.execution.tune_controller"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(drop)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"optuna\.")
    for module in ("huggingface_hub.utils", "transformers.utils.logging"):
        if module in sys.modules:  # read the variable when imported: imported already
            for disable in ("disable_progress_bars", "disable_progress_bar"):
                getattr(sys.modules[module], disable, lambda: None)()
    return {"logging_level": logging.WARNING, "log_to_driver": False}
