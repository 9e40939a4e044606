"""TEST INFRASTRUCTURE: a UNICORE site stand-in on loopback (tests only).

It speaks the part of the UNICORE REST API (``https://<gateway>/<SITE>/rest/core``) that
pyunicore's ``Client``/``Job``/``Storage`` use, in the shapes UNICORE/X answers with
(checked against UNICORE-EU/unicorex ``uas-core`` REST resources):

``GET  /SITE/rest/core``                       ``client.role.selected`` (``anonymous`` when the
                                               credential was not accepted), ``server.version``,
                                               ``_links`` (jobs, storages, factories, sites)
``GET  /jobs``                                 ``{"jobs": [url, ...], "_links": {...}}`` (URLs only,
                                               like UNICORE; ``offset``/``num``/``tags``)
``POST /jobs``                                 201 + ``Location``; a description that is no JSON
                                               object gets 500 ``{"errorMessage": "Could not submit
                                               job: ..."}``. Resource requests are checked only
                                               when the job goes to the batch system (see below)
``GET  /jobs/{id}``                            ``status``, ``statusMessage``, ``exitCode`` (a
                                               string, present once known), ``log``, ``name``,
                                               ``_links`` (``workingDirectory``, ``action:*``, ...);
                                               ``?fields=a,b`` narrows the answer
``POST /jobs/{id}/actions/start|abort|restart`` ``DELETE /jobs/{id}``
``GET  /storages``, ``/storages/{id}``          job directories are ``{job id}-uspace``
``GET  /storages/{id}/files/{path}``            JSON (``Accept: application/json``): file
                                               properties, or a directory's ``content``;
                                               ``Accept: application/octet-stream``: the bytes,
                                               honouring ``Range`` (206, also at the end of the
                                               file), 406 for a directory
``404`` anywhere                               a bare status, no ``errorMessage`` (as UNICORE)
``PUT`` (write, parents created), ``POST`` (mkdir), ``DELETE`` on ``files/{path}``

Authentication: HTTP basic (``users``) and bearer tokens (``tokens``, each with an expiry).
A request without credentials is anonymous: the site resource answers with role
``anonymous`` and everything else with 401. A credential that is given but not accepted
(wrong password, unknown or expired token) gets a bare 403 everywhere, as from UNICORE's
AuthNHandler. Every
authenticated answer carries ``X-UNICORE-SecuritySession``; a request presenting an
unknown or expired session id gets 432, after which pyunicore repeats it with its
credential.

Jobs run for real, as local processes in their working directory: status READY (waiting
for client stage-in and ``start`` when ``haveClientStageIn`` is "true"), STAGINGIN, the
user precommand on the "login node" (a local ``bash -c``), QUEUED, RUNNING (``Executable``
and ``Arguments`` joined into one shell line, as UNICORE's TSI writes them into the batch
script; ``Stdout``/``Stderr`` files; ``Resources.Runtime`` enforced), STAGINGOUT (user
postcommand, only after exit code 0 unless ``IgnoreNonZeroExitCode``), then SUCCESSFUL or
FAILED (non-zero exit code, failed pre- or postcommand, time limit, ``abort``: status
message "Job aborted."), with UNICORE's status messages. Before QUEUED the job goes to
the batch system as UNICORE/X sends it there: its resources are checked against the
queues and their ranges (``limits``) and fail the job with "Could not submit job:
Resource request <Nodes=64> is out of range." (not tried again); an account
(``Project``) that Slurm does not know for the user (``projects``), or none from a user
without a ``default_account``, makes sbatch refuse it, which UNICORE tries three more
times, ``resubmit_delay`` apart, then fails the job with the TSI's words ("Could not
submit job: TSI on <host>: TSI_FAILED: Command 'sbatch ...' failed with code 1: sbatch:
error: ... Invalid account ..."). ``Umask`` (default 027) applies to the job directory
and the job's processes; uploaded files get the storage's umask (0640).
A new job's directory storage is INITIALIZING for ``uspace_delay`` seconds, as UNICORE
makes the directory asynchronously.

The batch system behind it is Slurm, reached through UNICORE's Slurm TSI
(UNICORE-EU/tsi ``slurm/BSS.py``), and the batch job gets what that TSI writes into its
script: ``--job-name`` is the job's ``Name`` unless it holds a character other than
``0-9a-zA-Z.:=~/``, then ``UNICORE_job``; ``--time`` is ``Runtime`` (seconds) in whole
minutes, truncated, at least 1. ``GET /jobs/{id}/details`` answers those as the TSI
parses ``scontrol show job`` (``JobName``, ``TimeLimit``, ...). A minute of that time
limit lasts ``batch_minute`` seconds (60; tests shorten it).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

ACTIVE = ("READY", "STAGINGIN", "QUEUED", "RUNNING", "STAGINGOUT")
_INT_RESOURCES = ("Nodes", "TotalCPUs", "CPUsPerNode", "GPUsPerNode")
_STRING_RESOURCES = ("Queue", "Reservation", "NodeConstraints", "QoS", "Project")
_KNOWN_RESOURCES = (*_INT_RESOURCES, *_STRING_RESOURCES, "Runtime", "MemoryPerNode", "Memory")
_TIME_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
# What the Slurm TSI keeps of a job name; a name with anything else becomes UNICORE_job.
_TSI_JOB_NAME_ILLEGAL = re.compile(r"[^0-9a-zA-Z.:=~/]")
_MEM_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_DEFAULT_LIMITS = {
    "Nodes": (1, 16),
    "TotalCPUs": (1, 2048),
    "CPUsPerNode": (1, 128),
    "GPUsPerNode": (0, 4),
    "Runtime": (1, 86400),
    "MemoryPerNode": (1, 512 * 1024**3),
}
_RESUBMIT_COUNT = 3  # XNJS bssResubmitCount
# The site's time zone (a JVM in Central Europe says +0100): times are not assumed UTC.
_SITE_ZONE = dt.timezone(dt.timedelta(hours=1))
_TSI_HOST = "standin-login"


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _iso(epoch: float) -> str:
    """UNICORE's time format (UnitParser's ISO 8601 "yyyy-MM-dd'T'HH:mm:ssZ"): whole
    seconds and the UTC offset, here the site's zone, not UTC, as at most sites."""
    return dt.datetime.fromtimestamp(epoch, _SITE_ZONE).strftime("%Y-%m-%dT%H:%M:%S%z")


