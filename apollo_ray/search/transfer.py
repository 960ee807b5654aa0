"""Search small, train big: a finished search's schedules carried from its proxy model to the
target size (`transfer` in the study file), and whether the proxy's ranking holds there.

    python -m apollo_ray.tune STUDY.yaml                   # the search, confirm, then this
    python -m apollo_ray.tune STUDY.yaml --transfer-only   # this, on a finished search

The proxy's finished trials are carried `carry` at a time, the best, the worst and evenly
between (`carried`), with the released recipe (base.schedule) as a fixed reference. Each is
scaled to the target (`apollo_ray.study.scaling`: stage ends as fractions of the steps, depths as
fractions of the layers), runs at the LR and schedule family the target's own tuned scratch
chose for the full budget (or its own, `lr: carried`) and is read against the target's tuned
scratch frontier, like a confirmation run. The proxy side is what the search and its
confirmation measured (the release, which the search did not train, is trained at the proxy
here). The report (`compare`): per schedule the proxy and target speedups on the test split,
each a geometric mean over its seeds with a 95% interval; Spearman's rank correlation between
the two, with a bootstrap interval over schedules and seeds; whether the proxy's best (the
search's) is the target's best (on the target's validation split). Written to
`<study_dir>/transfer.json` and `transfer.txt`, best.yaml (the target's run of the schedule that
won there; the proxy's is best-proxy.yaml), and MLflow (the study's `transfer` run).
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any

from apollo_ray.config import ConfigError
from apollo_ray.records.results import log_transfer
from apollo_ray.records.tracking import KIND, STUDY, StudyRecord, group_run, save_session
from apollo_ray.search.baseline import ensure_frontier
from apollo_ray.search.summary import (
    WIDTH,
    confirmation,
    read_baseline,
    text_table,
    transfer_fingerprint,
    write_best_yaml,
)
from apollo_ray.search.tuner import run_confirm
from apollo_ray.study.scaling import scale_schedule
from apollo_ray.study.schema import StudyConfig
from apollo_ray.training.runlog import last_eval
from apollo_ray.yardstick.regime import regime
from apollo_ray.yardstick.stats import bootstrap_spearman, log_interval

__all__ = [
    "RELEASE",
    "carried",
    "compare",
    "format_transfer",
    "run_transfer",
    "target_params",
]

RELEASE = "release"  # the carried name of base.schedule, the released recipe
FINGERPRINT = "transfer-fingerprint"  # in the target's folder: the transfer its runs belong to


def carried(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """`n` of the finished `rows` (best first): the best, the worst and evenly between."""
    done = [r for r in rows if r["status"] == "ok"]
    if len(done) <= n:
        return done
    picks = sorted({round(i * (len(done) - 1) / (n - 1)) for i in range(n)})
    return [done[i] for i in picks]


def target_params(
    study: StudyConfig,
    target: StudyConfig,
    params: dict[str, Any],
    scratch_choice: dict[str, Any],
) -> dict[str, Any]:
    """A proxy trial's `params` as the `target`'s (`study.target()`): its whole schedule
    (base.schedule with the trial's values) scaled to the target's layers, each field written
    `schedule.<field>`; with `lr: scratch` the LR and family the target's scratch chose
    (`scratch_choice`), else the trial's own; any other searched value as is."""
    assert study.transfer is not None and study.base.schedule is not None
    ours = {k: v for k, v in params.items() if k.startswith("schedule.")}
    schedule = study.base.schedule.model_dump(mode="json")
    schedule |= {k.removeprefix("schedule."): v for k, v in ours.items()}
    scaled = scale_schedule(schedule, study.base.model.n_layer, target.base.model.n_layer)
    out = {k: v for k, v in params.items() if k not in ours}
    out |= {f"schedule.{k}": v for k, v in scaled.items()}
    if study.transfer.lr == "scratch":
        out |= {"train.lr": scratch_choice["lr"], "train.decay": scratch_choice["family"]}
    return out


def run_transfer(
    study: StudyConfig,
    rows: list[dict[str, Any]],
    confirmed: list[dict[str, Any]] | None,
    best: str,
    record: StudyRecord | None,
    live: bool | None = None,
) -> dict[str, Any]:
    """Carry the finished search's schedules (`rows`, best first; `confirmed`; `best`, the
    search's best trial) to the target, train them and the target's frontier, and report
    (`compare`); returns the report."""
    assert study.transfer is not None
    t, target = study.transfer, study.target()
    _claim(study, target)
    picked = carried(rows, t.carry)
    if not picked:
        raise ConfigError("transfer: no trial of the search finished; nothing to carry")
    tags = {KIND: "transfer", STUDY: study.experiment}
    params = {"carry": [r["trial"] for r in picked], "target": target.experiment}
    with group_run(record, "transfer", tags, params) as group:
        if group is not None:
            save_session(target, group)
        proxy = {r["trial"]: proxy_side(r, confirmed) for r in picked}
        entries = [{"schedule": r["trial"], "params": r["params"]} for r in picked]
        if t.release:
            entries.append({"schedule": RELEASE, "params": {}})
            runs = [
                {"trial": RELEASE, "params": {}, "seed": s} for s in study.fresh_seeds(t.best_seeds)
            ]
            grid = run_confirm(study, ensure_frontier(study), runs, group, live, "reference")
            proxy |= sides(study, runs, grid)
        target_scratch = ensure_frontier(target, group)
        choice = _chosen(target)
        runs = []
        for e in entries:
            e["target_params"] = target_params(study, target, e["params"], choice)
            n = t.best_seeds if e["schedule"] in (best, RELEASE) else t.seeds
            runs += [
                {"trial": e["schedule"], "params": e["target_params"], "seed": s}
                for s in target.fresh_seeds(n)
            ]
        grid = run_confirm(target, target_scratch, runs, group, live, "target")
        measured = sides(target, runs, grid)
        for e in entries:
            e["proxy"], e["target"] = proxy[e["schedule"]], measured[e["schedule"]]
        report = compare(entries, best)
        full = last_eval(target_scratch.full)
        reg = regime(target.base, full.get("test_loss", full.get("eval_loss")))
        report |= {
            "fingerprint": transfer_fingerprint(study),
            "proxy": study.experiment,
            "target": target.experiment,
            "target_choice": choice,
            "regime": reg.as_dict() | {"described": reg.describe()},
        }
        text = format_transfer(report)
        write(study, target, report, text)
        print("\n" + text)
        if group is not None:
            log_transfer(group, report, Path(study.study_dir))
    return report


def _claim(study: StudyConfig, target: StudyConfig) -> None:
    """The target's folder holds the runs of one transfer: another one (its section changed)
    would resume them as if they were its own."""
    path = Path(target.study_dir) / FINGERPRINT
    mine = transfer_fingerprint(study)
    if path.exists() and path.read_text().strip() != mine:
        raise ConfigError(
            f"transfer: {target.study_dir} holds the runs of another transfer of this study (its "
            "transfer section, or the search, has changed since): remove that folder to carry "
            "this one, or give the study another experiment name"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(mine + "\n")


def _chosen(target: StudyConfig) -> dict[str, Any]:
    """The LR and family the target's scratch uses at the full budget: tuned, or base's."""
    baseline = read_baseline(target)
    if baseline is not None:
        return baseline["chosen"]["1"]
    return {"family": target.base.train.decay, "lr": target.base.train.lr}


def proxy_side(row: dict[str, Any], confirmed: list[dict[str, Any]] | None) -> dict[str, Any]:
    """What the proxy measured of a trial: its confirmation's fresh seeds when it was confirmed,
    else its one search run (the base seed)."""
    entry = next((e for e in confirmed or [] if e["trial"] == row["trial"] and e["seeds"]), None)
    if entry is not None:
        return {k: entry.get(k, []) for k in SIDE}
    return {
        "seeds": [None],
        "speedups": [row["speedup"]],
        "test_speedups": [row.get("test_speedup")],
    }


SIDE = ("seeds", "speedups", "test_speedups", "failed_seeds")  # what one side measured


def sides(study: StudyConfig, runs: list[dict[str, Any]], grid) -> dict[str, dict[str, Any]]:
    """Each schedule's runs of a Tune grid of re-runs `runs`, over its seeds: the speedups on
    validation and test and the seeds that failed (grouped as `summary.confirmation` groups a
    confirmation's)."""
    return {e["trial"]: {k: e.get(k, []) for k in SIDE} for e in confirmation(study, runs, grid)}


def compare(entries: list[dict[str, Any]], best: str) -> dict[str, Any]:
    """The report of carried `entries` (each with its `proxy` and `target` sides: seeds,
    validation `speedups`, `test_speedups`): per entry each side's geometric mean on the test
    split (validation when a side has no test reading) with its 95% interval; Spearman's rho
    between the two sides with a bootstrap interval over schedules and seeds; the target's best
    by its validation mean, and whether it is the proxy's `best`."""
    split = "test" if all(_readings(e[s], "test") for e in entries for s in SIDES) else "validation"
    scored = [e for e in entries if all(_readings(e[s], split) for s in SIDES)]
    for e in entries:
        for s in SIDES:
            values = _readings(e[s], split)
            e[s]["interval"] = asdict(log_interval(values)) if values else None
    rho = low = high = math.nan
    if len(scored) >= 3:
        rho, low, high = bootstrap_spearman(
            [_readings(e["proxy"], split) for e in scored],
            [_readings(e["target"], split) for e in scored],
        )
    chosen = [e for e in entries if _readings(e["target"], "validation")]
    winner = max(chosen, key=lambda e: log_interval(e["target"]["speedups"]).mean, default=None)
    return {
        "split": split,
        "schedules": entries,
        "spearman": {"rho": rho, "low": low, "high": high, "n": len(scored)},
        "proxy_best": best,
        "target_best": winner["schedule"] if winner else None,
        "same_best": winner is not None and winner["schedule"] == best,
        "verdict": verdict(rho, low, high, len(scored)),
    }


SIDES = ("proxy", "target")


def _readings(side: dict[str, Any], split: str) -> list[float]:
    values = side["test_speedups" if split == "test" else "speedups"]
    return values if values and all(v is not None and v > 0 for v in values) else []


def verdict(rho: float, low: float, high: float, n: int) -> str:
    """The correlation said plainly: whether the proxy's ranking held at the target."""
    if n < 3 or math.isnan(rho):
        return f"no ranking to compare ({n} schedules measured on both sides; 3 at least)"
    ci = f"Spearman rho {rho:+.2f}, 95% bootstrap interval [{low:+.2f}, {high:+.2f}], {n} schedules"
    if low > 0:
        return f"the proxy's ranking held at the target: {ci}"
    if high < 0:
        return f"the proxy's ranking reversed at the target: {ci}"
    return f"no evidence that the proxy's ranking holds at the target (the interval holds 0): {ci}"


def format_transfer(report: dict[str, Any]) -> str:
    """The report as printed: the verdict, the best of each side, the regime, the table."""
    split = report["split"]
    header = [
        "schedule",
        f"proxy speedup ({split})",
        f"target speedup ({split})",
        "depths at the target",
        "stage ends",
    ]
    lines = []
    for e in report["schedules"]:
        lines.append(
            [
                e["schedule"] + (" *" if e["schedule"] == report["proxy_best"] else ""),
                _cell(e["proxy"]),
                _cell(e["target"]),
                str(e["target_params"]["schedule.depths"]),
                ", ".join(f"{x:.3g}" for x in e["target_params"]["schedule.stage_ends"]),
            ]
        )
    same = "is" if report["same_best"] else "is not"
    regime = report.get("regime")
    said = [
        f"transfer {report.get('proxy', '')} -> {report.get('target', '')}: {report['verdict']}.",
        f"The proxy's best ({report['proxy_best']}, marked *) {same} the target's best "
        f"({report['target_best']}, by the target's validation mean).",
    ]
    if regime:
        said.append(f"Target regime: {regime['described']}.")
    text = "\n".join(textwrap.fill(s, WIDTH) for s in said)
    return text + "\n\n" + text_table(header, lines)


def _cell(side: dict[str, Any]) -> str:
    ci = side.get("interval")
    if ci is None:
        return "failed" if side.get("failed_seeds") else "-"
    spread = "" if ci["low"] is None else f" [{ci['low']:.3g}, {ci['high']:.3g}]"
    return f"{ci['mean']:.3g}{spread} ({ci['n']} seed{'s' if ci['n'] > 1 else ''})"


def write(study: StudyConfig, target: StudyConfig, report: dict[str, Any], text: str) -> None:
    """transfer.json and transfer.txt in the study's folder, and best.yaml: the target's run of
    the schedule that won there (the proxy's best.yaml kept as best-proxy.yaml)."""
    out = Path(study.study_dir)
    (out / "transfer.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "transfer.txt").write_text(text + "\n")
    if (out / "best.yaml").exists() and not (out / "best-proxy.yaml").exists():
        (out / "best.yaml").rename(out / "best-proxy.yaml")
    winner = next((e for e in report["schedules"] if e["schedule"] == report["target_best"]), None)
    if winner is not None:
        key = "test_speedup" if report["split"] == "test" else "speedup"
        reading = {key: winner["target"]["interval"]}
        row = {"trial": winner["schedule"], "params": winner["target_params"]}
        write_best_yaml(target, row, out / "best.yaml", reading)
