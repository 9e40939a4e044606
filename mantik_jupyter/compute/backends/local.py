"""Local processes: the backend of the embedded default, and the same code path as HPC.

Every run gets the run-directory layout the cluster backends use,
``<directory>/<run_id>/`` with ``code/`` (the unpacked package), ``mantik-job.sh``
(generated with ``scheduler="none"``), ``mantik.log`` and ``mantik.exitcode``. The
script runs as ``bash mantik-job.sh`` in that directory, in a session (process group)
of its own, so ``cancel`` stops the whole tree. A child that leaves the session
(``setsid``, a daemon's double fork) still carries ``MANTIK_LOCAL_JOB`` in its
environment, a token of this job alone (kept in ``mantik.jobmarker``): on Linux
``cancel`` finds such processes of the user in ``/proc/<pid>/environ`` and stops them
too. A child that clears its environment escapes that; so do all children where there
is no ``/proc``. As Slurm does at the end of a job, ``job_ended`` (the RunService
records the run's end) stops what a job that ended by itself or was killed from outside
left running, the same way, in a thread of its own; and deletes the credential file a
script killed before reading it leaves behind.

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

import logging
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from ...errors import BackendRejected, Conflict, InvalidRequest, NotFound, UnsafePath
from .. import layout
from ..script import login_commands_script
from ..states import RunState
from .base import Backend, Capabilities, FileEntry, JobStatus, PreparedJob, Progress
from .paths import clean_relative, safe_name, save_stream

log = logging.getLogger(__name__)

CANCELLED_FILE = "mantik.cancelled"
JOB_ID_FILE = "mantik.jobid"
MARKER_FILE = "mantik.jobmarker"
MARKER_ENV = "MANTIK_LOCAL_JOB"
CANCEL_GRACE = 5.0
# How long ``close`` waits for the threads that stop what ended jobs left running.
CLOSE_WAIT = 2.0
# How much of mantik-login.log a failed PreRunCommandOnLoginNode shows in its error.
LOGIN_LOG_TAIL = 2000

_JOB_ID = re.compile(r"^local-(\d+)-(\d+)$")
_STRIPPED_ENV_PREFIXES = ("MLFLOW_", "MANTIK_SSH_")

# Child processes started by any LocalBackend of this process, so that a fresh backend
# (e.g. a new RunService) still reaps them and learns their exit status.
_CHILDREN: dict[str, subprocess.Popen[bytes]] = {}
_CHILDREN_LOCK = threading.Lock()


def _proc_start_time(pid: int) -> str | None:
    """The start time of a live (non-zombie) process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
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
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


