"""What the training loop tells a run's record, as an interface the loop owns: `Tracker`, and
`NullTracker`, its do-nothing twin (every rank but 0, every untracked run). The MLflow
implementation is `apollo_ray.records.mirror.RunMirror`; the loop never imports it.
"""

from __future__ import annotations

from typing import Any, Protocol

from apollo_ray.training.checkpoints import Store

__all__ = ["NullTracker", "Tracker"]


class Tracker(Protocol):
    """What the training loop tells a run's record (rank 0 only)."""

    def start(self, store: Store) -> None:
        """Training (re)starts; the metrics log holds exactly the rows the checkpoint covers, and
        `store` the checkpoints saved so far."""

    def poll(self) -> None:
        """New rows were written; upload them if it is time."""

    def checkpoint(self, name: str, location: str, row: dict[str, Any]) -> None:
        """Checkpoint `name` was saved at `location` (a path or a URI)."""

    def close(self) -> bool:
        """Training ended: upload what is left; True when nothing is."""


class NullTracker:
    """The tracker of a run that is not tracked, and of every rank but 0: does nothing."""

    def start(self, store: Store) -> None:
        pass

    def poll(self) -> None:
        pass

    def checkpoint(self, name: str, location: str, row: dict[str, Any]) -> None:
        pass

    def close(self) -> bool:
        return True
