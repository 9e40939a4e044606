"""What mantik keeps on an MLflow run, and the run as the faces show it (``RunInfo``).

MLflow is the system of record: everything about a submitted job is on its run.

==========================  ===========================================================
tag                         meaning
==========================  ===========================================================
``mantik.state``            fine-grained state (``RunState``), MLflow status follows it
``mantik.backend``          backend kind (``ssh-slurm``, ``unicore``, ``local``)
``mantik.backend_spec``     JSON of the backend section (no secrets): rebuilds the backend
                            after a restart of the lab
``mantik.job_id``           the backend's job id
``mantik.run_dir``          the run directory on the compute system (UNICORE: the URL of
                            the job's working-directory storage)
``mantik.binding``          signature of the run id, the three tags above and
                            ``mantik.run_user`` by the submitting installation's key
                            (``run_backends.RunKeys``); only runs it verifies are connected to,
                            and only the run user it names is deleted. Made when the run is
                            created (no job yet), made again with the job's tags
``mantik.entry_point``      MLproject entry point; ``mantik.source``: cli|notebook|lab|api
``mantik.config``           the compute backend config file as messages name it (relative
                            to the project when in it): the file the user edits
``mantik.user``             submitting tracking user; ``mantik.run_user``: per-run user
``mantik.package_sha256``   digest of the code archive
``mantik.git_commit``       ``git rev-parse HEAD`` and ``mantik.git_dirty`` (true/false)
``mantik.reason``           why a run did not finish cleanly, in words with what to do
                            (``exit code 3``, ``CANCELLED``, "Slurm ended the job: time
                            limit of 01:00:00 reached. Raise Resources.Runtime ...", an error)
``mantik.exit_code``        the entry point's exit status
``mantik.running_since``    when the job's latest attempt started running, ms since the
                            epoch: the backend's own start time where its status says it
                            (Slurm, local), else when the sync first saw it RUNNING. Kept
                            while a requeued job waits again (``RunInfo.running_since`` is
                            then None); absent for a run that never ran
``mantik.warning``          e.g. a loopback tracking URI for a remote cluster
==========================  ===========================================================

Artifacts under ``mantik/``: ``code.tar.gz`` (the code snapshot), ``backend-config.json``
(the resolved config, ``ComputeConfig.to_dict()``, no secrets), ``mantik-job.sh`` and, once
the job ended, ``mantik.log``. Params: the entry point's parameters with defaults filled
in, as ``mlflow run`` logs them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..tracking.runs_api import run_metrics, run_params, run_tags
from ..tracking.service import TrackingService
from .layout import JOB_SCRIPT, LOG_FILE
from .states import RunState

ARTIFACT_DIR = "mantik"
ARTIFACT_CODE = f"{ARTIFACT_DIR}/code.tar.gz"
ARTIFACT_CONFIG = f"{ARTIFACT_DIR}/backend-config.json"
ARTIFACT_SCRIPT = f"{ARTIFACT_DIR}/{JOB_SCRIPT}"
ARTIFACT_LOG = f"{ARTIFACT_DIR}/{LOG_FILE}"

TAG_STATE = "mantik.state"
TAG_BACKEND = "mantik.backend"
TAG_BACKEND_SPEC = "mantik.backend_spec"
TAG_JOB_ID = "mantik.job_id"
TAG_RUN_DIR = "mantik.run_dir"
TAG_BINDING = "mantik.binding"
TAG_ENTRY_POINT = "mantik.entry_point"
TAG_SOURCE = "mantik.source"
TAG_USER = "mantik.user"
TAG_RUN_USER = "mantik.run_user"
TAG_SHA = "mantik.package_sha256"
TAG_GIT_COMMIT = "mantik.git_commit"
TAG_GIT_DIRTY = "mantik.git_dirty"
TAG_REASON = "mantik.reason"
TAG_EXIT_CODE = "mantik.exit_code"
TAG_RUNNING_SINCE = "mantik.running_since"
TAG_NATIVE_STATE = "mantik.native_state"
TAG_STATE_MESSAGE = "mantik.state_message"
TAG_WARNING = "mantik.warning"
TAG_PROJECT = "mantik.project"
TAG_CONFIG = "mantik.config"

SOURCES = ("cli", "notebook", "lab", "api")
ACTIVE_STATES = (RunState.SUBMITTING, RunState.QUEUED, RunState.RUNNING, RunState.UNKNOWN)
FINAL_STATES = (RunState.FINISHED, RunState.FAILED, RunState.KILLED)
MAX_TAG_VALUE = 5000
MLFLOW_STATUS_STATE = {
    "SCHEDULED": RunState.QUEUED,
    "RUNNING": RunState.RUNNING,
    "FINISHED": RunState.FINISHED,
    "FAILED": RunState.FAILED,
    "KILLED": RunState.KILLED,
}


@dataclass
class RunInfo:
    """One run as the faces show it. JSON-serialisable via ``to_json``; never holds secrets."""

    run_id: str
    run_name: str | None
    experiment_id: str
    state: RunState
    mlflow_status: str
    backend: str | None
    job_id: str | None
    entry_point: str | None
    source: str | None
    start_time: int | None
    end_time: int | None
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    reason: str | None
    exit_code: int | None
    user: str | None
    # Added to the agreed API: when the job's latest attempt started running (ms since
    # the epoch); None while it waits (again) and for runs that never ran or were
    # recorded before mantik kept it. ``start_time`` is the submission.
    running_since: int | None = None
    # Added to the agreed API: warnings about this submission (e.g. a loopback tracking URI).
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = str(self.state)
        out["is_final"] = self.state.is_final
        return out

    @classmethod
    def from_run(cls, run: Mapping[str, Any]) -> RunInfo:
        info = run["info"]
        tags = run_tags(run)
        status = info.get("status", "")
        try:
            state = RunState(tags[TAG_STATE])
        except (KeyError, ValueError):
            state = MLFLOW_STATUS_STATE.get(status, RunState.UNKNOWN)
        exit_code = tags.get(TAG_EXIT_CODE)
        # A requeued job waiting again keeps the tag of the attempt before.
        waiting = state in (RunState.SUBMITTING, RunState.QUEUED)
        return cls(
            run_id=info["run_id"],
            run_name=info.get("run_name") or tags.get("mlflow.runName"),
            experiment_id=str(info["experiment_id"]),
            state=state,
            mlflow_status=status,
            backend=tags.get(TAG_BACKEND),
            job_id=tags.get(TAG_JOB_ID),
            entry_point=tags.get(TAG_ENTRY_POINT) or tags.get("mlflow.project.entryPoint"),
            source=tags.get(TAG_SOURCE),
            start_time=int_or_none(info.get("start_time")),
            end_time=int_or_none(info.get("end_time")),
            params=run_params(run),
            metrics=run_metrics(run),
            tags=tags,
            reason=tags.get(TAG_REASON),
            exit_code=int(exit_code) if exit_code and exit_code.lstrip("-").isdigit() else None,
            user=tags.get(TAG_USER) or info.get("user_id") or None,
            running_since=None if waiting else int_or_none(tags.get(TAG_RUNNING_SINCE)),
            warnings=[tags[TAG_WARNING]] if tags.get(TAG_WARNING) else [],
        )


@dataclass
class LogChunk:
    text: str
    offset: int  # byte offset to ask for next
    final: bool  # the run ended and everything was read


def int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def clip(text: str) -> str:
    """A tag value MLflow accepts."""
    return text if len(text) <= MAX_TAG_VALUE else text[: MAX_TAG_VALUE - 3] + "..."


def submitting_user(tracking: TrackingService) -> str | None:
    """The tracking user runs are recorded for (``mantik.user``); None for a token."""
    cred = tracking.credential()
    return cred.username if cred and not cred.token else None