class LocalBackend(Backend):
    """Runs jobs as local processes below ``directory``."""

    capabilities = Capabilities(
        name="local",
        batch_states=True,
        description="Local processes on the machine of the lab (no scheduler)",
    )

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser().absolute()
        self._run_dirs: dict[str, Path] = {}
        # Threads stopping what ended jobs left running; ``close`` cuts their grace short.
        self._reapers: set[threading.Thread] = set()
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
        with (run_dir / layout.LOG_FILE).open("ab") as out:
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=run_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise BackendRejected(f"Cannot start the job of run {job.run_id}: {exc}") from None
        start = _proc_start_time(proc.pid) or "0"
        job_id = f"local-{proc.pid}-{start}"
        with _CHILDREN_LOCK:
            _CHILDREN[job_id] = proc
        (run_dir / JOB_ID_FILE).write_text(job_id + "\n")
        self._run_dirs[job_id] = run_dir
        log.info("started run %s as local job %s", job.run_id, job_id)
        return job_id

    # ---- states -------------------------------------------------------------------------

    def states(self, job_ids: list[str]) -> dict[str, JobStatus]:
        answer: dict[str, JobStatus] = {}
        for job_id in job_ids:
            try:
                answer[str(job_id)] = self._state(self._check_job_id(job_id))
            except NotFound:
                answer[str(job_id)] = JobStatus(RunState.UNKNOWN, native_state="NOT_FOUND")
        return answer

    def _alive(self, job_id: str) -> bool:
        match = _JOB_ID.match(job_id)
        assert match is not None
        pid, start = int(match.group(1)), match.group(2)
        with _CHILDREN_LOCK:
            child = _CHILDREN.get(job_id)
        if child is not None and child.poll() is not None:
            return False  # reaped now; the zombie is gone
        current = _proc_start_time(pid)
        return current is not None and (current == start or start == "0")

    def _state(self, job_id: str) -> JobStatus:
        if self._alive(job_id):
            return JobStatus(RunState.RUNNING, native_state="RUNNING")
        run_dir = Path(self.run_dir_of(job_id))
        cancelled = (run_dir / CANCELLED_FILE).exists()
        code = _read_code(run_dir / layout.EXIT_CODE_FILE)
        if cancelled:
            return JobStatus(RunState.KILLED, "CANCELLED", code, "CANCELLED")
        if code is None:
            with _CHILDREN_LOCK:
                child = _CHILDREN.get(job_id)
            rc = child.returncode if child is not None else None
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
        job_id = self._check_job_id(job_id)
        run_dir = Path(self.run_dir_of(job_id))
        try:
            self._stop(job_id, run_dir)
        finally:
            # Killed before its script got to the credential file, the job leaves it behind.
            (run_dir / layout.CREDENTIALS_FILE).unlink(missing_ok=True)

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
        # Not a daemon: a `mantik runs status` that recorded the end exits only once the
        # thread is done (the run is over, nobody would call this again); the lab's
        # ``close`` cuts the grace short instead.
        thread = threading.Thread(
            target=self._reap, args=(job_id, run_dir), name=f"mantik-local-end-{job_id}"
        )
        with self._reapers_lock:
            self._reapers = {t for t in self._reapers if t.is_alive()}
            self._reapers.add(thread)
        thread.start()

    def _reap(self, job_id: str, run_dir: Path) -> None:
        try:
            self._stop(job_id, run_dir, hurry=self._closing)
        except Exception:  # a thread of its own: nobody else would hear of it
            log.exception("stopping what local job %s left running", job_id)

    def close(self) -> None:
        # SIGKILL at once for what ended jobs left, rather than hold the lab's shutdown
        # for the grace of a child that ignores SIGTERM.
        self._closing.set()
        with self._reapers_lock:
            reapers = list(self._reapers)
        deadline = time.monotonic() + CLOSE_WAIT
        for thread in reapers:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _stop(self, job_id: str, run_dir: Path, hurry: threading.Event | None = None) -> None:
        """SIGTERM to the job's processes, SIGKILL to those left after the grace (cut
        short once ``hurry`` is set). Marks the job cancelled if its script still ran."""
        pid = int(job_id.split("-")[1])
        marker = _read_marker(run_dir)
        alive = self._alive(job_id)
        if alive:
            (run_dir / CANCELLED_FILE).write_text("cancelled\n")
        elif not _job_members(None, marker):
            return
        # The script ended but left children behind: they go all the same. The session
        # is not searched then: its number may be another process's by now.
        session = pid if alive else None
        self._signal_job(pid, session, marker, signal.SIGTERM)
        # The whole job, not only the script: a child that ignores SIGTERM (or takes its
        # time) outlives the script and must get the SIGKILL too.
        deadline = time.monotonic() + CANCEL_GRACE
        while self._job_alive(job_id, session, marker) and time.monotonic() < deadline:
            if hurry is None:
                time.sleep(0.1)
            elif hurry.wait(0.1):
                break
        # A killed process takes a moment to go (more on a loaded machine); one that
        # forked meanwhile has a child to kill too.
        deadline = time.monotonic() + CANCEL_GRACE
        while self._job_alive(job_id, session, marker) and time.monotonic() < deadline:
            self._signal_job(pid, session, marker, signal.SIGKILL)
            time.sleep(0.05)

    def _job_alive(self, job_id: str, session: int | None, marker: str | None) -> bool:
        return self._alive(job_id) or bool(_job_members(session, marker))

    @staticmethod
    def _signal_job(pid: int, session: int | None, marker: str | None, sig: signal.Signals) -> None:
        """Signal the job's process group (the script started a session of its own), any
        process of its session that moved to a group of its own, and any process that
        carries the job's marker (one that left the session)."""
        if session is not None:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass
        for member in _job_members(session, marker):
            try:
                os.kill(member, sig)
            except ProcessLookupError:
                pass

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
            raise NotFound(f"No file {rel!r} in run directory {run_dir}")
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
        name = target.name if rel else root.name
        final = dest / name if dest.is_dir() else dest
        final.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            if final.exists():
                raise Conflict(f"{final} exists already: remove it or download elsewhere")
            total = _tree_size(target)
            copied = [0]

            def copy(src: str, dst: str) -> None:
                shutil.copy2(src, dst)
                copied[0] += os.path.getsize(src)
                if progress:
                    progress(copied[0], total)

            shutil.copytree(
                target,
                final,
                symlinks=True,
                ignore=_links_leaving(root),
                copy_function=copy,
            )
            if progress:
                progress(total, total)
            return final
        return save_stream(self._stream(target), final, target.stat().st_size, progress)


def _job_members(session: int | None, marker: str | None) -> list[int]:
    """Live (non-zombie) processes of a session, and processes of this user whose
    environment holds ``MANTIK_LOCAL_JOB=<marker>``, from /proc; none where /proc is
    absent. Never this process or its ancestors (the lab, the shell that started it)."""
    if session is None and not marker:
        return []
    wanted = f"{MARKER_ENV}={marker}".encode() if marker else None
    spared = _self_and_ancestors()
    uid = os.getuid()
    members = []
    try:
        entries = list(os.scandir("/proc"))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] in ("Z", "X"):
            continue
        if session is not None and fields[3] == str(session):
            members.append(int(entry.name))
        elif wanted is not None and _environ_holds(entry, uid, wanted):
            members.append(int(entry.name))
    return members


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
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _links_leaving(root: Path):
    def ignore(directory: str, names: list[str]) -> list[str]:
        skipped = []
        for name in names:
            path = Path(directory) / name
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                log.warning("download: skipped %s (a link leading out of the run)", path)
                skipped.append(name)
        return skipped

    return ignore
