"""Search Apollo schedules with Ray Tune + Optuna: the product's main job.

    python -m apollo_ray.tune search_spaces/small.yaml            # CPU demo, local Ray
    python -m apollo_ray.tune search_spaces/bert.yaml --address auto
    python -m apollo_ray.tune search_spaces/small.yaml --resume   # finish an interrupted study,
                                                    # or print a finished one's end again
    python -m apollo_ray.tune search_spaces/small.yaml --verbose  # Ray's logs on the terminal too
    python -m apollo_ray.tune search_spaces/small.yaml --check    # the checks below, no Ray
    python -m apollo_ray.tune search_spaces/transfer-gpt.yaml --transfer-only  # carry a
                                                    # finished search to its target size
    python -m apollo_ray.tune search_spaces/small.yaml --kill-at-step 7  # chaos: each trial
                                                    # is killed once and must resume

In order, cheapest first (`apollo_ray.launch.preflight`): the study file is validated and
searched for placeholders (YOUR-BUCKET), the machine checked against a GPU study when no
cluster is named, the output folders checked, local data read as a run reads it (its manifest,
tokenizer and every shard's header: `check_data`; `--check` stops here), the MLflow server
checked (or a local one started), storage URIs reached, the data prepared if the study asks for
it and checked against the base run, Ray joined and its resources checked; each failure is one
`error:` line. Then the scratch frontier is trained once (or reused from
`<output_dir>/baselines/`), the trials run (`apollo_ray.search.tuner`), and the end is
summarised: a table, `best.yaml` (a ready-to-use run config) and `summary.json` in
`<output_dir>/<experiment>/`, and the study's MLflow run. A study with a `transfer` section then
carries its schedules to the target size and reports whether the ranking held there
(`apollo_ray.search.transfer`: transfer.txt, best.yaml the target's).

While the trials run, the terminal shows one line per running trial (`apollo_ray.search.progress`),
redrawn in place; without a terminal (CI, a log file) one line as each trial starts and one as
it ends. Ray's own logs and the workers' output stay in Ray's log files
(/tmp/ray/session_latest/logs) unless --verbose.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
from pathlib import Path

from apollo_ray.config import ConfigError
from apollo_ray.data import DataError, check_data, prepare, resolve_source
from apollo_ray.data.shards import MANIFEST, load_manifest
from apollo_ray.launch.preflight import folder, join_ray, machine, placeholders, storage
from apollo_ray.records.mlflow_server import check_tracking, tracking_uri
from apollo_ray.storage import is_uri
from apollo_ray.study.schema import StudyConfig, load_study
from apollo_ray.training.faults import add_arguments as add_fault_arguments
from apollo_ray.training.faults import requested
from apollo_ray.training.runlog import NonFiniteLossError

__all__ = [
    "cheap_checks",
    "check_new_or_resumed",
    "check_resources",
    "check_transfer_only",
    "main",
    "prepare_data",
    "run_study",
    "where_to_look",
]

BASE_DATA = "base.data.path"  # the YAML field a study's data errors name


def cheap_checks(study: StudyConfig, address: str | None) -> None:
    """What needs no server, network or Ray: placeholders, the machine, the local data (its
    manifest, or the local files the study prepares it from)."""
    prepare_sources = study.prepare.sources if study.prepare else None
    placeholders(
        {
            "storage_path": study.storage_path,
            BASE_DATA: study.base.data.path,
            "prepare.sources": prepare_sources,
            "tracking.mlflow_uri": study.tracking.mlflow_uri,
        }
    )
    machine(study.base.resources, address, "base.resources")
    folder("output_dir", study.output_dir)
    path = study.base.data.path
    if is_uri(path):
        return
    if not _needs_preparing(study):
        check_data(study.base.data, study.base.model.kind, field=BASE_DATA)
        check_prepared_as_asked(study)
        return
    folder(BASE_DATA, path)  # where the study prepares its data
    p = study.prepare
    for spec in p.sources:
        if not spec.startswith("hub:"):  # a Hub dataset is reached when it is prepared
            resolve_source(spec, text_column=p.text_column, split=p.split, doc_sep=p.doc_sep)


def check_prepared_as_asked(study: StudyConfig) -> None:
    """Data already in base.data.path, prepared with other held-out fractions than the study's
    `prepare` asks for (data from before the test split has none): the study would select and
    report on other documents than it says."""
    if study.prepare is None:
        return
    path = study.base.data.path
    manifest = load_manifest(path)
    asked = (study.prepare.val_fraction, study.prepare.test_fraction)
    if (manifest.val_fraction, manifest.test_fraction) != asked:
        raise ConfigError(
            f"{BASE_DATA}: {path} was prepared with val_fraction {manifest.val_fraction} and "
            f"test_fraction {manifest.test_fraction}, the study's prepare asks for {asked[0]} "
            f"and {asked[1]}: remove {path} to prepare it again, or point {BASE_DATA} elsewhere"
        )


def _needs_preparing(study: StudyConfig) -> bool:
    path = study.base.data.path
    return not (study.prepare is None or is_uri(path) or (Path(path) / MANIFEST).exists())


def prepare_data(study: StudyConfig) -> bool:
    """Prepare the study's data once, if it asks for it and it is not there yet (True: it
    was prepared now)."""
    if not _needs_preparing(study):
        return False
    path = study.base.data.path
    p = study.prepare
    prepare(
        p.sources,
        Path(path),
        study.base.model.kind,
        vocab_size=p.vocab_size,
        val_fraction=p.val_fraction,
        test_fraction=p.test_fraction,
        doc_sep=p.doc_sep,
        text_column=p.text_column,
        split=p.split,
    )
    return True


def check_new_or_resumed(study: StudyConfig, resume: bool) -> None:
    """A study that already ran continues only with --resume (checked before anything starts)."""
    from ray import tune

    search = study.search_state("search")
    if tune.Tuner.can_restore(search) and not resume:
        raise ConfigError(
            f"{search} already holds this study: pass --resume to finish it (or see its "
            "results), or choose another `experiment` name"
        )


def check_resources(study: StudyConfig) -> list[dict[str, float]] | None:
    """Refuse a trial that the cluster can never hold, now or grown by its autoscaler (it
    would wait forever); the bundles of one trial that must wait for the autoscaler's nodes
    (the study asks for them, `apollo_ray.launch.scaling.requested`), or None."""
    import ray

    from apollo_ray.launch import solo
    from apollo_ray.launch.capacity import describe, fits_now, node_types, shortfall
    from apollo_ray.search.tuner import trial_resources

    res, now = study.base.resources, ray.cluster_resources()
    per_worker = res.per_worker
    # the trial's driver, beside its TorchTrainer's workers
    driver = 0.0 if solo.applies(study.base) else trial_resources(study)["CPU"]
    types = node_types()
    problem = shortfall(per_worker, res.workers, now, types, driver, res.placement == "STRICT_PACK")
    if problem:
        more = "add nodes" if types is None else "add a node type or raise its max_workers"
        raise ConfigError(
            f"base.resources: {problem}; lower base.resources.workers or its per-worker "
            f"resources (or {more})"
        )
    if types is None or fits_now(per_worker, res.workers, now, driver):
        return None
    print(
        f"asked the autoscaler for nodes for the first trial ({res.workers} x "
        f"{describe(per_worker)}); it starts when they are up",
        file=sys.stderr,
    )
    return [{k: v for k, v in per_worker.items() if v}] * res.workers


def run_study(
    study: StudyConfig,
    yaml_path: str,
    address: str | None,
    resume: bool,
    verbose: bool = False,
    faults: dict[str, int] | None = None,
    transfer_only: bool = False,
) -> None:
    """Everything after the cheap checks: tracking, storage, data, Ray, the baseline, the
    search, the end, the transfer (only the last with `transfer_only`, on the finished search's
    summary). Unless `verbose`, Ray's logs and the workers' output stay in Ray's log files and
    the trials show as live lines (`apollo_ray.search.progress`). `faults` kills each search
    trial's training once (`apollo_ray.training.faults`, chaos testing)."""
    from apollo_ray.launch.scaling import requested
    from apollo_ray.records.results import log_study_results
    from apollo_ray.records.tracking import study_run
    from apollo_ray.search.baseline import ensure_frontier
    from apollo_ray.search.progress import calm_driver
    from apollo_ray.search.summary import confirmation, searched, summarize, trial_rows
    from apollo_ray.search.transfer import run_transfer
    from apollo_ray.search.tuner import confirm_runs, run_confirm, run_search

    quiet = calm_driver(verbose)
    live = False if verbose else None  # the workers' output would run through live lines
    with tracking_uri(study.tracking.mlflow_uri, study.output_dir) as uri:
        check_tracking(uri, "tracking.mlflow_uri" if study.tracking.mlflow_uri else None)
        storage("storage_path", study.storage_path)
        storage(BASE_DATA, study.base.data.path)
        if not transfer_only:
            check_new_or_resumed(study, resume)
        if prepare_data(study) or is_uri(study.base.data.path):  # local data: checked already
            check_data(study.base.data, study.base.model.kind, field=BASE_DATA)
        if study.transfer is not None:  # the target's data, prepared as the proxy's if need be
            target = study.target()
            prepare_data(target)
            check_data(target.base.data, target.base.model.kind, field="transfer.base.data.path")
        join_ray(address, **quiet)
        bundles = check_resources(study)
        # the request ends with the study, or with its driver, killed (a watchdog on the head)
        with (
            requested(bundles) if bundles else contextlib.nullcontext(),
            study_run(study, yaml_path, uri, resume or transfer_only) as record,
        ):
            summary = searched(study) if transfer_only else None
            if summary is None:
                scratch = ensure_frontier(study, record)
                rows = trial_rows(study, run_search(study, scratch, record, faults, live))
                confirmed = None
                done = [r for r in rows if r["status"] == "ok"]
                if study.search.confirm is not None and done:
                    runs = confirm_runs(study, done[: study.search.confirm.top_k])
                    grid = run_confirm(study, scratch, runs, record, live=live)
                    confirmed = confirmation(study, runs, grid)
                print()
                summary = summarize(study, rows, scratch, confirmed)  # prints the table
                log_study_results(record, study, summary, scratch)
            if study.transfer is not None and summary["best"]:
                best = summary["best"][0]["trial"]
                run_transfer(study, summary["trials"], summary["confirmed"], best, record, live)
    print("\n" + where_to_look(study))


