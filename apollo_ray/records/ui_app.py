"""MLflow's server app as the local server runs it (`mlflow server --app-name apollo`, which
calls `create_app`).

MLflow 3.17's UI opens an experiment in its GenAI view (traces, an assistant panel) unless the
browser says otherwise: the `mlflow.experimentKind` tag is no longer read, only the URL's
`workflowType` or the browser's own setting (localStorage `mlflow.workflowType_v1`, which its
sidebar toggle writes). This app is MLflow's own, with one script added to the page it serves:
where the browser has no such setting yet, it sets the model-training view (and marks the
assistant's first-visit pop-up as shown). A setting the user chose is left as it is.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["SEED", "create_app"]

DEFAULTS = {  # localStorage keys of MLflow 3.17's UI and the JSON values its hooks store
    "mlflow.workflowType_v1": "machine_learning",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
}
SEED = (
    "<script>(function(){var s=window.localStorage,d="
    + json.dumps({k: json.dumps(v) for k, v in DEFAULTS.items()})
    + ";for(var k in d){if(s.getItem(k)===null){s.setItem(k,d[k]);}}})();</script>"
).encode()
PAGES = ("/", "/index.html")  # where MLflow serves the UI's page


def create_app():
    """MLflow's ASGI app, its page given `SEED` at the top of its head."""
    from mlflow.server.fastapi_app import app as mlflow_app  # builds MLflow's app: the server's

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
            page = b"".join(body).replace(b"<head>", b"<head>" + SEED, 1)
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(page)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": page})

        await mlflow_app(scope, receive, seeded)

    return app
