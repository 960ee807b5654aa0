"""Shared fixtures: small prepared datasets, built once per test session.

`bert_data` and `gpt_data` are directories written by `prepare` from the first 30 documents of
the embedded `demo` corpus with a 2000-token vocabulary (a few seconds each).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from apollo_ray.data import prepare


def _prepare_demo(tmp_path_factory: pytest.TempPathFactory, kind: str) -> Path:
    out = tmp_path_factory.mktemp(f"{kind}_data")
    prepare(["demo"], out, kind, vocab_size=2000, max_documents=30, val_fraction=0.1)
    return out


@pytest.fixture(scope="session")
def bert_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare_demo(tmp_path_factory, "bert")


@pytest.fixture(scope="session")
def gpt_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare_demo(tmp_path_factory, "gpt")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for every test that needs it (starting Ray costs ~10 s).

    4 logical CPUs on this 2-core machine: a run's workers (and, for Tune, the trial driver)
    must fit at once. Token auth is off for this throwaway local instance."""
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=4, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()
