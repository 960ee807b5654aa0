"""The end of a search: the answer in one sentence (what the confirmed best schedule saved
against scratch, with its interval and regime), the trials table, the best trial (or the Pareto
front), `best.yaml`, `summary.json` and `summary.txt` in `<output_dir>/<experiment>/`; and the
one text-table helper that `apollo_ray.report` uses too."""

from __future__ import annotations

import hashlib
import json
import math
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from apollo_ray.study.schema import StudyConfig
from apollo_ray.study.space import materialize
from apollo_ray.training.runlog import DIVERGED_KEY, last_eval
from apollo_ray.yardstick.frontier import rank_key
from apollo_ray.yardstick.regime import Regime, regime
from apollo_ray.yardstick.scratch import Scratch
from apollo_ray.yardstick.stats import Interval, log_interval, paired_log_interval

__all__ = [
    "WIDTH",
    "answer",
    "confirmation",
    "confirmed_note",
    "fingerprint",
    "finished",
    "format_confirmed",
    "format_table",
    "noise_note",
    "pareto_front",
    "ranking",
    "read_baseline",
    "searched",
    "summarize",
    "text_table",
    "transfer_fingerprint",
    "transferred",
    "trial_rows",
    "tuning_note",
    "write_best_yaml",
]


def trial_rows(study: StudyConfig, grid) -> list[dict[str, Any]]:
    """One row per trial of Tune's `grid`: status, searched params and scores; finished trials
    first, best first (`ranking`)."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        status = "ok" if "speedup" in m else "stopped early" if m else "no result"
        if DIVERGED_KEY in m:
            status = f"diverged: {m[DIVERGED_KEY][:120]}"
        if result.error is not None:
            status = f"failed: {str(result.error).strip().splitlines()[-1][:120]}"
        params = {k: v for k, v in (result.config or {}).items() if k in study.search.space}
        rows.append(
            {
                "trial": Path(result.path).name,  # the trial's name (`tuner._names`)
                "status": status,
                "params": params,
                **{k: m.get(k) for k in ROW_FIELDS},
            }
        )
    done = sorted((r for r in rows if r["status"] == "ok"), key=ranking(study.search.objective))
    return done + [r for r in rows if r["status"] != "ok"]


def confirmation(study: StudyConfig, runs: list[dict[str, Any]], grid) -> list[dict[str, Any]]:
    """The confirmed ranking: per re-run trial, its speedups and final losses over the fresh
    seeds, the geometric-mean speedup with its 95% interval (`stats.log_interval`), best first
    (by mean speedup on validation, or mean final loss for objective eval_loss); with a test
    split, `test_speedup`, the same read on test: the number a person reads."""
    by_trial: dict[str, dict[str, Any]] = {}
    for run in runs:
        entry = by_trial.setdefault(run["trial"], {"trial": run["trial"], "params": run["params"]})
        entry.setdefault("seeds", [])
    for result in grid:
        m, run = result.metrics or {}, runs[(result.config or {})["run"]]
        entry = by_trial[run["trial"]]
        if result.error is None and "speedup" in m:
            entry["seeds"].append(run["seed"])
            entry.setdefault("speedups", []).append(m["speedup"])
            entry.setdefault("eval_losses", []).append(m["eval_loss"])
            entry.setdefault("bounds", []).append(m.get("bound"))
            entry.setdefault("test_speedups", []).append(m.get("test_speedup"))
        else:
            entry.setdefault("failed_seeds", []).append(run["seed"])
    table = []
    for entry in by_trial.values():
        if entry["seeds"]:
            order = sorted(range(len(entry["seeds"])), key=lambda k: entry["seeds"][k])
            for key in ("seeds", "speedups", "eval_losses", "bounds", "test_speedups"):
                entry[key] = [entry[key][k] for k in order]
            entry["speedup"] = asdict(log_interval(entry["speedups"]))
            if None not in entry["test_speedups"]:
                entry["test_speedup"] = asdict(log_interval(entry["test_speedups"]))
            entry["eval_loss"] = sum(entry["eval_losses"]) / len(entry["eval_losses"])
        table.append(entry)
    if study.search.objective == "eval_loss":
        return sorted(table, key=lambda e: e.get("eval_loss", math.inf))
    return sorted(table, key=lambda e: -e["speedup"]["mean"] if "speedup" in e else math.inf)


def confirmed_note(confirmed: list[dict[str, Any]], scratch_se: float | None = None) -> str:
    """The confirmed best trial's speedup with its interval, and against the runner-up, paired
    by seed, whether they differ at all; with `scratch_se`, a reminder that the frontier's own
    evaluation noise is not in the interval."""
    done = [e for e in confirmed if e["seeds"]]
    if not done:
        return "confirmation: no re-run finished"
    best = done[0]
    speedup = Interval(**best["speedup"]).describe()
    if "test_speedup" in best:  # chosen on validation, read on test
        speedup = (
            Interval(**best["test_speedup"]).describe() + f" on the test split (validation, "
            f"which chose it: {Interval(**best['speedup']).describe()})"
        )
    lines = [f"confirmed best trial {best['trial']}: {speedup}"]
    if any(b == "lower" for b in best["bounds"]):
        lines.append("  (some seeds ended beyond the frontier: those speedups are lower bounds)")
    if scratch_se is not None:
        lines.append(
            f"  (read against one scratch frontier, of the base seed, whose final losses carry "
            f"their own evaluation noise, +-{1.96 * scratch_se:.3g} at 95%, not in this interval: "
            "where the frontier falls less than that between budgets, a speedup means little)"
        )
    if len(done) > 1:
        second = done[1]
        common = sorted(set(best["seeds"]) & set(second["seeds"]))
        if len(common) > 1:
            a = [best["speedups"][best["seeds"].index(s)] for s in common]
            b = [second["speedups"][second["seeds"].index(s)] for s in common]
            ratio = paired_log_interval(a, b).describe(f"ratio to {second['trial']}")
            lines.append(f"against the runner-up, paired by seed: {ratio}")
    return "\n".join(lines)


WIDTH = 100  # the columns the end of a study fits in


def summarize(
    study: StudyConfig,
    rows: list[dict[str, Any]],
    scratch: Scratch,
    confirmed: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Print the end of the study (`summary.txt`): the notes, the answer, the trials table (and
    the confirmed ranking) with each trial's parameters below it; write best.yaml and
    summary.json. Returns the summary: the trials in ranking order, the best (the confirmed best
    if there is one, or the Pareto front), the frontier, the regime, the answer and plain notes
    on whether the best trial's lead is more than noise."""
    done = [r for r in rows if r["status"] == "ok"]
    best = pareto_front(done) if study.search.objective == "pareto" else done[:1]
    full = last_eval(scratch.full)
    notes = []
    if confirmed and confirmed[0]["seeds"]:
        (row,) = [r for r in done if r["trial"] == confirmed[0]["trial"]]
        best = [row]
        notes.append(confirmed_note(confirmed, full.get("eval_loss_se")))
    notes.insert(0, noise_note(best[0], full) if best else "no trial finished")
    baseline = read_baseline(study)
    notes.append(tuning_note(baseline, len(rows), len(confirmed or [])))
    reg = regime(study.base, full.get("test_loss", full.get("eval_loss")))
    said = answer(confirmed, best[0] if best else None, reg)
    summary = {
        "experiment": study.experiment,
        "fingerprint": fingerprint(study),
        "objective": study.search.objective,
        "answer": said,
        "regime": reg.as_dict(),
        "trials": rows,
        "confirmed": confirmed,
        "best": best,
        "frontier": [asdict(p) for p in scratch.frontier().points],
        "scratch": {
            k: full.get(k) for k in ("eval_loss", "eval_loss_se", "test_loss", "test_loss_se")
        },
        "baseline": baseline,
        "note": "\n".join(notes),
    }
    out = Path(study.study_dir)
    if best:  # with a transfer, best.yaml is the target's (apollo_ray.search.transfer)
        reading = confirmed[0] if confirmed and confirmed[0]["seeds"] else None
        name = "best-proxy.yaml" if study.transfer else "best.yaml"
        write_best_yaml(study, best[0], out / name, reading)
    table = format_table(rows)
    if confirmed:
        table += "\n\nconfirmed with fresh seeds, best first:\n" + format_confirmed(confirmed)
    text = "\n\n".join([_wrap(summary["note"]), textwrap.fill(said, WIDTH), table])
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    return summary


