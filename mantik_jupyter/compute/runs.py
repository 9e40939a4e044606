"""RunService: the core API behind the lab sidebar, the REST handlers, the magics and the CLI.

MLflow is the system of record: ``submit`` creates the MLflow run first and keeps
everything about the job on it (the tags and artifacts: ``run_record``). The service
holds the backends (one per backend spec, shared by its runs) and finds runs; its parts
live beside it: ``run_submit`` (the submission path, with ``run_inputs`` checking what it
starts from), ``run_sync`` (backend states recorded on runs, finalising ended ones) and
``run_logs`` (reading and following a run's log).
"""

from __future__ import annotations

import builtins
import errno
import os
import posixpath
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import Ambiguous, Conflict, InvalidRequest, NotFound, PermissionDenied
from ..tracking.runs_api import RunsApi, now_ms, quote_filter_value, tag_key
from ..tracking.service import TrackingService
from .backends.base import Backend, FileEntry
from .backends.paths import clean_relative, is_credentials, usable_path
from .run_archive import Archive, archive_name, zip_stream
from .run_backends import BackendPool, RunKeys, backend_kinds
from .run_download import Downloaded, check_listing, land, landing_spot, staging_beside
from .run_logs import RunLogs
from .run_record import (
    ACTIVE_STATES,
    FINAL_STATES,
    TAG_BACKEND,
    TAG_REASON,
    TAG_STATE,
    TAG_USER,
    LogChunk,
    RunInfo,
    submitting_user,
)
from .run_submit import Submitter
from .run_sync import RunSync
from .states import RunState

# The run reference that names the newest run the user submitted.
LAST = "last"

CANCEL_WAIT = 15.0
_HEX_ID = re.compile(r"[0-9a-f]{32}")


