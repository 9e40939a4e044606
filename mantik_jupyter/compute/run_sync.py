"""Bringing runs up to date with their backends, and finalising the runs that ended.

State mapping (see ``docs/states.md``): backends report ``JobStatus`` with a ``RunState``;
``RunState.mlflow_status`` gives the MLflow status. A backend that cannot be reached makes
its active runs ``UNKNOWN`` (MLflow status unchanged) — never ``FAILED``.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..errors import AuthenticationFailed, BackendUnavailable, MantikError
from ..tracking.run_users import admin_client, delete_run_user
from ..tracking.runs_api import RunsApi, now_ms, run_tags
from ..tracking.service import TrackingService
from .backends.base import Backend, JobStatus, name_config
from .run_record import (
    ACTIVE_STATES,
    ARTIFACT_LOG,
    FINAL_STATES,
    MLFLOW_STATUS_STATE,
    TAG_BACKEND_SPEC,
    TAG_BINDING,
    TAG_CONFIG,
    TAG_EXIT_CODE,
    TAG_JOB_ID,
    TAG_NATIVE_STATE,
    TAG_REASON,
    TAG_RUN_USER,
    TAG_RUNNING_SINCE,
    TAG_STATE,
    TAG_STATE_MESSAGE,
    RunInfo,
    clip,
    int_or_none,
)
from .states import RunState

log = logging.getLogger(__name__)

NOT_FOLLOWED = (
    "Not followed here: this run was submitted from another mantik installation or by "
    "someone else (or its backend tags were changed since), so its state is the one last "
    "recorded. Follow it where it was submitted."
)


# Seconds before a lab asks again a backend that could not be reached or refused the
# login, doubling from the first to the second after each failure (see ``RunSync``).
RETRY_PAUSE = (10.0, 300.0)


@dataclass(frozen=True)
class _Pause:
    error: MantikError
    seconds: float
    until: float  # time.monotonic()
    wall: float  # the same moment, time.time()

    def warning(self) -> str:
        at = time.strftime("%H:%M:%S", time.localtime(self.wall))
        return (
            f"Its backend is asked again at {at}, not before: the last attempt failed "
            f"({self.error.message}) and the lab does not try a cluster that cannot be "
            "reached or refuses the login at every refresh."
        )


class RunSync:
    """Records backend states on runs for one ``RunService``. ``backend_of_run`` gives a
    run's backend (attached to its run directory) and job id; ``binding_problem`` says
    why this installation did not submit a run, None if it did
    (``BackendPool.binding_problem``).

    ``retry_pause`` (first, longest; None: ask every time): a lab syncs unasked, every
    interval and at every refresh of the sidebar. A cluster that cannot be reached (a
    maintenance day; a firewall that drops packets makes each try wait for the connect
    timeout, and the sidebar with it) or that refuses the login (sites lock accounts,
    or ban addresses, after repeated failed logins) is then asked again only after a
    pause that doubles after each failure; its runs say when (their warnings).
    """

    def __init__(
        self,
        tracking: TrackingService,
        backend_of_run: Callable[[Mapping[str, Any]], tuple[Backend, str]],
        binding_problem: Callable[[Mapping[str, Any]], str | None],
        retry_pause: tuple[float, float] | None = None,
    ) -> None:
        self.tracking = tracking
        self._backend_of_run = backend_of_run
        self._binding_problem = binding_problem
        self._retry_pause = retry_pause
        self._pauses: dict[str, _Pause] = {}  # by backend spec
        self._lock = threading.Lock()
        # Runs being finalised (log upload etc.) by this process, to do it only once.
        self._finalising: set[str] = set()

    def sync_runs(self, api: RunsApi, runs: Sequence[Mapping[str, Any]]) -> list[RunInfo]:
        """Ask each backend once for the states of its active runs and record them.

        Runs another installation or user submitted are left alone, quietly: no
        connection, no tag, no log upload. Their recorded state is what the list shows
        (a sync runs unasked, for every page of runs, so this is no place for an error).
        """
        groups: dict[str, list[Mapping[str, Any]]] = {}
        not_followed: set[str] = set()
        for run in runs:
            tags = run_tags(run)
            state = tags.get(TAG_STATE)
            if state in ACTIVE_STATES and tags.get(TAG_JOB_ID) and tags.get(TAG_BACKEND_SPEC):
                if self._binding_problem(run) is None:
                    groups.setdefault(tags[TAG_BACKEND_SPEC], []).append(run)
                else:
                    not_followed.add(run["info"]["run_id"])
        changed: set[str] = set()
        paused: dict[str, _Pause] = {}  # by run id
        for spec, group in groups.items():
            pause = self._pause_of(spec)
            try:
                if pause is not None:
                    failure: MantikError | None = pause.error  # not asked again yet
                else:
                    failure = None
                    backend, _ = self._backend_of_run(group[0])
                    for run in group[1:]:
                        self._backend_of_run(run)
                    job_ids = [run_tags(r)[TAG_JOB_ID] for r in group]
                    statuses = backend.states(job_ids)
            except MantikError as exc:
                failure, pause = exc, self._pause_after(spec, exc)
            if failure is not None:
                # Unreachable cluster, refused login, changed host key: the job's fate is
                # unknown, not failed. The message says what is wrong.
                for run in group:
                    if self._mark_unknown(api, run, failure):
                        changed.add(run["info"]["run_id"])
                    if pause is not None:
                        paused[run["info"]["run_id"]] = pause
                continue
            with self._lock:
                self._pauses.pop(spec, None)
            for run in group:
                tags = run_tags(run)
                status = statuses.get(tags[TAG_JOB_ID], JobStatus(RunState.UNKNOWN))
                if status.reason:
                    status = replace(
                        status, reason=name_config(status.reason, tags.get(TAG_CONFIG))
                    )
                if self._apply(api, backend, run, status):
                    changed.add(run["info"]["run_id"])
        infos = [
            RunInfo.from_run(
                api.get_run(r["info"]["run_id"]) if r["info"]["run_id"] in changed else r
            )
            for r in runs
        ]
        for info in infos:
            if info.run_id in not_followed:
                # Says why its state stands still (the faces show a run's warnings).
                info.warnings.append(NOT_FOLLOWED)
            if info.run_id in paused:
                info.warnings.append(paused[info.run_id].warning())
        return infos

    @staticmethod
    def _end_of(run: Mapping[str, Any], status: JobStatus) -> int:
        """The run's end time: when its job ended, where the backend says so (a run ended
        while no one followed it, overnight, does not end at the next morning's sync),
        else now. Within the run's start and now: the cluster's clock may differ."""
        now = now_ms()
        if status.ended_at is None:
            return now
        start = int_or_none(run["info"].get("start_time")) or 0
        return min(max(status.ended_at, start), now)

    def _pause_of(self, spec: str) -> _Pause | None:
        """The pause a backend is in, if any (see the class)."""
        with self._lock:
            pause = self._pauses.get(spec)
        return pause if pause is not None and time.monotonic() < pause.until else None

    def _pause_after(self, spec: str, error: MantikError) -> _Pause | None:
        """Start (or lengthen) a backend's pause after it failed as ``error``."""
        if self._retry_pause is None or not isinstance(
            error, BackendUnavailable | AuthenticationFailed
        ):
            return None
        first, longest = self._retry_pause
        with self._lock:
            last = self._pauses.get(spec)
            seconds = min(last.seconds * 2, longest) if last is not None else first
            pause = _Pause(error, seconds, time.monotonic() + seconds, time.time() + seconds)
            self._pauses[spec] = pause
        return pause

    def _mark_unknown(self, api: RunsApi, run: Mapping[str, Any], exc: MantikError) -> bool:
        run_id = run["info"]["run_id"]
        tags = run_tags(run)
        message = clip(exc.message)
        if tags.get(TAG_STATE) == RunState.UNKNOWN and tags.get(TAG_STATE_MESSAGE) == message:
            # Recorded, and logged, when it began: a lab syncing every 10 s (a notebook's
            # live line on each retry) logged the same unreachable host each time.
            return False
        if tags.get(TAG_STATE) == RunState.UNKNOWN:
            # Still unknown, in other words: one cause may read two ways by timing (a
            # connection reset or closed), which is no news for the lab's log.
            log.info("run %s: state still unknown: %s", run_id, exc.message)
        else:
            log.warning("run %s: state unknown: %s", run_id, exc.message)
        api.set_tags(run_id, {TAG_STATE: str(RunState.UNKNOWN), TAG_STATE_MESSAGE: message})
        return True

    def _apply(
        self, api: RunsApi, backend: Backend, run: Mapping[str, Any], status: JobStatus
    ) -> bool:
        """Record a backend status on the run; True if something changed."""
        run_id = run["info"]["run_id"]
        tags = run_tags(run)
        old = tags.get(TAG_STATE)
        if status.state.is_final:
            return self._finalise(api, backend, run, status)
        if status.state == RunState.UNKNOWN:
            message = f"the backend does not know job {tags.get(TAG_JOB_ID)} (any more)"
            if old == RunState.UNKNOWN:
                return False
            api.set_tags(run_id, {TAG_STATE: str(RunState.UNKNOWN), TAG_STATE_MESSAGE: message})
            return True
        new_tags: dict[str, str] = {}
        if old != status.state:
            new_tags[TAG_STATE] = str(status.state)
        if status.native_state and tags.get(TAG_NATIVE_STATE) != status.native_state:
            new_tags[TAG_NATIVE_STATE] = status.native_state
        since = self._running_since(tags, status)
        if since is not None:
            new_tags[TAG_RUNNING_SINCE] = since
        # An active job's reason says why it cannot go on (a request its partition can
        # never meet); it goes when that changes.
        reason_gone = not status.reason and bool(tags.get(TAG_REASON))
        if status.reason and tags.get(TAG_REASON) != clip(status.reason):
            new_tags[TAG_REASON] = clip(status.reason)
        elif reason_gone:
            api.delete_tag(run_id, TAG_REASON)
        if tags.get(TAG_STATE_MESSAGE):
            api.delete_tag(run_id, TAG_STATE_MESSAGE)
        if new_tags:
            api.set_tags(run_id, new_tags)
        mlflow_status = run["info"].get("status")
        if status.state == RunState.RUNNING and mlflow_status == "SCHEDULED":
            api.update_run(run_id, status="RUNNING")
        return bool(new_tags) or reason_gone

    @staticmethod
    def _running_since(tags: Mapping[str, str], status: JobStatus) -> str | None:
        """The ``mantik.running_since`` value to record with this status, or None to leave
        the tag as it is. It goes with the state change's own tags, no request of its own.

        The backend's start time wins (it also catches a requeue between two syncs);
        without one, a job seen RUNNING now but not at the last sync started about now.
        An ended job that was never seen running keeps no tag unless the backend says
        when it ran (a job cancelled in the queue never did).
        """
        recorded = tags.get(TAG_RUNNING_SINCE)
        if status.started_at is not None:
            value = str(status.started_at)
            return value if value != recorded else None
        if status.state != RunState.RUNNING:
            return None
        old = tags.get(TAG_STATE)
        # Back from UNKNOWN (lost contact) with a start recorded: it ran all along.
        if old == RunState.RUNNING or (old == RunState.UNKNOWN and recorded):
            return None
        return str(now_ms())

    def _finalise(
        self, api: RunsApi, backend: Backend, run: Mapping[str, Any], status: JobStatus
    ) -> bool:
        run_id = run["info"]["run_id"]
        with self._lock:
            if run_id in self._finalising:
                return False
            self._finalising.add(run_id)
        try:
            tags = run_tags(run)
            if tags.get(TAG_STATE) in FINAL_STATES:
                return False
            self._upload_log(api, backend, run, tags[TAG_JOB_ID])
            try:
                backend.job_ended(tags[TAG_JOB_ID])
            except MantikError as exc:
                log.warning("run %s: cleaning up after the job: %s", run_id, exc.message)
            state, reason = status.state, status.reason
            current = run["info"].get("status")
            end_time = int_or_none(run["info"].get("end_time"))
            if state == RunState.FINISHED and current in ("FAILED", "KILLED"):
                # The entry point exited 0 but reported its run as failed: believe the run.
                state = MLFLOW_STATUS_STATE[current]
                reason = f"the run reported status {current}"
            elif not status.outcome_known and current in ("FINISHED", "FAILED", "KILLED"):
                # The job's records are gone, but it ended its MLflow run itself: that
                # status (and its end time) is the only account of how it ended.
                state = MLFLOW_STATUS_STATE[current]
                reason = None if current == "FINISHED" else f"the run reported status {current}"
            new_tags = {TAG_NATIVE_STATE: status.native_state} if status.native_state else {}
            if reason:
                new_tags[TAG_REASON] = clip(reason)
            elif tags.get(TAG_REASON):
                api.delete_tag(run_id, TAG_REASON)  # why it waited, while it did
            if status.exit_code is not None:
                new_tags[TAG_EXIT_CODE] = str(status.exit_code)
            since = self._running_since(tags, status)
            if since is not None:
                new_tags[TAG_RUNNING_SINCE] = since
            if tags.get(TAG_STATE_MESSAGE):
                api.delete_tag(run_id, TAG_STATE_MESSAGE)
            target = state.mlflow_status
            if current != target or not end_time:
                keep_end = current == target and end_time
                api.update_run(
                    run_id,
                    status=target,
                    end_time=end_time if keep_end else self._end_of(run, status),
                )
            self.delete_run_user(run)
            # Last: a crash before this point leaves the run active, and the next sync
            # finishes the job.
            api.set_tags(run_id, {**new_tags, TAG_STATE: str(state)})
            log.info("run %s ended: %s %s", run_id, state, reason or "")
            return True
        finally:
            with self._lock:
                self._finalising.discard(run_id)

    def _upload_log(
        self, api: RunsApi, backend: Backend, run: Mapping[str, Any], job_id: str
    ) -> None:
        try:
            with tempfile.TemporaryFile() as tmp:
                offset = 0
                while True:
                    data, offset = backend.read_log(job_id, offset)
                    if not data:
                        break
                    tmp.write(data)
                tmp.seek(0)
                api.upload_artifact(run, ARTIFACT_LOG, tmp)
        except MantikError as exc:
            # The state matters more than the log; the log stays readable on the backend.
            log.warning("run %s: could not store its log: %s", run["info"]["run_id"], exc.message)

    def delete_run_user(self, run: Mapping[str, Any]) -> str | None:
        """Delete the run's own tracking user, if it has one; the user is left alone
        unless the run's signature (``mantik.binding``) names it for this run, and the
        answer is then why (for the faces to show).

        Anyone with EDIT on the experiment writes the ``mantik.run_user`` tag; the admin
        credential deleting what it names would let them take the user of any of our
        active runs away from its job (see ``run_backends``).
        """
        tags = run_tags(run)
        username = tags.get(TAG_RUN_USER)
        if not username:
            return None
        problem = self._binding_problem(run)
        if problem:
            note = (
                f"The per-run tracking user {username} named by run {run['info']['run_id']} "
                f"was not deleted: {problem}. mantik deletes only a user its own signature "
                f"({TAG_BINDING}) names for that run, since anyone who may edit the "
                f"experiment can write {TAG_RUN_USER}. If the user is left over from a run "
                "of yours, an administrator of the tracking server can delete it."
            )
            log.warning("%s", note)
            return note
        admin = admin_client(self.tracking)
        if admin is None:
            log.warning("cannot delete the per-run user %s: no admin credential", username)
            return None
        delete_run_user(admin, username)
        return None
