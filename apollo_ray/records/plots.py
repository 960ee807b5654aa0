"""The pictures MLflow shows besides the loss-vs-FLOPs plot (`apollo_ray.yardstick.acceleration`):
the depths a run sampled in each stage, Optuna's views of a finished search, and a transfer's
proxy-against-target speedups."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from matplotlib.figure import Figure

from apollo_ray.config import RunConfig
from apollo_ray.method.schedule import Schedule
from apollo_ray.study.space import ChoiceParam, IncreasingParam, IntParam, Param

__all__ = ["depth_histogram", "optuna_plots", "optuna_study", "transfer_scatter"]


def depth_histogram(cfg: RunConfig, path: str | Path) -> Path:
    """One panel per stage: how often each depth ran (every micro-batch of the run, recomputed
    from the seeded schedule, so exactly what training did) against the sampler's probabilities."""
    sched = Schedule(cfg.schedule, cfg.model.n_layer, cfg.train.steps, cfg.seed)
    counts: list[Counter] = [Counter() for _ in sched.depths]
    for step in range(cfg.train.steps):
        for micro in range(cfg.train.grad_accum):
            where = sched.step(step, micro)
            counts[where.stage][where.depth] += 1
    full = cfg.model.n_layer
    fig = Figure(figsize=(3.2 * len(counts), 3.2), dpi=120, layout="constrained")
    axes = fig.subplots(1, len(counts), sharey=True, squeeze=False)[0]
    depths = np.arange(1, full + 1)
    for stage, (ax, count) in enumerate(zip(axes, counts, strict=True)):
        n = sched.depths[stage]
        total = sum(count.values()) or 1
        ax.bar(depths, [count[d] / total for d in depths], color="tab:blue", label="sampled")
        ax.plot(np.arange(n, full + 1), sched.sampler.probs(n, full), "k.", label="p(depth)")
        ax.set_title(f"stage {stage}: N = {n} ({total} micro-batches)", fontsize=9)
        ax.set_xlabel("depth (layers run)")
        ax.set_xticks(depths)
    axes[0].set_ylabel("fraction of micro-batches")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{cfg.name}: sampled depths per stage ({sched.cfg.sampler})", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def optuna_study(
    rows: list[dict[str, Any]], space: dict[str, Param], directions: list[str], values: list[str]
) -> optuna.Study:
    """A real Optuna study of finished trials (each row's `params` and objective `values`),
    rebuilt after the search: Ray Tune keeps its searcher's study to itself, and a resumed search
    does not expose one. Stage ends appear as one parameter per end, `schedule.stage_ends[i]`
    (of k ends), in stage-end units rather than the sampler's internal coordinates."""
    study = optuna.create_study(directions=directions)
    for row in rows:
        params, dists = {}, {}
        for key, value in row["params"].items():
            param = space[key]
            if isinstance(param, ChoiceParam):
                params[key] = param.encoded[param.choices.index(value)]
                dists[key] = optuna.distributions.CategoricalDistribution(param.encoded)
            elif isinstance(param, IncreasingParam):
                for i, end in enumerate(value):
                    name = f"{key}[{i}] (of {len(value)})"
                    params[name] = end
                    dists[name] = optuna.distributions.FloatDistribution(param.low, param.high)
            elif isinstance(param, IntParam):
                params[key] = value
                dists[key] = optuna.distributions.IntDistribution(
                    int(param.low), int(param.high), log=param.log
                )
            else:
                params[key] = value
                dists[key] = optuna.distributions.FloatDistribution(
                    param.low, param.high, log=param.log
                )
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=dists, values=[row[v] for v in values]
            )
        )
    return study


def optuna_plots(study: optuna.Study, out_dir: str | Path) -> list[Path]:
    """Optuna's optimization history, parameter importances and parallel coordinates (or, for
    two objectives, the Pareto front) as PNGs. A plot Optuna cannot draw (importances need two
    finished trials that differ) is skipped with a warning."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    multi = len(study.directions) > 1
    if multi:
        plots = {"pareto_front": lambda: ov.plot_pareto_front(study)}
    else:
        plots = {
            "optimization_history": lambda: ov.plot_optimization_history(study),
            "param_importances": lambda: ov.plot_param_importances(study),
            "parallel_coordinate": lambda: ov.plot_parallel_coordinate(study),
        }
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, draw in plots.items():
            try:
                ax = draw()
            except (RuntimeError, ValueError, ZeroDivisionError) as e:
                warnings.warn(f"Optuna plot {name} skipped: {e}", RuntimeWarning, stacklevel=2)
                continue
            fig = np.ravel(ax)[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def transfer_scatter(report: dict[str, Any], path: str | Path) -> Path:
    """Each carried schedule's target speedup against its proxy speedup (log-log; bars: the
    95% intervals of those with several seeds), the lines of no speedup, and the correlation in
    the title (`apollo_ray.search.transfer.compare`'s report)."""
    fig = Figure(figsize=(6, 5), dpi=130, layout="constrained")
    ax = fig.add_subplot()
    for e in report["schedules"]:
        p, t = e["proxy"].get("interval"), e["target"].get("interval")
        if p is None or t is None:
            continue
        colour = "tab:red" if e["schedule"] == report["proxy_best"] else "tab:blue"
        colour = "black" if e["schedule"] == "release" else colour

        def bar(ci):
            return (
                None if ci["low"] is None else [[ci["mean"] - ci["low"]], [ci["high"] - ci["mean"]]]
            )

        ax.errorbar(
            p["mean"], t["mean"], xerr=bar(p), yerr=bar(t), fmt="o", color=colour, capsize=3
        )
        ax.annotate(
            e["schedule"],
            (p["mean"], t["mean"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(1, color="0.6", linestyle=":")
    ax.axvline(1, color="0.6", linestyle=":")
    s = report["spearman"]
    rho = "n/a" if s["rho"] != s["rho"] else f"{s['rho']:+.2f} [{s['low']:+.2f}, {s['high']:+.2f}]"
    split = report["split"]
    ax.set_xlabel(f"speedup on the proxy ({split} split)")
    ax.set_ylabel(f"speedup on the target ({split} split)")
    ax.set_title(
        f"{report.get('proxy', '')} -> {report.get('target', '')}\nSpearman {rho}, "
        f"{s['n']} schedules (red: the proxy's best; black: the release)",
        fontsize=8,
    )
    ax.grid(True, which="both", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
