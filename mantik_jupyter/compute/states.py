"""The one run state enum, and its relation to MLflow run status."""

from __future__ import annotations

from enum import StrEnum


class RunState(StrEnum):
    SUBMITTING = "SUBMITTING"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"
    # A transient loss of contact with the backend: never turned into FAILED.
    UNKNOWN = "UNKNOWN"

    @property
    def is_final(self) -> bool:
        return self in (RunState.FINISHED, RunState.FAILED, RunState.KILLED)

    @property
    def mlflow_status(self) -> str | None:
        """The MLflow run status this state implies, or None to leave it as it is."""
        return {
            RunState.SUBMITTING: "SCHEDULED",
            RunState.QUEUED: "SCHEDULED",
            RunState.RUNNING: "RUNNING",
            RunState.FINISHED: "FINISHED",
            RunState.FAILED: "FAILED",
            RunState.KILLED: "KILLED",
        }.get(self)