def check_transfer_only(study: StudyConfig, path: str) -> None:
    """--transfer-only needs a `transfer` section and this study's finished search."""
    from apollo_ray.search.summary import searched

    if study.transfer is None:
        raise ConfigError(f"{path}: --transfer-only needs a `transfer` section in the study")
    if searched(study) is None:
        raise ConfigError(
            f"{study.study_dir} holds no finished search of this study (its summary.json is "
            f"missing, or the study's search has changed since): run python -m apollo_ray.tune "
            f"{path} first (it carries the schedules too)"
        )


def where_to_look(study: StudyConfig) -> str:
    """The lines that close a study's output: its files, its MLflow records, the logs."""
    from apollo_ray.search.progress import RAY_LOGS

    out = Path(study.study_dir)
    configured = study.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        mlflow = f"MLflow: {configured} (experiment {study.experiment})"
    else:
        make = (
            "; or make ui" if Path(study.output_dir).resolve() == Path("outputs").resolve() else ""
        )
        mlflow = f"MLflow UI: python -m apollo_ray.ui --output-dir {study.output_dir}{make}"
    return "\n".join(
        [
            f"summary: {out / 'summary.txt'} (also summary.json; best.yaml: the best schedule)"
            if study.transfer is None
            else f"summary: {out / 'summary.txt'} and {out / 'transfer.txt'} (best.yaml: the "
            "schedule that won at the target; best-proxy.yaml: the search's best)",
            mlflow,
            f"trials: {out / 'trials'}/<trial> (metrics.jsonl); Tune: {out / 'tune'}",
            f"Ray's logs: {RAY_LOGS}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apollo_ray.tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study", help="study YAML (see search_spaces/)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted study without redoing finished trials (starts it if new); "
        "a finished one prints its end again",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: RAY_ADDRESS, else a new local Ray)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's logs and the workers' output too (otherwise only in Ray's log files)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check the study, as it starts: the file, its folders and its local data "
        "(every file a run reads), without Ray, MLflow or the network; exit 0 if all pass",
    )
    parser.add_argument(
        "--transfer-only",
        action="store_true",
        help="run only the study's transfer (its `transfer` section) on its finished search: "
        "carry the schedules to the target size and compare the rankings",
    )
    add_fault_arguments(
        parser, "each trial must resume from its last checkpoint", "each trial's (last) worker"
    )
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study)
        if args.check:
            cheap_checks(study, args.address)
            print(f"{args.study}: the study, its folders and its local data pass the checks")
            return 0
        if args.transfer_only:
            check_transfer_only(study, args.study)
        elif args.resume:  # a finished study answers at once, without Ray or MLflow
            from apollo_ray.search.summary import finished

            if (text := finished(study)) is not None:
                print(text + "\n" + where_to_look(study))
                return 0
        cheap_checks(study, args.address)
        faults = requested(args) or None
        run_study(
            study, args.study, args.address, args.resume, args.verbose, faults, args.transfer_only
        )
    except (ConfigError, DataError, NonFiniteLossError) as e:  # the last: a diverged baseline
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what finished is kept (checkpoints, Tune's state, MLflow)
        print(
            f"\ninterrupted: finish the study with python -m apollo_ray.tune {args.study} --resume",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    status = main()
    # exit at once, without the final collection over every object of torch, Ray and MLflow
    # (seconds on a small machine); atexit handlers (Ray's shutdown among them) still run
    gc.freeze()
    sys.exit(status)
