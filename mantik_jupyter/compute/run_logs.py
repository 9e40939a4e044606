"""Reading a run's log: from its backend while it can, else the copy stored on the run;
decoded without splitting a UTF-8 character."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from ..errors import BackendUnavailable, NotFound, PermissionDenied
from ..tracking.runs_api import RunsApi, run_tags
from .backends.base import Backend
from .run_pace import BACK_OFF, FIRST_STATE_ASK, StatePace, asks_a_cluster
from .run_record import ARTIFACT_LOG, TAG_BACKEND, TAG_JOB_ID, LogChunk, RunInfo

# A follower that finds no new log text waits longer each time (x BACK_OFF), from the
# caller's interval up to these seconds: a read is a remote call on a cluster's login
# node, as a state query is (see ``run_pace``); new lines of a running job still show
# within seconds.
LOG_IDLE_MAX = 5.0
QUEUED_LOG_MAX = 30.0  # a queued job writes no log


class RunLogs:
    """Log reads for one ``RunService``. ``backend_of_run`` gives a run's backend and job
    id; ``sync_runs`` brings runs up to date with their backends (an ended job's log is
    complete once its run is final)."""

    def __init__(
        self,
        backend_of_run: Callable[[Mapping[str, Any]], tuple[Backend, str]],
        sync_runs: Callable[[RunsApi, Sequence[Mapping[str, Any]]], list[RunInfo]],
    ) -> None:
        self._backend_of_run = backend_of_run
        self._sync_runs = sync_runs

    def read(self, api: RunsApi, run: Mapping[str, Any], offset: int) -> LogChunk:
        """One read of the log from ``offset``; ``final`` once the run ended and all was read."""
        info = RunInfo.from_run(run)
        if not info.job_id:
            return LogChunk("", offset, info.state.is_final)
        data = self._read_log(api, run, offset, info.state.is_final)
        if data:
            chunk = _chunk(data, offset, final_state=info.state.is_final, final=False)
            if chunk.offset > offset:
                return chunk
        if not info.state.is_final:
            info = self._sync_runs(api, [run])[0]
            if not info.state.is_final:
                return LogChunk("", offset, False)
            data = self._read_log(api, run, offset, True)
            if data:
                return _chunk(data, offset, final_state=True, final=False)
        return LogChunk("", offset, True)

    def read_all(self, api: RunsApi, run: Mapping[str, Any], offset: int) -> LogChunk:
        """All log text there is now from ``offset``."""
        _require_mantik_run(run)
        parts: list[str] = []
        while True:
            chunk = self.read(api, run, offset)
            if not chunk.text:
                return LogChunk("".join(parts), chunk.offset, chunk.final)
            parts.append(chunk.text)
            offset = chunk.offset

    def _read_log(self, api: RunsApi, run: Mapping[str, Any], offset: int, final: bool) -> bytes:
        untrusted: PermissionDenied | None = None
        try:
            backend, job_id = self._backend_of_run(run)
            data, _ = backend.read_log(job_id, offset)
            return data
        except (BackendUnavailable, NotFound):
            if not final:
                raise
        except PermissionDenied as exc:
            # Submitted elsewhere (see run_backends): its backend is not asked, but the
            # copy an ended run stored in MLflow is data like its metrics.
            if not final:
                raise
            untrusted = exc
        # The run ended and its directory is gone or unreachable: the stored copy.
        try:
            out = bytearray()
            skip = offset
            for chunk in api.download_artifact(run, ARTIFACT_LOG):
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                out += chunk[skip:]
                skip = 0
            return bytes(out)
        except NotFound:
            if untrusted is not None:
                raise untrusted from None
            return b""

    def follow(
        self, api: RunsApi, run: dict[str, Any], *, poll_interval: float, offset: int
    ) -> Iterator[str]:
        """Yield log text as it grows, until the run ended and everything was read."""
        _require_mantik_run(run)
        state = RunInfo.from_run(run).state
        final = state.is_final
        # A local run's log and state are files here: read at the caller's pace.
        remote = asks_a_cluster(RunInfo.from_run(run))
        pace = StatePace(max(poll_interval, FIRST_STATE_ASK), state, backs_off=remote)
        state_due = time.monotonic() + pace.every
        idle = poll_interval
        while True:
            if not run_tags(run).get(TAG_JOB_ID):
                if final:
                    return
                time.sleep(poll_interval)
                run = api.get_run(run["info"]["run_id"])
                final = RunInfo.from_run(run).state.is_final
                continue
            data = self._read_log(api, run, offset, final)
            chunk = _chunk(data, offset, final_state=final, final=False)
            if chunk.offset > offset:
                offset = chunk.offset
                idle = poll_interval
                yield chunk.text
                continue
            if final:
                return
            # Ask the backend for the state only now and then (it may be a remote call).
            if time.monotonic() >= state_due:
                info = self._sync_runs(api, [run])[0]
                if info.state.is_final:
                    run = api.get_run(info.run_id)
                    final = True
                    continue
                if info.state != pace.state:  # it started (or was requeued): look soon
                    idle = poll_interval
                state_due = time.monotonic() + pace.after(info.state)
            time.sleep(idle)
            if remote:
                cap = QUEUED_LOG_MAX if pace.waiting else LOG_IDLE_MAX
                idle = min(idle * BACK_OFF, max(cap, poll_interval))


def _require_mantik_run(run: Mapping[str, Any]) -> None:
    """A run mantik did not submit has no job and so no log: following one waited for a
    job that never comes (for as long as the run stayed RUNNING), and reading one printed
    nothing with success."""
    info = RunInfo.from_run(run)
    if not info.backend:
        raise NotFound(
            f"Run {info.run_id} has no log here: it was not submitted by mantik (it has no "
            f"{TAG_BACKEND} tag). What it logged is on its page in the MLflow UI."
        )


def _chunk(data: bytes, offset: int, *, final_state: bool, final: bool) -> LogChunk:
    """Decode without splitting a UTF-8 character across chunks: a character cut by the
    read size or by a job still writing it waits for the next read. Only an ended run's
    log may end in a partial character (the job died writing it); that comes alone.
    Nothing to decode yet gives no text and the same offset."""
    cut = _utf8_boundary(data)
    if cut == 0 and final_state:
        cut = len(data)
    return LogChunk(data[:cut].decode("utf-8", errors="replace"), offset + cut, final)


def _utf8_boundary(data: bytes) -> int:
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # continuation byte
        if byte & 0x80 == 0:
            return len(data)
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4
        return len(data) if back >= need else len(data) - back
    return len(data)
