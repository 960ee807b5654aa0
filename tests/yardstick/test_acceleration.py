"""Acceleration metrics on hand-made curves whose answers are worked out in the comments, and the
loss-vs-FLOPs figure. Run: `pytest tests/yardstick/test_acceleration.py`.

The baseline throughout: eval every 100 FLOPs up to 1000, loss = 12 - flops / 100 (12 .. 2, so
the target is 2), 10 FLOPs per second (100 s in all).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from apollo_ray.yardstick.acceleration import (
    Acceleration,
    Curve,
    compare,
    first_reach,
    plot_loss_vs_flops,
)

BASE_FLOPS = np.arange(0, 1001, 100)
BASELINE = Curve("scratch", BASE_FLOPS, BASE_FLOPS / 10, 12 - BASE_FLOPS / 100)

# Crosses 2 halfway between (500, 3) and (600, 1): at 550 FLOPs, at 20 + 0.5 * 10 = 25 s.
FAST = Curve("apollo", [0, 250, 500, 600, 800], [0, 10, 20, 30, 40], [12, 6, 3, 1, 0.5])


def test_saving_at_the_interpolated_crossing() -> None:
    r = compare(FAST, BASELINE)
    assert r.target_loss == 2.0 and r.reached
    assert r.flops_to_target == pytest.approx(550)
    assert r.flops_saving == pytest.approx(0.45)
    assert r.acceleration == pytest.approx(1 / 0.55)
    assert r.final_loss_gap == pytest.approx(-1.5)
    assert (r.method_flops, r.baseline_flops, r.method_final_loss) == (800, 1000, 0.5)


def test_wall_clock_saving_uses_its_own_axis() -> None:
    r = compare(FAST, BASELINE)
    assert r.wall_to_target == pytest.approx(25)
    assert r.wall_saving == pytest.approx(0.75)  # 1 - 25 / 100
    assert r.wall_acceleration == pytest.approx(4.0)
    assert (r.method_wall, r.baseline_wall) == (40, 100)


def test_first_reach_counts_an_eval_exactly_at_target_and_ignores_later_rises() -> None:
    dip = Curve("dip", [0, 100, 200, 300], [0, 1, 2, 3], [12, 2, 3, 1])
    r = compare(dip, BASELINE)
    assert (r.flops_to_target, r.wall_to_target) == (100, 1)
    assert r.flops_saving == pytest.approx(0.9)


def test_first_reach_interpolates_and_returns_none_when_never_reached() -> None:
    # 12 -> 0 between flops 0 and 120: loss 2 at 10/12 of the way.
    assert first_reach(Curve("c", [0, 120], [0, 6], [12, 0]), 2.0) == pytest.approx((100, 5))
    assert first_reach(Curve("c", [0, 120], [0, 6], [12, 0]), 12.0) == (0, 0)
    assert first_reach(Curve("c", [0, 120], [0, 6], [12, 3]), 2.0) is None


def test_never_reached_has_no_saving() -> None:
    # Ends at 6.5 after 400 FLOPs; the baseline reaches 6.5 at 550 FLOPs (between 500 and 600).
    slow = Curve("slow", [0, 200, 400], [0, 10, 20], [12, 9, 6.5])
    r = compare(slow, BASELINE)
    assert not r.reached
    assert r.flops_to_target is r.wall_to_target is None
    assert r.flops_saving is r.wall_saving is r.acceleration is r.wall_acceleration is None
    assert r.final_loss_gap == pytest.approx(4.5)


def test_baseline_against_itself() -> None:
    r = compare(BASELINE, BASELINE)
    assert r.flops_saving == 0.0 and r.acceleration == 1.0
    assert r.final_loss_gap == 0.0


def test_to_dict_is_json_and_to_metrics_is_floats() -> None:
    never = compare(Curve("slow", [0, 400], [0, 20], [12, 6.5]), BASELINE)
    d = json.loads(json.dumps(never.to_dict()))
    assert d["method"] == "slow" and d["flops_saving"] is None and d["reached"] is False
    assert set(d) == set(Acceleration.__dataclass_fields__)
    metrics = compare(FAST, BASELINE).to_metrics("accel/")
    assert all(type(v) is float for v in metrics.values())
    assert metrics["accel/flops_saving"] == pytest.approx(0.45)
    assert metrics["accel/reached"] == 1.0 and "accel/method" not in metrics
    assert "flops_saving" not in never.to_metrics()


def _write_metrics(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    return path


def _run_rows() -> list[dict]:
    def at(step: int) -> dict:
        return {"step": step, "tokens": 64 * step, "flops": 10**18 * step, "wall_time": 1.5 * step}

    rows = [{**at(0), "eval_loss": 10.0}]
    for step in range(1, 5):
        row = {**at(step), "loss": 9.0 - step, "lr": 1e-4}  # train-only unless evaluated
        rows.append({**row, "eval_loss": 9.5 - step} if step % 2 == 0 else row)
    return rows


def test_from_metrics_reads_only_eval_rows(tmp_path: Path) -> None:
    path = _write_metrics(tmp_path / "apollo-trial-3" / "metrics.jsonl", _run_rows())
    curve = Curve.from_metrics(path)
    assert curve.name == "apollo-trial-3"
    np.testing.assert_array_equal(curve.flops, [0, 2e18, 4e18])
    np.testing.assert_array_equal(curve.wall, [0, 3, 6])
    np.testing.assert_array_equal(curve.loss, [10, 7.5, 5.5])
    assert Curve.from_metrics(_run_rows(), name="x").final_loss == 5.5
    with pytest.raises(ValueError):
        curve.loss[0] = 1.0  # read-only


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"flops": 0, "wall_time": 0, "eval_loss": 3.0}], "at least 2 eval points"),
        ([{"flops": 0, "wall_time": 0, "loss": 3.0}] * 3, "at least 2 eval points"),
        (
            [{"flops": 0, "wall_time": 0, "eval_loss": 3.0}, {"flops": 1, "eval_loss": 2.0}],
            "lacks 'wall_time'",
        ),
        (
            [
                {"flops": 0, "wall_time": 0, "eval_loss": 3.0},
                {"flops": 1, "wall_time": 1, "eval_loss": float("nan")},
            ],
            "loss has a non-finite value",
        ),
        (
            [
                {"flops": 0, "wall_time": 0, "eval_loss": 3.0},
                {"flops": 2, "wall_time": 1, "eval_loss": 2.0},
                {"flops": 1, "wall_time": 2, "eval_loss": 1.0},
            ],
            "flops must be non-negative and non-decreasing",
        ),
        (
            [
                {"flops": 0, "wall_time": 2, "eval_loss": 3.0},
                {"flops": 1, "wall_time": 1, "eval_loss": 2.0},
            ],
            "wall must be non-negative and non-decreasing",
        ),
        (
            [
                {"flops": 0, "wall_time": 0, "eval_loss": 3.0},
                {"flops": 0, "wall_time": 1, "eval_loss": 2.0},
            ],
            "total flops must be positive",
        ),
    ],
)
def test_invalid_metrics_name_the_file(tmp_path: Path, rows: list[dict], message: str) -> None:
    path = _write_metrics(tmp_path / "run" / "metrics.jsonl", rows)
    with pytest.raises(ValueError, match=message) as err:
        Curve.from_metrics(path)
    assert str(path) in str(err.value)


def test_bad_json_line_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"flops": 0, "wall_time": 0, "eval_loss": 3.0}\n{"flops": 1,\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not JSON"):
        Curve.from_metrics(path)


@pytest.mark.parametrize("x", ["flops", "wall"])
def test_plot_writes_a_png(tmp_path: Path, x: str) -> None:
    # Realistic scale (PFLOPs, minutes): two methods that reach the target close together and
    # one that never does.
    f = np.linspace(0, 4e17, 41)
    base = Curve("scratch", f, f / 4e17 * 3600, 3 + 7 * np.exp(-f / 6e16))
    fast = Curve("apollo", f, f / 4e17 * 3000, 2.9 + 7 * np.exp(-f / 3.5e16))
    faster = Curve("apollo-tau0.3", f, f / 4e17 * 2900, 2.85 + 7 * np.exp(-f / 3.2e16))
    slow = Curve("stack", f[:21], f[:21] / 4e17 * 3600, 3.3 + 7 * np.exp(-f[:21] / 6e16))
    out = plot_loss_vs_flops([fast, faster, slow], base, tmp_path / "fig" / f"{x}.png", x=x)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000
    with pytest.raises(ValueError, match="x must be"):
        plot_loss_vs_flops([fast], base, tmp_path / "bad.png", x="tokens")  # type: ignore[arg-type]


def test_infinite_acceleration_when_reached_before_training() -> None:
    r = compare(Curve("pre", [0, 100], [0, 1], [1.0, 1.0]), BASELINE)
    assert r.flops_to_target == 0 and math.isinf(r.acceleration or 0.0)
