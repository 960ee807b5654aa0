"""The MLflow UI over a real small search's store (`apollo_ray.ui`'s local server), in headless
Chromium: the runs table, the eval-loss charts and a trial's page, with screenshots."""

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest
from conftest import search_runs

from apollo_ray.records.mlflow_server import LocalServer
from apollo_ray.records.tracking import KIND
from apollo_ray.yardstick.acceleration import legend_of

SCREENSHOTS = Path(
    os.environ.get("APOLLO_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")
)


@pytest.mark.slow
def test_mlflow_ui_shows_the_trials(tiny_search):
    """The MLflow UI on loopback over the search's store, in headless Chromium."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium and chromium-driver (see .ci/run)")
        pytest.skip("needs Debian's chromium and chromium-driver (see README, Tests)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, exp, runs = search_runs(tiny_search)
    trials = sorted(r.info.run_name for r in runs if r.data.tags[KIND] == "trial")
    summary = json.loads((tiny_search / "tiny" / "summary.json").read_text())
    winner = f"tiny-{summary['best'][0]['trial']}"
    ok = next(r for r in runs if r.data.tags[KIND] == "trial" and r.info.status == "FINISHED")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1600,1000",
    ):
        options.add_argument(flag)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with LocalServer(tiny_search) as server:
        driver = webdriver.Chrome(service=Service(chromedriver), options=options)
        wait = WebDriverWait(driver, 90)
        text = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731
        try:
            page = f"{server.uri}/#/experiments/{exp.experiment_id}"
            driver.get(page)  # as a user opens it: the model-training view, the runs table
            names = "[col-id='attributes.`Run Name`'][role=gridcell] a"
            shown = lambda: {a.text for a in driver.find_elements(By.CSS_SELECTOR, names)}  # noqa: E731
            # the study run expanded to its trials, without a click
            wait.until(lambda d: {"tiny", "baseline", *trials} <= shown())
            assert "/runs" in driver.current_url and "Detect Issues" not in text()
            wait.until(lambda d: "answer:" in text())  # the experiment's description
            for close in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
                close.click()  # the assistant side panel
            # the columns that say who won: the winner's mark on the winner's row, its speedup
            marked = driver.execute_script(
                """const rows = {};
                for (const cell of document.querySelectorAll("[role=gridcell][col-id]")) {
                  const i = cell.closest("[row-index]").getAttribute("row-index");
                  const shown = cell.querySelector("a") || cell;  // a run's name: its link
                  (rows[i] = rows[i] || {})[cell.getAttribute("col-id")] = shown.innerText.trim();
                }
                return Object.values(rows).filter(r => r["tags.`apollo.winner`"] === "true")
                  .map(r => [r["attributes.`Run Name`"], r["metrics.`speedup`"]]);"""
            )
            assert [name for name, _ in marked] == [winner], marked
            assert float(marked[0][1]) == pytest.approx(summary["best"][0]["speedup"], rel=1e-2)
            driver.save_screenshot(str(SCREENSHOTS / "mlflow-runs.png"))

            chart_view = driver.find_element(By.CSS_SELECTOR, "input[value=CHART]")
            driver.execute_script("arguments[0].click()", chart_view)
            search = "input[placeholder='Search metric charts']"
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, search))
            driver.find_element(By.CSS_SELECTOR, search).send_keys("eval_loss")
            wait.until(lambda d: f"{ok.info.run_name} (eval_loss)" in text() and "Step" in text())
            driver.save_screenshot(str(SCREENSHOTS / "mlflow-eval-loss-charts.png"))

            driver.get(f"{page}/runs/{ok.info.run_id}")
            wait.until(lambda d: "final_eval_loss" in text() and "speedup" in text())
            driver.save_screenshot(str(SCREENSHOTS / "mlflow-trial.png"))

            (study,) = [r for r in runs if r.data.tags[KIND] == "study"]
            driver.get(f"{page}/runs/{study.info.run_id}")  # its description: the answer, the table
            wait.until(lambda d: "answer:" in text() and "confirmed with fresh seeds" in text())
            driver.save_screenshot(str(SCREENSHOTS / "mlflow-study.png"))

            # the frontier plot, the study run's first artifact, labelled with the summary's
            # speedups (its legend as drawn, from the PNG the UI shows)
            plot = "frontier_and_best_trials.png"
            driver.get(f"{page}/runs/{study.info.run_id}/artifacts/{plot}")
            image = f"img[alt='{plot}']"  # the UI shows it from a blob, named in alt
            loaded = "return arguments[0].complete && arguments[0].naturalWidth > 0"
            wait.until(
                lambda d: any(
                    d.execute_script(loaded, i) for i in d.find_elements(By.CSS_SELECTOR, image)
                )
            )
            driver.save_screenshot(str(SCREENSHOTS / "mlflow-frontier.png"))
            url = f"{server.uri}/get-artifact?path={plot}&run_uuid={study.info.run_id}"
            with urllib.request.urlopen(url) as response:
                legend = legend_of(response.read())
            done = [t for t in summary["trials"] if t["status"] == "ok"]
            for t in done[:3]:
                label = f"{t['trial']}: speedup {t['speedup']:.3g}"
                assert any(line.startswith(label) for line in legend), (label, legend)
        finally:
            driver.quit()
