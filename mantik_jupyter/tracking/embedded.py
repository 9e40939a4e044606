"""The embedded MLflow tracking server: the default that needs no configuration.

``mlflow server`` runs as a child process of the lab with an sqlite store and
proxied artifacts under one directory, MLflow's basic-auth app with
``default_permission = NO_PERMISSIONS``, and a generated admin password and
Flask secret kept in a 0600 file. It binds to 127.0.0.1 on a free port.
``server.json`` records the running process so that a later start (or the
``mantik`` command, or a kernel) finds it, and so that a process left behind by
a crash is found and stopped.

A server that runs but no longer answers (stopped, deadlocked) is found without
asking it anything while all is well: a request to it that times out or finds no
connection is reported (``report_unanswered``), and only then does the lab that
runs it ask /health, and start it again when it stays silent.
"""

from __future__ import annotations

import ctypes
import fcntl
import getpass
import logging
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.version import InvalidVersion, Version

from ..errors import LocalStateInvalid, MantikError, TrackingTimeout, TrackingUnavailable
from . import mlflow_app
from .credentials import Credential
from .rest import TrackingClient
from .secrets import (
    create_private_json,
    read_json,
    read_private_json,
    write_private,
    write_private_json,
)

log = logging.getLogger(__name__)

STATE_FILE = "server.json"
SECRETS_FILE = "secrets.json"
LOCK_FILE = "server.lock"
AUTH_INI = "basic_auth.ini"
# Seconds MLflow keeps a verified credential (see ``start``).
AUTH_CACHE_TTL = 300
LOG_FILE = "server.log"
# server.log is cut to nothing (its content kept as server.log.1) above this size.
MAX_LOG_BYTES = 10 << 20
# Touched by whoever saw a request to the server go unanswered (see ``report_unanswered``).
UNANSWERED_FILE = "server.unanswered"
# While requests go unanswered, /health is asked at most this often (seconds)...
HANG_RECHECK = 5.0
# ... and given this long to answer.
HANG_HEALTH_TIMEOUT = 5.0
# MLflow's own error records, and the last line of a Python traceback.
_ERROR_LINE = re.compile(r"\bERROR\b|^[\w.]+(Error|Exception): ")


@dataclass(frozen=True)
class EmbeddedSecrets:
    admin_username: str
    admin_password: str
    flask_secret: str

    def credential(self) -> Credential:
        return Credential(username=self.admin_username, password=self.admin_password)


def _admin_name() -> str:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "admin"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "admin"


SECRETS_NAME = "The embedded tracking server's secrets file"
_SECRET_KEYS = ("admin_username", "admin_password", "flask_secret")


