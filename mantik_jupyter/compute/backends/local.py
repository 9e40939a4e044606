"""Local processes: the backend of the embedded default, and the same code path as HPC.

Every run gets the run-directory layout the cluster backends use,
``<directory>/<run_id>/`` with ``code/`` (the unpacked package), ``mantik-job.sh``
(generated with ``scheduler="none"``), ``mantik.log`` and ``mantik.exitcode``. The
script runs as ``bash mantik-job.sh`` in that directory, in a session (process group)
of its own, so ``cancel`` stops the whole tree. Its parent is a small supervisor
process of the job (``_SUPERVISOR``, recorded in ``mantik.supervisor``): on Linux a
child subreaper, so every orphan of the job (a child that left the session with
``setsid`` or a daemon's double fork, even one that cleared its environment) stays its
descendant in ``/proc`` until the job's last process is gone; the supervisor records
the script's end status in ``mantik.ended``. A child that leaves the session also
still carries ``MANTIK_LOCAL_JOB`` in its environment, a token of this job alone (kept
in ``mantik.jobmarker``), which finds it when the supervisor is gone (killed, or a job
started before there were supervisors). Where there is no ``/proc`` only the session's
process group is stopped. As scancel does, ``cancel`` answers once SIGTERM is sent and
the job reads KILLED; the SIGKILL for what is left after the grace comes from the job's
supervisor (asked with ``STOP_SIGNAL``): it lives as long as the job, so a
``mantik runs cancel`` exits right after its answer and the job is still killed. Only
for a job without such a supervisor (started by an older version, or its supervisor
killed) does a thread of the cancelling process wait out the grace. As Slurm does at
the end of a job, ``job_ended`` (the RunService records the run's end) stops what a job
that ended by itself or was killed from outside left running, the same way (the
SIGTERM from a thread, as the sync must not wait for the scan); and deletes the
credential file a script killed before reading it leaves behind.

Job ids are ``local-<pid>-<start>``, where ``<start>`` is the process start time from
``/proc/<pid>/stat``: after a restart of the lab a pid that was reused by another
process is not mistaken for the job. When the process is gone the state comes from
``mantik.exitcode``; a missing exit code means the job was killed (``mantik.cancelled``
marks a cancel through this backend).

The job's environment is the lab's, minus every ``MLFLOW_*`` and ``MANTIK_SSH_*``
variable: the job script sets the tracking variables from its credential file.

Here the login node is this machine: ``Environment.PreRunCommandOnLoginNode`` runs in
the run directory before the job starts (a failing one stops the submission), and
``PostRunCommandOnLoginNode`` after the job script ends, in the job's process group (a
cancel stops it too). Their output goes to ``mantik-login.log``, as on UNICORE.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import posixpath
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ...errors import BackendRejected, InvalidRequest, NotFound, UnsafePath
from .. import layout
from ..run_pace import LOCAL_BACKEND
from ..script import login_commands_script
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
)
from .paths import (
    CREDENTIALS_SKIPPED,
    LINK_SKIPPED,
    clean_relative,
    is_credentials,
    link_points_down,
    not_folder,
    safe_name,
    save_stream,
    staged_folder,
)

log = logging.getLogger(__name__)

CANCELLED_FILE = "mantik.cancelled"
JOB_ID_FILE = "mantik.jobid"
MARKER_FILE = "mantik.jobmarker"
SUPERVISOR_FILE = "mantik.supervisor"
# A supervisor that sends the SIGKILL after the grace when asked is recorded with this
# third word in SUPERVISOR_FILE (one of an older version would die of the signal).
SUPERVISOR_STOPS = "stops"
# The grace (seconds) of the stop asked of a supervisor, for it to read.
STOP_FILE = "mantik.stop"
STOP_SIGNAL = signal.SIGUSR1
# The script's end status, written by its supervisor: the exit status, or minus the
# signal that killed it (the script writes mantik.exitcode itself only when it got to).
END_FILE = "mantik.ended"
MARKER_ENV = "MANTIK_LOCAL_JOB"
CANCEL_GRACE = 5.0
# How long ``close`` waits for the threads that stop what cancelled and ended jobs left.
CLOSE_WAIT = 2.0
# How much of mantik-login.log a failed PreRunCommandOnLoginNode shows in its error.
LOGIN_LOG_TAIL = 2000

_JOB_ID = re.compile(r"^local-(\d+)-(\d+)$")
_STRIPPED_ENV_PREFIXES = ("MLFLOW_", "MANTIK_SSH_")

# The supervisors started by any LocalBackend of this process (they are its children),
# by job id, until they are reaped.
_SUPERVISORS: dict[str, subprocess.Popen[bytes]] = {}
_SUPERVISORS_LOCK = threading.Lock()

# The supervisor of a job: ``python -c _SUPERVISOR <report fd> <end file> <argv...>``,
# started by the lab in a session of its own; it starts the job script in another one.
#
# Why a supervisor: a child that clears its environment (``env -i``) and leaves the
# session (``setsid``, a double fork) sheds the marker and the session, the two things
# the job was found by. What no child can shed is its ancestry below a child subreaper
# (prctl PR_SET_CHILD_SUBREAPER, Linux 3.4+): an orphan is re-parented to its nearest
# living subreaper ancestor instead of init. So while the supervisor lives, every process
# of the job is its descendant in /proc, found by ppid alone, with no privilege, and
# never another job's, another user's or the lab's. It lives as long as anything of the
# job does (it reaps the orphans it adopts) and ignores SIGTERM, SIGINT and SIGHUP: it
# must outlive the job's processes to find them, and ends by itself after the last.
# The alternatives fall short: a cgroup needs a writable cgroup tree, which a lab run by
# a user without root does not have (no systemd delegation; cgroup v1 here); a walk of
# the ppid tree at cancel time misses an orphan whose parent ended before, since it was
# re-parented to init; the job script itself as subreaper is gone when the job ends, so
# what a finished job left behind would be lost.
#
# It reports "ok <script pid> <script start> <own start>" (or "error <why>") on the
# report fd, and writes the script's end status to the end file before it reaps the
# script: the script's zombie stays until then, so the lab never sees a script gone
# without its end status. Plain stdlib Python (-I -S), quick to start.
#
# On SIGUSR1 (``STOP_SIGNAL``: whoever cancelled the job, or recorded its end, has sent
# SIGTERM) it sends SIGKILL to every process below it once the grace in the stop file
# has passed, and again every 50 ms while any is left (one may fork meanwhile): the
# cancelling process need not stay for the grace. An earlier request's deadline stands
# if it comes first. Its handlers never raise: an error there would end the supervisor.
_SUPERVISOR = r"""
import os, signal, subprocess, sys