def _now() -> str:
    return _iso(time.time())


def _parse_time(value: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([a-z]*)\s*", str(value).lower())
    if not match or match.group(2) not in _TIME_UNITS | {"": 1}:
        raise ValueError(f"cannot parse time value <{value}>")
    return int(match.group(1)) * (_TIME_UNITS.get(match.group(2)) or 1)


def _tsi_job_name(description: dict[str, Any]) -> str:
    """The Slurm job name: XNJS sends ``Name`` (else ``ApplicationName``, else
    ``UNICORE_Job``) as ``#TSI_JOBNAME``; the Slurm TSI replaces a name it finds unsafe."""
    name = str(description.get("Name") or description.get("ApplicationName") or "UNICORE_Job")
    return "UNICORE_job" if _TSI_JOB_NAME_ILLEGAL.search(name) else name


def _tsi_minutes(description: dict[str, Any]) -> int | None:
    """``--time`` in minutes as the Slurm TSI writes it (``max(int(t / 60), 1)``), None for
    no ``--time`` line (no Runtime, or 0)."""
    runtime = (description.get("Resources") or {}).get("Runtime")
    seconds = _parse_time(runtime) if runtime is not None else 0
    return max(int(seconds / 60), 1) if seconds > 0 else None


def _slurm_local(epoch: float) -> str:
    """A time as ``scontrol show job`` prints it: the login node's local time, no zone."""
    return dt.datetime.fromtimestamp(epoch, _SITE_ZONE).strftime("%Y-%m-%dT%H:%M:%S")


def _slurm_time(minutes: int | None) -> str:
    """A time limit as ``scontrol show job`` prints it."""
    if minutes is None:
        return "UNLIMITED"
    days, rest = divmod(minutes, 1440)
    clock = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{days}-{clock}" if days else clock


def _parse_capacity(value: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", str(value).lower())
    if not match:
        raise ValueError(f"cannot parse capacity value <{value}>")
    return int(match.group(1)) * _MEM_UNITS[match.group(2)]


@dataclass
class StandinJob:
    id: str
    owner: str
    description: dict[str, Any]
    workdir: Path
    umask: int
    status: str = "READY"
    status_message: str = ""
    exit_code: int | None = None
    log: list[str] = field(default_factory=list)
    submitted: str = field(default_factory=_now)
    proc: subprocess.Popen[bytes] | None = None
    aborted: bool = False
    started: bool = False
    uspace_ready_at: float = 0.0
    # JobProcessor's time stamps (TIME_START, TIME_END_MAIN, ...), epoch seconds.
    times: dict[str, float] = field(default_factory=dict)
    # The batch job: Slurm's job id (UNICORE's batchSystemID) and state.
    bss_id: str | None = None
    bss_state: str = "PENDING"
    bss_reason: str = "Priority"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, text: str) -> None:
        # Action.addLogTrace: java.util.Date's toString(), in the site's zone.
        when = dt.datetime.now(_SITE_ZONE).strftime("%a %b %d %H:%M:%S CET %Y")
        self.log.append(f"{when}: {text}")

    def stamp(self, name: str) -> None:
        self.times.setdefault(name, time.time())

    def consumed_time(self) -> dict[str, str]:
        """``consumedTime`` as JobProcessor.TimeProfile.asMap() gives it: whole seconds of
        each phase as strings, "N/A" where a phase has not ended; TIME_END (and so
        ``total`` and ``stage-out``) only of a job that ended successfully."""
        t = self.times
        end = t.get("end")
        stage_out = t.get("start_stageout", end)

        def span(first: str | float | None, last: str | float | None) -> str:
            a = t.get(first) if isinstance(first, str) else first
            b = t.get(last) if isinstance(last, str) else last
            return "N/A" if a is None or b is None else str(int(b - a))

        return {
            "total": span("start", end),
            "stage-in": span("start", "end_stagein"),
            "preCommand": span("start_pre", "submitted"),
            "queued": span("submitted", "start_main"),
            "main": span("start_main", "end_main"),
            "postCommand": span("start_post", stage_out),
            "stage-out": span(stage_out, end),
        }


class UnicoreStandin:
    """One stand-in UNICORE site. ``start()`` it; ``base_url`` is its ``/rest/core`` URL."""

    def __init__(
        self,
        directory: Path,
        *,
        site: str = "STANDIN-SITE",
        users: dict[str, str] | None = None,
        queues: tuple[str, ...] = ("batch", "devel"),
        projects: tuple[str, ...] | None = None,
        limits: dict[str, tuple[int, int]] | None = None,
        partition_nodes: int = 8,
        resubmit_delay: float = 10.0,
        extra_path: list[str] | None = None,
        queue_delay: float = 0.3,
        batch_minute: float = 60.0,
        uspace_delay: float = 0.2,
        session_lifetime: float = 300.0,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.site = site
        self.users = dict(users or {})
        self.tokens: dict[str, tuple[str, float]] = {}
        self.queues = queues
        # The accounts Slurm knows for the user (None: any); an unknown one, or none
        # for a user without a default account, makes sbatch refuse the job.
        self.projects = projects
        # Slurm's DefaultAccount of the user, charged for a job that names none; a user
        # without one must name an account (tests set None).
        self.default_account = projects[0] if projects else None
        # The IDB's ranges of the queues' resources (Runtime in seconds, MemoryPerNode in
        # bytes): a request outside is "out of range" (GrounderImpl.incarnateResources).
        self.limits = dict(_DEFAULT_LIMITS if limits is None else limits)
        # The nodes Slurm's partition has: a job asking for more is accepted (the site
        # does not EnforcePartLimits) and pends for good, Reason=PartitionNodeLimit.
        self.partition_nodes = partition_nodes
        # XNJS bssResubmitDelay: the pause before the next of bssResubmitCount (3) more
        # attempts to submit a job the TSI failed to submit.
        self.resubmit_delay = resubmit_delay
        self.extra_path = list(extra_path or [])
        self.queue_delay = queue_delay
        # How long one minute of a batch job's time limit lasts here.
        self.batch_minute = batch_minute
        # A new job's working directory is made asynchronously (UspaceStorageImpl): its
        # storage is INITIALIZING, and has no files, for this long after the submission.
        self.uspace_delay = uspace_delay
        self.session_lifetime = session_lifetime
        # Slurm's MinJobAge: how long scontrol still knows an ended job.
        self.min_job_age = 300.0
        self._next_bss_id = 4710
        # (certificate, key) PEM files: serve HTTPS, as every real site does.
        self.tls = tls
        self.jobs: dict[str, StandinJob] = {}
        self.sessions: dict[str, tuple[str, float]] = {}
        # Last use of each session: a user has at most 5, and a new one pushes out the
        # least recently used (SecuritySessionStore, DEF_MAX_SESSIONS_PER_USER).
        self.session_used: dict[str, float] = {}
        self.max_sessions_per_user = 5
        # Requests authenticated with the credential itself (each makes a new session).
        self.credential_logins = 0
        # Requests seen, as (method, path); tests count them.
        self.requests: list[tuple[str, str]] = []
        # Requests real UNICORE never answers (a Range starting past the end of a file);
        # the stand-in holds them unanswered too, until the client gives up.
        self.never_answered: list[str] = []
        # Connections accepted (HTTP/1.1 keep-alive serves many requests on one).
        self.connections = 0
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> UnicoreStandin:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "home").mkdir(exist_ok=True)
        handler = type("Handler", (_Handler,), {"standin": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._httpd.daemon_threads = True
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering (jobs keep their state; ``start()`` again on the same port)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def close(self) -> None:
        self.stop()
        for job in list(self.jobs.values()):
            self._kill(job)

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/{self.site}/rest/core"

    def add_token(self, user: str, lifetime: float = 3600.0) -> str:
        token = secrets.token_urlsafe(24)
        self.tokens[token] = (user, time.time() + lifetime)
        return token

    def expire_sessions(self) -> None:
        with self._lock:
            self.sessions.clear()

    # ---- authentication --------------------------------------------------------------------

    def authenticate(self, headers: Any) -> tuple[str | None, str | None]:
        """(user or None, a new session id or None). Raises _Refused(432) for a bad session."""
        session = headers.get("X-UNICORE-SecuritySession")
        now = time.time()
        with self._lock:
            if session:
                known = self.sessions.get(session)
                if known is None or known[1] < now:
                    self.sessions.pop(session, None)
                    raise _Refused(432, "Security session expired or unknown")
                self.session_used[session] = now
                return known[0], session
        user = None
        auth = headers.get("Authorization") or ""
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "basic":
            try:
                name, _, password = base64.b64decode(value).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                name, password = "", ""
            if name in self.users and secrets.compare_digest(self.users[name], password):
                user = name
        elif scheme.lower() == "bearer":
            entry = self.tokens.get(value.strip())
            if entry and entry[1] > now:
                user = entry[0]
        if user is None and auth:
            # AuthNHandler: "credentials could not be verified" is a SecurityException,
            # answered 403 with no message, on every resource, the site's own included.
            raise _Refused(403, "")
        if user is None:
            return None, None
        new_session = secrets.token_hex(16)
        with self._lock:
            self.credential_logins += 1
            self.sessions[new_session] = (user, now + self.session_lifetime)
            self.session_used[new_session] = now
            mine = [k for k, v in self.sessions.items() if v[0] == user]
            if len(mine) > self.max_sessions_per_user:
                oldest = min(mine, key=lambda k: self.session_used.get(k, 0.0))
                self.sessions.pop(oldest, None)
                self.session_used.pop(oldest, None)
        return user, new_session

    # ---- jobs ------------------------------------------------------------------------------

    def submit(self, owner: str, description: Any) -> StandinJob:
        if not isinstance(description, dict):
            raise _Refused(500, "Could not submit job: the job description is not a JSON object")
        if not description.get("Executable") and not description.get("ApplicationName"):
            raise _Refused(500, "Could not submit job: no executable or application given")
        try:
            umask = int(str(description.get("Umask", "027")), 8)  # XNJS defaultUmask
        except ValueError:
            raise _Refused(
                500, f"Could not submit job: invalid umask <{description.get('Umask')}>"
            ) from None
        job_id = str(uuid.uuid4())
        workdir = self.directory / "jobs" / f"{job_id}-uspace"
        workdir.mkdir(parents=True)
        workdir.chmod(0o777 & ~umask)  # made with the job's umask (LocalECManager)
        job = StandinJob(job_id, owner, description, workdir, umask)
        job.uspace_ready_at = time.monotonic() + self.uspace_delay
        job.stamp("start")
        job.stamp("end_stagein")
        job.note(f"Created with ID {job_id}")
        with self._lock:
            self.jobs[job_id] = job
        if str(description.get("haveClientStageIn", "false")).lower() != "true":
            self.start_job(job)
        else:
            job.note("Waiting for client stage-in")
        return job

    def _incarnate(self, description: dict[str, Any]) -> str | None:
        """Why the job cannot go to the batch system, in UNICORE's words, or None.

        UNICORE/X accepts any resource request with the job (POST /jobs stores the
        description); it checks them only when it submits the job to the batch system,
        after the stage-in and the user precommand (GrounderImpl.incarnateResources, from
        JobProcessor.submitMainExecutable). Such a job fails with "Could not submit job:
        ..." and is not tried again (ErrorCode.isWrongResourceSpec)."""
        resources = description.get("Resources") or {}
        if not isinstance(resources, dict):
            return "Could not submit job: 'Resources' must be a JSON object"
        queue = str(resources.get("Queue", self.queues[0]))
        if queue not in self.queues:
            return f"Could not submit job: Resource request <Queue = {queue}> is out of range."
        for name, value in resources.items():
            if name == "Queue" or name in ("Project", "Reservation", "NodeConstraints", "QoS"):
                continue  # passed on to the batch system unchecked
            if name not in _KNOWN_RESOURCES:
                return (
                    f"Could not submit job: Resource <{name}> is not available for "
                    f"partition <{queue}>"
                )
            try:
                if name == "Runtime":
                    amount = _parse_time(value)
                elif name in ("MemoryPerNode", "Memory"):
                    amount = _parse_capacity(value)
                else:
                    amount = int(str(value))
            except ValueError as exc:
                return f"Could not submit job: Could not parse requested resource <{name}>: {exc}"
            low, high = self.limits.get(name, (0, 2**63))
            if not low <= amount <= high:
                return f"Could not submit job: Resource request <{name}={value}> is out of range."
        return None

    def _sbatch_refusal(self, description: dict[str, Any]) -> str | None:
        """What sbatch says of the job's account (``--account`` from ``Project``), or
        None when it takes the job."""
        project = description.get("Project") or (description.get("Resources") or {}).get("Project")
        project = project or self.default_account
        if self.projects is None or (project is not None and project in self.projects):
            return None
        # A user without a default account who named none gets the same words.
        return (
            "sbatch: error: Batch job submission failed: Invalid account or "
            "account/partition combination specified"
        )

    def start_job(self, job: StandinJob) -> None:
        with job.lock:
            if job.started or job.status != "READY":
                return
            job.started = True
        threading.Thread(target=self._process, args=(job,), daemon=True).start()

    def abort(self, job: StandinJob) -> None:
        with job.lock:
            if job.status not in ACTIVE:
                return
            job.aborted = True
            proc = job.proc
        job.note("Abort requested")
        if proc is not None:
            self._kill(job)
        elif not job.started:
            self._finish(job, "FAILED", "Job aborted.")

    def _kill(self, job: StandinJob) -> None:
        proc = job.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @staticmethod
    def _wait(job: StandinJob, seconds: float) -> None:
        """Sleep, but end at an abort (UNICORE cancels a queued batch job at once)."""
        deadline = time.monotonic() + seconds
        while not job.aborted and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _finish(self, job: StandinJob, status: str, message: str = "") -> None:
        with job.lock:
            job.status = status
            job.status_message = message
            if job.bss_id is not None and "bss_end" not in job.times:
                job.times["bss_end"] = time.time()
                if job.aborted:
                    job.bss_state = "CANCELLED"
                elif job.bss_state == "RUNNING":
                    job.bss_state = "COMPLETED" if job.exit_code == 0 else "FAILED"
        job.note(f"Job finished: {status} {message}".strip())

    def _env(self, job: StandinJob) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MLFLOW_", "MANTIK_", "PYTEST_"))
        }
        if self.extra_path:
            env["PATH"] = os.pathsep.join([*self.extra_path, env.get("PATH", "")])
        env["UC_OUTCOME_DIR"] = str(job.workdir)
        env["HOME"] = str(self.directory / "home")
        given = job.description.get("Environment") or {}
        if isinstance(given, dict):
            env.update({str(k): str(v) for k, v in given.items()})
        elif isinstance(given, list):  # UNICORE also takes ["NAME=value", ...]
            for item in given:
                name, _, value = str(item).partition("=")
                env[name] = value
        return env

    def _run_shell(
        self,
        job: StandinJob,
        command: str,
        out: Path,
        err: Path | None,
        limit: float | None = None,
    ) -> int:
        """Run one shell line in the job directory, in a session of its own."""
        umask = job.umask

        def append(path: Path):
            return os.fdopen(
                os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666 & ~umask), "ab"
            )

        stdout = append(out)
        stderr = stdout if err is None or err == out else append(err)
        try:
            proc = subprocess.Popen(
                ["bash", "-c", command],
                cwd=job.workdir,
                env=self._env(job),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=lambda: os.umask(umask),  # noqa: PLW1509 - test infrastructure
            )
        finally:
            stdout.close()
            if stderr is not stdout:
                stderr.close()
        with job.lock:
            job.proc = proc
            aborted = job.aborted
        if aborted:
            self._kill(job)
        try:
            return proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self._kill(job)
            return -999
        finally:
            with job.lock:
                job.proc = None

    def _login_command(self, job: StandinJob, key: str, phase: str) -> int:
        command = job.description.get(key)
        if isinstance(command, list):
            command = "\n".join(map(str, command))
        if not command:
            return 0
        # Only the login node is modelled: compute-node pre/post commands run there as well.
        out = job.workdir / f".UNICORE_{phase}_0.stdout"
        err = job.workdir / f".UNICORE_{phase}_0.stderr"
        job.note(f"Launched {phase.lower()} command <{command}>")
        return self._run_shell(job, command, out, err)

    def _process(self, job: StandinJob) -> None:
        try:
            self._process_inner(job)
        except Exception as exc:  # noqa: BLE001 - report as a failed job, as UNICORE does
            self._finish(job, "FAILED", f"Internal error: {exc}")

    def _process_inner(self, job: StandinJob) -> None:
        desc = job.description
        job.status = "STAGINGIN"
        job.note("Staging in")
        time.sleep(0.1)
        if job.aborted:
            return self._finish(job, "FAILED", "Job aborted.")
        job.stamp("start_pre")
        code = self._login_command(job, "User precommand", "PRE")
        if job.aborted:
            return self._finish(job, "FAILED", "Job aborted.")
        ignore = str(desc.get("UserPrecommandIgnoreNonZeroExitCode", "false")).lower() == "true"
        if code != 0 and not ignore:
            return self._finish(job, "FAILED", f"Pre-command(s) failed: [{_non_zero(job, code)}]")
        refused = self._incarnate(desc)
        if refused is not None:
            job.note(refused)
            return self._finish(job, "FAILED", refused)
        for attempt in range(1, _RESUBMIT_COUNT + 2):
            said = self._sbatch_refusal(desc)
            if said is None:
                break
            # Utils.run_command's words, one line (Connector.failed), from the TSI on a
            # login node (TSIProblem), as Execution.submit passes them on.
            reply = (
                f"TSI_FAILED: Command 'sbatch ./bss_submit_{secrets.token_hex(5)}' failed "
                f"with code 1: {said}:"
            )
            job.note(f"Submission attempt failed: {reply}")
            problem = f"TSI on <{_TSI_HOST}>: {reply}"
            if attempt > _RESUBMIT_COUNT:
                job.note(f"Could not submit job: {problem}")
                return self._finish(job, "FAILED", f"Could not submit job: {problem}")
            job.note(f"Submit attempt {attempt} (of {_RESUBMIT_COUNT}) failed: {problem}")
            job.status = "QUEUED"  # PENDING while it waits to try again
            self._wait(job, self.resubmit_delay)
            if job.aborted:
                return self._finish(job, "FAILED", "Job aborted.")
        job.status = "QUEUED"
        job.stamp("submitted")
        with self._lock:
            self._next_bss_id += 1
            job.bss_id = str(self._next_bss_id)
        job.note("Submitted to batch system")
        nodes = (desc.get("Resources") or {}).get("Nodes")
        if nodes is not None and int(str(nodes)) > self.partition_nodes:
            job.bss_reason = "PartitionNodeLimit"
            self._wait(job, float("inf"))  # until aborted
        self._wait(job, self.queue_delay)
        if job.aborted:
            return self._finish(job, "FAILED", "Job aborted.")
        job.status = "RUNNING"
        job.bss_state = "RUNNING"
        job.bss_reason = "None"
        job.stamp("start_main")
        job.note("Running")
        words = [str(desc.get("Executable") or desc.get("ApplicationName"))]
        words += [str(a) for a in desc.get("Arguments") or []]
        stdout = job.workdir / str(desc.get("Stdout") or "stdout")
        stderr = job.workdir / str(desc.get("Stderr") or "stderr")
        # Only the batch job has the time limit, in the TSI's whole minutes.
        minutes = _tsi_minutes(desc)
        limit = None if minutes is None else minutes * self.batch_minute
        code = self._run_shell(job, " ".join(words), stdout, stderr, limit)
        if job.aborted:
            return self._finish(job, "FAILED", "Job aborted.")
        if code == -999:
            job.bss_state = "TIMEOUT"
            # The batch system killed the job script, so it wrote no exit code file:
            # Execution.handleCompleted logs the BSS details and fails the job.
            job.note(
                "Detailed job information from batch system: "
                f"JobId={job.bss_id} JobName={_tsi_job_name(desc)}\n"  # `scontrol show job`
                f"   UserId={job.owner}(1000) GroupId={job.owner}(1000) MCS_label=N/A\n"
                "   Priority=1 Nice=0 Account=standin QOS=normal\n"
                "   JobState=TIMEOUT Reason=TimeLimit Dependency=(null)\n"
                "   Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:15\n"
                f"   RunTime=00:00:02 TimeLimit={_slurm_time(minutes)} TimeMin=N/A\n"
                "   Partition=batch AllocNode:Sid=standin-login:4242\n"
                "   ReqNodeList=(null) ExcNodeList=(null)\n"
                "   NodeList=standin-node01"
            )
            return self._finish(
                job,
                "FAILED",
                "Job did not complete normally on BSS, please check standard error file "
                "and job log for more information.",
            )
        job.exit_code = code
        job.stamp("end_main")
        job.status = "STAGINGOUT"
        # As JobProcessor.handlePostProcessing: a non-zero exit code ends the job here,
        # so the user postcommand runs only after a successful application (or with
        # IgnoreNonZeroExitCode), and a failing postcommand fails the job.
        ignore = str(desc.get("IgnoreNonZeroExitCode", "false")).lower() == "true"
        if code != 0 and not ignore:
            return self._finish(
                job,
                "FAILED",
                f"User application exited with non-zero exit code: <{code}>. More "
                "information might be available in the job's working directory "
                f"'{job.workdir}/'",
            )
        job.stamp("start_post")
        post = self._login_command(job, "User postcommand", "POST")
        if post != 0:
            return self._finish(job, "FAILED", f"Post-command(s) failed: [{_non_zero(job, post)}]")
        job.stamp("start_stageout")
        job.stamp("end")  # JobProcessor.setToDoneSuccessfully
        return self._finish(job, "SUCCESSFUL")

    def bss_details(self, job: StandinJob) -> dict[str, str]:
        """``/jobs/{id}/details``: ``scontrol show job`` run by the TSI on a login node,
        split into key=value pairs (parse_job_details; the part tests look at). Before
        the job reached the batch system there is no batch job: "N/A" (not JSON, so
        ``rawDetailsData``). Slurm's times are the login node's local time without a
        zone; EndTime of a running job is its start plus the time limit, a forecast.
        Slurm forgets an ended job after MinJobAge (``min_job_age``): scontrol fails,
        and so does the call (500)."""
        desc = job.description
        if job.bss_id is None:
            return {"rawDetailsData": "N/A"}
        ended = job.times.get("bss_end")
        if ended is not None and time.time() - ended > self.min_job_age:
            raise _Refused(
                500,
                f"Could not get job details: TSI on <{_TSI_HOST}>: TSI_FAILED: Command "
                f"'scontrol show job {job.bss_id}' failed with code 1: slurm_load_jobs "
                "error: Invalid job id specified:",
            )
        minutes = _tsi_minutes(desc)
        start = job.times.get("start_main")
        if ended is not None:
            end = _slurm_local(ended)
        elif start is not None and minutes is not None:
            end = _slurm_local(start + minutes * 60)
        else:
            end = "Unknown"
        return {
            "JobId": job.bss_id,
            "JobName": _tsi_job_name(desc),
            "JobState": job.bss_state,
            "Reason": job.bss_reason if job.bss_state == "PENDING" else "None",
            "Partition": str((desc.get("Resources") or {}).get("Queue", "batch")),
            "TimeLimit": _slurm_time(minutes),
            "SubmitTime": _slurm_local(job.times["submitted"]),
            "StartTime": "Unknown" if start is None else _slurm_local(start),
            "EndTime": end,
        }

    def job_properties(self, job: StandinJob) -> dict[str, Any]:
        base = self.base_url
        url = f"{base}/jobs/{job.id}"
        props: dict[str, Any] = {
            "status": job.status,
            "statusMessage": job.status_message,
            "name": job.description.get("Name", "N/A"),
            "owner": f"UID={job.owner}",
            "queue": (job.description.get("Resources") or {}).get("Queue", "N/A"),
            "submissionTime": job.submitted,
            "terminationTime": "",
            "currentTime": _now(),
            "batchSystemID": job.bss_id or "N/A",
            "consumedTime": job.consumed_time(),
            "log": list(job.log),
            "tags": list(job.description.get("Tags") or []),
            "acl": [],
            "jobType": "BATCH",
            "_links": {
                "self": {"href": url},
                "action:start": {"href": f"{url}/actions/start", "description": "Start"},
                "action:abort": {"href": f"{url}/actions/abort", "description": "Abort"},
                "action:restart": {"href": f"{url}/actions/restart", "description": "Restart"},
                "details": {"href": f"{url}/details"},
                "submitted": {"href": f"{url}/submitted"},
                "workingDirectory": {"href": f"{base}/storages/{job.id}-uspace"},
                "parentTSS": {"href": f"{base}/sites/default"},
            },
        }
        if job.exit_code is not None:
            props["exitCode"] = str(job.exit_code)
        return props

    def storage_root(self, storage_id: str, user: str) -> Path:
        if storage_id == "HOME":
            return self.directory / "home"
        if storage_id.endswith("-uspace"):
            job = self.jobs.get(storage_id[: -len("-uspace")])
            if job is not None and job.owner != user:
                raise _Refused(403, f"Access denied to resource <{storage_id}>")
            if job is not None:
                return job.workdir
        raise _Refused(404, f"No such storage <{storage_id}>")


def _non_zero(job: StandinJob, code: int) -> str:
    """UNICORE's message for a login-node command that failed (AsyncCommandProcessor)."""
    return (
        f"Command exited with non-zero exit code: <{code}>. More information might be "
        f"available in the job's working directory '{job.workdir}/'"
    )


def _file_props(path: Path, name: str) -> dict[str, Any]:
    st = path.stat()
    mode = stat.S_IMODE(st.st_mode)
    perms = "".join(
        ch if mode & bit else "-"
        for ch, bit in zip("rwxrwxrwx", (256, 128, 64, 32, 16, 8, 4, 2, 1), strict=True)
    )
    return {
        "path": name,
        "isDirectory": path.is_dir(),
        "size": 0 if path.is_dir() else st.st_size,
        "owner": "standin",
        "group": "standin",
        "permissions": perms[:3],
        "unixPermissions": perms,
        # Files.getProperties: the modification time, "yyyy-MM-dd'T'HH:mm:ssZ".
        "lastAccessed": _iso(st.st_mtime),
        "metadata": {},
    }


class _Handler(BaseHTTPRequestHandler):
    standin: UnicoreStandin
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet in tests
        return

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without this, Nagle's algorithm and
        # the client's delayed ACK hold the body back 40 ms on a kept-alive connection.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.standin._lock:
            self.standin.connections += 1

    # ---- plumbing ------------------------------------------------------------------------

    def _send(
        self,
        status: int,
        body: Any = None,
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        if isinstance(body, bytes):
            data = body
        elif body is None:
            data = b""
        else:
            data = json.dumps(body).encode()
        self.send_response(status)
        if data or content_type != "application/json":
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self._session:
            self.send_header("X-UNICORE-SecuritySession", self._session)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        if status == 404 or not message:
            # UNICORE answers an unknown job, storage or file with a bare 404: no
            # errorMessage names what was not found (USERestInvoker, Files).
            return self._send(status)
        self._send(status, {"status": status, "errorMessage": message})

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        self._session: str | None = None
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        self.query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.standin.requests.append((self.command, path))
        prefix = f"/{self.standin.site}/rest/core"
        if not (path == prefix or path.startswith(prefix + "/")):
            return self._error(404, f"Not found: {path}")
        rest = path[len(prefix) :].strip("/")
        body = self._body() if self.command in ("POST", "PUT") else b""
        try:
            user, self._session = self.standin.authenticate(self.headers)
            if rest == "" and self.command == "GET":
                return self._site(user)
            if user is None:
                return self._error(401, "Authentication failed: no valid credentials given")
            self._route(user, rest, body)
        except _Refused as exc:
            self._error(exc.status, exc.message)

    do_GET = do_POST = do_PUT = do_DELETE = _dispatch  # noqa: N815

    # ---- resources -------------------------------------------------------------------------

    def _site(self, user: str | None) -> None:
        base = self.standin.base_url
        role = "user" if user else "anonymous"
        self._send(
            200,
            {
                "client": {
                    "dn": f"UID={user}" if user else "",
                    "role": {"selected": role, "availableRoles": [role]},
                    "xlogin": {"UID": user, "availableUIDs": [user]} if user else {},
                },
                "server": {"version": "10.1.0-standin", "externalConnections": {}},
                "_links": {
                    name: {"href": f"{base}/{name}"}
                    for name in ("jobs", "storages", "factories", "sites", "transfers")
                },
            },
        )

    def _route(self, user: str, rest: str, body: bytes) -> None:
        segments = rest.split("/")
        head = segments[0]
        if head == "jobs":
            return self._jobs(user, segments[1:], body)
        if head == "storages":
            return self._storages(user, segments[1:], body)
        if head in ("factories", "sites", "transfers") and len(segments) == 1:
            return self._send(200, {head: [], "_links": {}})
        raise _Refused(404, f"No such resource <{rest}>")

    def _job(self, user: str, job_id: str) -> StandinJob:
        job = self.standin.jobs.get(job_id)
        if job is None:
            raise _Refused(404, f"No such job <{job_id}>")
        if job.owner != user:
            # USERestInvoker: a resource that exists is found first, then access control
            # refuses whoever does not own it; only a resource that is gone is a 404.
            raise _Refused(403, f"Access denied to resource <{job_id}>")
        return job

    def _jobs(self, user: str, segments: list[str], body: bytes) -> None:
        base = self.standin.base_url
        if not segments or segments == [""]:
            if self.command == "GET":
                tags = [t for t in self.query.get("tags", "").split(",") if t]
                ids = [
                    j.id
                    for j in self.standin.jobs.values()
                    if j.owner == user and all(t in (j.description.get("Tags") or []) for t in tags)
                ]
                offset = int(self.query.get("offset", 0))
                num = int(self.query.get("num", 200))
                urls = [f"{base}/jobs/{i}" for i in ids[offset : offset + num]]
                return self._send(200, {"jobs": urls, "_links": {"self": {"href": f"{base}/jobs"}}})
            if self.command == "POST":
                try:
                    description = json.loads(body or b"null")
                except ValueError as exc:
                    raise _Refused(500, f"Could not submit job: invalid JSON: {exc}") from None
                job = self.standin.submit(user, description)
                return self._send(201, headers={"Location": f"{base}/jobs/{job.id}"})
            raise _Refused(405, "Method not allowed")
        job = self._job(user, segments[0])
        if len(segments) == 1:
            if self.command == "GET":
                props = self.standin.job_properties(job)
                fields = [f for f in self.query.get("fields", "").split(",") if f]
                if fields:
                    props = {k: v for k, v in props.items() if k in fields}
                return self._send(200, props)
            if self.command == "DELETE":
                self.standin.abort(job)
                self.standin.jobs.pop(job.id, None)
                shutil.rmtree(job.workdir, ignore_errors=True)
                return self._send(204)
        if len(segments) == 3 and segments[1] == "actions" and self.command == "POST":
            action = segments[2]
            if action == "start":
                self.standin.start_job(job)
            elif action == "abort":
                self.standin.abort(job)
            elif action == "restart":
                raise _Refused(500, "Restart is not supported by the stand-in")
            else:
                raise _Refused(404, f"No such action <{action}>")
            return self._send(200, {})
        if len(segments) == 2 and segments[1] == "submitted" and self.command == "GET":
            return self._send(200, job.description)
        if len(segments) == 2 and segments[1] == "details" and self.command == "GET":
            details = self.standin.bss_details(job)
            fields = [f for f in self.query.get("fields", "").split(",") if f]
            if fields:  # Jobs.details: ?fields= narrows the answer, as for properties
                details = {k: v for k, v in details.items() if k in fields}
            return self._send(200, details)
        raise _Refused(404, f"No such job resource <{'/'.join(segments)}>")

    def _storages(self, user: str, segments: list[str], body: bytes) -> None:
        base = self.standin.base_url
        if not segments or segments == [""]:
            ids = ["HOME"]
            if self.query.get("filter") == "all":
                ids += [f"{j.id}-uspace" for j in self.standin.jobs.values() if j.owner == user]
            return self._send(200, {"storages": [f"{base}/storages/{i}" for i in ids]})
        storage_id = segments[0]
        root = self.standin.storage_root(storage_id, user)
        url = f"{base}/storages/{storage_id}"
        job = self.standin.jobs.get(storage_id.removesuffix("-uspace"))
        ready = job is None or time.monotonic() >= job.uspace_ready_at
        if len(segments) == 1:
            return self._send(
                200,
                {
                    "resourceStatus": "READY" if ready else "INITIALIZING",
                    "mountPoint": str(root) + "/",
                    "protocols": ["BFT"],
                    "_links": {
                        "self": {"href": url},
                        "files": {"href": f"{url}/files"},
                        "action:rename": {"href": f"{url}/actions/rename"},
                        "action:copy": {"href": f"{url}/actions/copy"},
                    },
                },
            )
        if segments[1] != "files":
            raise _Refused(404, "No such storage resource")
        if not ready:
            # No storage root yet: every file operation fails (getStorageRoot() is null).
            raise _Refused(500, "Error accessing storage: the storage is not ready")
        rel = "/".join(s for s in segments[2:] if s)
        target = self._confined(root, rel)
        if self.command == "GET":
            return self._get_file(target, rel)
        if self.command == "PUT":
            if "json" in (self.headers.get("Content-Type") or ""):
                return self._send(200, {})  # property changes: accepted, nothing to do here
            # Uploads get the storage's umask (SMSProperties defaultUmask 027), not the
            # job's: the job directory itself is made with the job's Umask.
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            with os.fdopen(fd, "wb") as out:
                out.write(body)
            return self._send(204)
        if self.command == "POST":
            target.mkdir(parents=True, exist_ok=True)
            return self._send(201, {})
        if self.command == "DELETE":
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
            return self._send(204)
        raise _Refused(405, "Method not allowed")

    @staticmethod
    def _confined(root: Path, rel: str) -> Path:
        if any(part == ".." for part in rel.split("/")):
            raise _Refused(403, f"Access denied: <{rel}> leaves the storage")
        real_root = root.resolve()
        target = (root / rel).resolve() if rel else real_root
        if target != real_root and not target.is_relative_to(real_root):
            raise _Refused(403, f"Access denied: <{rel}> leaves the storage")
        return target

    def _get_file(self, target: Path, rel: str) -> None:
        if not target.exists():
            raise _Refused(404, f"File <{rel}> not found")
        accept = self.headers.get("Accept") or "application/json"
        if "octet-stream" in accept:
            if target.is_dir():
                return self._send(406)  # Files.download: "not acceptable", no message
            return self._send_bytes(target)
        props = _file_props(target, "/" + rel)
        if target.is_dir():
            content = {}
            for child in sorted(target.iterdir()):
                # Paths from the storage root; directories end with "/" (Files.getProperties).
                name = f"/{rel}/{child.name}" if rel else f"/{child.name}"
                name += "/" if child.is_dir() else ""
                try:
                    content[name] = _file_props(child, name)
                except OSError:
                    continue
            props["content"] = content
        return self._send(200, props)

    def _hold(self, limit: float = 120.0) -> None:
        """Answer nothing until the client closes the connection (or ``limit`` passed)."""
        deadline = time.monotonic() + limit
        self.close_connection = True
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.connection], [], [], 0.2)
            if readable and not self.connection.recv(1, socket.MSG_PEEK):
                return

    def _send_bytes(self, target: Path) -> None:
        size = target.stat().st_size
        spec = self.headers.get("Range")
        if not spec:
            return self._send(200, target.read_bytes(), content_type="application/octet-stream")
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", spec.strip())
        if not match:
            raise _Refused(416, f"Invalid range <{spec}>")
        start = int(match.group(1))
        end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
        if start > size:
            # Real UNICORE never answers this one: Files.makeRangedStream loops on
            # skip(), which returns 0 at the end of a TSI stream (BackedInputStream).
            self.standin.never_answered.append(f"{self.path} {spec}")
            return self._hold()
        with target.open("rb") as f:
            f.seek(start)
            data = f.read(max(0, end - start + 1))
        # 206 without Content-Range, an empty body at the end of the file (Files.download).
        return self._send(206, data, content_type="application/octet-stream")