def fingerprint(study: StudyConfig) -> str:
    """What the search asks for, hashed (its `transfer` aside: one added to a finished search
    runs on its results): a summary answers again only for the same search."""
    return hashlib.sha256(study.model_dump_json(exclude={"transfer"}).encode()).hexdigest()[:16]


def finished(study: StudyConfig) -> str | None:
    """The end of this study as it printed it (`summary.txt`) when it has finished, and its
    study file has not changed since (`fingerprint`); None otherwise."""
    summary = searched(study)
    if summary is None:
        return None
    text = (Path(study.study_dir) / "summary.txt").read_text()
    if study.transfer is None:
        return text
    report = transferred(study)
    return None if report is None else text + "\n" + report


def transfer_fingerprint(study: StudyConfig) -> str:
    """The whole study, its transfer included, hashed: what a transfer's runs were made for."""
    return hashlib.sha256(study.model_dump_json().encode()).hexdigest()[:16]


def transferred(study: StudyConfig) -> str | None:
    """The transfer's report as printed (`transfer.txt`) when it ran for this very study."""
    out = Path(study.study_dir)
    try:
        report = json.loads((out / "transfer.json").read_text())
        text = (out / "transfer.txt").read_text()
    except (OSError, ValueError):
        return None
    return text if report.get("fingerprint") == transfer_fingerprint(study) else None


