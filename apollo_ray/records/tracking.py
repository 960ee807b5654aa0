"""MLflow records of a study, from the drivers: the lifecycle of the study's runs.

One MLflow experiment per study. The study is a parent run (the study YAML, Optuna's plots, the
summary table, the best trial's metrics); each trial and the scratch baseline are child runs
(tag `mlflow.parentRunId`) with the trial's whole config as params, per-step metrics, the
stage-wise checkpoints, a loss-vs-FLOPs plot against the baseline and a depth histogram per stage.

Who writes what (Ray's three tiers):
- the study driver (`apollo_ray.tune`) creates the experiment and the parent run (`study_run`)
  and, at the end, closes whatever a stopped trial left open (`trial_runs_callback`,
  `close_leftovers`);
- each trial driver opens its child run (`tracked_run`), passes its `Target` to the workers,
  and after training uploads what is missing, logs the scores and plots
  (`apollo_ray.records.results`) and ends the run, whatever happens;
- rank 0 of the Ray Train workers keeps the run up to date while training
  (`apollo_ray.records.mirror.RunMirror`).

A single run (`python -m apollo_ray.train`) gets the same record as a trial, in an experiment of
its own (`single_run`), without a parent.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Param, RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from apollo_ray.config import RunConfig
from apollo_ray.records.mirror import RunMirror, Target, quick_failure, sync
from apollo_ray.storage import join_uri
from apollo_ray.study.fields import flatten
from apollo_ray.study.schema import StudyConfig
from apollo_ray.training.checkpoints import StorageStore, Store
from apollo_ray.training.runlog import DIVERGED

__all__ = [
    "CONFIRM_OF",
    "KIND",
    "STUDY",
    "TRIAL",
    "StudyRecord",
    "close_leftovers",
    "end_status",
    "find_run",
    "group_run",
    "log_params",
    "save_session",
    "single_run",
    "start_run",
    "study_run",
    "tracked_run",
    "trial_name",
    "trial_runs_callback",
]

# tags: kind is study, baseline, frontier, trial, confirm or run (`python -m apollo_ray.train`)
KIND, TRIAL, STUDY = "apollo.kind", "apollo.trial_id", "apollo.study"
CONFIRM_OF = "apollo.confirm_of"  # tag of a confirmation run: the trial it re-runs
RUN_DIR = "apollo.run_dir"  # tag of a single run: its folder (a resumed run continues its run)
END = "apollo.end"  # tag: why a run ended the way it did
SESSION = "mlflow-session.json"  # in the study folder: where the study logs now


@dataclass(frozen=True)
class StudyRecord:
    """Where a study is recorded: the tracking URI, its experiment and its parent run."""

    uri: str
    experiment_id: str
    parent_id: str

    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)


def find_run(client: MlflowClient, experiment_id: str, **tags: str):
    """The newest run of the experiment carrying all `tags`, or None."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], query, max_results=1, order_by=["start_time DESC"])
    return runs[0] if runs else None


def start_run(
    client: MlflowClient,
    experiment_id: str,
    name: str,
    tags: dict[str, str],
    parent_id: str | None = None,
    fresh: bool = False,
) -> str:
    """The id of a RUNNING run with these tags: an existing one (a resumed study or retried trial
    continues its run) unless `fresh`, or a new one, nested under `parent_id`."""
    found = None if fresh else find_run(client, experiment_id, **tags)
    if found is not None:
        client.update_run(found.info.run_id, status="RUNNING")
        if parent_id:  # a resumed study may have a new parent run: the child moves under it
            client.set_tag(found.info.run_id, MLFLOW_PARENT_RUN_ID, parent_id)
        return found.info.run_id
    all_tags = {**tags, MLFLOW_RUN_NAME: name}
    if parent_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_id
    return client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id


def log_params(
    client: MlflowClient, run_id: str, params: dict[str, Any], searched: dict[str, Any]
) -> None:
    """The run's flattened config as params, and what the search chose again as `searched.<key>`
    (so the UI's columns and parallel-coordinates view can single them out). Params already
    logged are skipped (MLflow refuses to change a param)."""
    have = client.get_run(run_id).data.params
    items = {**params, **{f"searched.{k}": v for k, v in searched.items()}}
    new = [Param(k, _param_str(v)) for k, v in items.items() if k not in have]
    for i in range(0, len(new), 100):  # MLflow's log_batch limit
        client.log_batch(run_id, params=new[i : i + 100])


def _param_str(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return "null" if value is None else str(value)


def close_leftovers(client: MlflowClient, experiment_id: str, parent_id: str) -> list[str]:
    """End every child of `parent_id` still RUNNING (a trial stopped by ASHA or killed with its
    driver) as KILLED; returns their ids."""
    query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}' and attributes.status = 'RUNNING'"
    left = client.search_runs([experiment_id], query, max_results=10_000)
    for run in left:
        client.set_tag(run.info.run_id, END, "stopped before it finished")
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    return [r.info.run_id for r in left]