def start_time(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
        return text[text.rindex(")") + 2 :].split()[19]
    except (OSError, ValueError, IndexError):
        return "0"

def descendants():
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] not in ("Z", "X"):
            children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found

def kill_rest(signum, frame):
    try:
        left = descendants()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if not left:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Exception:
        pass

def stop(signum, frame):
    try:
        try:
            with open(stop_file) as f:
                grace = float(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            grace = 5.0
        if not 0 < grace <= 3600:
            grace = 5.0
        pending = signal.getitimer(signal.ITIMER_REAL)[0]
        if not pending or grace < pending:
            signal.setitimer(signal.ITIMER_REAL, grace, 0.05)
    except Exception:
        pass

report, end_file, stop_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
argv = sys.argv[4:]
try:  # without it (not Linux, a Python without ctypes) the marker still finds most
    import ctypes
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
except (ImportError, OSError, AttributeError):
    pass
try:
    job = subprocess.Popen(argv, start_new_session=True)
except OSError as exc:
    os.write(report, f"error {exc}\n".encode())
    sys.exit(1)
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
signal.signal(signal.SIGALRM, kill_rest)
signal.signal(signal.SIGUSR1, stop)
os.write(report, f"ok {job.pid} {start_time(job.pid)} {start_time(os.getpid())}\n".encode())
os.close(report)
while True:
    try:
        if hasattr(os, "waitid"):
            child = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            pid, code = child.si_pid, child.si_status
            if child.si_code != os.CLD_EXITED:
                code = -code
        else:
            pid, status = os.wait()
            code = os.waitstatus_to_exitcode(status)
    except ChildProcessError:
        break
    if pid == job.pid:
        job.returncode = code
        try:
            with open(end_file, "w") as f:
                f.write(f"{code}\n")
        except OSError:
            pass
    if hasattr(os, "waitid"):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
"""


def _proc_start_time(pid: int, *, zombie: bool = False) -> str | None:
    """The start time of a live (non-zombie, unless ``zombie``) process, or None when
    it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        # ESRCH: the process is on its way out (seen right after a SIGKILL).
        return None
    except OSError:
        # No /proc (not Linux): fall back to "some process has this pid".
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "0"
        return "0"
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X") and not zombie:
        return None
    return fields[19]


@dataclass(frozen=True)
class _Target:
    """What finds a job's processes: its script's process group (``session``, while the
    script runs), its marker, and its supervisor (pid, start time)."""

    job_id: str
    run_dir: Path
    session: int | None
    marker: str | None
    supervisor: tuple[int, str] | None
    # The supervisor sends the SIGKILL after the grace when asked (``STOP_SIGNAL``).
    supervisor_stops: bool = False


class LocalBackend(Backend):
    """Runs jobs as local processes below ``directory``."""

    capabilities = Capabilities(
        name=LOCAL_BACKEND,
        batch_states=True,
        description="Local processes on the machine of the lab (no scheduler)",
    )

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser().absolute()
        self._run_dirs: dict[str, Path] = {}
        # Threads stopping what cancelled or ended jobs left running, by job id;
        # ``close`` cuts their grace short.
        self._reapers: dict[str, threading.Thread] = {}
        # Jobs whose supervisors wait out the grace before their SIGKILL, by job id.
        self._stopping: dict[str, _Target] = {}
        self._reapers_lock = threading.Lock()
        self._closing = threading.Event()

    def __repr__(self) -> str:
        return f"LocalBackend({self.directory})"

    # ---- bookkeeping --------------------------------------------------------------------

    def attach(self, job_id: str, run_dir: str | Path) -> None:
        self._run_dirs[self._check_job_id(job_id)] = Path(run_dir)

    def run_dir_of(self, job_id: str) -> str:
        job_id = self._check_job_id(job_id)
        if job_id not in self._run_dirs:
            for marker in self.directory.glob(f"*/{JOB_ID_FILE}"):
                try:
                    if marker.read_text().strip() == job_id:
                        self._run_dirs[job_id] = marker.parent
                        break
                except OSError:
                    continue
            else:
                raise NotFound(f"No local job {job_id} below {self.directory}")
        return str(self._run_dirs[job_id])

    @staticmethod
    def _check_job_id(job_id: str) -> str:
        job_id = str(job_id)
        if not _JOB_ID.match(job_id):
            raise NotFound(f"{job_id!r} is not a local job id (local-<pid>-<start>)")
        return job_id

    # ---- submit -------------------------------------------------------------------------

    def submit(self, job: PreparedJob, progress: Progress | None = None) -> str:
        run_dir = self.directory / safe_name(job.run_id, "run id")
        names = job.files or sorted(p.name for p in job.local_dir.iterdir() if p.is_file())
        for name in names:
            safe_name(name, "file name")
        if layout.JOB_SCRIPT not in names:
            raise InvalidRequest(f"{job.local_dir} holds no {layout.JOB_SCRIPT} to submit")
        self.directory.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir(mode=0o700, exist_ok=True)
        total = sum((job.local_dir / n).stat().st_size for n in names)
        done = 0
        if job.local_dir.resolve() != run_dir.resolve():
            for name in names:
                done += _copy_private(job.local_dir / name, run_dir / name)
                if progress:
                    progress(done, total)
        if progress:
            progress(total, total)
        if (run_dir / layout.PACKAGE_FILE).is_file():
            _unpack(run_dir / layout.PACKAGE_FILE, run_dir / layout.CODE_DIR)
        env = {k: v for k, v in os.environ.items() if not k.startswith(_STRIPPED_ENV_PREFIXES)}
        pre, post = job.pre_login_commands, job.post_login_commands
        # As on UNICORE: the run id tells a login-node command which run it serves.
        login_env = {**env, "MLFLOW_RUN_ID": job.run_id, "MANTIK_RUN_ID": job.run_id}
        if pre:
            _run_pre_commands(run_dir, pre, login_env)
        argv = ["bash", layout.JOB_SCRIPT]
        if post:
            argv = ["bash", "-c", _with_post_commands(post), "mantik-job"]
            env = login_env
        # Unique per job, unlike anything the lab's environment holds, so that a scan
        # for it finds this job's processes and never the lab's or another job's.
        marker = uuid.uuid4().hex
        (run_dir / MARKER_FILE).write_text(marker + "\n")
        env = {**env, MARKER_ENV: marker}
        _reap_supervisors()
        supervisor, pid, start = _start_supervised(argv, run_dir, env, job.run_id)
        job_id = f"local-{pid}-{start}"
        with _SUPERVISORS_LOCK:
            _SUPERVISORS[job_id] = supervisor
        (run_dir / JOB_ID_FILE).write_text(job_id + "\n")
        self._run_dirs[job_id] = run_dir
        log.info("started run %s as local job %s", job.run_id, job_id)
        return job_id

    # ---- states -------------------------------------------------------------------------

    def states(self, job_ids: list[str]) -> dict[str, JobStatus]:
        answer: dict[str, JobStatus] = {}
        for job_id in job_ids:
            try:
                status = self._state(self._check_job_id(job_id))
                ended = self._ended_at(job_id) if status.state.is_final else None
                answer[str(job_id)] = replace(
                    status, started_at=self._started_at(job_id), ended_at=ended
                )
            except NotFound:
                answer[str(job_id)] = JobStatus(RunState.UNKNOWN, native_state="NOT_FOUND")
        return answer

    def _started_at(self, job_id: str) -> int | None:
        """When the job's script started (ms): the job id file is written right after,
        so its time is known without asking the process."""
        try:
            return (Path(self.run_dir_of(job_id)) / JOB_ID_FILE).stat().st_mtime_ns // 1_000_000
        except (NotFound, OSError):
            return None

    def _ended_at(self, job_id: str) -> int | None:
        """When an ended job ended (ms): its supervisor records the end as the script
        exits; a cancel, or the script's exit code, in case that is not written yet."""
        try:
            run_dir = Path(self.run_dir_of(job_id))
        except NotFound:
            return None
        for name in (END_FILE, CANCELLED_FILE, layout.EXIT_CODE_FILE):
            try:
                return (run_dir / name).stat().st_mtime_ns // 1_000_000
            except OSError:
                continue
        return None

    def _alive(self, job_id: str, run_dir: Path | None = None) -> bool:
        """Whether the job's script still runs (``run_dir``: where its files are)."""
        match = _JOB_ID.match(job_id)
        assert match is not None
        pid, start = int(match.group(1)), match.group(2)
        _reap_supervisors()
        current = _proc_start_time(pid)
        if current is None and run_dir is not None and not (run_dir / END_FILE).exists():
            # Ended, but its supervisor has not yet recorded how (it does before it reaps
            # the zombie): still running for a moment, rather than killed without a word.
            if (run_dir / SUPERVISOR_FILE).exists():
                current = _proc_start_time(pid, zombie=True)
        return current is not None and (current == start or start == "0")

    def _state(self, job_id: str) -> JobStatus:
        try:
            run_dir = Path(self.run_dir_of(job_id))
        except NotFound:
            if self._alive(job_id):
                return JobStatus(RunState.RUNNING, native_state="RUNNING")
            raise
        alive = self._alive(job_id, run_dir)
        code = _read_code(run_dir / layout.EXIT_CODE_FILE)
        if (run_dir / CANCELLED_FILE).exists():
            # As after scancel: KILLED once SIGTERM is sent, even while a process that
            # ignores it waits for its SIGKILL.
            return JobStatus(RunState.KILLED, "CANCELLED", code, "CANCELLED")
        if alive:
            return JobStatus(RunState.RUNNING, native_state="RUNNING")
        if code is None:
            rc = _read_code(run_dir / END_FILE)
            reason = f"killed by signal {-rc}" if rc is not None and rc < 0 else "killed"
            return JobStatus(RunState.FAILED, "KILLED", rc, reason)
        if code == 0:
            return JobStatus(RunState.FINISHED, "COMPLETED", 0)
        return JobStatus(RunState.FAILED, "FAILED", code, f"exit code {code}")

    # ---- logs, cancel -------------------------------------------------------------------

    def read_log(self, job_id: str, offset: int = 0) -> tuple[bytes, int]:
        path = Path(self.run_dir_of(job_id)) / layout.LOG_FILE
        try:
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read(layout.MAX_LOG_READ)
        except FileNotFoundError:
            return b"", offset
        return data, offset + len(data)

    def cancel(self, job_id: str) -> None:
        """As scancel: SIGTERM to the job's processes, the job marked cancelled, and the
        answer; what is left after the grace gets SIGKILL from the job's supervisor
        (from a thread of this process for a job without one that can)."""
        job_id = self._check_job_id(job_id)
        run_dir = Path(self.run_dir_of(job_id))
        try:
            target = self._terminate(job_id, run_dir, cancel=True)
        finally:
            # Killed before its script got to the credential file, the job leaves it behind.
            (run_dir / layout.CREDENTIALS_FILE).unlink(missing_ok=True)
        if target is not None and not self._handed_over(target):
            self._in_background(job_id, run_dir, target)

    def job_ended(self, job_id: str) -> None:
        job_id = self._check_job_id(job_id)
        try:
            run_dir = Path(self.run_dir_of(job_id))
        except NotFound:
            return  # its run directory is gone, and with it the marker and credential
        # A script killed from outside (SIGKILL) before it read the file never deletes it.
        (run_dir / layout.CREDENTIALS_FILE).unlink(missing_ok=True)
        # The sync loop calls this while it records the end: the scan of /proc and the
        # grace of a child that ignores SIGTERM must not hold it (nor the run's FINISHED).
        self._in_background(job_id, run_dir, None)

    def _in_background(self, job_id: str, run_dir: Path, target: _Target | None) -> None:
        """Stop the job's processes in a thread: SIGTERM first unless ``target`` (the
        job SIGTERM was sent to), SIGKILL to those left after the grace (by the job's
        supervisor where it can, else by this thread).

        Not a daemon: a `mantik runs cancel` or `status` that exits right after still
        sends what it began (nobody would call this again); the thread is short where
        the supervisor waits out the grace, and the lab's ``close`` cuts the grace short
        otherwise. One thread a job: a cancelled job's end comes while the cancel's
        thread (or the supervisor) still waits, and that scans to the end anyway; a
        second SIGTERM would cut short what a job does on the first (a checkpoint).
        """
        thread = threading.Thread(
            target=self._reap, args=(job_id, run_dir, target), name=f"mantik-local-stop-{job_id}"
        )
        with self._reapers_lock:
            self._reapers = {k: t for k, t in self._reapers.items() if t.is_alive()}
            stopping = self._stopping.get(job_id)
            if job_id in self._reapers or (stopping and _supervisor_lives(stopping)):
                return
            self._reapers[job_id] = thread
            thread.start()

    def _reap(self, job_id: str, run_dir: Path, target: _Target | None) -> None:
        try:
            if target is None:
                target = self._terminate(job_id, run_dir, cancel=False)
                if target is not None and self._handed_over(target):
                    return
            if target is not None:
                self._kill_after_grace(target)
        except Exception:  # a thread of its own: nobody else would hear of it
            log.exception("stopping the processes of local job %s", job_id)

    def _handed_over(self, target: _Target) -> bool:
        """Whether the job's supervisor took on the SIGKILL after the grace (remembered
        for ``close``, while that supervisor lives)."""
        if not _ask_supervisor_to_stop(target):
            return False
        with self._reapers_lock:
            self._stopping = {k: t for k, t in self._stopping.items() if _supervisor_lives(t)}
            self._stopping[target.job_id] = target
        return True

    def close(self) -> None:
        # SIGKILL at once for what cancelled and ended jobs left, rather than hold the
        # lab's shutdown for the grace of a child that ignores SIGTERM (or leave it to
        # the supervisors: the processes would outlive the lab by the grace).
        self._closing.set()
        with self._reapers_lock:
            reapers = list(self._reapers.values())
            stopping = list(self._stopping.values())
            self._stopping.clear()
        for target in stopping:
            if not _supervisor_lives(target):
                continue  # done: it lives as long as anything of the job
            # The script's process group only while the script is the same process.
            alive = self._alive(target.job_id, target.run_dir)
            self._kill_after_grace(replace(target, session=target.session if alive else None))
        deadline = time.monotonic() + CLOSE_WAIT
        for thread in reapers:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _terminate(self, job_id: str, run_dir: Path, *, cancel: bool) -> _Target | None:
        """SIGTERM to the job's processes; None when none runs. A cancel marks a job
        whose script still runs cancelled (before the signal: it reads KILLED then)."""
        alive = self._alive(job_id, run_dir)
        if alive and cancel:
            (run_dir / CANCELLED_FILE).write_text("cancelled\n")
        pid = int(job_id.split("-")[1])
        # The script ended but left processes behind: they go all the same. Its session
        # is not searched then: its number may be another process's by now (the
        # supervisor and the marker still find them).
        supervisor = _read_supervisor(run_dir)
        target = _Target(
            job_id=job_id,
            run_dir=run_dir,
            session=pid if alive else None,
            marker=_read_marker(run_dir),
            supervisor=supervisor[:2] if supervisor else None,
            supervisor_stops=bool(supervisor and supervisor[2]),
        )
        if not alive and not _job_members(target):
            return None
        self._signal_job(target, signal.SIGTERM)
        return target

    def _kill_after_grace(self, target: _Target) -> None:
        """SIGKILL to the job's processes left after the grace (cut short by ``close``)."""
        # The whole job, not only the script: a child that ignores SIGTERM (or takes its
        # time) outlives the script and must get the SIGKILL too.
        deadline = time.monotonic() + CANCEL_GRACE
        while self._job_alive(target) and time.monotonic() < deadline:
            if self._closing.wait(0.1):
                break
        # A killed process takes a moment to go (more on a loaded machine); one that
        # forked meanwhile has a child to kill too.
        deadline = time.monotonic() + CANCEL_GRACE
        while self._job_alive(target) and time.monotonic() < deadline:
            self._signal_job(target, signal.SIGKILL)
            time.sleep(0.05)

    def _job_alive(self, target: _Target) -> bool:
        return self._alive(target.job_id, target.run_dir) or bool(_job_members(target))

    @staticmethod
    def _signal_job(target: _Target, sig: signal.Signals) -> None:
        """Signal the job's process group (the script started a session of its own), any
        process of its session that moved to a group of its own, any descendant of its
        supervisor, and any process that carries the job's marker. Each once: a second
        SIGTERM cuts short what a process does on the first (a checkpoint)."""
        grouped = False
        if target.session is not None:
            try:
                os.killpg(target.session, sig)
                grouped = True
            except (ProcessLookupError, PermissionError):
                pass
        for member in _job_members(target, beside_group=grouped):
            try:
                os.kill(member, sig)
            except (ProcessLookupError, PermissionError):
                pass  # gone, or a setuid program the job ran: not ours to stop

    # ---- files --------------------------------------------------------------------------

    def _confined(self, job_id: str, path: str) -> tuple[Path, Path, str]:
        run_dir = Path(self.run_dir_of(job_id))
        rel = clean_relative(path)
        root = run_dir.resolve()
        if not root.is_dir():
            raise NotFound(f"The run directory {run_dir} does not exist")
        target = (root / rel).resolve() if rel else root
        if target != root and not target.is_relative_to(root):
            raise UnsafePath(f"{rel!r} leads outside the run directory {run_dir}")
        if not target.exists():
            # As the SSH backend says it: it named the run directory only, and a user of
            # `runs download` did not know how to see what is there. The run directory is
            # named after its run.
            folder = rel.rpartition("/")[0]
            look = f"mantik runs files {run_dir.name}" + (
                f" {shlex.quote(folder)}" if folder else ""
            )
            raise NotFound(
                f"There is no {rel!r} in the run directory {run_dir}; '{look}' lists what is there."
            )
        return root, target, rel

    def list_files(self, job_id: str, path: str = "") -> list[FileEntry]:
        root, target, rel = self._confined(job_id, path)
        if not target.is_dir():
            raise InvalidRequest(f"{path!r} of run directory {root} is not a folder")
        entries = []
        for child in target.iterdir():
            st = child.lstat()
            entries.append(
                FileEntry(
                    path=f"{rel}/{child.name}" if rel else child.name,
                    size=st.st_size,
                    is_dir=stat.S_ISDIR(st.st_mode),
                )
            )
        return sorted(entries, key=lambda e: (not e.is_dir, e.path))

    def open_file(self, job_id: str, path: str) -> Iterator[bytes]:
        root, target, _ = self._confined(job_id, path)
        if not target.is_file():
            raise InvalidRequest(f"{path!r} of run directory {root} is not a file")
        return self._stream(target)

    @staticmethod
    def _stream(target: Path) -> Iterator[bytes]:
        with target.open("rb") as f:
            while chunk := f.read(layout.CHUNK):
                yield chunk

    def download(
        self, job_id: str, path: str, dest: Path, progress: Progress | None = None
    ) -> Path:
        """Same contract as ``SshSlurmBackend.download``: a file replaces an older copy,
        a folder lands as ``dest/<name>`` (or ``dest``) and never merges into one."""
        root, target, rel = self._confined(job_id, path)
        dest = Path(dest)
        name = posixpath.basename(rel) if rel else root.name
        final = dest / name if dest.is_dir() else dest
        final.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            total = _tree_size(target)
            copied = [0]

            def count(size: int) -> None:
                copied[0] += size
                if progress:
                    progress(copied[0], max(total, copied[0]))

            with staged_folder(final, name) as staging:
                _copy_folder(target, staging / name, root, count)
            if progress:
                # Complete, also when what was skipped (links, a removed file) never came.
                end = max(total, copied[0])
                progress(end, end)
            return final
        return save_stream(self._stream(target), final, target.stat().st_size, progress)


    def folder_members(self, job_id: str, path: str) -> Iterator[FolderMember]:
        root, target, rel = self._confined(job_id, path)
        if not target.is_dir():
            why = not_folder(target.is_file())
            raise InvalidRequest(f"{path!r} of run directory {root} {why}")
        return _walk_members(target, "")


def _walk_members(folder: Path, prefix: str) -> Iterator[FolderMember]:
    """The entries below ``folder`` as ``_copy_folder`` sees them: links as links (the
    archive keeps those pointing down), no special files; what the job removes meanwhile
    is skipped."""
    try:
        with os.scandir(folder) as found:
            entries = sorted(found, key=lambda e: e.name)
    except FileNotFoundError:
        log.warning("download: skipped %s (removed while it was downloaded)", folder)
        return
    for entry in entries:
        rel = f"{prefix}{entry.name}"
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                yield FolderMember(rel, "link", st.st_mtime, target=os.readlink(entry.path))
            elif stat.S_ISDIR(st.st_mode):
                yield FolderMember(rel, "dir", st.st_mtime, stat.S_IMODE(st.st_mode))
                yield from _walk_members(Path(entry.path), f"{rel}/")
            elif stat.S_ISREG(st.st_mode):
                yield FolderMember(
                    rel, "file", st.st_mtime, stat.S_IMODE(st.st_mode), open=_opener(entry.path)
                )
            else:
                log.warning("download: skipped %s (not a file, folder or link)", entry.path)
        except FileNotFoundError:
            log.warning("download: skipped %s (removed while it was downloaded)", entry.path)


def _opener(path: str) -> FileOpener:
    def open_now() -> tuple[int, Iterator[bytes]]:
        # O_NOFOLLOW: a file the job replaced by a link since it was listed is not read
        # through that link.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # now a link: the file that was listed is gone
                raise FileNotFoundError(errno.ENOENT, "replaced by a link", path) from None
            raise
        f = os.fdopen(fd, "rb")
        size = os.fstat(fd).st_size
        return size, _read_all(f)

    return open_now


def _read_all(f: io.BufferedReader) -> Iterator[bytes]:
    with f:
        while chunk := f.read(layout.CHUNK):
            yield chunk


def _job_members(target: _Target, *, beside_group: bool = False) -> list[int]:
    """Live (non-zombie) processes of the job, from /proc: of its session, below its
    supervisor (while that is the same process), and of this user with
    ``MANTIK_LOCAL_JOB=<marker>`` in their environment; none where /proc is absent.
    Never the supervisor, this process or its ancestors (the lab, its shell).
    ``beside_group``: not those of the script's process group (just signalled whole)."""
    session, marker = target.session, target.marker
    supervisor = target.supervisor
    if supervisor is not None and (
        supervisor[1] == "0" or _proc_start_time(supervisor[0]) != supervisor[1]
    ):
        supervisor = None  # ended (with nothing of the job left), or its pid is reused
    if session is None and not marker and supervisor is None:
        return []
    wanted = f"{MARKER_ENV}={marker}".encode() if marker else None
    spared = _self_and_ancestors()
    if supervisor is not None:
        spared.add(supervisor[0])
    uid = os.getuid()
    members: dict[int, None] = {}
    children: dict[int, list[int]] = {}
    grouped: set[int] = set()
    try:
        entries = list(os.scandir("/proc"))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] in ("Z", "X"):
            continue
        children.setdefault(int(fields[1]), []).append(pid)
        if beside_group and session is not None and fields[2] == str(session):
            grouped.add(pid)
        if pid in spared:
            continue
        if session is not None and fields[3] == str(session):
            members[pid] = None
        elif wanted is not None and _environ_holds(entry, uid, wanted):
            members[pid] = None
    if supervisor is not None:
        below, seen = list(children.get(supervisor[0], [])), set()
        while below:
            pid = below.pop()
            if pid not in seen and pid not in spared:
                seen.add(pid)
                members[pid] = None
                below.extend(children.get(pid, []))
    return [pid for pid in members if pid not in grouped]


