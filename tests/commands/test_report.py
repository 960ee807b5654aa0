"""`python -m apollo_ray.report`: the comparison table and the loss-vs-FLOPs plot of a real small
search, read back from MLflow."""

import json

import pytest

from apollo_ray import report


@pytest.mark.slow
def test_report_table_and_plot(tiny_search, capsys):
    out = tiny_search / "tiny" / "report" / "loss_vs_flops.png"
    assert report.main(["tiny", "--output-dir", str(tiny_search), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["kind"] for r in rows][:3] == ["frontier", "frontier", "trial"]
    assert [r["status"] for r in rows[2:]] == ["FINISHED", "FAILED", "FAILED"]
    best = json.loads((tiny_search / "tiny" / "summary.json").read_text())["best"][0]
    assert rows[2]["run"].endswith(best["trial"]) and out.stat().st_size > 10_000
    assert report.main(["missing", "--output-dir", str(tiny_search)]) == 2
    assert "no MLflow experiment 'missing'" in capsys.readouterr().err