def end_status(error: BaseException | None) -> str:
    """The MLflow status for a run that ended with `error` (None: it finished)."""
    if error is None:
        return "FINISHED"
    if isinstance(error, KeyboardInterrupt | SystemExit):
        return "KILLED"
    return "FAILED"


def reason(error: BaseException) -> str:
    """The last line of an error's message: why a run ended (tag `apollo.end`)."""
    text = str(error).strip()
    return (text.splitlines()[-1] if text else type(error).__name__)[:500]


@contextmanager
def tracked_run(
    study: StudyConfig,
    record: StudyRecord | None,
    cfg: RunConfig,
    kind: str,
    searched: dict[str, Any],
    trial_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    storage: str | None = None,
) -> Iterator[Target | None]:
    """The MLflow child run of a trial or the baseline, RUNNING while the block runs and then
    FINISHED, FAILED (with the reason as tag `apollo.end`) or KILLED, whatever happens. On the
    way out, what rank 0 could not upload is sent: rows (all of them if the run finished or
    diverged, else those its newest checkpoint covers: a retry redoes the rest) and the wanted
    checkpoints found in `storage`, the run's checkpoint folder (one saved just before its
    worker died included)."""
    if record is None:
        yield None
        return
    client = record.client()
    tags = {KIND: kind, STUDY: study.experiment}
    if trial_id is not None:
        tags[TRIAL] = trial_id
    run_id = start_run(client, record.experiment_id, cfg.name, tags, record.parent_id)
    for key, value in (extra_tags or {}).items():
        client.set_tag(run_id, key, value)
    log_params(client, run_id, flatten(cfg), searched)
    target = Target(record.uri, run_id, study.tracking.checkpoints)
    store = StorageStore(storage, cfg.train.keep_checkpoints) if storage else None
    with _until_ended(client, target, cfg, store):
        yield target


@contextmanager
def single_run(
    uri: str, experiment: str, cfg: RunConfig, checkpoints: str, store: Store
) -> Iterator[Target]:
    """The MLflow run of one `python -m apollo_ray.train` run, in `experiment`: the same params,
    rows and checkpoints (those in `store` included) as a trial's, ended like one; a resumed
    run (the same folder) continues its MLflow run."""
    client = MlflowClient(uri)
    exp_id = _experiment(client, experiment)
    tags = {KIND: "run", RUN_DIR: str(cfg.output_dir)}
    run_id = start_run(client, exp_id, cfg.name, tags)
    log_params(client, run_id, flatten(cfg), {})
    target = Target(uri, run_id, checkpoints)
    with _until_ended(client, target, cfg, store):
        yield target


@contextmanager
def _until_ended(
    client: MlflowClient, target: Target, cfg: RunConfig, store: Store | None
) -> Iterator[None]:
    """End the run FINISHED, FAILED or KILLED, whatever happens in the block, first sending
    what rank 0 could not: rows (all of them if the run finished or diverged, else those its
    newest checkpoint covers: a retry redoes the rest) and the wanted checkpoints found in
    `store` (one saved just before its worker died included)."""
    error: BaseException | None = None
    try:
        yield
    except BaseException as e:
        error = e
        raise
    finally:
        try:
            mirror = RunMirror(target, cfg.output_dir, cfg.train.steps, patient=True)
            mirror.settle(error is None or (cfg.output_dir / DIVERGED).exists(), store)
            mirror.flush()
        except Exception as e:
            print(f"mlflow: run {target.run_id} not synced: {e}", file=sys.stderr)
        _end(client, target.run_id, error)


@contextmanager
def group_run(
    record: StudyRecord | None, name: str, tags: dict[str, str], params: dict[str, Any]
) -> Iterator[StudyRecord | None]:
    """A child run of the study that holds runs of its own (the baseline, whose children are
    the frontier's scratch runs): yields the record they nest under, and ends it like a trial's
    run, whatever happens."""
    if record is None:
        yield None
        return
    client = record.client()
    run_id = start_run(client, record.experiment_id, name, tags, record.parent_id)
    log_params(client, run_id, params, {})
    error: BaseException | None = None
    try:
        yield replace(record, parent_id=run_id)
    except BaseException as e:
        error = e
        raise
    finally:
        _end(client, run_id, error)


def _end(client: MlflowClient, run_id: str, error: BaseException | None) -> None:
    try:
        if error is not None:
            client.set_tag(run_id, END, reason(error))
        client.set_terminated(run_id, end_status(error))
    except Exception as e:  # MLflow gone: the study's end closes it (close_leftovers)
        print(f"mlflow: could not end run {run_id}: {e}", file=sys.stderr)