def _environ_holds(entry: os.DirEntry[str], uid: int, wanted: bytes) -> bool:
    try:
        # Another user's environment is not ours to read, nor theirs to be stopped.
        if entry.stat().st_uid != uid:
            return False
        environ = Path(entry.path, "environ").read_bytes()
    except OSError:
        return False
    return wanted in environ.split(b"\0")


def _self_and_ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(text[text.rindex(")") + 2 :].split()[1])
    return pids


def _read_marker(run_dir: Path) -> str | None:
    """The job's marker; None for a job started before there were markers."""
    try:
        marker = (run_dir / MARKER_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return marker if re.fullmatch(r"[0-9a-f]{32}", marker) else None


def _read_supervisor(run_dir: Path) -> tuple[int, str, bool] | None:
    """The job's supervisor (pid, start time, whether it stops the job when asked: see
    ``STOP_SIGNAL``); None for a job started without one."""
    try:
        words = (run_dir / SUPERVISOR_FILE).read_text().split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(words) not in (2, 3) or not all(w.isdigit() for w in words[:2]):
        return None
    return int(words[0]), words[1], words[2:] == [SUPERVISOR_STOPS]


def _supervisor_lives(target: _Target) -> bool:
    """Whether the job's supervisor is still the process recorded (not ended, its pid
    not another process's)."""
    supervisor = target.supervisor
    return supervisor is not None and _proc_start_time(supervisor[0]) == supervisor[1]


def _ask_supervisor_to_stop(target: _Target) -> bool:
    """Ask the job's supervisor for the SIGKILL after the grace (``STOP_SIGNAL``); False
    where it cannot be asked (none, one that does not know the signal, gone)."""
    if target.supervisor is None or not target.supervisor_stops:
        return False
    if target.supervisor[1] == "0" or not _supervisor_lives(target):
        return False  # no /proc: it could not find the job's processes
    try:
        (target.run_dir / STOP_FILE).write_text(f"{CANCEL_GRACE}\n")
        os.kill(target.supervisor[0], STOP_SIGNAL)
    except OSError:
        return False
    return True


def _start_supervised(
    argv: list[str], run_dir: Path, env: dict[str, str], run_id: str
) -> tuple[subprocess.Popen[bytes], int, str]:
    """Start ``argv`` in ``run_dir`` below a supervisor of its own (``_SUPERVISOR``):
    (the supervisor, the script's pid, the script's start time)."""
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as report, (run_dir / layout.LOG_FILE).open("ab") as out:
        try:
            supervisor = subprocess.Popen(
                [sys.executable or "python3", "-I", "-S", "-c", _SUPERVISOR, str(write_end),
                 END_FILE, STOP_FILE, *argv],
                cwd=run_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
                pass_fds=(write_end,),
            )  # fmt: skip
        except OSError as exc:
            raise BackendRejected(f"Cannot start the job of run {run_id}: {exc}") from None
        finally:
            os.close(write_end)
        line = report.readline().decode(errors="replace").strip()
    words = line.split()
    if len(words) != 4 or words[0] != "ok" or not all(w.isdigit() for w in words[1:]):
        supervisor.wait()
        why = (
            line.removeprefix("error ")
            if line.startswith("error ")
            else f"its supervisor ({sys.executable}) exited with status "
            f"{supervisor.returncode}; what it said is in {run_dir / layout.LOG_FILE}"
        )
        raise BackendRejected(f"Cannot start the job of run {run_id}: {why}")
    (run_dir / SUPERVISOR_FILE).write_text(f"{supervisor.pid} {words[3]} {SUPERVISOR_STOPS}\n")
    return supervisor, int(words[1]), words[2]


def _reap_supervisors() -> None:
    """Reap the supervisors that ended (after the last process of their job)."""
    with _SUPERVISORS_LOCK:
        for job_id, supervisor in list(_SUPERVISORS.items()):
            if supervisor.poll() is not None:
                del _SUPERVISORS[job_id]


def _copy_private(src: Path, dst: Path) -> int:
    """Copy keeping the mode; the mode is set before any byte is written."""
    mode = stat.S_IMODE(src.stat().st_mode)
    dst.unlink(missing_ok=True)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    size = 0
    with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
        os.fchmod(out.fileno(), mode)
        while chunk := inp.read(layout.CHUNK):
            out.write(chunk)
            size += len(chunk)
    return size


def _unpack(package: Path, dest: Path) -> None:
    dest.mkdir(exist_ok=True)
    try:
        with tarfile.open(package, "r:gz") as archive:
            archive.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise BackendRejected(f"Cannot unpack the code package {package}: {exc}") from None


def _run_pre_commands(run_dir: Path, commands: tuple[str, ...], env: dict[str, str]) -> None:
    script = login_commands_script(commands, "PreRunCommandOnLoginNode")
    with (run_dir / layout.LOGIN_LOG_FILE).open("ab") as out:
        try:
            done = subprocess.run(
                ["bash", "-c", script],
                cwd=run_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                check=False,
            )
        except OSError as exc:
            raise BackendRejected(f"Cannot run PreRunCommandOnLoginNode: {exc}") from None
    if done.returncode == 0:
        return
    # No job will read and delete the credential file.
    (run_dir / layout.CREDENTIALS_FILE).unlink(missing_ok=True)
    with (run_dir / layout.LOGIN_LOG_FILE).open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - LOGIN_LOG_TAIL))
        tail = f.read().decode(errors="replace").strip()
    raise BackendRejected(
        f"Environment.PreRunCommandOnLoginNode failed with exit status {done.returncode}, "
        f"so the job of run {run_dir.name} was not started. The end of "
        f"{run_dir / layout.LOGIN_LOG_FILE}:\n{tail}"
    )


