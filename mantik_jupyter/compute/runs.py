"""RunService: the core API behind the lab sidebar, the REST handlers, the magics and the CLI.

MLflow is the system of record. ``submit`` creates the MLflow run first and keeps
everything about the job on it:

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
``mantik.entry_point``      MLproject entry point; ``mantik.source``: cli|notebook|lab|api
``mantik.user``             submitting tracking user; ``mantik.run_user``: per-run user
``mantik.package_sha256``   digest of the code archive
``mantik.git_commit``       ``git rev-parse HEAD`` and ``mantik.git_dirty`` (true/false)
``mantik.reason``           why a run did not finish cleanly (``exit code 3``, ``TIMEOUT``,
                            ``OUT_OF_MEMORY``, ``CANCELLED``, ``NODE_FAIL``, an error)
``mantik.exit_code``        the entry point's exit status
``mantik.warning``          e.g. a loopback tracking URI for a remote cluster
==========================  ===========================================================

Artifacts under ``mantik/``: ``code.tar.gz`` (the code snapshot), ``backend-config.json``
(the resolved config, ``ComputeConfig.to_dict()``, no secrets), ``mantik-job.sh`` and, once
the job ended, ``mantik.log``. Params: the entry point's parameters with defaults filled
in, as ``mlflow run`` logs them.

State mapping (see ``docs/states.md``): backends report ``JobStatus`` with a ``RunState``;
``RunState.mlflow_status`` gives the MLflow status. A backend that cannot be reached makes
its active runs ``UNKNOWN`` (MLflow status unchanged) — never ``FAILED``.

Secrets: the job's tracking credential only exists in the 0600 file next to the job
script (deleted locally right after submission, by the job when it starts (a Slurm job
when it ends: a requeue starts it again), by the backend's ``cancel``, and by
``Backend.job_ended`` for a job its scheduler killed). With the
embedded server (``TrackingService.is_embedded``) each run gets its own MLflow user with
``EDIT`` on its experiment, deleted when the run ends; with a remote server the job gets
the user's own credential.
"""

from __future__ import annotations

import builtins
import json
import logging
import re
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import (
    Ambiguous,
    BackendUnavailable,
    ConfigError,
    Conflict,
    InvalidRequest,
    MantikError,
    NotFound,
    PermissionDenied,
    ProjectError,
    UnsafePath,
)
from ..tracking.credentials import Credential
from ..tracking.rest import TrackingClient
from ..tracking.run_users import create_run_user, delete_run_user, new_run_username
from ..tracking.runs_api import (
    RunsApi,
    now_ms,
    quote_filter_value,
    run_metrics,
    run_params,
    run_tags,
    tag_key,
)
from ..tracking.secrets import write_private
from ..tracking.service import TrackingService
from .backends.base import Backend, Capabilities, FileEntry, JobStatus, PreparedJob
from .backends.local import LocalBackend
from .backends.paths import clean_relative, usable_path
from .backends.ssh_slurm import SshSlurmBackend
from .backends.unicore import UnicoreBackend
from .config import (
    CONFIG_FILENAMES,
    ENV_SSH_PASSWORD,
    ENV_SSH_PRIVATE_KEY,
    ENV_SSH_USERNAME,
    ComputeConfig,
    find_config,
    load_config,
)
from .layout import CREDENTIALS_FILE, JOB_SCRIPT, LOG_FILE, PACKAGE_FILE
from .packaging import build_package
from .project import find_project_dir, load_project, resolve_entry_point
from .script import Scheduler, render_job_script, safe_job_name
from .states import RunState

log = logging.getLogger(__name__)

# How each backend kind starts the job script (see script.Scheduler).
_SCHEDULERS: dict[str, Scheduler] = {"ssh": "slurm", "unicore": "unicore"}

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
TAG_ENTRY_POINT = "mantik.entry_point"
TAG_SOURCE = "mantik.source"
TAG_USER = "mantik.user"
TAG_RUN_USER = "mantik.run_user"
TAG_SHA = "mantik.package_sha256"
TAG_GIT_COMMIT = "mantik.git_commit"
TAG_GIT_DIRTY = "mantik.git_dirty"
TAG_REASON = "mantik.reason"
TAG_EXIT_CODE = "mantik.exit_code"
TAG_NATIVE_STATE = "mantik.native_state"
TAG_STATE_MESSAGE = "mantik.state_message"
TAG_WARNING = "mantik.warning"
TAG_PROJECT = "mantik.project"

