"""How much cheaper a run first reaches a scratch run's final loss (the Apollo paper's metric:
FLOPs and wall-clock savings, acceleration ratios), and the loss-vs-FLOPs figure.

The yardstick that decides whether a schedule saves compute is the scratch frontier
(`apollo_ray.yardstick.frontier`): a method's final loss against scratch runs that each finished
their own schedule. The figure here draws both.

Both runs are read from their `metrics.jsonl` (only the eval rows, which carry cumulative
`flops` and `wall_time`); the definitions follow docs/method.md, section 8:

    apollo = Curve.from_metrics("runs/apollo/metrics.jsonl")
    scratch = Curve.from_metrics("runs/scratch/metrics.jsonl")
    compare(apollo, scratch).to_dict()  # or .to_metrics() for mlflow.log_metrics
    plot_loss_vs_flops([apollo], scratch, "loss_vs_flops.png")  # x="wall" for seconds

Conventions (see `compare` for the details):
- target loss = the baseline's final eval loss;
- a curve "reaches" a loss at the first eval point at or below it; the crossing itself is placed
  by linear interpolation between that point and the one before it (in FLOPs and in seconds,
  separately);
- saving = 1 - cost to reach the target / the baseline's total cost; acceleration =
  1 / (1 - saving).
"""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from apollo_ray.yardstick.frontier import Frontier

__all__ = ["Acceleration", "Curve", "compare", "first_reach", "legend_of", "plot_loss_vs_flops"]


