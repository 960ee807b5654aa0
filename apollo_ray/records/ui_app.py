"""MLflow's server app as the local server runs it (`mlflow server --app-name apollo`, which
calls `create_app`).

MLflow 3.17's UI opens an experiment in its GenAI view (traces, an assistant panel) unless the
browser says otherwise: the `mlflow.experimentKind` tag is no longer read, only the URL's
`workflowType` or the browser's own setting (localStorage `mlflow.workflowType_v1`, which its
sidebar toggle writes). Its runs table shows Created, Dataset, Duration, Source and Models,
with a study's numbers among a hundred unticked columns. This app is MLflow's own, with one
script added to the page it serves: where the browser has no setting of its own yet, it sets
the model-training view (and marks the assistant's first-visit pop-up as shown), and gives the
table of each experiment with a study run the columns that say who won (`layouts`), the study
run expanded. A setting the user chose is left as it is.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mlflow import MlflowClient
from mlflow.server.constants import BACKEND_STORE_URI_ENV_VAR

from apollo_ray.records.results import WINNER
from apollo_ray.records.tracking import KIND

__all__ = ["COLUMNS", "DEFAULTS", "create_app", "layouts", "seed"]

DEFAULTS = {  # localStorage keys of MLflow 3.17's UI and the JSON values its hooks store
    "mlflow.workflowType_v1": "machine_learning",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
}
COLUMNS = [  # a study's runs table: the winner's mark, its numbers (the UI's column keys)
    f"tags.`{WINNER}`",
    "metrics.`speedup`",
    "metrics.`test_speedup`",
    "metrics.`final_eval_loss`",
    "metrics.`total_flops`",
    "attributes.`Duration`",
]
PAGES = ("/", "/index.html")  # where MLflow serves the UI's page


def layouts(client: MlflowClient) -> dict[str, Any]:
    """The runs table's state (as the UI keeps it in localStorage, per experiment page) of each
    experiment that holds a study run: `COLUMNS`, and the study run expanded to its trials."""
    entries = {}
    for exp in client.search_experiments():
        study = client.search_runs([exp.experiment_id], f"tags.`{KIND}` = 'study'", max_results=1)
        if study:
            page = json.dumps([exp.experiment_id], separators=(",", ":"))
            key = f"MLflowLocalStorage-1.1-ExperimentPage-{page}-ReactComponentState"
            entries[key] = {
                "selectedColumns": COLUMNS,
                "runsExpanded": {study[0].info.run_id: True},
            }
    return entries


def seed(entries: dict[str, Any]) -> bytes:
    """The script that sets each of `entries` (key: value, stored as JSON) the browser lacks."""
    values = json.dumps({k: json.dumps(v) for k, v in entries.items()})
    return (
        f"<script>(function(){{var s=window.localStorage,d={values};"
        "for(var k in d){if(s.getItem(k)===null){s.setItem(k,d[k]);}}})();</script>"
    ).encode()


def create_app():
    """MLflow's ASGI app, its page given `seed` of `DEFAULTS` and `layouts` at the top of its
    head (`DEFAULTS` alone where the store cannot be read)."""
    from mlflow.server.fastapi_app import app as mlflow_app  # builds MLflow's app: the server's
    from starlette.concurrency import run_in_threadpool

    client = MlflowClient(os.environ[BACKEND_STORE_URI_ENV_VAR])

    async def entries() -> dict[str, Any]:
        try:
            return {**DEFAULTS, **await run_in_threadpool(layouts, client)}
        except Exception:  # the page must open whatever the store says
            return DEFAULTS

    async def app(scope: dict[str, Any], receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in PAGES:
            await mlflow_app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        body: list[bytes] = []

        async def seeded(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            body.append(message.get("body", b""))
            if message.get("more_body"):
                return
            page = b"".join(body).replace(b"<head>", b"<head>" + seed(await entries()), 1)
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(page)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": page})

        await mlflow_app(scope, receive, seeded)

    return app