SOURCES = ("cli", "notebook", "lab", "api")
ACTIVE_STATES = (RunState.SUBMITTING, RunState.QUEUED, RunState.RUNNING, RunState.UNKNOWN)
FINAL_STATES = (RunState.FINISHED, RunState.FAILED, RunState.KILLED)
MAX_TAG_VALUE = 5000
CANCEL_WAIT = 15.0
# Seconds a submission trusts an experiment lookup of an earlier one.
EXPERIMENT_TTL = 60.0
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}
_HEX_ID = re.compile(r"[0-9a-f]{32}")
_MLFLOW_STATUS_STATE = {
    "SCHEDULED": RunState.QUEUED,
    "RUNNING": RunState.RUNNING,
    "FINISHED": RunState.FINISHED,
    "FAILED": RunState.FAILED,
    "KILLED": RunState.KILLED,
}


class MantikRunWarning(UserWarning):
    """Something about a submission that works but will likely not do what is meant."""


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
            state = _MLFLOW_STATUS_STATE.get(status, RunState.UNKNOWN)
        exit_code = tags.get(TAG_EXIT_CODE)
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
            start_time=_int_or_none(info.get("start_time")),
            end_time=_int_or_none(info.get("end_time")),
            params=run_params(run),
            metrics=run_metrics(run),
            tags=tags,
            reason=tags.get(TAG_REASON),
            exit_code=int(exit_code) if exit_code and exit_code.lstrip("-").isdigit() else None,
            user=tags.get(TAG_USER) or info.get("user_id") or None,
            warnings=[tags[TAG_WARNING]] if tags.get(TAG_WARNING) else [],
        )


@dataclass
class LogChunk:
    text: str
    offset: int  # byte offset to ask for next
    final: bool  # the run ended and everything was read


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