def load_or_create_secrets(directory: Path) -> EmbeddedSecrets:
    """The embedded server's admin credential and Flask secret, made on first use.

    The admin password only works as long as it matches the one MLflow stored in
    ``auth.db`` when it made the admin: once that exists, a lost or broken secrets file
    is an error that says how to recover, never a new password (which MLflow would
    refuse on every call, with a misleading "log in again").
    """
    path = directory / SECRETS_FILE
    has_admin = (directory / "auth.db").exists()
    recover = (
        f"Restore it from a backup, or, to make a new admin, move {directory / 'auth.db'} "
        "away as well (users and permissions of the embedded server are lost; experiments "
        "and runs are kept)."
    )
    data = read_private_json(path, SECRETS_NAME, recover if has_admin else "Delete it.")
    if data is None and has_admin:
        raise LocalStateInvalid(f"{SECRETS_NAME} {path} is missing. {recover}")
    kept = dict(data) if isinstance(data, dict) else {}
    if not all(isinstance(kept.get(k), str) and kept[k] for k in _SECRET_KEYS[:2]):
        if has_admin:
            raise LocalStateInvalid(
                f"{SECRETS_NAME} {path} has no admin_username and admin_password. {recover}"
            )
        kept = {"admin_username": _admin_name(), "admin_password": secrets.token_urlsafe(24)}
    if not (isinstance(kept.get("flask_secret"), str) and kept["flask_secret"]):
        # It only signs MLflow's session cookies: a new one costs nothing.
        kept["flask_secret"] = secrets.token_urlsafe(32)
    kept = {k: kept[k] for k in _SECRET_KEYS}
    if data is None:
        if not create_private_json(path, kept):
            # Another lab started on this data dir at the same moment and made them first.
            return load_or_create_secrets(directory)
    elif kept != data:
        write_private_json(path, kept)
    return EmbeddedSecrets(**kept)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the lab dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_our_server(pid: int, directory: Path) -> bool:
    """True when ``pid`` is an ``mlflow server`` of this data directory (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        # The server runs in the data dir; its arguments name no path (see ``start``).
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return b"mlflow" in cmdline and cwd == str(directory)


def _terminate_group(pid: int, timeout: float = 15) -> None:
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
            # A stopped server would only act on SIGTERM when continued.
            os.killpg(pgid, signal.SIGCONT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _group_alive(pgid):
                return
            time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie leader still counts for killpg; reap our own children.
    try:
        while os.waitpid(-pgid, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _quiet_access_log() -> list[str]:
    """``mlflow server`` options that turn off the per-request access log.

    From MLflow 3.3 on the server runs uvicorn, which logs a line per request (the lab
    proxies every call of the UI and of clients: server.log would grow by tens of
    thousands of lines a day). MLflow 3.0-3.2 ran gunicorn, which logs no requests and
    knows no ``--uvicorn-opts``.
    """
    try:
        version = Version(metadata.version("mlflow"))
    except (metadata.PackageNotFoundError, InvalidVersion):
        return []
    # Its release candidates (3.3.0rc0) ran uvicorn already.
    return ["--uvicorn-opts", "--no-access-log"] if version.release[:2] >= (3, 3) else []


def _app_name() -> str:
    """MLflow's basic-auth app as mantik runs it (``mlflow_app.py``), when this package is
    installed with its plugin entry point; else MLflow's own (a checkout on ``PYTHONPATH``)."""
    plugins = metadata.entry_points(group="mlflow.app")
    return mlflow_app.APP_NAME if mlflow_app.APP_NAME in plugins.names else "basic-auth"