def _experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created (or restored) if need be."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        exp_id = client.create_experiment(name)
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp_id)
    # MLflow 3 UIs before 3.17 read the experiment's kind from this tag (3.17's view: ui_app.py)
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")
    return exp_id


@contextmanager
def study_run(study: StudyConfig, yaml_path: str, uri: str, resume: bool) -> Iterator[StudyRecord]:
    """The study's MLflow experiment and parent run (a resumed study continues its own), ended
    FINISHED, FAILED or KILLED (Ctrl-C) whatever happens, with every child still RUNNING closed."""
    client = MlflowClient(uri)
    exp_id = _experiment(client, study.experiment)
    tags = {KIND: "study", STUDY: study.experiment}
    found = find_run(client, exp_id, **tags) if resume else None
    if found is not None:
        parent = found.info.run_id
        client.update_run(parent, status="RUNNING")
    else:
        parent = start_run(client, exp_id, study.experiment, tags, fresh=True)
        client.log_artifact(parent, yaml_path, "study")
        log_params(client, parent, _study_params(study), {})
    record = StudyRecord(uri, exp_id, parent)
    save_session(study, record)
    error: BaseException | None = None
    try:
        yield record
    except BaseException as e:
        error = e
        raise
    finally:
        try:
            closed = close_leftovers(client, exp_id, parent)
            if closed:
                print(f"mlflow: closed {len(closed)} run(s) left RUNNING", file=sys.stderr)
            if error is not None:
                client.set_tag(parent, END, reason(error))
            elif END in client.get_run(parent).data.tags:  # why an earlier start stopped
                client.delete_tag(parent, END)
            client.set_terminated(parent, end_status(error))
        except Exception as e:  # MLflow unreachable: say so, keep the study's own error
            print(f"mlflow: could not close the study's runs at {uri}: {e}", file=sys.stderr)


def _study_params(study: StudyConfig) -> dict[str, Any]:
    s = study.search
    return {
        "objective": s.objective,
        "trials": s.trials,
        "max_concurrent_trials": s.max_concurrent_trials,
        "sampler": s.sampler.kind,
        "sampler.seed": s.sampler.seed,
        "scheduler": "asha" if s.scheduler else "none",
        "space": ",".join(s.space),
        "checkpoints": study.tracking.checkpoints,
    }


def save_session(study: StudyConfig, record: StudyRecord) -> None:
    """Where the study logs now, for `trial_runs_callback`: written each time the study starts,
    since a resumed study runs the callbacks pickled when it began and its local MLflow server
    listens on a new port."""
    session = Path(study.study_dir) / SESSION
    session.parent.mkdir(parents=True, exist_ok=True)
    session.write_text(json.dumps(asdict(record)))


def trial_name(trial) -> str:
    """What a Tune trial is called in the study (its MLflow tag, its folder): the name its
    trainable reads (`get_trial_name()`), which the study gives it (`apollo_ray.search.tuner`)."""
    return str(trial)


def trial_runs_callback(study: StudyConfig):
    """A Tune callback in the study driver that ends the MLflow run of a trial that ended
    without ending it itself: stopped by ASHA (KILLED) or killed with its driver (FAILED).
    It reads where the study logs now from the study folder (`save_session`)."""
    from ray import tune

    session = Path(study.study_dir) / SESSION

    class TrialRunsCallback(tune.Callback):
        def __init__(self, session: Path, storage: str, keep: int) -> None:
            self.session, self.storage, self.keep = session, storage, keep

        def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
            self._close(trial, "KILLED", "stopped early by the scheduler")

        def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
            self._close(trial, "FAILED", "the trial's driver failed")

        def _close(self, trial, status: str, why: str) -> None:
            # Tune does not catch a callback's exception: MLflow being down must not end the
            # study (its end closes what is left), nor block Tune's loop in HTTP retries
            try:
                with quick_failure(patient=False):
                    self._close_run(trial, status, why)
            except Exception as e:
                print(f"mlflow: trial {trial_name(trial)} not closed: {e}", file=sys.stderr)

        def _close_run(self, trial, status: str, why: str) -> None:
            record = StudyRecord(**json.loads(self.session.read_text()))
            client = record.client()
            name = trial_name(trial)
            run = find_run(client, record.experiment_id, **{TRIAL: name})
            if run is None or run.info.status != "RUNNING":
                return
            # the trial is over (stopped, or failed after its retries: a resumed study does not
            # retry errored trials), so every row is final
            store = StorageStore(join_uri(self.storage, name), self.keep)
            run_dir = self.session.parent / "trials" / name
            sync(run_dir, record.uri, ended=True, store=store)
            client.set_tag(run.info.run_id, END, why)
            client.set_terminated(run.info.run_id, status)

    storage = study.storage(study.experiment, "trials")
    return TrialRunsCallback(session, storage, study.base.train.keep_checkpoints)