class RunService:
    """Submit, track, follow and fetch runs. One instance per lab (or CLI invocation).

    ``work_dir`` holds the job directories being prepared (``work_dir/<run_id>/``, removed
    after submission) and, by default, the run directories of the local backend
    (``work_dir/local-runs``). ``job_tracking_uri`` is the tracking address the job uses
    (a compute node may need another one than the lab). ``root_dir`` confines project
    and config paths (the Jupyter root for the REST API). ``key_file`` signs the runs
    submitted here, ``trusted_keys`` holds other installations' keys (default: in the
    mantik data dir; see ``run_backends.RunKeys``): only runs these verify are followed.
    """

    def __init__(
        self,
        tracking: TrackingService,
        *,
        work_dir: Path,
        job_tracking_uri: str | None = None,
        package_size_limit: int | None = 2 * 1024**3,
        root_dir: Path | None = None,
        key_file: Path | None = None,
        trusted_keys: Path | None = None,
        retry_pause: tuple[float, float] | None = None,
    ) -> None:
        """``retry_pause``: see ``RunSync`` (a lab's service pauses failing backends; a
        command or a notebook asks them when told to)."""
        self.tracking = tracking
        self.work_dir = Path(work_dir).expanduser().absolute()
        self.job_tracking_uri = job_tracking_uri
        self.package_size_limit = package_size_limit
        self.root_dir = Path(root_dir).expanduser().resolve() if root_dir is not None else None
        self._backends = BackendPool(
            tracking, local_dir=self.work_dir / "local-runs", keys=RunKeys(key_file, trusted_keys)
        )
        self._submitter = Submitter(tracking, self._backends.for_config, self._backends.keys.sign)
        self._sync = RunSync(
            tracking,
            self._backends.of_run,
            self._backends.binding_problem,
            retry_pause,
        )
        self._logs = RunLogs(self._backends.of_run, self._sync.sync_runs)

    # ---- plumbing ---------------------------------------------------------------------

    def _api(self) -> RunsApi:
        return RunsApi(self.tracking.client())

    def close(self) -> None:
        self._backends.close()

    def backends(self) -> list[dict]:
        """The backend kinds, what they can do, and the config key that selects them."""
        return backend_kinds()

    # ---- submit -----------------------------------------------------------------------

    def submit(
        self,
        project_dir: str | Path,
        *,
        backend_config: str | Path | None = None,
        entry_point: str = "main",
        params: Mapping[str, str] | None = None,
        experiment_name: str | None = None,
        experiment_id: str | None = None,
        run_name: str | None = None,
        source: str = "cli",
        progress: Callable[[str, int, int], None] | None = None,
    ) -> RunInfo:
        """Package a project, create its MLflow run, and start it on the config's backend.

        Before the job is submitted: the run (its id goes into the job script) with its
        tags, status SCHEDULED and params, and the per-run user (made at the same time as
        the run: its name does not derive from the run id). The artifacts upload while
        the job is shipped; the job's id is tagged once the backend answered. A failure
        before submission marks the run FAILED and removes its user; after it, the job
        keeps running and the failure is a warning (or, if even its id could not be
        recorded, an error naming the job).
        """
        return self._submitter.submit(
            project_dir,
            backend_config=backend_config,
            entry_point=entry_point,
            params=params,
            experiment_name=experiment_name,
            experiment_id=experiment_id,
            run_name=run_name,
            source=source,
            progress=progress,
            work_dir=self.work_dir,
            root_dir=self.root_dir,
            job_tracking_uri=self.job_tracking_uri,
            package_size_limit=self.package_size_limit,
        )

    # ---- queries ------------------------------------------------------------------------

    def _experiment_ids(
        self, api: RunsApi, experiment_ids: Sequence[str] | None, experiment_name: str | None
    ) -> list[str]:
        if experiment_ids and experiment_name:
            raise InvalidRequest("Give experiment ids or an experiment name, not both.")
        if experiment_ids:
            return [str(i) for i in experiment_ids]
        if experiment_name:
            found = api.get_experiment_by_name(experiment_name)
            if found is None:
                raise NotFound(f"No experiment named {experiment_name!r} on {api.client.uri}")
            return [str(found["experiment_id"])]
        return [str(e["experiment_id"]) for e in api.search_experiments()]

    def list(
        self,
        *,
        experiment_ids: Sequence[str] | None = None,
        experiment_name: str | None = None,
        state: str | None = None,
        max_results: int = 50,
        page_token: str | None = None,
        refresh: bool = False,
    ) -> tuple[builtins.list[RunInfo], str | None]:
        """Mantik runs, newest first. ``state``: a RunState, or ``active``/``final``.
        ``refresh`` (added): sync the active runs of the page with their backends first."""
        api = self._api()
        ids = self._experiment_ids(api, experiment_ids, experiment_name)
        conditions = [f"{tag_key(TAG_BACKEND)} LIKE '%'"]
        if state:
            conditions += _state_filter(state)
        runs, token = api.search_runs(
            ids,
            filter_string=" and ".join(conditions),
            max_results=max_results,
            page_token=page_token,
        )
        if not runs and experiment_ids and page_token is None:
            # MLflow lists nothing, without a word, for an id that names no experiment.
            for experiment_id in ids:
                self._check_experiment(api, experiment_id)
        infos = [RunInfo.from_run(r) for r in runs]
        if refresh:
            # The runs as the search gave them: a sidebar refreshing a page of 50 active
            # runs fetched each of them again first, one request per run.
            active = [
                run
                for run, info in zip(runs, infos, strict=True)
                if info.state in ACTIVE_STATES and info.job_id
            ]
            if active:
                fresh = {i.run_id: i for i in self._sync.sync_runs(api, active)}
                infos = [fresh.get(i.run_id, i) for i in infos]
        return infos, token

    def experiments(self) -> builtins.list[dict[str, str]]:
        """The experiments the user may read, ``{experiment_id, name}``, sorted by name."""
        found = [
            {"experiment_id": str(e["experiment_id"]), "name": str(e.get("name") or "")}
            for e in self._api().search_experiments()
        ]
        return sorted(found, key=lambda e: (e["name"].casefold(), e["experiment_id"]))

    def sync_found(self, runs: Sequence[Mapping[str, Any]]) -> builtins.list[RunInfo]:
        """``sync`` for runs as the tracking server just gave them (a search): they are
        not fetched again, only those whose state changed are read back."""
        return self._sync.sync_runs(self._api(), runs)

    @staticmethod
    def _check_experiment(api: RunsApi, experiment_id: str) -> None:
        try:
            api.get_experiment(experiment_id)
        except (NotFound, PermissionDenied, InvalidRequest):
            # MLflow's auth layer answers an id that does not exist as a forbidden one.
            raise NotFound(
                f"No experiment with id {experiment_id!r} that you may read on "
                f"{api.client.uri}: there is no such experiment, or it belongs to someone "
                "who has not shared it with you. `mantik runs list` without an id lists "
                "the runs of every experiment you may read."
            ) from None

    def resolve(self, ref: str) -> str:
        """A full run id, a unique prefix of one, or a run name -> the run id."""
        return self._resolve_run(self._api(), ref)["info"]["run_id"]

    def _resolve_run(self, api: RunsApi, ref: str) -> dict[str, Any]:
        """The MLflow run for ``ref`` (one request when ``ref`` is a full id); ``last``:
        the newest run the user submitted (``mantik runs logs last --follow`` after a
        submission)."""
        ref = (ref or "").strip()
        if not ref:
            raise InvalidRequest("Give a run id, a unique prefix of one, or a run name.")
        if ref == LAST:
            return self._last_run(api)
        if _HEX_ID.fullmatch(ref):
            try:
                return api.get_run(ref)
            except (NotFound, PermissionDenied):
                # MLflow's auth layer answers 403 for a run id that does not exist.
                pass
        return self._search_ref(api, ref)

    def _last_run(self, api: RunsApi) -> dict[str, Any]:
        user = submitting_user(self.tracking)
        if not user:
            # Runs submitted with a token record no user: 'last' would be anyone's.
            raise InvalidRequest(
                f"'{LAST}' is the newest run you submitted, but with a token login to "
                f"{api.client.uri} runs do not record who submitted them. Give the run's id "
                "(`mantik runs list` lists them)."
            )
        conditions = [
            f"{tag_key(TAG_BACKEND)} LIKE '%'",
            f"{tag_key(TAG_USER)} = {quote_filter_value(user)}",
        ]
        ids = self._experiment_ids(api, None, None)
        runs, _ = api.search_runs(ids, filter_string=" and ".join(conditions), max_results=1)
        if not runs:
            raise NotFound(
                f"'{LAST}' is the newest run you submitted, and there is none on "
                f"{api.client.uri} that you may read. `mantik runs list` lists the runs "
                "there are."
            )
        return runs[0]

    def _search_ref(self, api: RunsApi, ref: str) -> dict[str, Any]:
        ids = self._experiment_ids(api, None, None)
        mantik = f"{tag_key(TAG_BACKEND)} LIKE '%'"
        if re.fullmatch(r"[0-9a-f]+", ref):
            matches = [
                r
                for r in api.iter_runs(ids, filter_string=mantik)
                if r["info"]["run_id"].startswith(ref)
            ]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                listed = ", ".join(r["info"]["run_id"] for r in matches[:5])
                raise Ambiguous(
                    f"{ref!r} is the start of {len(matches)} run ids ({listed}"
                    f"{', ...' if len(matches) > 5 else ''}): give more characters."
                )
        named = builtins.list(
            api.iter_runs(
                ids, filter_string=f"{mantik} and attributes.run_name = {quote_filter_value(ref)}"
            )
        )
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            listed = ", ".join(r["info"]["run_id"] for r in named[:5])
            raise Ambiguous(f"{len(named)} runs are named {ref!r} ({listed}): use the run id.")
        raise NotFound(f"No run with id, id prefix or name {ref!r} on {api.client.uri}")

    def get(self, ref: str, *, refresh: bool = True) -> RunInfo:
        api = self._api()
        run = self._resolve_run(api, ref)
        if refresh:
            return self._sync.sync_runs(api, [run])[0]
        return RunInfo.from_run(run)

    def not_followed(self, info: RunInfo) -> str | None:
        """Why this installation does not follow the run, else None (see
        ``BackendPool.not_followed``); from what ``info`` holds, without a request."""
        tags = [{"key": k, "value": v} for k, v in info.tags.items()]
        return self._backends.not_followed(
            {"info": {"run_id": info.run_id}, "data": {"tags": tags}}
        )

    # ---- sync ---------------------------------------------------------------------------

    def _active_runs(self, api: RunsApi) -> builtins.list[dict[str, Any]]:
        conditions = [f"{tag_key(TAG_STATE)} != '{s}'" for s in FINAL_STATES]
        user = submitting_user(self.tracking)
        if user:
            conditions.append(f"{tag_key(TAG_USER)} = {quote_filter_value(user)}")
        ids = self._experiment_ids(api, None, None)
        return builtins.list(api.iter_runs(ids, filter_string=" and ".join(conditions)))

    def sync(
        self,
        run_ids: Sequence[str] | None = None,
        *,
        experiment_ids: Sequence[str] | None = None,
    ) -> builtins.list[RunInfo]:
        """Bring the state of runs up to date with their backends: one ``states()`` call
        per backend. ``None``: all active runs the user submitted.

        The runs are read with one search per 100 ids in ``experiment_ids`` (the
        experiments they are in, when the caller knows them; else every experiment the
        user may read): a notebook following a sweep of 50 runs sent 50 ``runs/get`` a
        tick. A run the search does not find (deleted, not readable, no such id) is
        fetched on its own, so it fails as it always did."""
        api = self._api()
        if run_ids is None:
            return self._sync.sync_runs(api, self._active_runs(api))
        ids = builtins.list(dict.fromkeys(run_ids))
        found: dict[str, dict[str, Any]] = {}
        if experiment_ids is not None or len(ids) > 1:
            # A single run without its experiment: the get is one request, a search two.
            experiments = self._experiment_ids(api, experiment_ids, None)
            found = api.runs_by_id(ids, experiments)
        runs = [found.get(r) or api.get_run(r) for r in ids]
        return self._sync.sync_runs(api, runs)

    # ---- logs ---------------------------------------------------------------------------

    def logs(self, ref: str, offset: int = 0) -> LogChunk:
        """Log text from byte ``offset``; ``final`` once the run ended and all was read."""
        if offset < 0:
            raise InvalidRequest(f"offset must be 0 or more, got {offset}")
        api = self._api()
        return self._logs.read(api, self._resolve_run(api, ref), offset)

    def all_logs(self, ref: str, offset: int = 0) -> LogChunk:
        """All log text there is now from ``offset`` (``logs`` gives one read of it)."""
        if offset < 0:
            raise InvalidRequest(f"offset must be 0 or more, got {offset}")
        api = self._api()
        run = self._resolve_run(api, ref)  # once, not for every read
        return self._logs.read_all(api, run, offset)

    def follow_logs(
        self, ref: str, *, poll_interval: float = 0.5, offset: int = 0
    ) -> Iterator[str]:
        """Yield log text as it grows, until the run ended and everything was read."""
        # A generator itself: an unknown run fails the first read, not the call.
        api = self._api()
        run = self._resolve_run(api, ref)
        yield from self._logs.follow(api, run, poll_interval=poll_interval, offset=offset)

    # ---- cancel -------------------------------------------------------------------------

    def cancel(self, ref: str) -> RunInfo:
        api = self._api()
        run = self._resolve_run(api, ref)
        run_id = run["info"]["run_id"]
        info = RunInfo.from_run(run)
        if not info.backend:
            raise Conflict(
                f"Run {run_id} was not submitted by mantik (it has no {TAG_BACKEND} tag): "
                "there is no job to cancel. Stop it where it runs."
            )
        if info.state.is_final:
            raise Conflict(f"Run {run_id} already ended ({info.state}); nothing to cancel.")
        if not info.job_id:
            # Being submitted, or its submission died: there is no job to stop. Marking
            # the run is what anyone who may edit it may do; its user goes only if this
            # installation signed the run (see RunSync.delete_run_user).
            api.set_tags(run_id, {TAG_STATE: str(RunState.KILLED), TAG_REASON: "CANCELLED"})
            api.update_run(run_id, status="KILLED", end_time=now_ms())
            note = self._sync.delete_run_user(run)
            info = RunInfo.from_run(api.get_run(run_id))
            if note:
                info.warnings.append(note)
            return info
        backend, job_id = self._backends.of_run(run)
        backend.cancel(job_id)
        deadline = time.monotonic() + CANCEL_WAIT
        while True:
            info = self._sync.sync_runs(api, [api.get_run(run_id)])[0]
            if info.state.is_final or time.monotonic() > deadline:
                return info
            time.sleep(0.5)

    # ---- files --------------------------------------------------------------------------

    # The run's credential file (``layout.CREDENTIALS_FILE``: the job's tracking token,
    # there until the job reads it, e.g. while a Slurm job waits) is not a file of the
    # run for anyone: not listed, not opened, not downloaded, nor any file of its name
    # below (``paths.is_credentials``; the backends leave them out of folder downloads).

    def files(self, ref: str, path: str = "") -> builtins.list[FileEntry]:
        rel = clean_relative(path)
        backend, job_id = self._backends.of_run(self._resolve_run(self._api(), ref))
        return _run_files(backend, job_id, rel)

    def open_file(self, ref: str, path: str) -> Iterator[bytes]:
        rel = clean_relative(path)
        if not rel:
            raise InvalidRequest("Give the path of a file of the run directory.")
        run = self._resolve_run(self._api(), ref)
        backend, job_id = self._backends.of_run(run)
        _not_credentials(run, rel)
        return backend.open_file(job_id, rel)

    def open_archive(self, ref: str, path: str = "") -> Archive:
        """A folder of the run (default: the whole run directory) as one zip archive made
        while it streams (``run_archive``): entries below ``<folder>/`` (the run's id for
        the whole run, as ``download`` lands it), saved as ``<run name>-<folder>.zip``.
        The folder is checked first (``NotFound``; ``InvalidRequest`` for a file)."""
        rel = clean_relative(path)
        run = self._resolve_run(self._api(), ref)
        backend, job_id = self._backends.of_run(run)
        _not_credentials(run, rel)
        members = backend.folder_members(job_id, rel)
        run_id = run["info"]["run_id"]
        top = posixpath.basename(rel) if rel else run_id
        label = (run["info"].get("run_name") or "").strip() or run_id
        return Archive(
            archive_name(label, posixpath.basename(rel)),
            zip_stream(top, members, folder=rel, whole_run=not rel),
        )

    def download(
        self,
        ref: str,
        path: str = "",
        dest: Path | None = None,
        progress: Callable[[int, int], None] | None = None,
        *,
        overwrite: bool = False,
        exact: bool = False,
    ) -> Downloaded:
        """Copy a file or folder (default: the whole run directory) to ``dest`` (default:
        the current directory): into it if it is a folder, else under that name (as cp
        does; ``exact``: at ``dest`` itself, also when a folder is there, as an earlier
        download of the same left it). A folder already there gets what it lacks; a local
        file that differs from the run's is a ``DownloadClash`` unless ``overwrite``
        (see ``run_download``). Nothing of the destination changes until all arrived."""
        rel = clean_relative(path)
        target = Path(dest) if dest else Path.cwd()
        usable_path(target, "download destination")
        run = self._resolve_run(self._api(), ref)
        backend, job_id = self._backends.of_run(run)
        _not_credentials(run, rel)
        final = target
        try:
            # The whole run lands under the run's id with every backend, as the SSH and
            # local run directories are named; UNICORE's is named after its job.
            name = posixpath.basename(rel) if rel else run["info"]["run_id"]
            final = target if exact else landing_spot(target, name)
            if os.path.lexists(final):
                entry = self._entry(backend, job_id, rel)
                if entry is not None:
                    check_listing(final, entry, self._listing(backend, job_id), overwrite)
            with staging_beside(final) as staging:
                got = backend.download(job_id, rel, staging, progress)
                return land(got, final, overwrite)
        except (ConnectionError, TimeoutError):
            raise
        except PermissionError as exc:
            raise PermissionDenied(
                f"Cannot write the download to {final}: {exc.strerror}{_where(exc)}. "
                "Choose a destination you can write to."
            ) from None
        except OSError as exc:  # the backends map their remote side's errors themselves
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise InvalidRequest(
                f"Cannot write the download to {final}: {exc.strerror or exc}{_where(exc)}. "
                + ("Free space there or choose" if full else "Choose")
                + " another destination."
            ) from None

    @staticmethod
    def _entry(backend: Backend, job_id: str, rel: str) -> FileEntry | None:
        """What ``rel`` is in the run directory (None: not there; the download says so)."""
        if not rel:
            return FileEntry("", 0, True)
        parent = posixpath.dirname(rel)
        for entry in backend.list_files(job_id, parent):
            if entry.path == rel:
                return entry
        return None

    @staticmethod
    def _listing(backend: Backend, job_id: str) -> Callable[[str], builtins.list[FileEntry]]:
        # The credential file is not downloaded, so it is no clash either.
        return lambda rel: _run_files(backend, job_id, rel)