def _cap_log(path: Path, limit: int) -> bool:
    """Keep ``path`` below ``limit`` bytes: above it, its content becomes ``path.1`` (the
    one before is dropped) and ``path`` starts empty. True when it was cut.

    Copied and truncated, not renamed: the server keeps writing to the file it was given,
    and as it writes with O_APPEND its next line lands at the start of the emptied file.
    A line written between the copy and the truncation is lost; growing without bound
    (a server that logs per request, a warning repeated for weeks) is worse.
    """
    try:
        if path.stat().st_size <= limit:
            return False
        old = path.with_name(path.name + ".1")
        with open(path, "rb") as src, open(old, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.truncate(path, 0)
    except FileNotFoundError:
        return False  # nothing written yet
    except OSError as exc:
        log.warning("Could not cut %s down to size: %s", path, exc)
        return False
    return True


def report_unanswered(directory: Path) -> None:
    """Say that a request to the embedded server of ``directory`` timed out or found no
    connection. The lab that runs it then asks /health and restarts a server that stays
    silent. A file, so that kernels, the ``mantik`` command and other labs using that
    server reach the one lab that may restart it."""
    path = directory / UNANSWERED_FILE
    try:
        path.touch(mode=0o600)
    except OSError:
        pass  # a read-only data dir: the server is then restarted when it exits


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the server binds: a port whose old connections linger in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class EmbeddedTrackingServer:
    """The ``mlflow server`` of one data directory, kept running while the lab runs.

    One process at a time owns a data directory: it holds an exclusive lock on
    ``server.lock`` (released by the kernel when that process dies, however it dies)
    and runs the server as its child. A second lab (or a restart racing the old lab's
    exit) finds the lock taken and uses the running server instead of stopping it.
    A supervisor thread restarts a server that exits while the lab runs, on the same
    port when it can (running jobs were given that address), and takes over the
    directory when its owner goes away.
    """

    def __init__(
        self,
        directory: Path,
        startup_timeout: float = 90,
        check_interval: float = 2.0,
        max_log_bytes: int = MAX_LOG_BYTES,
        access_log: bool = False,
        hang_grace: float = 30.0,
    ) -> None:
        """``access_log``: let MLflow log every request in server.log (for diagnosis and
        tests: it is off because the lab's traffic would fill the log). ``hang_grace``:
        seconds a running server may leave /health unanswered, once a request to it went
        unanswered, before it is started again."""
        self.directory = directory.resolve()
        self.startup_timeout = startup_timeout
        self.check_interval = check_interval
        self.hang_grace = hang_grace
        self.max_log_bytes = max_log_bytes
        self.access_log = access_log
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        # Spawning and stopping exclude each other (the supervisor restarts from its thread).
        self._mutex = threading.Lock()
        self._supervisor: threading.Thread | None = None
        self._failure: MantikError | None = None
        self._secrets: EmbeddedSecrets | None = None
        self._spawned_at = 0.0
        self._log_offset = 0
        self._attached_pid: int | None = None
        # The last report of an unanswered request that was looked into (its file's mtime).
        self._report_seen = 0
        self._last_hang_check = -HANG_RECHECK
        # Since when the running server leaves /health unanswered (None: it answers).
        self._silent_since: float | None = None
        # A lab on another host runs the server (see ``_runs_elsewhere``).
        self._elsewhere = False

    @property
    def secrets(self) -> EmbeddedSecrets:
        # Read on first use, not in the constructor: a broken secrets file must reach
        # the user as a message on every call, not stop the lab's extension from loading.
        if self._secrets is None:
            self._secrets = load_or_create_secrets(self.directory)
        return self._secrets

    @property
    def uri(self) -> str:
        if self.port is None:
            self._raise_failure()
            raise TrackingUnavailable(
                "The embedded tracking server has not been started"
                + (" (another lab with the same data dir is starting it)." if self._supervisor
                   else ".")
            )  # fmt: skip
        return f"http://127.0.0.1:{self.port}"

    @property
    def owner(self) -> bool:
        """True when this process runs the server (False: another lab's is used)."""
        return self._lock_fd is not None

    def _raise_failure(self) -> None:
        failure = self._failure
        if failure is not None:
            # A fresh exception each time: raising one instance from many requests
            # would chain their tracebacks onto it.
            raise type(failure)(failure.message)

    def credential(self) -> Credential:
        return self.secrets.credential()

    def _make_private(self) -> None:
        """A data dir made before (by hand, or by an older version) may be open to others;
        MLflow makes its databases and artifacts with the umask, so the directory is what
        keeps other users from the password hashes in auth.db and from the runs."""
        st = self.directory.stat()
        mode = stat.S_IMODE(st.st_mode)
        if not mode & 0o077:
            return
        if st.st_uid != os.getuid():
            log.warning(
                "The embedded tracking server's data dir %s belongs to user id %d and is "
                "open to other users (mode %o): they can read its databases. Choose a data "
                "dir of your own with MANTIK_DATA_DIR or c.MantikApp.data_dir.",
                self.directory, st.st_uid, mode,
            )  # fmt: skip
            return
        os.chmod(self.directory, 0o700)
        log.warning(
            "The embedded tracking server's data dir %s was open to other users (mode %o); "
            "it is now 0700.",
            self.directory, mode,
        )  # fmt: skip

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Start (or find) the server and return at once; ``wait_ready`` waits for it."""
        self._stopping.clear()
        self._failure = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._make_private()
            (self.directory / "artifacts").mkdir(exist_ok=True)
            self.secrets  # noqa: B018 - loaded (or made) here, before anything starts
            if self._take_lock():
                self.cleanup_stale()
                # From this thread, which lives as long as the lab: the child's
                # PR_SET_PDEATHSIG fires when the thread that spawned it ends.
                self._spawn()
            elif not self._runs_elsewhere():
                self._attach(wait=10.0)
        except LocalStateInvalid as exc:
            self._fail(exc)
            return
        except OSError as exc:
            # Reported on every call instead of keeping the lab's extension from loading.
            self._fail(
                LocalStateInvalid(
                    f"The embedded tracking server's data dir {self.directory} cannot be "
                    f"used: {exc.strerror or exc} ({exc.filename or self.directory}). Make it "
                    "writable or free space there, or choose another one with "
                    "MANTIK_DATA_DIR or c.MantikApp.data_dir."
                )
            )
            self._release_lock()
            return
        self._supervisor = threading.Thread(
            target=self._supervise, name="mantik-mlflow-supervisor", daemon=True
        )
        self._supervisor.start()

    def _fail(self, failure: MantikError) -> None:
        self._failure = failure
        log.error("%s", failure.message)

    def _take_lock(self) -> bool:
        if self._lock_fd is not None:
            return True
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def _attach(self, wait: float = 0.0) -> bool:
        """Use the server another process runs for this directory, if it is up."""
        deadline = time.monotonic() + wait
        while True:
            found = _running_server(self.directory)
            if found is not None:
                pid, port = found
                if pid != self._attached_pid:
                    # Another server than the one that answered: wait for its health.
                    self._ready.clear()
                    self._attached_pid = pid
                if port != self.port:
                    log.info(
                        "Using the embedded MLflow server (pid %s, port %s) that another "
                        "process runs for %s",
                        pid, port, self.directory,
                    )  # fmt: skip
                self.port = port
                return True
            if time.monotonic() >= deadline or self._stopping.is_set():
                return False
            time.sleep(0.2)

    def _spawn(self) -> None:
        with self._mutex:
            if self._stopping.is_set():
                return
            self._spawn_locked()

    def _spawn_locked(self) -> None:
        ini = self.directory / AUTH_INI
        write_private(
            ini,
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            # Relative to the server's working directory, the data dir: an absolute path
            # in a URL broke on a data dir named with ?, # or % (SQLAlchemy parses it).
            "database_uri = sqlite:///auth.db\n"
            f"admin_username = {self.secrets.admin_username}\n"
            f"admin_password = {self.secrets.admin_password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # Without it MLflow checks the password hash (scrypt) on every request,
            # twice: ~0.1-0.7 s per call, ten calls per submission. Successful checks
            # are cached (HMAC-keyed, in memory); deleting a user or changing a
            # password drops its entries at once.
            f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL}\n",
        )
        # The same port as before when it is free: jobs and stored logins know it.
        if self.port is None or not _port_free(self.port):
            self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
            MLFLOW_FLASK_SERVER_SECRET_KEY=self.secrets.flask_secret,
            MLFLOW_AUTH_CONFIG_PATH=str(ini),
        )
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", "sqlite:///mlflow.db",
            "--artifacts-destination", (self.directory / "artifacts").as_uri(),
            "--app-name", _app_name(),
            *([] if self.access_log else _quiet_access_log()),
        ]  # fmt: skip
        _cap_log(self.directory / LOG_FILE, self.max_log_bytes)
        logfile = open(self.directory / LOG_FILE, "ab")  # noqa: SIM115 - handed to the child
        self._log_offset = logfile.tell()
        try:
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads touched in it
            )
        finally:
            logfile.close()
        self._spawned_at = time.monotonic()
        write_private_json(
            self.directory / STATE_FILE,
            {
                "pid": self._proc.pid,
                "port": self.port,
                "owner": os.getpid(),
                # A data dir on a shared file system (a home dir on NFS or GPFS) may be
                # used from several hosts; the server listens on its own host only.
                "host": socket.gethostname(),
            },
        )
        # What was reported about the server before is no concern of this one.
        self._report_seen = _mtime_ns(self.directory / UNANSWERED_FILE)
        self._silent_since = None
        log.info("Started the embedded MLflow server (pid %s) on %s", self._proc.pid, self.uri)

    def _supervise(self) -> None:
        client_port: int | None = None
        client: TrackingClient | None = None
        while not self._stopping.is_set():
            try:
                if client_port != self.port and self.port is not None:
                    client_port, client = self.port, TrackingClient(self.uri, None)
                if self._check(client):
                    return
            except Exception:  # noqa: BLE001 - the supervisor must outlive one bad check
                log.exception("Checking the embedded MLflow server failed")
            settled = self._ready.is_set() or self._elsewhere  # else: soon ready, or not
            self._stopping.wait(self.check_interval if settled else 0.25)

    def _check(self, client: TrackingClient | None) -> bool:
        """One look at the server; True when there is nothing more to supervise."""
        proc = self._proc
        if self.owner and proc is not None:
            if proc.poll() is not None:
                if not self._ready.is_set():
                    self._fail(
                        TrackingTimeout(
                            f"The embedded MLflow server exited with code {proc.returncode} "
                            f"while starting. See {self.directory / LOG_FILE}:\n{self.log_tail()}"
                        )
                    )
                    return True
                self._ready.clear()
                log.error(
                    "The embedded MLflow server (pid %s) exited with code %s; starting it "
                    "again. See %s:\n%s",
                    proc.pid, proc.returncode, self.directory / LOG_FILE, self.log_tail(),
                )  # fmt: skip
                self._spawn()
                return False
            if _cap_log(self.directory / LOG_FILE, self.max_log_bytes):
                # What this server said so far is in server.log.1 now.
                self._log_offset = 0
            if self._ready.is_set():
                # Only the process is watched once it answered: a /health call every
                # few seconds would keep the server busy day and night for nothing.
                if client is not None:
                    self._check_hang(proc, client)
                return False
            if client is not None and client.health(timeout=2):
                # Requests refused while it started say nothing about a hang.
                self._report_seen = _mtime_ns(self.directory / UNANSWERED_FILE)
                self._ready.set()
            elif time.monotonic() - self._spawned_at > self.startup_timeout:
                self._fail(
                    TrackingTimeout(
                        f"The embedded MLflow server did not become healthy within "
                        f"{self.startup_timeout:.0f} s. See {self.directory / LOG_FILE}."
                    )
                )
                return True
            return False
        # Another process runs the server: follow it, and take over when it goes away.
        if self._attach():
            if not self._ready.is_set() and client is not None and client.health(timeout=2):
                self._ready.set()
            return False
        self._ready.clear()
        if self._take_lock():
            log.warning(
                "The embedded MLflow server of %s stopped with the process that ran it; "
                "this lab runs it now.",
                self.directory,
            )
            self._failure, self._elsewhere = None, False  # another host's server stopped
            self.cleanup_stale()
            self._spawn()
        else:
            self._runs_elsewhere()
        return False

    def _runs_elsewhere(self) -> bool:
        """Whether a lab on another host runs this data dir's server (it listens only
        there): then every request says so at once, instead of waiting for a server that
        never answers here. Once that lab stops, the supervisor takes over."""
        host = _recorded_host(self.directory)  # the lock is taken: that lab runs
        if host is None:
            if self._elsewhere:
                # It stopped, and a lab of this host took over before this one could.
                self._failure, self._elsewhere = None, False
            return False
        if not self._elsewhere:
            self._elsewhere = True
            self._fail(TrackingUnavailable(elsewhere_message(self.directory, host)))
        return True

    def report_unanswered(self) -> None:
        """A request to this server timed out or found no connection (see the module's
        ``report_unanswered``)."""
        report_unanswered(self.directory)

    def _check_hang(self, proc: subprocess.Popen[bytes], client: TrackingClient) -> None:
        """Start the server again when it runs but does not answer (stopped, deadlocked).

        Nothing is asked while no request goes unanswered; after a report /health is
        asked at most every ``HANG_RECHECK`` s, until it answers or has been silent for
        ``hang_grace`` s.
        """
        reported = _mtime_ns(self.directory / UNANSWERED_FILE)
        if self._silent_since is None and reported == self._report_seen:
            return
        now = time.monotonic()
        if now - self._last_hang_check < HANG_RECHECK:
            return
        # Reports that come in while /health is asked are looked into the next time.
        self._report_seen, self._last_hang_check = reported, now
        if client.health(timeout=HANG_HEALTH_TIMEOUT):
            if self._silent_since is not None:
                log.warning("The embedded MLflow server (pid %s) answers again", proc.pid)
            self._silent_since = None
            return
        if self._silent_since is None:
            self._silent_since = now
            log.warning(
                "The embedded MLflow server (pid %s) does not answer; it is started again "
                "if it stays silent for %.0f s",
                proc.pid, self.hang_grace,
            )  # fmt: skip
            return
        if time.monotonic() - self._silent_since < self.hang_grace:
            return
        with self._mutex:
            if self._stopping.is_set() or self._proc is not proc:
                return
            log.error(
                "The embedded MLflow server (pid %s) has not answered for %.0f s; stopping "
                "it and starting it again. See %s:\n%s",
                proc.pid, time.monotonic() - self._silent_since, self.directory / LOG_FILE,
                self.log_tail(),
            )  # fmt: skip
            self._ready.clear()
            # Whatever hangs it may also keep it from stopping gracefully.
            _terminate_group(proc.pid, timeout=2)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            # The same port (its requests were cut off with it) and the same data.
            self._spawn_locked()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the server answers /health; raise TrackingTimeout if it never does."""
        if self._ready.is_set():
            return
        self._raise_failure()
        if self._supervisor is None:
            raise TrackingUnavailable("The embedded tracking server has not been started.")
        limit = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not self._ready.wait(0.1):
            self._raise_failure()
            if time.monotonic() > deadline:
                raise TrackingTimeout(
                    f"The embedded MLflow server is not ready after {limit:.0f} s. "
                    f"See {self.directory / LOG_FILE}."
                )

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def stop(self) -> None:
        """Stop the server if this process runs it; another lab's is left running."""
        self._stopping.set()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(timeout=10)
        with self._mutex:
            proc, self._proc = self._proc, None
        self._ready.clear()
        if proc is not None:
            _terminate_group(proc.pid)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            log.info("Stopped the embedded MLflow server (pid %s)", proc.pid)
        state = read_json(self.directory / STATE_FILE)
        if isinstance(state, dict) and proc is not None and state.get("pid") == proc.pid:
            (self.directory / STATE_FILE).unlink(missing_ok=True)
        # Last: until the server is gone, no other lab may start one on the same data.
        self._release_lock()

    def cleanup_stale(self) -> None:
        """Stop a server of this directory whose owner died without stopping it.

        Only called with the lock held: a recorded server is then nobody's.
        """
        state = read_json(self.directory / STATE_FILE)
        if not isinstance(state, dict):
            return
        pid = int(state.get("pid", 0) or 0)
        host = state.get("host")
        if host and host != socket.gethostname():
            # Its lab no longer holds the lock: it stopped, or its host went down.
            log.warning(
                "The embedded MLflow server of %s was last run from host %s, whose lab has "
                "stopped; this lab runs it now.",
                self.directory, host,
            )  # fmt: skip
        elif pid and _pid_alive(pid) and _is_our_server(pid, self.directory):
            log.warning("Stopping a stale embedded MLflow server (pid %s)", pid)
            _terminate_group(pid)
        (self.directory / STATE_FILE).unlink(missing_ok=True)

    def log_tail(self, lines: int = 15) -> str:
        """What the server said since it was last started: its error lines when it wrote
        any (the cause, e.g. "database or disk is full", sat above a long traceback),
        else its last lines."""
        try:
            with open(self.directory / LOG_FILE, "rb") as fh:
                fh.seek(self._log_offset)
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        all_lines = text.splitlines()
        errors = list(dict.fromkeys(line for line in all_lines if _ERROR_LINE.search(line)))
        return "\n".join(errors[:5] if errors else all_lines[-lines:])