@dataclass(frozen=True, eq=False)
class Curve:
    """A run's eval points, in order: cumulative training FLOPs, seconds and eval loss.

    The arrays are float64 (FLOPs of large runs overflow int64) and read-only."""

    name: str
    flops: np.ndarray
    wall: np.ndarray
    loss: np.ndarray

    def __post_init__(self) -> None:
        for field in ("flops", "wall", "loss"):
            array = np.array(getattr(self, field), dtype=np.float64)
            if array.ndim != 1:
                raise ValueError(f"curve {self.name!r}: {field} must be one-dimensional")
            array.setflags(write=False)
            object.__setattr__(self, field, array)
        n = len(self.loss)
        if not len(self.flops) == len(self.wall) == n:
            raise ValueError(f"curve {self.name!r}: flops, wall and loss differ in length")
        if n < 2:
            raise ValueError(f"curve {self.name!r}: needs at least 2 eval points, got {n}")
        for field in ("flops", "wall", "loss"):
            if not np.isfinite(getattr(self, field)).all():
                raise ValueError(f"curve {self.name!r}: {field} has a non-finite value")
        for field in ("flops", "wall"):
            values = getattr(self, field)
            if values[0] < 0 or (np.diff(values) < 0).any():
                raise ValueError(
                    f"curve {self.name!r}: {field} must be non-negative and non-decreasing"
                )
            if values[-1] <= 0:
                raise ValueError(f"curve {self.name!r}: total {field} must be positive")

    @classmethod
    def from_metrics(
        cls, source: str | Path | Iterable[Mapping[str, Any]], name: str | None = None
    ) -> Curve:
        """The eval rows (those with `eval_loss`) of a `metrics.jsonl` path or of row dicts.

        `name` defaults to the run directory's name for a path, "run" for rows."""
        if isinstance(source, (str, Path)):
            path = Path(source)
            where = str(path)
            name = name or path.parent.name or path.stem
            rows = _read_jsonl(path)
        else:
            where = "metrics rows"
            name = name or "run"
            rows = list(source)
        evals = [row for row in rows if "eval_loss" in row]
        try:
            columns = {
                key: [row[key] for row in evals] for key in ("flops", "wall_time", "eval_loss")
            }
        except KeyError as err:
            raise ValueError(f"{where}: an eval row lacks {err.args[0]!r}") from None
        try:
            return cls(name, columns["flops"], columns["wall_time"], columns["eval_loss"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None

    @property
    def total_flops(self) -> float:
        return float(self.flops[-1])

    @property
    def total_wall(self) -> float:
        return float(self.wall[-1])

    @property
    def final_loss(self) -> float:
        return float(self.loss[-1])


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not JSON ({err.msg})") from None
    return rows


def first_reach(curve: Curve, target: float) -> tuple[float, float] | None:
    """(FLOPs, seconds) at which `curve` first reaches loss <= `target`, or None if it never does.

    With i the first eval point at or below the target, the crossing is interpolated linearly
    between points i - 1 (above the target) and i; at point 0 it is point 0 itself."""
    (below,) = np.nonzero(curve.loss <= target)
    if len(below) == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(curve.flops[0]), float(curve.wall[0])
    above, at = curve.loss[i - 1], curve.loss[i]
    frac = (above - target) / (above - at)  # in (0, 1]: above > target >= at
    flops = curve.flops[i - 1] + frac * (curve.flops[i] - curve.flops[i - 1])
    wall = curve.wall[i - 1] + frac * (curve.wall[i] - curve.wall[i - 1])
    return float(flops), float(wall)


@dataclass(frozen=True)
class Acceleration:
    """How `method` compares with `baseline`; see `compare` for the definitions.

    Fields that need the target to be reached are None when it is not."""

    method: str
    baseline: str
    target_loss: float
    reached: bool
    flops_to_target: float | None
    wall_to_target: float | None
    flops_saving: float | None
    wall_saving: float | None
    acceleration: float | None
    wall_acceleration: float | None
    final_loss_gap: float
    method_flops: float
    method_wall: float
    method_final_loss: float
    baseline_flops: float
    baseline_wall: float
    baseline_final_loss: float

    def to_dict(self) -> dict[str, Any]:
        """All fields, JSON-ready (None where undefined)."""
        return asdict(self)

    def to_metrics(self, prefix: str = "") -> dict[str, float]:
        """The numeric fields as floats for `mlflow.log_metrics`: names dropped, undefined
        (None) fields left out, booleans as 0.0 / 1.0."""
        return {
            prefix + key: float(value)
            for key, value in asdict(self).items()
            if value is not None and not isinstance(value, str)
        }


def compare(method: Curve, baseline: Curve) -> Acceleration:
    """Savings of `method` against `baseline` at the baseline's final eval loss.

    - `target_loss`: the baseline's final eval loss.
    - `flops_to_target`, `wall_to_target`: where the method first reaches loss <= target
      (`first_reach`). Between eval points the loss is unknown; linear interpolation is the
      least-assuming estimate, it converges to the true crossing as evals get denser, and unlike
      taking either neighbouring eval point it does not favour the more or the less often
      evaluated run. "First" is literal: the earliest eval at or below the target counts even if
      a later eval rises above it again; curves are not smoothed or replaced by their running
      minimum (eval loss on a fixed held-out set is smooth enough for this to be the figure's
      meaning, "first reaches").
    - `flops_saving` = 1 - flops_to_target / baseline total FLOPs, `wall_saving` likewise in
      seconds; `acceleration` = 1 / (1 - saving) = baseline total / cost to target (inf if
      reached before any training), `wall_acceleration` likewise. A method that needs more than
      the baseline's total has a negative saving and an acceleration below 1. All four, and both
      "to target" fields, are None when the target is never reached.
    - `final_loss_gap` = method final loss - target loss (negative: the method ends better).
    """
    target = baseline.final_loss
    reach = first_reach(method, target)
    if reach is None:
        flops_to, wall_to = None, None
        flops_saving = wall_saving = accel = wall_accel = None
    else:
        flops_to, wall_to = reach
        flops_saving = 1.0 - flops_to / baseline.total_flops
        wall_saving = 1.0 - wall_to / baseline.total_wall
        accel = _ratio(baseline.total_flops, flops_to)
        wall_accel = _ratio(baseline.total_wall, wall_to)

    end = method.final_loss
    return Acceleration(
        method=method.name,
        baseline=baseline.name,
        target_loss=target,
        reached=reach is not None,
        flops_to_target=flops_to,
        wall_to_target=wall_to,
        flops_saving=flops_saving,
        wall_saving=wall_saving,
        acceleration=accel,
        wall_acceleration=wall_accel,
        final_loss_gap=end - target,
        method_flops=method.total_flops,
        method_wall=method.total_wall,
        method_final_loss=end,
        baseline_flops=baseline.total_flops,
        baseline_wall=baseline.total_wall,
        baseline_final_loss=target,
    )


def _ratio(total: float, part: float) -> float:
    return math.inf if part == 0 else total / part


_FLOP_UNITS = [(1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
_TIME_UNITS = [(3600.0, "h", 7200.0), (60.0, "min", 120.0)]  # used from 2 h, from 2 min


def _x_unit(x: Literal["flops", "wall"], largest: float) -> tuple[float, str]:
    """(scale, axis label) so that the largest x value reads as 1 to 1000 (or s / min / h)."""
    if x == "wall":
        scale, unit = next(((s, u) for s, u, start in _TIME_UNITS if largest >= start), (1.0, "s"))
        return scale, f"training wall-clock time ({unit})"
    scale, prefix = next(((s, p) for s, p in _FLOP_UNITS if largest >= s), (1.0, ""))
    return scale, f"training compute ({prefix}FLOPs)"


def plot_loss_vs_flops(
    curves: Sequence[Curve],
    baseline: Curve | None,
    path: str | Path,
    title: str | None = None,
    x: Literal["flops", "wall"] = "flops",
    frontier: Frontier | None = None,
) -> Path:
    """Eval loss against cumulative training FLOPs (or seconds, `x="wall"`), as a PNG at `path`.

    One line per curve with a marker at each eval point. With `frontier`, the scratch frontier:
    each scratch run's final loss at its total compute (squares, labelled by budget), joined
    as the frontier interpolates them. With `baseline` (the scratch run of the trials' own
    budget), its curve dashed, a dotted line at its final loss (the target of the paper's
    metric) and, for each curve that reaches it, a vertical line where it first does, labelled
    with that saving and acceleration. The PNG's `Description` holds the legend's labels, one
    per line, as drawn (for a reader without eyes: `legend_of`). Returns the path."""
    if x not in ("flops", "wall"):
        raise ValueError(f'x must be "flops" or "wall", got {x!r}')
    others = [c for c in curves if c is not baseline]
    ends = [float(getattr(c, x)[-1]) for c in [*others, *([baseline] if baseline else [])]]
    ends += [getattr(p, x) for p in frontier.points] if frontier else []
    scale, xlabel = _x_unit(x, max(ends))

    fig = Figure(figsize=(7.5, 4.8), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    if frontier is not None:
        _draw_frontier(ax, frontier, x, scale)
    if baseline is not None:
        _draw_baseline(ax, baseline, x, scale)

    crossings = []
    for i, curve in enumerate(others):
        color = f"C{i % 10}"
        ax.plot(
            getattr(curve, x) / scale,
            curve.loss,
            "-o",
            color=color,
            markersize=3,
            linewidth=1.6,
            label=curve.name,
            zorder=4,
        )
        result = compare(curve, baseline) if baseline is not None else None
        if result is not None and result.reached:
            at, saving, accel = (
                (result.flops_to_target, result.flops_saving, result.acceleration)
                if x == "flops"
                else (result.wall_to_target, result.wall_saving, result.wall_acceleration)
            )
            assert at is not None and saving is not None and accel is not None  # reached
            crossings.append((at / scale, saving, accel, color))

    ax.set_xlabel(xlabel)
    ax.set_ylabel("eval loss")
    ax.set_title(title or f"Eval loss vs {xlabel.split(' (')[0]}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=9, framealpha=0.9)
    ax.set_xlim(left=0)
    if baseline is not None:
        _mark_crossings(ax, crossings, baseline.final_loss, "FLOPs" if x == "flops" else "time")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    fig.savefig(path, metadata={"Description": "\n".join(labels)})
    return path


def legend_of(png: bytes) -> list[str]:
    """The legend's labels of a plot that `plot_loss_vs_flops` drew, from the PNG's bytes."""
    from PIL import Image

    return Image.open(io.BytesIO(png)).text.get("Description", "").splitlines()


def _draw_frontier(ax: Axes, frontier: Frontier, x: str, scale: float) -> None:
    """The envelope through the scratch runs' end points, log-linear in compute between them."""
    xs, ys = [], []
    points = frontier.points
    for (a, la), (b, lb) in itertools.pairwise(zip(points, frontier.envelope, strict=True)):
        frac = np.linspace(0.0, 1.0, 24)
        xa, xb = getattr(a, x), getattr(b, x)
        xs += list(np.exp(np.log(xa) + frac * (np.log(xb) - np.log(xa))) / scale)
        ys += list(la + frac * (lb - la))
    ax.plot(xs, ys, "-", color="black", linewidth=2.2, alpha=0.8, zorder=2)
    ax.plot(
        [getattr(p, x) / scale for p in points],
        [p.loss for p in points],
        "s",
        color="black",
        markersize=5,
        label="scratch frontier (final losses)",
        zorder=5,
    )
    for p in points:
        ax.annotate(
            f"{p.budget:g}x",
            (getattr(p, x) / scale, p.loss),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=7,
        )


def _draw_baseline(ax: Axes, baseline: Curve, x: str, scale: float) -> None:
    target = baseline.final_loss
    ax.plot(
        getattr(baseline, x) / scale,
        baseline.loss,
        "--o",
        color="0.35",
        markersize=3,
        linewidth=1.6,
        label=f"{baseline.name} (curve)",
        zorder=3,
    )
    ax.axhline(target, color="0.35", linestyle=":", linewidth=1.2, zorder=1)
    ax.annotate(
        f"target {target:.3f}",
        (1.0, target),
        xycoords=("axes fraction", "data"),
        xytext=(-4, 4),
        textcoords="offset points",
        ha="right",
        va="bottom",
        fontsize=8,
        color="0.35",
    )


def _mark_crossings(
    ax: Axes, crossings: list[tuple[float, float, float, str]], target: float, what: str
) -> None:
    """At each crossing a diamond on the target line, a dotted line down to the axis, and a label
    just below the target line, left of the crossing (right of it where it would leave the axes).
    A label that would overlap one already placed moves down a row; the y-axis is extended
    downwards so that every row fits."""
    if not crossings:
        return
    ax.get_figure().draw_without_rendering()  # settle the layout before measuring labels
    placed: list[Bbox] = []
    rows = 0
    for at, saving, accel, color in sorted(crossings):
        sign = "−" if saving >= 0 else "+"
        label = ax.annotate(
            f"{sign}{abs(saving) * 100:.1f}% {what} to target ({accel:.2f}×)",
            (at, target),
            xytext=(-5, -8),
            textcoords="offset points",
            ha="right",
            va="top",
            fontsize=8,
            color=color,
            fontweight="bold",
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none"},
            zorder=6,
        )
        if label.get_window_extent().x0 < ax.bbox.x0:
            label.set_horizontalalignment("left")
            label.xyann = (5, -8)
        row = 0
        while any(label.get_window_extent().padded(3).overlaps(box) for box in placed):
            row += 1
            label.xyann = (label.xyann[0], -8 - 13 * row)
        placed.append(label.get_window_extent())
        rows = max(rows, row + 1)
    _room_below(ax, target, points=16 + 13 * rows)
    bottom = ax.get_ylim()[0]
    for at, _, _, color in crossings:
        ax.plot([at, at], [bottom, target], ":", color=color, linewidth=1.4, zorder=2)
        ax.plot([at], [target], "D", color=color, markersize=5, zorder=5)


def _room_below(ax: Axes, y: float, points: float) -> None:
    """Lower the y-axis bottom until there are at least `points` between it and `y`."""
    height = ax.bbox.height * 72 / ax.get_figure().dpi
    bottom, top = ax.get_ylim()
    if (y - bottom) / (top - bottom) * height < points:
        ax.set_ylim((y * height - points * top) / (height - points), top)
