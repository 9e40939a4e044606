"""The submission path of ``RunService.submit``: create the MLflow run, ship the job,
record it.

Secrets: the job's tracking credential only exists in the 0600 file next to the job
script (deleted locally right after submission, by the job when it starts (a Slurm job
when it ends: a requeue starts it again), by the backend's ``cancel``, and by
``Backend.job_ended`` for a job its scheduler killed). With the
embedded server (``TrackingService.is_embedded``) each run gets its own MLflow user with
``EDIT`` on its experiment, deleted when the run ends; with a remote server the job gets
the user's own credential.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from ..errors import Conflict, InvalidRequest, MantikError, PermissionDenied
from ..tracking.credentials import Credential
from ..tracking.rest import TrackingClient
from ..tracking.run_users import (
    admin_client,
    create_run_user,
    delete_run_user_quietly,
    new_run_username,
)
from ..tracking.runs_api import RunsApi, now_ms, run_tags
from ..tracking.secrets import write_private
from ..tracking.service import TrackingService
from .backends.base import Backend, PreparedJob
from .config import ComputeConfig, load_config
from .layout import CREDENTIALS_FILE, JOB_SCRIPT, PACKAGE_FILE
from .packaging import build_package
from .project import load_project, resolve_entry_point
from .run_inputs import (
    check_tracking_uri,
    extra_files,
    git_tags,
    resolve_config,
    resolve_project,
)
from .run_record import (
    ARTIFACT_CODE,
    ARTIFACT_CONFIG,
    ARTIFACT_DIR,
    ARTIFACT_SCRIPT,
    SOURCES,
    TAG_BACKEND,
    TAG_BACKEND_SPEC,
    TAG_BINDING,
    TAG_CONFIG,
    TAG_ENTRY_POINT,
    TAG_JOB_ID,
    TAG_PROJECT,
    TAG_REASON,
    TAG_RUN_DIR,
    TAG_RUN_USER,
    TAG_SHA,
    TAG_SOURCE,
    TAG_STATE,
    TAG_USER,
    TAG_WARNING,
    RunInfo,
    clip,
    submitting_user,
)
from .script import Scheduler, render_job_script, safe_job_name
from .states import RunState

log = logging.getLogger(__name__)

# How each backend kind starts the job script (see script.Scheduler).
_SCHEDULERS: dict[str, Scheduler] = {"ssh": "slurm", "unicore": "unicore"}

# Seconds a submission trusts an experiment lookup of an earlier one.
EXPERIMENT_TTL = 60.0


class MantikRunWarning(UserWarning):
    """Something about a submission that works but will likely not do what is meant."""


# Like MLflow's limit on param and tag keys: a name to read in lists, not a text.
MAX_RUN_NAME = 250


class Submitter:
    """The submissions of one ``RunService``. ``backend_for`` gives a config's backend
    spec and the service's backend for it; ``sign`` gives a run's ``mantik.binding``
    (``RunKeys.sign``); experiment lookups are remembered here."""

    def __init__(
        self,
        tracking: TrackingService,
        backend_for: Callable[[ComputeConfig], tuple[dict[str, Any], Backend]],
        sign: Callable[[str, Mapping[str, str]], str],
    ) -> None:
        self.tracking = tracking
        self._backend_for = backend_for
        self._sign = sign
        self._lock = threading.Lock()
        # (tracking URI, "id <id>" | "name <name>") -> (experiment id, when learnt).
        self._experiments: dict[tuple[str, str], tuple[str, float]] = {}

    def submit(
        self,
        project_dir: str | Path,
        *,
        backend_config: str | Path | None,
        entry_point: str,
        params: Mapping[str, str] | None,
        experiment_name: str | None,
        experiment_id: str | None,
        run_name: str | None,
        source: str,
        progress: Callable[[str, int, int], None] | None,
        work_dir: Path,
        root_dir: Path | None,
        job_tracking_uri: str | None,
        package_size_limit: int | None,
    ) -> RunInfo:
        """``RunService.submit`` (see there), given the service's settings."""
        if source not in SOURCES:
            raise InvalidRequest(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        if experiment_name and experiment_id:
            raise InvalidRequest("Give an experiment name or an experiment id, not both.")
        if run_name and len(run_name) > MAX_RUN_NAME:
            # MLflow stores any length, and sends it back with every run list.
            raise InvalidRequest(
                f"run_name has {len(run_name)} characters; give at most {MAX_RUN_NAME} "
                "(put longer notes into a parameter or an MLflow note on the run)."
            )
        # Everything the user can get wrong is checked before anything is created.
        project_path = resolve_project(project_dir, root_dir)
        config = load_config(resolve_config(project_path, backend_config, root_dir), project_path)
        spec, backend = self._backend_for(config)
        # The signing key is made (or found unusable) now: the job's tags are signed
        # once it is queued, where a failure would lose the job.
        self._sign("", {})
        # The login at the cluster (key exchange, authentication, a site's session)
        # overlaps loading the project (MLflow's project code is slow to import) and
        # packaging; it is waited for before anything is created in MLflow, so that a
        # credential or host the cluster refuses leaves no FAILED run behind.
        login = _in_thread(backend.check_credentials, "mantik-login")
        project = load_project(project_path)
        resolved = resolve_entry_point(project, entry_point, dict(params or {}))
        job_uri = job_tracking_uri or self.tracking.uri
        notes = check_tracking_uri(job_uri, spec)
        for note in notes:
            # Attributed to the caller of RunService.submit.
            warnings.warn(note, MantikRunWarning, stacklevel=3)
        work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=work_dir))
        # What the user waits for is "called" -> "job queued". MLflow calls that do not
        # depend on each other run in parallel (each in a thread has its own HTTP session,
        # see ``_new_session``), and all are waited for before returning.
        pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mantik-submit")
        run_id: str | None = None
        try:
            package = build_package(
                project_path,
                staging / PACKAGE_FILE,
                exclude=config.exclude,
                extra_files=extra_files(config, project_path),
                size_limit=package_size_limit,
                progress=(lambda d, t: progress("package", d, t)) if progress else None,
            )
            if progress and not login.done():
                # A slow or silent login node is waited for up to its connect timeout:
                # with nothing said after "package 100%", it looked like a hang.
                progress("login", 0, 0)
            login.result()
            api = RunsApi(self.tracking.client())
            user = submitting_user(self.tracking)
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
                raise _experiment_refused(api, user, experiment, looked_up=True) from None
            tags = {
                TAG_STATE: str(RunState.SUBMITTING),
                TAG_BACKEND: backend.capabilities.name,
                TAG_BACKEND_SPEC: json.dumps(spec, sort_keys=True),
                TAG_ENTRY_POINT: resolved.name,
                TAG_SOURCE: source,
                TAG_SHA: package.sha256,
                TAG_PROJECT: project.name or project_path.name,
                TAG_CONFIG: config.name,
                "mlflow.source.name": str(project_path),
                "mlflow.source.type": "PROJECT",
                "mlflow.project.entryPoint": resolved.name,
                "mlflow.project.backend": backend.capabilities.name,
                **git_tags(project_path),
            }
            if user:
                tags[TAG_USER] = user
                tags["mlflow.user"] = user
            if notes:
                tags[TAG_WARNING] = clip(" ".join(notes))
            admin = admin_client(self.tracking)
            run_user: str | None = None
            user_made: Future[Credential] | None = None
            if admin is not None:
                run_user = new_run_username()
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
                    delete_run_user_quietly(admin, run_user)
                if isinstance(exc, PermissionDenied):  # may read it, but not add to it
                    raise _experiment_refused(api, user, experiment) from None
                raise
            run_id = run["info"]["run_id"]
            job_dir = work_dir / run_id
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
                # With the params, the run is signed from the start (no job yet): only a
                # signature of ours makes mantik delete the per-run user it names.
                before_start = [
                    pool.submit(_new_session(api).update_run, run_id, status="SCHEDULED"),
                    pool.submit(
                        _new_session(api).log_batch,
                        run_id,
                        params=resolved.params,
                        tags={TAG_BINDING: self._sign(run_id, tags)},
                    ),
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
                    name: pool.submit(_new_session(api).upload_artifact, run, name, data)
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
                    # The total the backends count: every file shipped, not the package
                    # alone (the bar's total jumped when the first count came).
                    progress("upload", 0, sum((job_dir / f).stat().st_size for f in job.files))
                try:
                    job_id = backend.submit(
                        job, progress=(lambda d, t: progress("upload", d, t)) if progress else None
                    )
                finally:
                    (job_dir / CREDENTIALS_FILE).unlink(missing_ok=True)
            except BaseException as exc:
                wait(pending)
                _submission_failed(api, admin, run_id, run_user, exc)
                raise
            # The job is queued: from here on nothing may lose its id.
            job_tags = {
                TAG_JOB_ID: job_id,
                TAG_RUN_DIR: backend.run_dir_of(job_id),
                TAG_STATE: str(RunState.QUEUED),
            }
            cancelled = _cancelled_meanwhile(api, run_id)
            if cancelled:
                job_tags[TAG_STATE] = str(RunState.KILLED)
            # With the job's tags, in one call: a run is never followable unsigned.
            job_tags[TAG_BINDING] = self._sign(run_id, {**tags, **job_tags})
            _record_job(api, run_id, job_tags)
            if cancelled:
                wait(pending)
                raise _stop_cancelled_job(backend, run_id, job_id)
            notes = notes + _artifact_failures(api, run_id, notes, artifacts)
        finally:
            pool.shutdown()
            shutil.rmtree(staging, ignore_errors=True)
            if run_id:
                shutil.rmtree(work_dir / run_id, ignore_errors=True)
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


def _new_session(api: RunsApi) -> RunsApi:
    """The same server and credential over a new HTTP session, for a call in another
    thread (``requests.Session`` is not thread-safe)."""
    return RunsApi(TrackingClient(api.client.uri, api.client.credential))


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
        api.set_tags(run_id, {TAG_WARNING: clip(" ".join([*notes, note]))})
    except MantikError as exc:
        log.warning("run %s: could not tag the warning: %s", run_id, exc.message)
    return [note]


def _cancelled_meanwhile(api: RunsApi, run_id: str) -> bool:
    """Whether the run was cancelled while it was being submitted (``RunService.cancel``
    of a run without a job marks it KILLED: from the sidebar, another command, a
    colleague), which the submission learns only here, once its job is queued."""
    try:
        return run_tags(api.get_run(run_id)).get(TAG_STATE) == RunState.KILLED
    except MantikError as exc:
        log.warning("run %s: could not check whether it was cancelled: %s", run_id, exc.message)
        return False


def _stop_cancelled_job(backend: Backend, run_id: str, job_id: str) -> Conflict:
    """Cancel the job of a run cancelled while it was submitted; the error to raise.
    Its per-run tracking user went with the cancel: the job could not log anyway."""
    try:
        backend.cancel(job_id)
        stopped = "was cancelled as soon as it was queued"
    except MantikError as exc:
        log.warning("run %s: cancelling job %s failed: %s", run_id, job_id, exc.message)
        stopped = f"could not be cancelled ({exc.message}): cancel it on the cluster"
    return Conflict(
        f"Run {run_id} was cancelled while it was being submitted: its job {job_id} "
        f"{stopped}. The run stays KILLED."
    )


def _submission_failed(
    api: RunsApi,
    admin: TrackingClient | None,
    run_id: str,
    run_user: str | None,
    exc: BaseException,
) -> None:
    message = exc.message if isinstance(exc, MantikError) else f"{type(exc).__name__}: {exc}"
    state, reason = RunState.FAILED, f"submission failed: {message}"
    if isinstance(exc, KeyboardInterrupt):
        # The user stopped it (Ctrl-C, a kernel interrupt): not a failure, and no
        # 'KeyboardInterrupt: ' with nothing after it.
        state, reason = RunState.KILLED, "the submission was interrupted before the job was queued"
    try:
        api.set_tags(run_id, {TAG_STATE: str(state), TAG_REASON: clip(reason)})
        api.update_run(run_id, status=str(state), end_time=now_ms())
    except MantikError as again:
        log.warning("could not mark run %s as %s: %s", run_id, state, again.message)
    if run_user and admin is not None:
        delete_run_user_quietly(admin, run_user)


def _key_values(items: Mapping[str, str]) -> list[dict[str, str]]:
    """Tags or params as MLflow's REST API lists them."""
    return [{"key": k, "value": str(v)} for k, v in items.items()]


def _experiment_refused(
    api: RunsApi, user: str | None, experiment: str, *, looked_up: bool = False
) -> PermissionDenied:
    """``looked_up``: refused when looking the experiment up, where MLflow's auth layer
    answers an id that does not exist as one the user may not use."""
    who = f"user {user!r}" if user else "your token"
    whose = "it belongs to someone else"
    if looked_up and experiment.startswith("id "):
        whose = "there is no such experiment, or " + whose
    return PermissionDenied(
        f"The tracking server {api.client.uri} does not let {who} add runs to the experiment "
        f"{experiment}: {whose}. Ask its owner for EDIT permission on it, "
        "or submit to an experiment of your own (another experiment name)."
    )


def _credential_file(credential: Credential) -> str:
    return "".join(f"{k}={v}\n" for k, v in credential.env().items())


def _in_thread(action: Callable[[], None], name: str) -> Future[None]:
    """``action`` in a thread of its own, its outcome in the future. A daemon thread: a
    submission that fails before it waits must not keep the process alive for a login."""
    outcome: Future[None] = Future()

    def run() -> None:
        try:
            action()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            outcome.set_exception(exc)
        else:
            outcome.set_result(None)

    threading.Thread(target=run, name=name, daemon=True).start()
    return outcome
