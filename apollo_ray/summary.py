"""The end of a search: the trials table, the best trial (or the Pareto front), `best.yaml`
and `summary.json` in `<output_dir>/<experiment>/`; and the one text-table helper that
`apollo_ray.report` uses too."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from apollo_ray.space import materialize
from apollo_ray.study import OBJECTIVES, StudyConfig

__all__ = ["format_table", "pareto_front", "summarize", "text_table"]


def summarize(study: StudyConfig, grid) -> dict[str, Any]:
    """Print the trial table; write best.yaml and summary.json. Returns the summary."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        status = "ok" if "speedup" in m else "stopped early" if m else "no result"
        if result.error is not None:
            status = f"failed: {str(result.error).strip().splitlines()[-1][:120]}"
        params = {k: v for k, v in (result.config or {}).items() if k in study.search.space}
        rows.append(
            {
                "trial": m.get("trial_id") or Path(result.path).name,
                "status": status,
                "params": params,
                "eval_loss": m.get("eval_loss"),
                "saving": m.get("saving"),
                "flops_saving": m.get("acc_flops_saving"),
                "speedup": m.get("speedup"),
                "flops": m.get("flops"),
            }
        )
    done = [r for r in rows if r["status"] == "ok"]
    metric, mode = OBJECTIVES[study.search.objective]
    if isinstance(metric, list):
        best = pareto_front(done)
    else:
        best = sorted(done, key=lambda r: r[metric], reverse=mode == "max")[:1]
    out = Path(study.study_dir)
    summary = {
        "experiment": study.experiment,
        "objective": study.search.objective,
        "trials": rows,
        "best": best,
    }
    if best:
        cfg = materialize(
            study.base,
            best[0]["params"],
            name=f"{study.experiment}-best",
            out_dir=str(Path("runs") / f"{study.experiment}-best"),
        )
        (out / "best.yaml").write_text(
            f"# Best schedule of study {study.experiment} (trial {best[0]['trial']}).\n"
            f"# Train it: python -m apollo_ray.train {out / 'best.yaml'}\n"
            + yaml.safe_dump(cfg.model_dump(mode="json", exclude={"out_dir"}), sort_keys=False)
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    table = format_table(rows)
    (out / "summary.txt").write_text(table + "\n")
    print(table)
    return summary


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
    def fmt(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    header = ["trial", "eval loss", "FLOPs saving", "speedup", "status", "params"]
    lines = [
        [
            r["trial"],
            fmt(r["eval_loss"]),
            fmt(r["saving"]),
            fmt(r["speedup"]),
            r["status"],
            ", ".join(f"{k}={fmt(v)}" for k, v in r["params"].items()),
        ]
        for r in rows
    ]
    return text_table(header, lines)


def text_table(header: list[str], lines: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart, the header first."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *lines]
    )