def searched(study: StudyConfig) -> dict[str, Any] | None:
    """The summary of this study's finished search (`summary.json`), if it is this search's."""
    out = Path(study.study_dir)
    try:
        summary = json.loads((out / "summary.json").read_text())
        (out / "summary.txt").stat()
    except (OSError, ValueError):
        return None
    return summary if summary.get("fingerprint") == fingerprint(study) else None


def answer(confirmed: list[dict[str, Any]] | None, best: dict[str, Any] | None, reg: Regime) -> str:
    """The study's answer in one sentence: what the confirmed best schedule saved against
    scratch (on the test split when there is one) with its 95% interval, or that no schedule
    differed from scratch (the interval holds 1); and the regime it was measured in."""
    done = [e for e in confirmed or [] if e["seeds"]]
    if not done:
        if best is None:
            return f"answer: no trial finished; regime: {reg.describe()}."
        split = "test" if best.get("test_speedup") is not None else "validation"
        value = best.get("test_speedup") if split == "test" else best.get("speedup")
        return (
            f"answer: the best trial {best['trial']} read a speedup of {value:.3g}x on the "
            f"{split} split, one seed and no interval (search.confirm re-runs it with fresh "
            f"seeds); regime: {reg.describe()}."
        )
    top = done[0]
    key, split = ("test_speedup", "test") if "test_speedup" in top else ("speedup", "validation")
    ci = Interval(**top[key])
    first = next(filter(None, top["bounds"]), "")  # a seed beyond the frontier: a bound
    bound = {"lower": "at least ", "upper": "at most "}.get(first, "")
    measured = f"speedup {bound}{ci.mean:.3g}x" + (
        " (one seed: no interval)"
        if ci.low is None
        else f", 95% interval [{ci.low:.3g}, {ci.high:.3g}] over {ci.n} seeds"
    )
    measured += f" on the {split} split"
    who = f"the confirmed best schedule (trial {top['trial']})"
    if ci.significant is None:
        verdict = f"{who} read a {measured}"
    elif ci.low > 1:
        verdict = (
            f"{who} saved {bound}{1 - 1 / ci.mean:.0%} of scratch's compute for scratch's loss: "
            f"{measured}"
        )
    elif ci.high < 1:
        more = {"at most ": "at least ", "at least ": "at most "}.get(bound, "")
        verdict = f"{who} cost {more}{1 / ci.mean - 1:.0%} more compute than scratch: {measured}"
    else:
        verdict = (
            f"no schedule differed from scratch: {who} read a {measured}, an interval that holds 1"
        )
    return f"answer: {verdict}; regime: {reg.describe()}."