# ---- helpers ------------------------------------------------------------------------------


def _run_files(backend: Backend, job_id: str, rel: str) -> builtins.list[FileEntry]:
    """A folder's listing, as users see it: without mantik's credential file."""
    return [e for e in backend.list_files(job_id, rel) if not is_credentials(e.path)]


def _not_credentials(run: Mapping[str, Any], rel: str) -> None:
    """The credential file is answered as a file that is not there."""
    if is_credentials(rel):
        raise NotFound(
            f"No file {rel!r} in the run directory of run {run['info']['run_id']}; list "
            "the run directory to see what is there."
        )


def _state_filter(state: str) -> builtins.list[str]:
    word = state.strip().upper()
    if word == "ACTIVE":
        return [f"{tag_key(TAG_STATE)} != '{s}'" for s in FINAL_STATES]
    if word == "FINAL":
        return [f"{tag_key(TAG_STATE)} != '{s}'" for s in ACTIVE_STATES]
    try:
        return [f"{tag_key(TAG_STATE)} = '{RunState(word)}'"]
    except ValueError:
        names = ", ".join([*(s.value for s in RunState), "active", "final"])
        raise InvalidRequest(f"Unknown state {state!r}: use one of {names}") from None


def _where(exc: OSError) -> str:
    """The file an OS error names, for a message (a write error may name none)."""
    return f" ({exc.filename})" if exc.filename else ""
