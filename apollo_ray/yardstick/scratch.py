"""A study's scratch runs, by budget, read as the frontier and as curves (`Scratch`). Which runs
they are and how they are trained is `apollo_ray.search.baseline`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apollo_ray.yardstick.acceleration import Curve
from apollo_ray.yardstick.envelope import EvalPoint, lower_envelope
from apollo_ray.yardstick.frontier import Frontier, FrontierPoint

__all__ = ["Scratch"]


@dataclass(frozen=True)
class Scratch:
    """The study's scratch runs, by budget: where each one's metrics.jsonl is; and the scratch
    checkpoints the any-checkpoint check found below the frontier, each read like a finished
    run (`run`, `step`, `flops`, `wall`, `eval_loss`, `test_loss`): the frontier is their
    lower envelope with the runs (`envelope.lower_envelope`)."""

    runs: dict[float, str]
    checkpoints: tuple[dict[str, Any], ...] = ()

    @property
    def full(self) -> Path:
        """The metrics of the scratch run at the trials' own budget (1.0)."""
        return Path(self.runs[1.0])

    def frontier(self, loss: str = "eval_loss") -> Frontier | None:
        """The frontier read by each run's final `loss`: `eval_loss` (the whole validation
        split: what selects) or `test_loss` (the test split: what a person reads; None when a
        run has none, its data prepared without a test split)."""
        points = []
        for budget, path in self.runs.items():
            rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
            curve = Curve.from_metrics(rows, name=Path(path).parent.name)
            final = next(r for r in reversed(rows) if "eval_loss" in r)
            if final.get(loss) is None:
                return None
            points.append(FrontierPoint(budget, curve.total_flops, curve.total_wall, final[loss]))
        extra = [
            EvalPoint(c["run"], c["step"], c["flops"], c["wall"], c[loss])
            for c in self.checkpoints
            if c.get(loss) is not None
        ]
        return lower_envelope(Frontier(points), extra) if extra else Frontier(points)

    def sample_frontier(self) -> Frontier:
        """The frontier on the fixed validation sample that every evaluation reads (each run's
        final `eval_sample_loss`; its `eval_loss` for runs from before there was one): what
        the any-checkpoint check holds every scratch evaluation against."""
        points = []
        for budget, path in self.runs.items():
            rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
            curve = Curve.from_metrics(rows, name=Path(path).parent.name)
            loss = rows[-1].get("eval_sample_loss", curve.final_loss)
            points.append(FrontierPoint(budget, curve.total_flops, curve.total_wall, loss))
        return Frontier(points)

    def curves(self) -> list[Curve]:
        """Each run's eval curve, named `scratch <budget>x`, smallest budget first."""
        return [
            Curve.from_metrics(path, name=f"scratch {budget:g}x")
            for budget, path in sorted(self.runs.items())
        ]
