"""UNICORE: the backend for sites reached through a UNICORE REST API (JUWELS, JURECA, ...).

Everything goes through pyunicore's client (``Client``, ``Job``, ``Storage``,
``PathFile``); no HTTP is written by hand. ``unicore_transport.py`` adds to pyunicore's
``Transport`` what the backend needs (UNICORE's own error messages, TLS verified by
default, kept-alive connections, one security session a login); ``unicore_job.py`` holds
the job description and how UNICORE's answers become a run's state.

A run is one UNICORE job (``Job type`` BATCH). Its working directory (the job's
"uspace") is the run directory, with the same layout as on the other backends:

* the job is created with ``haveClientStageIn: "true"``; ``package.tar.gz``,
  ``mantik-job.sh`` and ``.mantik-credentials`` are uploaded into its working directory
  (client stage-in), then the job is started (``action:start``);
* the ``User precommand`` runs on the login node (``RunUserPrecommandOnLoginNode``):
  it unpacks the package into ``code/`` and then runs ``PreRunCommandOnLoginNode``;
  ``PostRunCommandOnLoginNode`` becomes the ``User postcommand`` on the login node.
  Their output goes to ``mantik-login.log`` in the run directory;
* ``Executable: bash``, ``Arguments: [mantik-job.sh]`` runs the generated job script
  (rendered with ``scheduler="unicore"``) on the compute node, ``Stdout``/``Stderr``
  ``mantik.log``; ``Resources`` become UNICORE resource requests (``Runtime`` in
  seconds, rounded up to whole minutes, ``MemoryPerNode`` in megabytes), the compute
  budget account becomes ``Project``; ``Environment.Variables``, modules, the
  venv/Apptainer image and the MLflow settings are set by the job script on the compute
  node, like on Slurm.

The tracking credential. The UNICORE protocol offers one way to get a file to the
job: through the UNICORE server (HTTPS to the gateway and UNICORE/X, which writes it
into the job directory through the TSI). So the credential necessarily passes through
the site's UNICORE services and sits in the job directory on the cluster file system
from stage-in until the job script starts. What is done to limit that: it is never in
the job description (UNICORE stores descriptions and shows them at
``/jobs/{id}/submitted``), nor in the ``Environment``, the job's name, tags or log; it
is uploaded as the file ``.mantik-credentials`` into the job directory, which UNICORE
makes with the job's ``Umask: 077`` (mode 0700: the file inside gets the storage's umask,
027 by default, but nobody else can reach it), before the job is started; the
job script reads it as data and deletes it first thing, as on Slurm (``cancel`` deletes
it for a job aborted before it started); with the embedded tracking server it is a
per-run user that can only write to the run's experiment and is deleted when the run
ends.

Job ids are UNICORE's job ids (the last part of the job URL). The run directory
(``run_dir_of``) is the URL of the job's working-directory storage; after a restart of
the lab the RunService hands it back with ``attach(job_id, run_dir)``.

States: UNICORE's REST API lists jobs only as URLs (``GET /jobs`` answers
``{"jobs": [url, ...]}``, see unicorex ``Jobs``/``ServicesBase``), so the list cannot
give states. ``states()`` therefore asks each job once, narrowed with
``?fields=status,statusMessage,exitCode,consumedTime``, several jobs in parallel. pyunicore's
``Job.exit_code`` turns an exit code of 0 into ``None``; the raw ``exitCode`` property is
read instead, and ``mantik.exitcode`` in the working directory is the fallback. The
mapping is in ``docs/states.md``.

Credentials: ``token`` (OIDC/bearer, e.g. ``MANTIK_UNICORE_TOKEN``) or
``username``/``password`` (``MANTIK_UNICORE_USERNAME``/``MANTIK_UNICORE_PASSWORD``),
read from the environment again whenever the site refused the last login.
They never appear in messages, logs or reprs.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import itertools
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pyunicore import client as uc
from pyunicore.credentials import AuthenticationFailedException, OIDCToken, UsernamePassword

from ...errors import (
    AuthenticationFailed,
    BackendRejected,
    BackendUnavailable,
    ConfigError,
    Conflict,
    InvalidRequest,
    MantikError,
    NotFound,
    PermissionDenied,
)
from .. import layout
from ..states import RunState
from .base import (
    Backend,
    Capabilities,
    FileEntry,
    FileOpener,
    FolderMember,
    JobStatus,
    PreparedJob,
    Progress,
    describe_error,
)
from .paths import CREDENTIALS_SKIPPED, clean_relative, is_credentials, safe_name, save_stream
from .slurm_words import waiting_for_good
from .unicore_job import (
    NOT_NORMALLY,
    bss_details,
    decide,
    exit_code,
    job_description,
    login_step_failed,
    needs_project,
)
from .unicore_transport import (
    SessionTransport,
    UnicoreHTTPError,
    http_client,
    untrusted_certificate,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

ENV_UNICORE_USERNAME = "MANTIK_UNICORE_USERNAME"
ENV_UNICORE_PASSWORD = "MANTIK_UNICORE_PASSWORD"  # noqa: S105 - a variable name
ENV_UNICORE_TOKEN = "MANTIK_UNICORE_TOKEN"  # noqa: S105 - a variable name

STATE_WORKERS = 8
# How much of the end of mantik-login.log a failed login-node step's reason shows.
LOGIN_LOG_TAIL = 1500
# How often the batch system is asked why a queued job waits (/details: the site's TSI
# runs `scontrol show job` on a login node each time), per job.
DETAILS_INTERVAL = 300.0
# consumedTime: what UNICORE measured of each phase (JobProcessor.TimeProfile), in seconds.
_STATE_FIELDS = "status,statusMessage,exitCode,consumedTime"
_LOGIN = "logging in"

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# ---- the backend -------------------------------------------------------------------------


class UnicoreBackend(Backend):
    """Runs jobs at a UNICORE site (``api_url`` is its ``.../rest/core`` URL)."""

    capabilities = Capabilities(
        name="unicore",
        # UNICORE's job list carries no states: one (small, parallel) request per job.
        batch_states=False,
        description="Batch jobs at a UNICORE site (UnicoreApiUrl)",
    )

    def __init__(
        self,
        api_url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        verify: bool | str = True,
        timeout: float = 60.0,
        run_dirs: dict[str, str] | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        # A credential given here is kept. Otherwise the environment is read again at
        # every login (the first, and the next one after the site refused the old
        # credential): a renewed MANTIK_UNICORE_TOKEN then works in the running lab or
        # kernel, whose RunService keeps this backend.
        self._given = (username, password, token) if token or (username and password) else None
        self.username: str | None = None
        self._password: str | None = None
        self._token: str | None = None
        self._pick_credential()
        self._verify = verify
        self._timeout = timeout
        self._run_dirs: dict[str, str] = dict(run_dirs or {})
        # (job id, file name) -> how much of it was read: files read are logs that only grow.
        self._known_sizes: dict[tuple[str, str], int] = {}
        # job id -> (when asked, monotonic; why it waits for good, or None).
        self._waiting: dict[str, tuple[float, str | None]] = {}
        self._client: uc.Client | None = None
        self._http: httpx.Client | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:  # no credentials in reprs that end up in logs
        return f"UnicoreBackend({self.api_url})"

    # ---- connection and errors -------------------------------------------------------------

    def _pick_credential(self) -> None:
        username, password, token = self._given or (
            os.environ.get(ENV_UNICORE_USERNAME) or None,
            os.environ.get(ENV_UNICORE_PASSWORD) or None,
            os.environ.get(ENV_UNICORE_TOKEN) or None,
        )
        self.username = None if token else username
        self._password = None if token else password
        self._token = token

    def _credential(self) -> UsernamePassword | OIDCToken:
        self._pick_credential()
        if self._token:
            _check_token_expiry(self._token, self.api_url)
            return OIDCToken(self._token)
        if self.username and self._password:
            return UsernamePassword(self.username, self._password)
        raise AuthenticationFailed(
            f"No credential for the UNICORE site {self.api_url}: set {ENV_UNICORE_USERNAME} "
            f"and {ENV_UNICORE_PASSWORD}, or {ENV_UNICORE_TOKEN} (an OIDC access token)."
        )

    def _refused(self) -> AuthenticationFailed:
        if self._token:
            return AuthenticationFailed(
                f"The UNICORE site {self.api_url} refused the access token: it has probably "
                f"expired or is not valid for this site. Renew the token and set it again "
                f"({ENV_UNICORE_TOKEN})."
            )
        return AuthenticationFailed(
            f"The UNICORE site {self.api_url} refused the login of user {self.username!r}. "
            f"Check the user name and password ({ENV_UNICORE_USERNAME}/"
            f"{ENV_UNICORE_PASSWORD})."
        )

    def client(self) -> uc.Client:
        """The pyunicore site client (the login is checked when it is made)."""
        with self._lock:
            if self._client is None:
                credential = self._credential()

                if self._http is None:
                    self._http = http_client(self._verify, STATE_WORKERS)
                http = self._http

                def connect() -> uc.Client:
                    transport = SessionTransport(credential, http)
                    transport.timeout = self._timeout
                    return uc.Client(transport, self.api_url)

                self._client = self._call(connect, _LOGIN)
            return self._client

    def _call(self, action: Callable[[], T], what: str) -> T:
        """Run a pyunicore call; turn its failures into the domain errors."""
        try:
            return action()
        except MantikError:
            raise
        except AuthenticationFailedException:
            raise self._refused() from None
        except UnicoreHTTPError as exc:
            raise self._http_error(exc, what) from None
        except (httpx.TransportError, OSError) as exc:
            if untrusted_certificate(exc):
                with self._lock:  # SSL_CERT_FILE is read when the next client is made
                    self._client = None
                    self._http = None
                raise BackendUnavailable(
                    f"The TLS certificate of the UNICORE site {self.api_url} could not be "
                    f"verified ({describe_error(exc)}). If the site's certificate is signed by its "
                    "own CA, set SSL_CERT_FILE to that CA's PEM bundle in the environment of "
                    "`jupyter lab`, the kernel or `mantik`."
                ) from None
            raise BackendUnavailable(
                f"Cannot reach the UNICORE site {self.api_url} while {what}: "
                f"{describe_error(exc)}{self._https_hint(exc)}"
            ) from None
        except httpx.HTTPError as exc:
            raise BackendUnavailable(
                f"The UNICORE site {self.api_url} failed while {what}: {describe_error(exc)}"
            ) from None
        except (KeyError, ValueError, TypeError) as exc:
            raise BackendUnavailable(
                f"The UNICORE site {self.api_url} gave an answer that is not UNICORE's REST "
                f"API while {what} ({describe_error(exc)}); is UnicoreApiUrl the site's "
                ".../rest/core URL?"
            ) from None

    def _https_hint(self, exc: BaseException) -> str:
        """UNICORE sites serve HTTPS only: an http:// URL meets a TLS port that drops the
        plain request (a reset, a connection closed without an answer) or a closed port."""
        if not self.api_url.lower().startswith("http://"):
            return ""
        seen: BaseException | None = exc
        while seen is not None:
            if isinstance(seen, socket.gaierror):
                return ""  # the host name is wrong, not the scheme
            seen = seen.__cause__ or seen.__context__
        https = "https://" + self.api_url[len("http://") :]
        return (
            f". UNICORE sites answer HTTPS only: if the site's URL starts with https://, "
            f"set UnicoreApiUrl to {https}"
        )

    def _http_error(self, exc: UnicoreHTTPError, what: str) -> MantikError:
        # UNICORE answers a credential it cannot verify (wrong password, expired token)
        # with a bare 403, not 401 (AuthNHandler), on the login and on any later call that
        # sends the credential (file reads, a renewed security session). A 403 is told
        # from a denied access by logging in again, with the credential as it is now.
        if exc.status in (401, 403):
            with self._lock:
                self._client = None
            if exc.status == 401 or what == _LOGIN:
                return self._refused()
            try:
                self.client()
            except AuthenticationFailed as refused:
                return refused
            except MantikError:
                pass
            return PermissionDenied(
                f"The UNICORE site {self.api_url} denied access while {what} "
                f"({exc.message}); your login there is valid but has no right to this. "
                "Check your project membership and roles with the site's support."
            )
        if 300 <= exc.status < 400:
            where = f"to {exc.location}" if exc.location else "elsewhere"
            return ConfigError(
                f"UnicoreApiUrl {self.api_url} is not the REST API of a UNICORE site: it "
                f"redirects {where} ({exc.status}). Set it to the site's .../rest/core URL, "
                "https://<gateway>/<SITE>/rest/core, as the site documents it."
            )
        if exc.status == 404 and what == _LOGIN:
            return ConfigError(
                f"UnicoreApiUrl {self.api_url} is not the REST API of a UNICORE site (it "
                "answered 404). Set it to the site's .../rest/core URL, "
                "https://<gateway>/<SITE>/rest/core, as the site documents it."
            )
        if exc.status == 404:
            return NotFound(f"Not found at the UNICORE site {self.api_url} while {what}: "
                            f"{exc.message}")  # fmt: skip
        if exc.status >= 500 or exc.status in (408, 429):
            return BackendUnavailable(
                f"The UNICORE site {self.api_url} answered {exc.status} while {what}: {exc.message}"
            )
        return BackendRejected(
            f"The UNICORE site {self.api_url} refused {what} ({exc.status}): {exc.message}"
        )

    def check_credentials(self) -> None:
        """Check the login at the site before the RunService creates the run, so that a
        credential mistake leaves no FAILED run behind. A missing credential or a JWT
        whose ``exp`` has passed is refused without a call; a wrong password or a revoked
        token only the site can tell, so it is asked once: the base resource with its
        ``client.role`` (the login pyunicore's ``Client`` makes). The client and its
        security session are kept for the submission that follows.

        Raises AuthenticationFailed (naming the site and what to set) for a credential
        the site refused, BackendUnavailable for a site that cannot be reached."""
        with self._lock:
            if self._client is not None and self._token and _token_expired(self._token):
                # A renewed token may be in the environment by now: log in anew.
                self._client = None
            if self._client is None:
                self.client()  # one round trip: pyunicore checks the role it gets
                return
            site = self._client
        # A login made earlier: the password may have been changed, or the token revoked,
        # since. Asked in its security session: one call, no new session at the site.
        self._call(lambda: _assert_login(site), _LOGIN)

    def close(self) -> None:
        with self._lock:
            self._client = None
            http, self._http = self._http, None
        if http is not None:
            http.close()

    # ---- bookkeeping -------------------------------------------------------------------------

    def attach(self, job_id: str, run_dir: str) -> None:
        self._run_dirs[self._check_job_id(job_id)] = run_dir

    def run_dir_of(self, job_id: str) -> str:
        """The URL of the job's working-directory storage."""
        job_id = self._check_job_id(job_id)
        if job_id not in self._run_dirs:
            job = self._job(job_id)
            self._run_dirs[job_id] = self._call(
                lambda: job.links["workingDirectory"], f"looking up job {job_id}"
            )
        return self._run_dirs[job_id]

    def job_url(self, job_id: str) -> str:
        return f"{self.api_url}/jobs/{self._check_job_id(job_id)}"

    @staticmethod
    def _check_job_id(job_id: str) -> str:
        job_id = str(job_id)
        if not _JOB_ID.match(job_id):
            raise NotFound(f"{job_id!r} is not a UNICORE job id")
        return job_id

    def _job(self, job_id: str) -> uc.Job:
        return uc.Job(self.client().transport, self.job_url(job_id))

    def _storage(self, job_id: str) -> uc.Storage:
        return uc.Storage(self.client().transport, self.run_dir_of(job_id))

    # ---- submit --------------------------------------------------------------------------------

    def submit(self, job: PreparedJob, progress: Progress | None = None) -> str:
        names = job.files or sorted(p.name for p in job.local_dir.iterdir() if p.is_file())
        for name in names:
            safe_name(name, "file name")
        if layout.JOB_SCRIPT not in names:
            raise InvalidRequest(f"{job.local_dir} holds no {layout.JOB_SCRIPT} to submit")
        config = job.config
        description = job_description(config, job.job_name, safe_name(job.run_id, "run id"))
        site = self.client()

        def create() -> uc.Job:
            try:
                return site.new_job(description, autostart=False)
            except UnicoreHTTPError as exc:
                if exc.status in (401, 403, 404):
                    raise
                # UNICORE answers a description it cannot accept with 4xx/500 and its reason.
                raise BackendRejected(
                    f"The UNICORE site {self.api_url} rejected the job of run {job.run_id}: "
                    f"{exc.message}"
                ) from None

        created = self._call(create, "submitting the job")
        job_id = self._check_job_id(created.job_id)
        try:
            workdir = self._call(lambda: self._working_dir(created), "opening the job directory")
            self._upload(workdir, job.local_dir, names, progress)
            self._call(created.start, "starting the job")
        except BaseException:
            # Do not leave a half-staged job (with the credential) behind.
            try:
                created.delete()
            except Exception as again:  # noqa: BLE001 - best effort
                log.warning("could not remove the half-submitted UNICORE job %s: %s", job_id,
                            describe_error(again))  # fmt: skip
            raise
        self._run_dirs[job_id] = workdir.resource_url
        log.info("submitted run %s as UNICORE job %s at %s", job.run_id, job_id, self.api_url)
        return job_id

    def _working_dir(self, job: uc.Job) -> uc.Storage:
        """The new job's directory, once UNICORE has made it (asynchronously: its storage
        is INITIALIZING until then). pyunicore's ``Job.working_dir`` waits too, but looks
        again only when its 5 s property cache expires, which made every submission 5 s
        slower than the site."""
        storage = uc.Storage(job.transport, job.links["workingDirectory"], cache_time=0)
        deadline = time.monotonic() + self._timeout
        pause = 0.05
        while True:
            status = str(storage.properties.get("resourceStatus", "READY"))
            if status == "READY":
                return storage
            if status not in ("INITIALIZING", "UNDEFINED") or time.monotonic() > deadline:
                raise BackendUnavailable(
                    f"The UNICORE site {self.api_url} did not make the working directory of "
                    f"job {job.job_id} ready (its status: {status}); try again later or ask "
                    "the site's support."
                )
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    def _upload(
        self, workdir: uc.Storage, local_dir: Path, names: list[str], progress: Progress | None
    ) -> None:
        total = sum((local_dir / n).stat().st_size for n in names)
        done = 0

        def counting(path: Path) -> Iterator[bytes]:
            nonlocal done
            with path.open("rb") as src:
                while chunk := src.read(layout.CHUNK):
                    done += len(chunk)
                    if progress:
                        progress(done, total)
                    yield chunk

        # No security session for uploads: pyunicore repeats a request the site answers
        # with 432 (session expired), and a streamed body cannot be sent twice.
        transport = workdir.transport._clone()
        transport.use_security_sessions = False
        for name in names:
            path = local_dir / name
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(path.stat().st_size),
            }

            def upload(path: Path = path, name: str = name, headers: dict = headers) -> None:
                transport.put(
                    url=_file_url(workdir, name), headers=headers, content=counting(path)
                ).close()

            self._call(upload, f"uploading {name}")
        if progress:
            progress(total, total)

    # ---- states --------------------------------------------------------------------------------

    def states(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """A job the site answers 404 for is gone for good: UNICORE finds a resource
        before it checks who may see it (another user's job is a 403), and deletes a job
        and its directory when its lifetime ends (aborting it if it still ran). Such a
        job has ended, how is lost with it: FAILED, unless the run's own MLflow client
        recorded how it ended (``outcome_known=False``)."""
        answer = {str(j): JobStatus(RunState.UNKNOWN, native_state="NOT_FOUND") for j in job_ids}
        valid = [j for j in dict.fromkeys(str(j) for j in job_ids) if _JOB_ID.match(j)]
        if not valid:
            return answer
        self.client()  # a refused login or an unreachable site raises here, once
        workers = min(STATE_WORKERS, len(valid))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(self._one_state, valid))
        unreachable = [r for r in results if isinstance(r, BackendUnavailable)]
        if unreachable and len(unreachable) == len(valid):
            raise unreachable[0]
        for job_id, result in zip(valid, results, strict=True):
            if isinstance(result, JobStatus):
                answer[job_id] = result
            elif isinstance(result, NotFound):
                answer[job_id] = JobStatus(
                    RunState.FAILED,
                    native_state="NOT_FOUND",
                    reason=(
                        f"the UNICORE site deleted job {job_id} before mantik learnt how it "
                        "ended (a site deletes a job and its directory when the job's "
                        "lifetime ends, stopping it if it still ran); what the run logged "
                        "to MLflow is kept"
                    ),
                    outcome_known=False,
                )
            elif isinstance(result, AuthenticationFailed):
                raise result
            else:
                answer[job_id] = JobStatus(RunState.UNKNOWN)
        return answer

    def _one_state(self, job_id: str) -> JobStatus | MantikError:
        transport = self.client().transport
        try:
            props = self._call(
                lambda: transport.get(url=self.job_url(job_id), params={"fields": _STATE_FIELDS}),
                f"asking for the state of job {job_id}",
            )
            status = str(props.get("status") or "UNDEFINED")
            message = str(props.get("statusMessage") or "")
            code = exit_code(props.get("exitCode"))
            if status in ("SUCCESSFUL", "FAILED") and code is None:
                code = self._exit_code_file(job_id)
            bss = None
            if status == "FAILED" and NOT_NORMALLY in message:
                bss = self._bss_details(job_id)
            project = None
            if status == "FAILED" and needs_project(message):
                project = self._project_of(job_id)
            tail = ""
            if status == "FAILED" and login_step_failed(message):
                tail = self._login_log_tail(job_id)
            decided = decide(status, message, code, bss, project, tail)
            if decided.state.is_final:
                self._waiting.pop(job_id, None)
                decided = self._with_times(job_id, decided, props.get("consumedTime"))
            elif status == "QUEUED":
                why = self._why_waiting(job_id)
                if why:
                    decided = dataclasses.replace(decided, reason=why)
            return decided
        except MantikError as exc:
            return exc

    def _why_waiting(self, job_id: str) -> str | None:
        """Why a queued job waits for good (a request its partition, QoS or account can
        never meet, which sites without EnforcePartLimits/DenyOnLimit accept), as the
        Slurm backend says it; None while it waits its turn. UNICORE says only QUEUED:
        the batch system's ``Reason`` is in the job's ``/details`` (Slurm sites), asked
        at most every DETAILS_INTERVAL, as each ask runs scontrol on the site."""
        now = time.monotonic()
        asked = self._waiting.get(job_id)
        if asked is not None and now - asked[0] < DETAILS_INTERVAL:
            return asked[1]
        transport = self.client().transport
        why = None
        # Not in the batch system yet (UNICORE says QUEUED from the user precommand on):
        # asked again sooner.
        when = now - DETAILS_INTERVAL + min(30.0, DETAILS_INTERVAL)
        try:
            details = self._call(
                lambda: transport.get(
                    url=f"{self.job_url(job_id)}/details", params={"fields": "JobState,Reason"}
                ),
                f"asking the batch system about job {job_id}",
            )
            if "JobState" in details:
                when = now
            if details.get("JobState") == "PENDING":
                why = waiting_for_good(str(details.get("Reason") or ""))
        except MantikError:
            pass  # not a Slurm site, or the TSI failed: nothing to say
        self._waiting[job_id] = (when, why)
        return why

    def _with_times(self, job_id: str, status: JobStatus, consumed: Any) -> JobStatus:
        """When an ended job's script ran, where the site tells it.

        UNICORE's job properties hold no time of the batch job (``submissionTime`` is
        the job's creation; ``consumedTime`` holds durations only); ``/details``, the
        batch system's own account (Slurm's StartTime/EndTime) through the TSI, gives
        the login node's local time without its zone, a forecast while the job runs,
        and nothing once Slurm forgot the job, so it is not used. What the protocol
        does give: the modification time of the exit-code file, which the job script
        writes last (file properties carry it with its UTC offset), and the run time
        UNICORE measured of the main execution (``consumedTime.main``). A job killed
        before it wrote the file (a time limit, an abort) gets neither: the sync then
        takes the moment it learns of the end."""
        try:
            props = self._stat(job_id, layout.EXIT_CODE_FILE)
        except MantikError:
            return status
        ended = _epoch_ms(props.get("lastAccessed"))
        if ended is None:
            return status
        main = consumed.get("main") if isinstance(consumed, dict) else None
        started = ended - int(str(main)) * 1000 if str(main or "").isdigit() else None
        return dataclasses.replace(status, started_at=started, ended_at=ended)

    def _bss_details(self, job_id: str) -> dict[str, str] | None:
        """What the batch system said of a job that ended without an exit code (its
        state: time limit, node failure, ...; its limits, its nodes): UNICORE puts it
        only into the job's log."""
        transport = self.client().transport
        try:
            props = self._call(
                lambda: transport.get(url=self.job_url(job_id), params={"fields": "log"}),
                f"reading the log of job {job_id}",
            )
        except MantikError:
            return None
        lines = props.get("log") if isinstance(props.get("log"), list) else []
        for line in reversed(lines):
            found = bss_details(str(line))
            if found is not None:
                return found
        return None

    def _login_log_tail(self, job_id: str) -> str:
        """The last lines of mantik-login.log, where a failed login-node step wrote why
        (the Slurm backend shows them with its refusal); "" when it cannot be read."""
        try:
            size = int(self._stat(job_id, layout.LOGIN_LOG_FILE).get("size") or 0)
            start = max(0, size - LOGIN_LOG_TAIL)
            self._known_sizes[(job_id, layout.LOGIN_LOG_FILE)] = start
            data, _ = self._read(job_id, layout.LOGIN_LOG_FILE, start, LOGIN_LOG_TAIL)
        except MantikError:
            return ""
        lines = data.decode(errors="replace").splitlines()
        return "\n".join(lines[1:] if start and len(lines) > 1 else lines)

    def _project_of(self, job_id: str) -> str | None:
        """The budget account a job asked for (its description's ``Project``), to name
        when the batch system refused it."""
        transport = self.client().transport
        try:
            description = self._call(
                lambda: transport.get(url=f"{self.job_url(job_id)}/submitted"),
                f"reading the description of job {job_id}",
            )
        except MantikError:
            return None
        resources = description.get("Resources")
        project = description.get("Project") or (
            resources.get("Project") if isinstance(resources, dict) else None
        )
        return str(project) if project else None

    def _exit_code_file(self, job_id: str) -> int | None:
        try:
            data, _ = self._read(job_id, layout.EXIT_CODE_FILE, 0, 64)
        except MantikError:
            return None
        # The first word: a file that holds only whitespace (a job killed while writing it)
        # has none, and says nothing.
        return exit_code(next(iter(data.decode(errors="replace").split()), None))

    # ---- logs, cancel ----------------------------------------------------------------------

    def read_log(self, job_id: str, offset: int = 0) -> tuple[bytes, int]:
        data, present = self._read(job_id, layout.LOG_FILE, offset, layout.MAX_LOG_READ)
        if not present and not self._job_dir_exists(job_id):
            # Sites delete a job and its directory some time after it ended; saying so
            # lets the RunService read the log stored with the run instead.
            raise self._missing(job_id, "")
        return data, offset + len(data)

    def _job_dir_exists(self, job_id: str) -> bool:
        storage = self._storage(job_id)
        try:
            self._call(
                lambda: storage.transport.get(url=storage.resource_url),
                f"looking up the run directory of job {job_id}",
            )
        except NotFound:
            return False
        return True

    def _read(self, job_id: str, name: str, offset: int, size: int) -> tuple[bytes, bool]:
        """Up to ``size`` bytes of a file from ``offset``; (b"", False) when it is absent."""
        storage = self._storage(job_id)
        url = _file_url(storage, name)
        path = uc.PathFile(storage, url, name)
        # UNICORE never answers a Range that starts past the end of the file (its server
        # loops on skip()), so an offset beyond what this backend has read of it is
        # checked against the file's size first. Following a log never needs that.
        if offset > self._known_sizes.get((job_id, name), 0):
            try:
                props = self._stat(job_id, name)
            except NotFound:
                return b"", False
            if offset > int(props.get("size") or 0):
                return b"", True

        def read() -> tuple[bytes, bool]:
            with path.raw(offset=offset, size=size) as resp:
                if resp.status_code in (404, 416):
                    return b"", resp.status_code == 416
                if resp.status_code >= 400:
                    storage.transport.check_error(resp)  # reads the error's body
                data = resp.read()
            if resp.status_code == 200 and offset:
                data = data[offset:]  # a server that ignored the Range
            return data[:size], True

        data, present = self._call(read, f"reading {name} of job {job_id}")
        if data:
            self._known_sizes[(job_id, name)] = offset + len(data)
        return data, present

    def cancel(self, job_id: str) -> None:
        job = self._job(job_id)
        try:
            self._call(job.abort, f"aborting job {job_id}")
        except NotFound:
            return  # gone already: nothing to stop
        # A job aborted before it ran never deletes its tracking credential itself.
        storage = self._storage(job_id)
        try:
            self._call(
                lambda: storage.rm(layout.CREDENTIALS_FILE),
                f"deleting the credential file of aborted job {job_id}",
            )
        except NotFound:
            pass  # the job started and deleted it

    # ---- files -----------------------------------------------------------------------------

    def list_files(self, job_id: str, path: str = "") -> list[FileEntry]:
        """The entries of one directory of the run (not recursive), directories first."""
        return _entries(self._listing(job_id, path))

    def _listing(self, job_id: str, path: str) -> dict[str, Any]:
        """What the site says of the folder ``path`` and of what is in it."""
        rel = clean_relative(path)
        storage = self._storage(job_id)
        try:
            listing = self._call(
                lambda: storage.transport.get(url=_file_url(storage, rel)), f"listing {rel or '/'}"
            )
        except NotFound:
            raise self._missing(job_id, rel) from None
        if not listing.get("isDirectory", "content" in listing):
            raise InvalidRequest(f"{path!r} of the run directory is not a folder")
        return listing

    def _stat(self, job_id: str, rel: str) -> dict[str, Any]:
        storage = self._storage(job_id)
        try:
            return self._call(
                lambda: storage.transport.get(
                    url=_file_url(storage, rel), headers={"Accept": "application/json"}
                ),
                f"looking at {rel or 'the run directory'}",
            )
        except NotFound:
            raise self._missing(job_id, rel) from None

    def _missing(self, job_id: str, rel: str) -> NotFound:
        # UNICORE's 404 is bare: it does not say what it did not find.
        if rel:
            return NotFound(
                f"There is no {rel!r} in the run directory of UNICORE job {job_id} at "
                f"{self.api_url}; list the run directory to see what is there."
            )
        return NotFound(
            f"The UNICORE site {self.api_url} no longer has the run directory of job "
            f"{job_id}: sites delete a job and its directory some time after it ended."
        )

    def open_file(self, job_id: str, path: str) -> Iterator[bytes]:
        rel = clean_relative(path)
        if not rel:
            raise InvalidRequest("Give the path of a file of the run directory.")
        if self._stat(job_id, rel).get("isDirectory"):
            raise InvalidRequest(f"{path!r} of the run directory is not a file")
        return self._stream(job_id, rel)

    def _stream(self, job_id: str, rel: str) -> Iterator[bytes]:
        storage = self._storage(job_id)
        path = uc.PathFile(storage, _file_url(storage, rel), rel)
        try:
            with path.raw() as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._call(lambda: storage.transport.check_error(resp), f"reading {rel}")
                yield from resp.iter_raw(layout.CHUNK)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(
                f"Lost the UNICORE site {self.api_url} while reading {rel}: {describe_error(exc)}"
            ) from None

    def download(
        self, job_id: str, path: str, dest: Path, progress: Progress | None = None
    ) -> Path:
        """Same contract as the other backends: a file replaces an older copy at ``dest``
        (or inside it, if ``dest`` is a folder); a folder lands as ``dest/<name>`` (or at
        ``dest`` if that does not exist yet) and never merges into an existing one."""
        rel = clean_relative(path)
        dest = Path(dest)
        props = self._stat(job_id, rel)
        name = rel.rsplit("/", 1)[-1] if rel else job_id
        final = dest / name if dest.is_dir() else dest
        if not props.get("isDirectory"):
            size = int(props.get("size") or 0)
            return save_stream(self._stream(job_id, rel), final, size, progress)
        if final.exists():
            raise Conflict(f"{final} exists already: remove it or download elsewhere")
        files = self._walk(job_id, rel)
        # The run's credential file stays on the site; so does any of its name below, where
        # a link UNICORE follows (plots/run -> ../../..) shows the run's own.
        for f, _ in files:
            if is_credentials(f) and f != layout.CREDENTIALS_FILE:
                log.warning(CREDENTIALS_SKIPPED, f)
        files = [(f, size) for f, size in files if not is_credentials(f)]
        total = sum(size for _, size in files) or 0
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".mantik-download-", dir=final.parent))
        done = 0
        try:
            root = staging / "root"
            root.mkdir()
            for file_rel, _size in files:
                inner = file_rel[len(rel) :].lstrip("/") if rel else file_rel
                target = root / inner
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with target.open("wb") as out:
                        for chunk in self._stream(job_id, file_rel):
                            out.write(chunk)
                            done += len(chunk)
                            if progress:
                                progress(done, max(total, done))
                except (PermissionDenied, NotFound) as exc:
                    # A link leading out of the job directory, or a file gone meanwhile.
                    target.unlink(missing_ok=True)
                    log.warning("download: skipped %s (%s)", file_rel, exc.message)
            root.replace(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if progress:
            progress(max(total, done), max(total, done))
        return final

    def folder_members(self, job_id: str, path: str) -> Iterator[FolderMember]:
        """The files below a folder, one by one through the site's file API. UNICORE
        lists a link as what it leads to, so links arrive as copies, as with a folder
        download; one leading out of the job's directory the site refuses (skipped)."""
        rel = clean_relative(path)
        if not self._stat(job_id, rel).get("isDirectory"):
            raise InvalidRequest(f"{path!r} of the run directory is not a folder")
        return self._members(job_id, rel)

    def _members(self, job_id: str, rel: str) -> Iterator[FolderMember]:
        made: set[str] = set()
        for file_rel, size in sorted(self._walk(job_id, rel, outer=True)):
            inner = file_rel[len(rel) :].lstrip("/") if rel else file_rel
            # The folders of each file, once, before it (the walk lists files only).
            parts = inner.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                folder = "/".join(parts[:depth])
                if folder not in made:
                    made.add(folder)
                    yield FolderMember(folder, "dir", time.time(), 0o755)
            yield FolderMember(
                inner, "file", time.time(), 0o644, open=self._opener(job_id, file_rel, size)
            )

    def _opener(self, job_id: str, file_rel: str, size: int) -> FileOpener:
        def open_now() -> tuple[int, Iterator[bytes]]:
            stream = self._stream(job_id, file_rel)
            # The request goes out now: a file gone since the listing (NotFound) or a
            # link out of the job's directory (PermissionDenied) fails here, before its
            # entry is written.
            first = next(stream, b"")
            return size, itertools.chain([first], stream)

        return open_now

    def _walk(
        self, job_id: str, rel: str, *, outer: bool = False
    ) -> list[tuple[str, int]]:
        """The files below ``rel``, with their sizes. UNICORE lists a link to a folder as
        that folder (its TSI stats through links), so a link to a folder above it (a
        run's ``outputs/up -> ..``) was walked round and round, until the path grew
        longer than 4096 bytes and the download failed. A folder listed exactly as one
        above it (every name, kind, size and time alike) is taken for such a link.
        ``outer``: the folders above ``rel`` in the run directory count too, so a link up
        out of ``rel`` (``outputs/run -> ../..``: the whole run again, its credential file
        while a job waits) is left out, as the other backends leave out links up."""
        files: list[tuple[str, int]] = []
        start: tuple[Hashable, ...] = ()
        if outer and rel:
            parts = rel.split("/")
            start = tuple(
                _signature(self._listing(job_id, "/".join(parts[:depth])))
                for depth in range(len(parts))
            )
        pending: list[tuple[str, tuple[Hashable, ...]]] = [(rel, start)]
        while pending:
            current, above = pending.pop()
            try:
                listing = self._listing(job_id, current)
            except NotFound:
                if current == rel:
                    raise
                # A running job replaced it (a trainer keeping its last checkpoints):
                # the whole download failed, with "There is no ..." for a folder listed.
                log.warning("download: skipped %s (removed while it was downloaded)", current)
                continue
            seen = _signature(listing)
            if seen in above:
                log.warning(
                    "download: skipped %s (listed as a folder above it is: a link back up)",
                    current,
                )
                continue
            for entry in _entries(listing):
                if entry.is_dir:
                    pending.append((entry.path, (*above, seen)))
                else:
                    files.append((entry.path, entry.size))
        return files


# ---- helpers ---------------------------------------------------------------------------


def _file_url(storage: uc.Storage, rel: str) -> str:
    """The URL of ``rel`` in ``storage``, its names percent-encoded. pyunicore's
    ``_to_file_url`` puts them in as they are: a '#' or '?' in a name cut the path short
    ('run #3' was not found, and a folder holding it failed to download) and '%41.txt'
    named another file ('A.txt')."""
    return storage.resource_url + "/files" + (f"/{quote(rel, safe='/')}" if rel else "")


def _entries(listing: dict[str, Any]) -> list[FileEntry]:
    """A folder's listing (``UnicoreBackend._listing``) as entries, directories first."""
    entries = [
        FileEntry(
            path=clean_relative(name.lstrip("/")),
            size=int(meta.get("size") or 0),
            is_dir=bool(meta.get("isDirectory")),
        )
        for name, meta in (listing.get("content") or {}).items()
    ]
    return sorted(entries, key=lambda e: (not e.is_dir, e.path))


def _signature(listing: dict[str, Any]) -> Hashable:
    """What tells a folder from another in a listing: its time, and the name, kind,
    size and time of each thing in it (paths differ: the same folder reached through
    a link is listed under the link's path)."""
    return (
        listing.get("lastAccessed"),
        frozenset(
            (
                posixpath.basename(name.rstrip("/")),
                bool(meta.get("isDirectory")),
                meta.get("size"),
                meta.get("lastAccessed"),
            )
            for name, meta in (listing.get("content") or {}).items()
        ),
    )


def _assert_login(site: uc.Client) -> None:
    """Ask the site, past pyunicore's 5 s property cache, whether it still takes the
    login: a refused credential is a 403, one it ignored the role ``anonymous``."""
    props = site.transport.get(url=site.resource_url)
    if props["client"]["role"]["selected"] == "anonymous":
        raise AuthenticationFailedException(f"Failure to authenticate at {site.resource_url}")


def _epoch_ms(value: Any) -> int | None:
    """UNICORE's time ("2026-11-27T23:43:43+0100") in ms since the epoch; None for one
    without a UTC offset, which cannot be placed."""
    try:
        when = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return None if when.tzinfo is None else int(when.timestamp() * 1000)


def _token_expiry(token: str) -> float | None:
    """The ``exp`` of a JWT access token; None for a token that is no JWT or has none."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
        return float(claims["exp"])
    except (ValueError, KeyError, TypeError):
        return None


def _token_expired(token: str) -> bool:
    expires = _token_expiry(token)
    return expires is not None and expires < time.time()


def _check_token_expiry(token: str, api_url: str) -> None:
    """Refuse a JWT access token whose ``exp`` has passed (without sending it)."""
    expires = _token_expiry(token)
    if expires is not None and expires < time.time():
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
        raise AuthenticationFailed(
            f"The access token for the UNICORE site {api_url} expired at {when}. Renew the "
            f"token and set it again ({ENV_UNICORE_TOKEN})."
        )