def _wrap(text: str) -> str:
    """Each line of `text` wrapped to `WIDTH` columns, continuations indented."""
    return "\n".join(
        textwrap.fill(line, WIDTH, subsequent_indent="    ") for line in text.splitlines()
    )


def read_baseline(study: StudyConfig) -> dict[str, Any] | None:
    """What tuned scratch (`<study_dir>/baseline.json`, `search.baseline.tuned`): the choice
    per budget, the tuning count and the any-checkpoint check's flags; None when untuned."""
    path = Path(study.study_dir) / "baseline.json"
    if study.baseline is None or not path.exists():
        return None
    record = json.loads(path.read_text())
    return {k: record[k] for k in ("chosen", "tuning_runs", "flags")}


def tuning_note(baseline: dict[str, Any] | None, trials: int, confirmed: int) -> str:
    """How hard each side was tuned, side by side, and whether the frontier is scratch's best
    at every compute (the any-checkpoint check)."""
    method = f"the search {trials} trials" + (
        f" and {confirmed} confirmed with fresh seeds" if confirmed else ""
    )
    if baseline is None:
        return f"tuning: scratch untuned (baseline: null), {method}"
    lines = [f"tuning: scratch {baseline['tuning_runs']} sweep and frontier runs, {method}"]
    for flag in baseline["flags"][:3]:
        read = (
            "speedups are read against the lower envelope with it"
            if flag.get("eval_loss") is not None
            else "its checkpoint was not kept, so speedups read near that compute are overstated"
        )
        lines.append(
            f"any-checkpoint check: scratch {flag['run']} at step {flag['step']} is "
            f"{flag['by']:.3f} nats below the frontier at its compute: the frontier is not "
            f"scratch's best there; {read}"
        )
    return "\n".join(lines)


def format_confirmed(confirmed: list[dict[str, Any]]) -> str:
    header = ["trial", "seeds", "mean eval loss", "speedup (validation)", "speedup (test)"]
    lines = []
    for e in confirmed:
        if not e["seeds"]:
            lines.append([e["trial"], "-", "-", "-", f"failed: seeds {e.get('failed_seeds')}"])
            continue
        lines.append(
            [
                e["trial"],
                ",".join(map(str, e["seeds"])),
                f"{e['eval_loss']:.4f}",
                _interval(e["speedup"]),
                _interval(e["test_speedup"]) if "test_speedup" in e else "-",
            ]
        )
    return text_table(header, lines)


def _interval(ci: dict[str, Any]) -> str:
    """A geometric mean with its 95% interval, as `1.23 [1.1, 1.4]`."""
    return f"{ci['mean']:.3g}" + (
        "" if ci["low"] is None else f" [{ci['low']:.3g}, {ci['high']:.3g}]"
    )


ROW_FIELDS = (
    "eval_loss",
    "eval_loss_se",
    "flops",
    "speedup",
    "saving",
    "bound",
    "wall_speedup",
    "paper_reached",
    "paper_flops_saving",
    "test_loss",
    "test_speedup",
)


def ranking(objective: str):
    """Sort key of finished trials, best first: against the frontier (`frontier.rank_key`) for
    speedup and flops_saving, by final loss for eval_loss and pareto."""
    if objective in ("speedup", "flops_saving"):
        return lambda r: rank_key(r["bound"], r["eval_loss"], r["flops"], r["speedup"])
    return lambda r: (r["eval_loss"], r["flops"])