class RunService:
    """Submit, track, follow and fetch runs. One instance per lab (or CLI invocation).

    ``work_dir`` holds the job directories being prepared (``work_dir/<run_id>/``, removed
    after submission) and, by default, the run directories of the local backend
    (``work_dir/local-runs``). ``job_tracking_uri`` is the tracking address the job uses
    (a compute node may need another one than the lab). ``root_dir`` confines project
    and config paths (the Jupyter root for the REST API).
    """

    def __init__(
        self,
        tracking: TrackingService,
        *,
        work_dir: Path,
        job_tracking_uri: str | None = None,
        package_size_limit: int | None = 2 * 1024**3,
        root_dir: Path | None = None,
    ) -> None:
        self.tracking = tracking
        self.work_dir = Path(work_dir).expanduser().absolute()
        self.job_tracking_uri = job_tracking_uri
        self.package_size_limit = package_size_limit
        self.root_dir = Path(root_dir).expanduser().resolve() if root_dir is not None else None
        self._backends: dict[str, Backend] = {}
        self._lock = threading.RLock()
        # Runs being finalised (log upload etc.) by this process, to do it only once.
        self._finalising: set[str] = set()
        # (tracking URI, "id <id>" | "name <name>") -> (experiment id, when learnt).
        self._experiments: dict[tuple[str, str], tuple[str, float]] = {}

    # ---- plumbing ---------------------------------------------------------------------

    def _api(self) -> RunsApi:
        return RunsApi(self.tracking.client())

    def _admin(self) -> TrackingClient | None:
        """A client with the embedded server's admin credential, or None for a remote server."""
        credential = self.tracking.embedded_credential
        if credential is None:
            return None
        self.tracking.wait_ready()
        return TrackingClient(self.tracking.uri, credential)

    def _username(self) -> str | None:
        cred = self.tracking.credential()
        return cred.username if cred and not cred.token else None

    def close(self) -> None:
        with self._lock:
            for backend in self._backends.values():
                backend.close()
            self._backends.clear()

    # ---- backends ---------------------------------------------------------------------

    def backends(self) -> list[dict]:
        """The backend kinds, what they can do, and the config key that selects them."""

        def entry(caps: Capabilities, key: str, supported: bool = True) -> dict:
            return {**asdict(caps), "config_key": key, "supported": supported}

        return [
            entry(SshSlurmBackend.capabilities, "SSH"),
            entry(LocalBackend.capabilities, "Local"),
            entry(UnicoreBackend.capabilities, "UnicoreApiUrl"),
            entry(
                Capabilities(name="firecrest", description="FirecREST sites (coming soon)"),
                "Firecrest",
                False,
            ),
        ]

    def _spec_for(self, config: ComputeConfig) -> dict[str, Any]:
        if config.backend == "ssh":
            assert config.ssh is not None
            return {"kind": "ssh", **config.ssh.to_dict()}
        if config.backend == "local":
            directory = config.local.directory if config.local else None
            if directory:
                path = Path(directory).expanduser()
                if not path.is_absolute():
                    path = config.source.parent / path
            else:
                path = self.work_dir / "local-runs"
            return {"kind": "local", "Directory": str(path.absolute())}
        if config.backend == "unicore":
            assert config.unicore is not None
            return {"kind": "unicore", "UnicoreApiUrl": config.unicore.api_url}
        raise ConfigError(
            f"{config.source}: the {config.backend} backend (config key 'Firecrest') is not "
            "supported yet; it is coming in a later release. Use 'UnicoreApiUrl', an 'SSH' "
            "section (Slurm over SSH) or 'Local' for now."
        )

    def _backend(self, spec: Mapping[str, Any], config: ComputeConfig | None = None) -> Backend:
        key = json.dumps(spec, sort_keys=True)
        with self._lock:
            backend = self._backends.get(key)
            if backend is None:
                backend = self._make_backend(spec, config)
                self._backends[key] = backend
            return backend

    def _make_backend(self, spec: Mapping[str, Any], config: ComputeConfig | None) -> Backend:
        import os

        kind = spec.get("kind")
        if kind == "local":
            return LocalBackend(spec["Directory"])
        if kind == "unicore":
            # A credential stored for the site's URL (as for a tracking server), else the
            # backend reads MANTIK_UNICORE_TOKEN or MANTIK_UNICORE_USERNAME/PASSWORD.
            stored = self.tracking.store.get(spec["UnicoreApiUrl"])
            return UnicoreBackend(
                spec["UnicoreApiUrl"],
                username=stored.username if stored else None,
                password=stored.password if stored else None,
                token=stored.token if stored else None,
            )
        if kind == "ssh":
            ssh = config.ssh if config is not None else None
            identity = spec.get("IdentityFile")
            return SshSlurmBackend(
                hostname=spec["Hostname"],
                port=int(spec.get("Port", 22)),
                username=spec.get("Username") or os.environ.get(ENV_SSH_USERNAME) or None,
                key_filename=str(Path(identity).expanduser()) if identity else None,
                private_key=(ssh.private_key if ssh else None)
                or os.environ.get(ENV_SSH_PRIVATE_KEY)
                or None,
                password=(ssh.password if ssh else None)
                or os.environ.get(ENV_SSH_PASSWORD)
                or None,
                known_hosts=spec.get("KnownHostsFile"),
                remote_dir=spec.get("RemoteDirectory") or "mantik-runs",
            )
        raise ConfigError(f"Unknown backend kind {kind!r} recorded on the run")

    def _backend_of_run(self, run: Mapping[str, Any]) -> tuple[Backend, str]:
        tags = run_tags(run)
        run_id = run["info"]["run_id"]
        job_id = tags.get(TAG_JOB_ID)
        if not job_id:
            raise Conflict(f"Run {run_id} has no backend job (it was never submitted)")
        try:
            spec = json.loads(tags[TAG_BACKEND_SPEC])
        except (KeyError, ValueError):
            raise NotFound(
                f"Run {run_id} carries no backend description (tag {TAG_BACKEND_SPEC}); "
                "it was not submitted by mantik"
            ) from None
        backend = self._backend(spec)
        run_dir = tags.get(TAG_RUN_DIR)
        attach = getattr(backend, "attach", None)
        if run_dir and attach is not None:
            attach(job_id, run_dir)
        return backend, job_id

    # ---- submit -----------------------------------------------------------------------

    def _resolve_project(self, project_dir: str | Path) -> Path:
        usable_path(project_dir, "project directory")
        path = Path(project_dir).expanduser()
        if self.root_dir is not None:
            if not path.is_absolute():
                path = self.root_dir / path
            if not path.resolve().is_relative_to(self.root_dir):
                raise UnsafePath(f"{project_dir} is not inside the Jupyter root {self.root_dir}")
        if not path.exists():
            raise ProjectError(f"The project directory {path} does not exist")
        return find_project_dir(path.resolve(), root=self.root_dir)

    def _resolve_config(self, project: Path, backend_config: str | Path | None) -> Path:
        if backend_config is None:
            found = find_config(project)
            if found is None:
                raise ConfigError(
                    f"No compute backend config found in {project} (looked for "
                    f"{', '.join(CONFIG_FILENAMES)}). Create one there or pass its path "
                    "(--backend-config FILE)."
                )
            return found
        usable_path(backend_config, "compute backend config")
        path = Path(backend_config).expanduser()
        if not path.is_absolute():
            in_project = project / path
            base = self.root_dir if self.root_dir is not None else Path.cwd()
            path = in_project if in_project.exists() else base / path
        if self.root_dir is not None and not path.resolve().is_relative_to(self.root_dir):
            raise UnsafePath(f"{backend_config} is not inside the Jupyter root {self.root_dir}")
        if not path.is_file():
            raise ConfigError(f"The compute backend config {path} does not exist")
        return path

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
        if source not in SOURCES:
            raise InvalidRequest(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        if experiment_name and experiment_id:
            raise InvalidRequest("Give an experiment name or an experiment id, not both.")
        # Everything the user can get wrong is checked before anything is created.
        project_path = self._resolve_project(project_dir)
        config = load_config(self._resolve_config(project_path, backend_config))
        spec = self._spec_for(config)
        backend = self._backend(spec, config)
        # A credential the backend can tell is missing or expired without asking the site.
        backend.check_credentials()
        # A first SSH login (key exchange, authentication) overlaps the rest of the
        # preparation: loading the project (MLflow's project code is slow to import),
        # packaging, the MLflow calls.
        threading.Thread(target=backend.warm_up, name="mantik-warm-up", daemon=True).start()
        project = load_project(project_path)
        resolved = resolve_entry_point(project, entry_point, dict(params or {}))
        job_uri = self.job_tracking_uri or self.tracking.uri
        notes = self._check_tracking_uri(job_uri, spec)
        for note in notes:
            warnings.warn(note, MantikRunWarning, stacklevel=2)
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.work_dir))
        # What the user waits for is "called" -> "job queued". MLflow calls that do not
        # depend on each other run in parallel (each in a thread has its own HTTP session,
        # see ``_session``), and all are waited for before returning.
        pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mantik-submit")
        run_id: str | None = None
        try:
            package = build_package(
                project_path,
                staging / PACKAGE_FILE,
                exclude=config.exclude,
                extra_files=_extra_files(config, project_path),
                size_limit=self.package_size_limit,
                progress=(lambda d, t: progress("package", d, t)) if progress else None,
            )
            api = self._api()
            user = self._username()
            experiment = (
                f"id {experiment_id}"
                if experiment_id
                else repr(experiment_name or project.name or project_path.name)
            )
            try:
                exp_id = self._submit_experiment(
                    api, experiment_id, experiment_name or project.name or project_path.name
                )
            except PermissionDenied:
                raise _experiment_refused(api, user, experiment) from None
            tags = {
                TAG_STATE: str(RunState.SUBMITTING),
                TAG_BACKEND: backend.capabilities.name,
                TAG_BACKEND_SPEC: json.dumps(spec, sort_keys=True),
                TAG_ENTRY_POINT: resolved.name,
                TAG_SOURCE: source,
                TAG_SHA: package.sha256,
                TAG_PROJECT: project.name or project_path.name,
                "mlflow.source.name": str(project_path),
                "mlflow.source.type": "PROJECT",
                "mlflow.project.entryPoint": resolved.name,
                "mlflow.project.backend": backend.capabilities.name,
                **_git_tags(project_path),
            }
            if user:
                tags[TAG_USER] = user
                tags["mlflow.user"] = user
            if notes:
                tags[TAG_WARNING] = _clip(" ".join(notes))
            admin = self._admin()
            run_user = new_run_username() if admin is not None else None
            user_made: Future[Credential] | None = None
            if run_user:
                # Recorded from the start, so whatever happens the user can be found and
                # removed. It needs only the experiment: made while the run is created.
                tags[TAG_RUN_USER] = run_user
                user_made = pool.submit(create_run_user, admin, run_user, exp_id)
            try:
                run = api.create_run(exp_id, run_name=run_name, tags=tags)
            except BaseException as exc:
                # The experiment may be gone: look it up afresh next time.
                self._forget_experiment(exp_id)
                # Remove the user made meanwhile (a failed creation left none).
                if run_user and user_made is not None and user_made.exception() is None:
                    _delete_run_user_quietly(admin, run_user)
                if isinstance(exc, PermissionDenied):  # may read it, but not add to it
                    raise _experiment_refused(api, user, experiment) from None
                raise
            run_id = run["info"]["run_id"]
            job_dir = self.work_dir / run_id
            run_name = run["info"].get("run_name") or run_name
            job_name = safe_job_name(run_name or project.name or "mantik")
            # Calls on the run; waited for before the job dir goes and before a failure
            # is recorded (a late SCHEDULED must not overwrite FAILED).
            pending: list[Future[Any]] = [user_made] if user_made else []
            try:
                staging.rename(job_dir)
                # Before the job starts: the status (the job's own start sets RUNNING,
                # which a late SCHEDULED would undo) and the params (MLflow may refuse
                # them, e.g. too long: a user error that must stop the submission).
                before_start = [
                    pool.submit(self._session(api).update_run, run_id, status="SCHEDULED"),
                    pool.submit(self._session(api).log_batch, run_id, params=resolved.params),
                ]
                pending += before_start
                script = render_job_script(
                    config,
                    command=resolved.command,
                    run_id=run_id,
                    experiment_id=exp_id,
                    tracking_uri=job_uri,
                    job_name=job_name,
                    scheduler=_SCHEDULERS.get(spec["kind"], "none"),
                    project_dir=project_path,
                )
                (job_dir / JOB_SCRIPT).write_text(script, encoding="utf-8")
                (job_dir / JOB_SCRIPT).chmod(0o700)
                config_json = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
                api.artifact_proxy_path(run, ARTIFACT_DIR)  # an unusable store fails now
                credential = user_made.result() if user_made else self.tracking.require_credential()
                write_private(job_dir / CREDENTIALS_FILE, _credential_file(credential))
                for call in before_start:
                    call.result()
                # The job does not need its artifacts: they upload while it is shipped and
                # submitted, not earlier, where they would slow the calls above down (a
                # tracking server spends its CPU checking credentials).
                artifacts = {
                    name: pool.submit(self._session(api).upload_artifact, run, name, data)
                    for name, data in (
                        (ARTIFACT_CONFIG, config_json.encode()),
                        (ARTIFACT_SCRIPT, script.encode()),
                        (ARTIFACT_CODE, job_dir / PACKAGE_FILE),
                    )
                }
                pending += artifacts.values()
                job = PreparedJob(
                    run_id=run_id,
                    local_dir=job_dir,
                    job_name=job_name,
                    files=[PACKAGE_FILE, JOB_SCRIPT, CREDENTIALS_FILE],
                    config=config,
                )
                if progress:
                    progress("upload", 0, package.size)
                try:
                    job_id = backend.submit(
                        job, progress=(lambda d, t: progress("upload", d, t)) if progress else None
                    )
                finally:
                    (job_dir / CREDENTIALS_FILE).unlink(missing_ok=True)
            except BaseException as exc:
                wait(pending)
                self._submission_failed(api, admin, run_id, run_user, exc)
                raise
            # The job is queued: from here on nothing may lose its id.
            job_tags = {
                TAG_JOB_ID: job_id,
                TAG_RUN_DIR: _run_dir_of(backend, job_id),
                TAG_STATE: str(RunState.QUEUED),
            }
            self._record_job(api, run_id, job_tags)
            notes = notes + self._artifact_failures(api, run_id, notes, artifacts)
        finally:
            pool.shutdown()
            shutil.rmtree(staging, ignore_errors=True)
            if run_id:
                shutil.rmtree(self.work_dir / run_id, ignore_errors=True)
        log.info("submitted run %s as %s job %s", run_id, backend.capabilities.name, job_id)
        # What the server holds now, without asking it again.
        info = RunInfo.from_run(
            {
                "info": {**run["info"], "status": "SCHEDULED"},
                "data": {
                    "tags": _key_values({**tags, **run_tags(run), **job_tags}),
                    "params": _key_values(resolved.params),
                },
            }
        )
        info.warnings = notes
        return info

    def _submit_experiment(
        self, api: RunsApi, experiment_id: str | None, experiment_name: str
    ) -> str:
        """The id of the experiment a submission goes to (created when the name is new).

        Remembered for ``EXPERIMENT_TTL`` seconds: the lookup is on the way to the queue,
        and a series of submissions goes to the same experiment. An experiment deleted
        meanwhile makes the run's creation fail, which forgets it.
        """
        key = (
            api.client.uri,
            f"id {experiment_id}" if experiment_id else f"name {experiment_name}",
        )
        with self._lock:
            known = self._experiments.get(key)
        if known is not None and time.monotonic() - known[1] < EXPERIMENT_TTL:
            return known[0]
        if experiment_id:
            api.get_experiment(experiment_id)
            exp_id = str(experiment_id)
        else:
            exp_id, _ = api.get_or_create_experiment(experiment_name)
        with self._lock:
            self._experiments[key] = (exp_id, time.monotonic())
        return exp_id

    def _forget_experiment(self, exp_id: str) -> None:
        with self._lock:
            for key in [k for k, (i, _) in self._experiments.items() if i == exp_id]:
                del self._experiments[key]

    @staticmethod
    def _session(api: RunsApi) -> RunsApi:
        """The same server and credential over a new HTTP session, for a call in another
        thread (``requests.Session`` is not thread-safe)."""
        return RunsApi(TrackingClient(api.client.uri, api.client.credential))

    @staticmethod
    def _record_job(api: RunsApi, run_id: str, job_tags: Mapping[str, str]) -> None:
        """Tag the submitted job onto its run; one retry, then an error naming the job."""
        job_id = job_tags[TAG_JOB_ID]
        for attempt in range(2):
            try:
                api.set_tags(run_id, job_tags)
                return
            except MantikError as exc:
                if attempt == 0:
                    log.warning("run %s: tagging job %s failed, retrying", run_id, job_id)
                    time.sleep(1.0)
                    continue
                log.error("run %s: job %s runs, but is not recorded", run_id, job_id)
                raise type(exc)(
                    f"Job {job_id} was submitted and is queued, but recording it on run "
                    f"{run_id} failed, so mantik cannot follow it: {exc.message}"
                ) from None

    @staticmethod
    def _artifact_failures(
        api: RunsApi,
        run_id: str,
        notes: Sequence[str],
        artifacts: Mapping[str, Future[None]],
    ) -> list[str]:
        """Wait for the artifact uploads; a failure is a warning on the run (the job
        runs and is tracked), returned to be shown."""
        failed = {}
        for name, upload in artifacts.items():
            exc = upload.exception()
            if exc is not None:
                failed[name] = exc.message if isinstance(exc, MantikError) else repr(exc)
        if not failed:
            return []
        note = (
            f"The job was submitted, but storing {', '.join(failed)} on the run failed: "
            + "; ".join(failed.values())
        )
        log.warning("run %s: %s", run_id, note)
        try:
            api.set_tags(run_id, {TAG_WARNING: _clip(" ".join([*notes, note]))})
        except MantikError as exc:
            log.warning("run %s: could not tag the warning: %s", run_id, exc.message)
        return [note]

    def _submission_failed(
        self,
        api: RunsApi,
        admin: TrackingClient | None,
        run_id: str,
        run_user: str | None,
        exc: BaseException,
    ) -> None:
        message = exc.message if isinstance(exc, MantikError) else f"{type(exc).__name__}: {exc}"
        try:
            api.set_tags(
                run_id,
                {
                    TAG_STATE: str(RunState.FAILED),
                    TAG_REASON: _clip(f"submission failed: {message}"),
                },
            )
            api.update_run(run_id, status="FAILED", end_time=now_ms())
        except MantikError as again:
            log.warning("could not mark run %s as FAILED: %s", run_id, again.message)
        if run_user and admin is not None:
            _delete_run_user_quietly(admin, run_user)

    @staticmethod
    def _check_tracking_uri(job_uri: str, spec: Mapping[str, Any]) -> list[str]:
        host = (urlparse(job_uri).hostname or "").lower()
        loopback = host in _LOOPBACK_HOSTS or host.startswith("127.")
        where = str(spec.get("Hostname", "")) if spec.get("kind") == "ssh" else ""
        if spec.get("kind") == "unicore":
            where = urlparse(str(spec.get("UnicoreApiUrl", ""))).hostname or ""
        remote = bool(where) and where.lower() not in (_LOOPBACK_HOSTS | {"127.0.0.1"})
        if loopback and remote:
            return [
                f"The job will report to the tracking server at {job_uri}, a loopback address, "
                f"but runs on {where}: it will not reach the server from there. "
                "Set the job tracking URI (an address the compute nodes can reach) or tunnel "
                "the port."
            ]
        return []

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
        infos = [RunInfo.from_run(r) for r in runs]
        if refresh:
            active = [i.run_id for i in infos if i.state in ACTIVE_STATES and i.job_id]
            if active:
                fresh = {i.run_id: i for i in self.sync(active)}
                infos = [fresh.get(i.run_id, i) for i in infos]
        return infos, token

    def resolve(self, ref: str) -> str:
        """A full run id, a unique prefix of one, or a run name -> the run id."""
        return self._resolve_run(self._api(), ref)["info"]["run_id"]

    def _resolve_run(self, api: RunsApi, ref: str) -> dict[str, Any]:
        """The MLflow run for ``ref`` (one request when ``ref`` is a full id)."""
        ref = (ref or "").strip()
        if not ref:
            raise InvalidRequest("Give a run id, a unique prefix of one, or a run name.")
        if _HEX_ID.fullmatch(ref):
            try:
                return api.get_run(ref)
            except (NotFound, PermissionDenied):
                # MLflow's auth layer answers 403 for a run id that does not exist.
                pass
        return self._search_ref(api, ref)

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
            return self._sync_runs(api, [run])[0]
        return RunInfo.from_run(run)

    # ---- sync ---------------------------------------------------------------------------

    def _active_runs(self, api: RunsApi) -> builtins.list[dict[str, Any]]:
        conditions = [f"{tag_key(TAG_STATE)} != '{s}'" for s in FINAL_STATES]
        user = self._username()
        if user:
            conditions.append(f"{tag_key(TAG_USER)} = {quote_filter_value(user)}")
        ids = self._experiment_ids(api, None, None)
        return builtins.list(api.iter_runs(ids, filter_string=" and ".join(conditions)))

    def sync(self, run_ids: Sequence[str] | None = None) -> builtins.list[RunInfo]:
        """Bring the state of runs up to date with their backends: one ``states()`` call
        per backend. ``None``: all active runs the user submitted."""
        api = self._api()
        if run_ids is None:
            runs = self._active_runs(api)
        else:
            runs = [api.get_run(r) for r in dict.fromkeys(run_ids)]
        return self._sync_runs(api, runs)

    def _sync_runs(
        self, api: RunsApi, runs: builtins.list[dict[str, Any]]
    ) -> builtins.list[RunInfo]:
        groups: dict[str, builtins.list[dict[str, Any]]] = {}
        for run in runs:
            tags = run_tags(run)
            state = tags.get(TAG_STATE)
            if state in ACTIVE_STATES and tags.get(TAG_JOB_ID) and tags.get(TAG_BACKEND_SPEC):
                groups.setdefault(tags[TAG_BACKEND_SPEC], []).append(run)
        changed: set[str] = set()
        for group in groups.values():
            try:
                backend, _ = self._backend_of_run(group[0])
                for run in group[1:]:
                    self._backend_of_run(run)
                job_ids = [run_tags(r)[TAG_JOB_ID] for r in group]
                statuses = backend.states(job_ids)
            except MantikError as exc:
                # Unreachable cluster, refused login, changed host key: the job's fate is
                # unknown, not failed. The message says what is wrong.
                for run in group:
                    if self._mark_unknown(api, run, exc):
                        changed.add(run["info"]["run_id"])
                continue
            for run in group:
                status = statuses.get(run_tags(run)[TAG_JOB_ID], JobStatus(RunState.UNKNOWN))
                if self._apply(api, backend, run, status):
                    changed.add(run["info"]["run_id"])
        return [
            RunInfo.from_run(
                api.get_run(r["info"]["run_id"]) if r["info"]["run_id"] in changed else r
            )
            for r in runs
        ]

    def _mark_unknown(self, api: RunsApi, run: Mapping[str, Any], exc: MantikError) -> bool:
        run_id = run["info"]["run_id"]
        log.warning("run %s: state unknown: %s", run_id, exc.message)
        tags = run_tags(run)
        message = _clip(exc.message)
        if tags.get(TAG_STATE) == RunState.UNKNOWN and tags.get(TAG_STATE_MESSAGE) == message:
            return False
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
        # An active job's reason says why it cannot go on (a request its partition can
        # never meet); it goes when that changes.
        reason_gone = not status.reason and bool(tags.get(TAG_REASON))
        if status.reason and tags.get(TAG_REASON) != _clip(status.reason):
            new_tags[TAG_REASON] = _clip(status.reason)
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
            end_time = _int_or_none(run["info"].get("end_time"))
            if state == RunState.FINISHED and current in ("FAILED", "KILLED"):
                # The entry point exited 0 but reported its run as failed: believe the run.
                state = _MLFLOW_STATUS_STATE[current]
                reason = f"the run reported status {current}"
            new_tags = {TAG_NATIVE_STATE: status.native_state} if status.native_state else {}
            if reason:
                new_tags[TAG_REASON] = _clip(reason)
            elif tags.get(TAG_REASON):
                api.delete_tag(run_id, TAG_REASON)  # why it waited, while it did
            if status.exit_code is not None:
                new_tags[TAG_EXIT_CODE] = str(status.exit_code)
            if tags.get(TAG_STATE_MESSAGE):
                api.delete_tag(run_id, TAG_STATE_MESSAGE)
            target = state.mlflow_status
            if current != target or not end_time:
                keep_end = current == target and end_time
                api.update_run(run_id, status=target, end_time=end_time if keep_end else now_ms())
            self._delete_run_user(tags)
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

    def _delete_run_user(self, tags: Mapping[str, str]) -> None:
        username = tags.get(TAG_RUN_USER)
        if not username:
            return
        admin = self._admin()
        if admin is None:
            log.warning("cannot delete the per-run user %s: no admin credential", username)
            return
        delete_run_user(admin, username)

    # ---- logs ---------------------------------------------------------------------------

    def logs(self, ref: str, offset: int = 0) -> LogChunk:
        """Log text from byte ``offset``; ``final`` once the run ended and all was read."""
        if offset < 0:
            raise InvalidRequest(f"offset must be 0 or more, got {offset}")
        api = self._api()
        return self._log_chunk(api, self._resolve_run(api, ref), offset)

    def all_logs(self, ref: str, offset: int = 0) -> LogChunk:
        """All log text there is now from ``offset`` (``logs`` gives one read of it)."""
        if offset < 0:
            raise InvalidRequest(f"offset must be 0 or more, got {offset}")
        api = self._api()
        run = self._resolve_run(api, ref)  # once, not for every read
        parts = []
        while True:
            chunk = self._log_chunk(api, run, offset)
            if not chunk.text:
                return LogChunk("".join(parts), chunk.offset, chunk.final)
            parts.append(chunk.text)
            offset = chunk.offset

    def _log_chunk(self, api: RunsApi, run: Mapping[str, Any], offset: int) -> LogChunk:
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

    def _read_log(self, api: RunsApi, run: Mapping[str, Any], offset: int, final: bool) -> bytes:
        try:
            backend, job_id = self._backend_of_run(run)
            data, _ = backend.read_log(job_id, offset)
            return data
        except (BackendUnavailable, NotFound):
            if not final:
                raise
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
            return b""

    def follow_logs(
        self, ref: str, *, poll_interval: float = 0.5, offset: int = 0
    ) -> Iterator[str]:
        """Yield log text as it grows, until the run ended and everything was read."""
        api = self._api()
        run = self._resolve_run(api, ref)
        final = RunInfo.from_run(run).state.is_final
        last_sync = time.monotonic()
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
                yield chunk.text
                continue
            if final:
                return
            # Ask the backend for the state only now and then (it may be a remote call).
            if time.monotonic() - last_sync >= max(poll_interval, 2.0):
                info = self._sync_runs(api, [run])[0]
                last_sync = time.monotonic()
                if info.state.is_final:
                    run = api.get_run(info.run_id)
                    final = True
                    continue
            time.sleep(poll_interval)

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
            api.set_tags(run_id, {TAG_STATE: str(RunState.KILLED), TAG_REASON: "CANCELLED"})
            api.update_run(run_id, status="KILLED", end_time=now_ms())
            self._delete_run_user(info.tags)
            return RunInfo.from_run(api.get_run(run_id))
        backend, job_id = self._backend_of_run(run)
        backend.cancel(job_id)
        deadline = time.monotonic() + CANCEL_WAIT
        while True:
            info = self._sync_runs(api, [api.get_run(run_id)])[0]
            if info.state.is_final or time.monotonic() > deadline:
                return info
            time.sleep(0.5)

    # ---- files --------------------------------------------------------------------------

    def files(self, ref: str, path: str = "") -> builtins.list[FileEntry]:
        rel = clean_relative(path)
        backend, job_id = self._backend_of_run(self._resolve_run(self._api(), ref))
        return backend.list_files(job_id, rel)

    def open_file(self, ref: str, path: str) -> Iterator[bytes]:
        rel = clean_relative(path)
        if not rel:
            raise InvalidRequest("Give the path of a file of the run directory.")
        backend, job_id = self._backend_of_run(self._resolve_run(self._api(), ref))
        return backend.open_file(job_id, rel)

    def download(
        self,
        ref: str,
        path: str = "",
        dest: Path | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Path:
        """Copy a file or folder (default: the whole run directory) to ``dest``
        (default: the current directory); returns the local path."""
        rel = clean_relative(path)
        target = Path(dest) if dest else Path.cwd()
        usable_path(target, "download destination")
        backend, job_id = self._backend_of_run(self._resolve_run(self._api(), ref))
        try:
            return backend.download(job_id, rel, target, progress)
        except (ConnectionError, TimeoutError):
            raise
        except PermissionError as exc:
            raise PermissionDenied(
                f"Cannot write the download to {target}: {exc.strerror} ({exc.filename}). "
                "Choose a destination you can write to."
            ) from None
        except OSError as exc:  # the backends map their remote side's errors themselves
            raise InvalidRequest(
                f"Cannot write the download to {target}: {exc.strerror or exc} "
                f"({exc.filename}). Choose another destination."
            ) from None


# ---- helpers ------------------------------------------------------------------------------


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


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TAG_VALUE else text[: MAX_TAG_VALUE - 3] + "..."


def _delete_run_user_quietly(admin: TrackingClient | None, username: str) -> None:
    """For cleanup after a failure: the failure is what gets reported, not this."""
    if admin is None:
        return
    try:
        delete_run_user(admin, username)
    except MantikError as exc:
        log.warning("could not delete the per-run user %s: %s", username, exc.message)


def _key_values(items: Mapping[str, str]) -> builtins.list[dict[str, str]]:
    """Tags or params as MLflow's REST API lists them."""
    return [{"key": k, "value": str(v)} for k, v in items.items()]


def _experiment_refused(api: RunsApi, user: str | None, experiment: str) -> PermissionDenied:
    who = f"user {user!r}" if user else "your token"
    return PermissionDenied(
        f"The tracking server {api.client.uri} does not let {who} add runs to the experiment "
        f"{experiment}: it belongs to someone else. Ask its owner for EDIT permission on it, "
        "or submit to an experiment of your own (another experiment name)."
    )


def _credential_file(credential: Credential) -> str:
    return "".join(f"{k}={v}\n" for k, v in credential.env().items())


def _run_dir_of(backend: Backend, job_id: str) -> str:
    run_dir_of = getattr(backend, "run_dir_of", None)
    return str(run_dir_of(job_id)) if run_dir_of is not None else ""


def _extra_files(config: ComputeConfig, project_dir: Path) -> builtins.list[Path]:
    apptainer = config.environment.apptainer
    if apptainer is None or apptainer.type != "local":
        return []
    path = Path(apptainer.path).expanduser()
    if not path.is_absolute():
        path = project_dir / path
    if not path.is_file():
        raise ConfigError(
            f"{config.source}: Environment.Apptainer.Path {apptainer.path!r} is a local image "
            f"(Type: local), but {path} does not exist. Give the image's path, or set "
            "Type: remote for an image on the cluster."
        )
    return [path]


def _git_tags(project_dir: Path) -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args],
                cwd=project_dir,
                capture_output=True,
                text=True,
                timeout=15,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    dirty = git("status", "--porcelain", "--untracked-files=normal", "--", ".")
    tags = {TAG_GIT_COMMIT: commit.strip(), "mlflow.source.git.commit": commit.strip()}
    if dirty is not None:
        tags[TAG_GIT_DIRTY] = "true" if dirty.strip() else "false"
    return tags