def _with_post_commands(commands: tuple[str, ...]) -> str:
    """bash text: the job script, then PostRunCommandOnLoginNode; the job's status stays."""
    post = login_commands_script(commands, "PostRunCommandOnLoginNode")
    return (
        f"bash {shlex.quote(layout.JOB_SCRIPT)}\n"
        "mantik_status=$?\n"
        f"bash -c {shlex.quote(post)} </dev/null >>{layout.LOGIN_LOG_FILE} 2>&1\n"
        'exit "$mantik_status"\n'
    )


def _read_code(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    head = text.splitlines()[0].strip() if text else ""
    return int(head) if head.lstrip("-").isdigit() else None


def _tree_size(root: Path) -> int:
    """The bytes of the files a folder download copies (links are made, not copied)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _copy_folder(src: Path, dst: Path, root: Path, copied: Callable[[int], None]) -> None:
    """``src`` copied to ``dst`` as the SSH backend's tar download lands it: links only
    where they point down (``link_points_down``), no special files, no credential file
    of the run (``root``). A file or folder the job removes meanwhile (a running job
    replacing its checkpoint) is skipped: copytree failed the whole download for it,
    telling the user that the destination could not be written."""
    dst.mkdir()
    try:
        with os.scandir(src) as found:
            entries = sorted(found, key=lambda e: e.name)
    except FileNotFoundError:
        dst.rmdir()
        log.warning("download: skipped %s (removed while it was downloaded)", src)
        return
    for entry in entries:
        path, out = Path(entry.path), dst / entry.name
        if is_credentials(entry.name):
            if src != root:
                log.warning(CREDENTIALS_SKIPPED, path)
            continue  # at the run's top it stays for a job that has not started yet
        try:
            if entry.is_symlink():
                link = os.readlink(path)
                if link_points_down(link):
                    os.symlink(link, out)
                else:
                    log.warning(LINK_SKIPPED, path, link)
            elif entry.is_dir(follow_symlinks=False):
                _copy_folder(path, out, root, copied)
            elif entry.is_file(follow_symlinks=False):
                shutil.copy2(path, out, follow_symlinks=False)
                copied(out.stat().st_size)
            else:
                log.warning("download: skipped %s (not a file, folder or link)", path)
        except FileNotFoundError:
            if os.path.lexists(path):
                raise  # the destination's trouble, not the run's
            out.unlink(missing_ok=True)
            log.warning("download: skipped %s (removed while it was downloaded)", path)
    try:
        shutil.copystat(src, dst, follow_symlinks=False)
    except FileNotFoundError:
        pass  # removed meanwhile; what was in it arrived