def noise_note(best: dict[str, Any], scratch: dict[str, Any]) -> str:
    """Whether the best trial's final loss differs from the scratch run of its budget by more
    than the evaluation noise (1.96 standard errors of the difference), said plainly."""
    diff = best["eval_loss"] - scratch["eval_loss"]
    ses = [best.get("eval_loss_se"), scratch.get("eval_loss_se")]
    where = (
        f"best trial {best['trial']}: final loss {best['eval_loss']:.4f} vs scratch at the same "
        f"budget {scratch['eval_loss']:.4f} ({diff:+.4f})"
    )
    if any(se is None for se in ses):
        return f"{where}; no standard error recorded, so no statement on noise"
    margin = 1.96 * math.hypot(*ses)
    verdict = (
        "inside the evaluation noise: no evidence that it ends better or worse than scratch"
        if abs(diff) < margin
        else "outside the evaluation noise"
    )
    return (
        f"{where}, 95% margin ±{margin:.4f}: {verdict}. One seed each: seed-to-seed variation "
        "is not in this margin (search.confirm re-runs the best trials with fresh seeds)."
    )


def write_best_yaml(
    study: StudyConfig, best: dict[str, Any], path: Path, confirmed: dict[str, Any] | None = None
) -> None:
    """The best trial's run config, headed by what it measured: its confirmed speedup (on the
    test split when there is one) or the single run's."""
    if confirmed is not None:
        key = "test_speedup" if "test_speedup" in confirmed else "speedup"
        split = "test split" if key == "test_speedup" else "validation split"
        measured = f"confirmed speedup {_interval(confirmed[key])} on the {split}"
    elif best.get("test_speedup") is not None:
        measured = f"speedup {best['test_speedup']:.3g} on the test split (one seed)"
    else:
        measured = f"speedup {best.get('speedup') or float('nan'):.3g} (one seed, validation)"
    cfg = materialize(
        study.base,
        best["params"],
        name=f"{study.experiment}-best",
        out_dir=str(Path("runs") / f"{study.experiment}-best"),
    )
    path.write_text(
        f"# Best schedule of study {study.experiment} (trial {best['trial']}): {measured}.\n"
        f"# Train it: python -m apollo_ray.train {path}\n"
        + yaml.safe_dump(cfg.model_dump(mode="json", exclude={"out_dir"}), sort_keys=False)
    )


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials not dominated in (eval loss, total FLOPs), both minimised."""

    def dominated(r):
        return any(
            o["eval_loss"] <= r["eval_loss"]
            and o["flops"] <= r["flops"]
            and (o["eval_loss"], o["flops"]) != (r["eval_loss"], r["flops"])
            for o in rows
        )

    return sorted((r for r in rows if not dominated(r)), key=lambda r: r["flops"])


def format_table(rows: list[dict[str, Any]]) -> str:
    """The trials, best first, in columns; below them each trial's parameters (and why it did
    not finish), wrapped to `WIDTH` columns."""

    def fmt(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    header = ["trial", "eval loss", "speedup", "test speedup", "paper saving", "status"]
    lines = [
        [
            r["trial"],
            _loss(r.get("eval_loss"), r.get("eval_loss_se"), fmt),
            {"lower": ">= ", "upper": "<= "}.get(r.get("bound") or "", "") + fmt(r.get("speedup")),
            fmt(r.get("test_speedup")),
            fmt(r.get("paper_flops_saving")),
            r["status"].split(":")[0],
        ]
        for r in rows
    ]
    legend = []
    for r in rows:
        params = " ".join(f"{k.removeprefix('schedule.')}={fmt(v)}" for k, v in r["params"].items())
        why = r["status"].partition(": ")[2]
        for text in filter(None, [params, why]):
            legend.append(
                textwrap.fill(
                    text,
                    WIDTH,
                    initial_indent=f"  {r['trial']}  ",
                    subsequent_indent=" " * (len(r["trial"]) + 4),
                    break_on_hyphens=False,
                )
            )
    return (
        text_table(header, lines)
        + "\n\neach trial's parameters (schedule.x written x):\n"
        + "\n".join(legend)
    )


def _loss(loss: float | None, se: float | None, fmt) -> str:
    return fmt(loss) if se is None or loss is None else f"{loss:.4f} ± {se:.4f}"


def text_table(header: list[str], lines: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart, the header first."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *lines]
    )