def elsewhere_message(directory: Path, host: str) -> str:
    return (
        f"The embedded tracking server of {directory} runs on host {host}, started by a lab "
        f"there, and can be reached only from {host}. This data dir is on a file system "
        f"that {host} shares. Use mantik on {host}; or stop the lab there (this lab then "
        "takes the server over); or give this lab a data dir of its own with "
        "MANTIK_DATA_DIR or c.MantikApp.data_dir (a new, empty tracking store); or point "
        "both at a shared tracking server (c.MantikApp.tracking_uri or MLFLOW_TRACKING_URI)."
    )


def _recorded_host(directory: Path) -> str | None:
    """The other host that ``server.json`` names as running the server, if any."""
    state = read_json(directory / STATE_FILE)
    host = state.get("host") if isinstance(state, dict) else None
    if not isinstance(host, str) or not host or host == socket.gethostname():
        return None
    return host


def running_host(directory: Path) -> str | None:
    """The other host whose lab runs this data dir's server; None when it is this host's,
    or none runs (as far as this host can tell)."""
    host = _recorded_host(directory)
    if host is None:
        return None
    # A record left behind by a lab that went down with its host: its lock is gone.
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: no lab ever ran the server here
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return host
    finally:
        os.close(fd)
    return None


def _running_server(directory: Path) -> tuple[int, int] | None:
    """The pid and port that ``server.json`` records, if that server runs on this host."""
    state = read_json(directory / STATE_FILE)
    if not isinstance(state, dict):
        return None
    if state.get("host") not in (None, socket.gethostname()):
        return None  # a pid of another host's
    try:
        pid, port = int(state.get("pid") or 0), int(state.get("port") or 0)
    except (TypeError, ValueError):
        return None
    if not (pid and port and _pid_alive(pid) and _is_our_server(pid, directory)):
        return None
    return pid, port


def discover(directory: Path) -> tuple[str, Credential] | None:
    """The URI and admin credential of a running embedded server of ``directory``, if any."""
    directory = directory.resolve()
    found = _running_server(directory)
    if found is None:
        return None
    return f"http://127.0.0.1:{found[1]}", load_or_create_secrets(directory).credential()
