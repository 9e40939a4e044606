"""Slurm over SSH: the backend for HPC login nodes reached with a key or password.

One paramiko connection is kept and reused; when it drops (login node
rebooted, sshd restarted) the next call opens a new one, and a call that
cannot reach the host raises ``BackendUnavailable`` (the RunService turns that
into ``UNKNOWN``, never ``FAILED``).

Job ids are Slurm's own numeric ids. Every job lives in its own run directory,
``<remote_dir>/<run_id>``; log, files and the exit-code fallback are read from
there. The backend remembers the run directory of every job it submitted
(``run_dir_of``). After a restart of the lab the RunService hands it back with
``attach(job_id, run_dir)`` (it keeps both in MLflow tags), or passes
``run_dirs={job_id: run_dir}`` to the constructor. Without either, the backend
asks Slurm for the job's working directory (one extra command, then cached).

``remote_dir`` (``SSH.RemoteDirectory``) may use ``$NAME``/``${NAME}`` and a leading
``~``, expanded once by the remote shell (``$SCRATCH/mantik``); nothing else in it is
interpreted. ``Environment.PreRunCommandOnLoginNode`` runs in the run directory right
before ``sbatch``, in the same remote command, with its output in ``mantik-login.log``
(as on UNICORE); a failing one stops the submission. ``PostRunCommandOnLoginNode`` is
refused: nothing on the login node notices when a Slurm job ends.

A login node that stops answering (frozen sshd, silently dead link) must not hang a
caller: every channel gets ``io_timeout`` for its reads and writes, and the channel
requests paramiko awaits without a timeout (exec, the sftp subsystem) are bounded by
a watchdog that closes the channel. A timeout drops the connection like a broken link.

Security: host keys are checked against known_hosts and never added on the
fly; every value that reaches the remote shell goes through ``shlex.quote``;
file access is confined to the run directory (no ``..``, no absolute paths, no
symlinks leading out); passwords and keys never appear in messages or logs.
"""

from __future__ import annotations

import io
import logging
import posixpath
import re
import shlex
import shutil
import stat
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import paramiko

from ...errors import (
    AuthenticationFailed,
    BackendRejected,
    BackendUnavailable,
    ConfigError,
    Conflict,
    HostKeyUnknown,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    UnsafePath,
)
from .. import layout
from ..script import expand_quoted, expanded_names, login_commands_script
from ..states import RunState
from .base import (
    Backend,
    Capabilities,
    FileEntry,
    JobStatus,
    PreparedJob,
    Progress,
    describe_error,
)
from .paths import clean_relative, save_stream
from .paths import safe_name as _safe_name
from .slurm_words import (
    ACTIVE,
    MARK,
    decide,
    parse_table,
    sbatch_culprit,
    split_sections,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

COMMAND_TIMEOUT = 120.0
# The submit command waits silently for PreRunCommandOnLoginNode (a venv to build, data
# to stage), so its channel may stay quiet far longer than any other command's.
LOGIN_COMMAND_TIMEOUT = 3600.0
# Jobs asked about in one status command (about 120 bytes each with their run directory).
STATES_BATCH = 500
# How much of mantik-login.log a failed PreRunCommandOnLoginNode shows in its error.
_LOGIN_LOG_TAIL = 2000

_JOB_ID = re.compile(r"^\d+(_\d+)?$")

_CONNECTION_ERRORS = (paramiko.SSHException, EOFError, OSError)


@dataclass
class _Result:
    status: int
    stdout: bytes
    stderr: bytes

    @property
    def err_text(self) -> str:
        return self.stderr.decode(errors="replace").strip()


class _RefuseUnknownHost(paramiko.MissingHostKeyPolicy):
    """RejectPolicy that tells the user how to trust the host."""

    def __init__(self, host: str, port: int, known_hosts: Path) -> None:
        self.host = host
        self.port = port
        self.known_hosts = known_hosts

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        raise HostKeyUnknown(
            f"The SSH host {self.host}:{self.port} (key {key.get_name()} {key.fingerprint}) "
            f"is not in {self.known_hosts}. Check the fingerprint against the site's "
            f"documentation, then trust it with: "
            f"{_keyscan_hint(self.host, self.port, self.known_hosts)}"
        )


def _keyscan_hint(host: str, port: int, known_hosts: Path) -> str:
    port_opt = f"-p {port} " if port != 22 else ""
    return f"ssh-keyscan {port_opt}{shlex.quote(host)} >> {shlex.quote(str(known_hosts))}"


def _load_private_key(text: str, passphrase: str | None, source: str = "") -> paramiko.PKey:
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text), password=passphrase)
        except (paramiko.SSHException, ValueError):
            continue
    # Deliberately vague: the text of a key must never end up in a message.
    raise AuthenticationFailed(
        f"The SSH private key{source} could not be read: it is not an OpenSSH/PEM private "
        "key of type ed25519, ecdsa or rsa, or its passphrase is wrong."
    )


def _load_key_file(path: str, passphrase: str | None) -> paramiko.PKey:
    """The key of an identity file, read here rather than by paramiko: for a key file it
    tries every key type in turn and raises the last type's complaint ("encountered RSA
    key, expected OPENSSH key") instead of the server's refusal of the key."""
    try:
        text = Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a text file"
        raise ConfigError(
            f"SSH.IdentityFile {path} cannot be read ({why}); check the key's path in the "
            "compute backend config."
        ) from None
    return _load_private_key(text, passphrase, f" in {path}")


class SshSlurmBackend(Backend):
    """Runs jobs with ``sbatch`` on a Slurm login node over SSH (paramiko).

    ``remote_dir`` is relative to the remote home unless absolute. Credentials:
    ``key_filename`` (a private key file), ``private_key`` (the key's text, e.g.
    from ``MANTIK_SSH_PRIVATE_KEY``) or ``password`` (also the key passphrase);
    with none of them, the SSH agent and ``~/.ssh/id_*`` are tried, like ``ssh``.
    ``io_timeout`` is how long a remote command or file operation may wait for the
    login node to answer before the connection is given up (``BackendUnavailable``).
    """

    capabilities = Capabilities(
        name="ssh-slurm",
        description="Slurm batch jobs on a login node reached over SSH",
    )

    def __init__(
        self,
        hostname: str,
        port: int = 22,
        username: str | None = None,
        key_filename: str | None = None,
        private_key: str | None = None,
        password: str | None = None,
        known_hosts: str | Path | None = None,
        remote_dir: str = "mantik-runs",
        run_dirs: dict[str, str] | None = None,
        connect_timeout: float = 15.0,
        io_timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        self.hostname = hostname
        self.port = int(port)
        self.username = username
        self._key_filename = key_filename
        self._pkey = _load_private_key(private_key, password) if private_key else None
        self._password = password
        self.known_hosts = Path(known_hosts or Path.home() / ".ssh" / "known_hosts").expanduser()
        self._remote_dir_setting = remote_dir
        self._remote_base: str | None = None
        self._run_dirs: dict[str, str] = dict(run_dirs or {})
        self._connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        # _lock guards the connection; _sftp_lock the shared SFTP session, which one
        # thread at a time may use. Two locks, so that a status poll never waits behind
        # a slow file operation. Order: _sftp_lock before _lock, never the reverse.
        self._lock = threading.RLock()
        self._sftp_lock = threading.Lock()
        # Remote shell commands run so far; a benchmark asserts one per status poll.
        self.commands_issued = 0

    def __repr__(self) -> str:  # no credentials in reprs that end up in logs
        return f"SshSlurmBackend({self._where()})"

    # ---- run directory bookkeeping -------------------------------------------------

    def attach(self, job_id: str, run_dir: str) -> None:
        """Tell the backend where a job submitted earlier (e.g. before a restart) lives."""
        self._run_dirs[str(job_id)] = run_dir

    def run_dir_of(self, job_id: str) -> str:
        """The absolute remote run directory of a job (store it next to the job id)."""
        job_id = self._check_job_id(job_id)
        if job_id not in self._run_dirs:
            self._run_dirs[job_id] = self._ask_slurm_workdir(job_id)
        return self._run_dirs[job_id]

    def remote_base(self) -> str:
        """The absolute directory that holds all run directories (asked once)."""
        if self._remote_base is None:
            # Two threads may both ask; they get the same answer.
            self._remote_base = self._with_connection(
                self._resolve_remote_base, "finding SSH.RemoteDirectory"
            )
        return self._remote_base

    # ---- connection -------------------------------------------------------------------

    def _where(self) -> str:
        return f"{self.username or '?'}@{self.hostname}:{self.port}"

    def _connection(self) -> paramiko.SSHClient:
        with self._lock:
            transport = self._client.get_transport() if self._client else None
            if transport is None or not transport.is_active():
                self._drop()
                self._client = self._connect()
            assert self._client is not None
            return self._client

    def _connect(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        if self.known_hosts.is_file():
            client.load_system_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(
            _RefuseUnknownHost(self.hostname, self.port, self.known_hosts)
        )
        explicit = bool(self._key_filename or self._pkey or self._password)
        pkey = self._pkey
        if pkey is None and self._key_filename:
            pkey = _load_key_file(self._key_filename, self._password)
        try:
            client.connect(
                self.hostname,
                port=self.port,
                username=self.username,
                pkey=pkey,
                password=self._password,
                timeout=self._connect_timeout,
                banner_timeout=self._connect_timeout,
                auth_timeout=self._connect_timeout,
                allow_agent=not explicit,
                look_for_keys=not explicit,
            )
        except HostKeyUnknown:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise self._host_key_changed(exc) from None
        except paramiko.AuthenticationException:
            client.close()
            raise AuthenticationFailed(
                f"The SSH server refused the credentials of {self.username}@{self.hostname} "
                f"(port {self.port}). Check the user name and the key or password."
            ) from None
        except (*_CONNECTION_ERRORS, ValueError) as exc:
            client.close()
            raise BackendUnavailable(
                f"Cannot reach the SSH server {self.hostname}:{self.port}: {describe_error(exc)}"
            ) from None
        transport = client.get_transport()
        assert transport is not None
        # Keepalives let a silently dead link (no FIN) be noticed between polls.
        transport.set_keepalive(30)
        log.info("connected to %s", self._where())
        return client

    def _host_key_changed(self, exc: paramiko.BadHostKeyException) -> HostKeyUnknown:
        host = f"[{self.hostname}]:{self.port}" if self.port != 22 else self.hostname
        return HostKeyUnknown(
            f"The SSH host key of {self.hostname}:{self.port} does not match {self.known_hosts} "
            f"(got {exc.key.get_name()} {exc.key.fingerprint}). If the site announced a new "
            f"key, remove the old one with: ssh-keygen -R {shlex.quote(host)} -f "
            f"{shlex.quote(str(self.known_hosts))} and trust the new one with: "
            f"{_keyscan_hint(self.hostname, self.port, self.known_hosts)}"
        )

    def _resolve_remote_base(self) -> str:
        """``remote_dir`` with its variables and leading ``~`` expanded by the remote
        shell, relative to the login directory unless absolute."""
        setting = self._remote_dir_setting
        where = f"SSH.RemoteDirectory {setting!r}"
        if setting.startswith("~") and not (setting == "~" or setting.startswith("~/")):
            raise ConfigError(
                f"{where}: only a leading ~ or ~/ (your home) is understood, not ~user; "
                "write the directory out"
            )
        try:
            word = expand_quoted(setting)  # only $NAME/${NAME} expand, never $(...) or `...`
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc.message}") from None
        names = expanded_names(setting)
        values = " ".join(f'"${{{name}-}}"' for name in names)
        # The marker skips whatever a chatty shell startup file printed first.
        script = f"printf '%s\\0' {MARK} \"$(pwd -P)\" {word} {values}"
        result = self._exec("sh -c " + shlex.quote(script))
        text = result.stdout.decode(errors="replace")
        start = text.find(MARK + "\0")
        fields = text[start + len(MARK) + 1 :].split("\0") if start >= 0 else []
        if result.status != 0 or len(fields) < 2 + len(names):
            raise BackendRejected(f"Expanding {where} on {self.hostname} failed: {result.err_text}")
        login_dir, expanded = fields[0], fields[1]
        for name, value in zip(names, fields[2:], strict=False):
            if not value:
                raise ConfigError(
                    f"{where}: ${name} is not set (or empty) in a non-interactive shell on "
                    f"{self.hostname}; set it there (e.g. in ~/.bashrc) or write the "
                    "directory out"
                )
        return posixpath.normpath(posixpath.join(login_dir, expanded))

    def _drop(self, client: paramiko.SSHClient | None = None) -> None:
        """Close the connection; with ``client``, only if that is still the current one
        (a thread that timed out on an old link must not close a fresh one)."""
        with self._lock:
            if client is not None and client is not self._client:
                return
            for thing in (self._sftp, self._client):
                if thing is not None:
                    try:
                        thing.close()
                    except Exception:  # noqa: S110 - closing a dead link may fail any way
                        pass
            self._sftp = None
            self._client = None

    def close(self) -> None:
        self._drop()

    def check_credentials(self) -> None:
        # The login (key exchange, authentication) and the remote base: both are kept for
        # the submission. The base is asked once; a link that dropped since logs in anew.
        self._connection()
        self.remote_base()

    @contextmanager
    def _shared_sftp(self) -> Iterator[paramiko.SFTPClient]:
        """The shared SFTP session for small operations, one thread at a time."""
        with self._sftp_lock:
            yield self._sftp_client()

    def _sftp_client(self) -> paramiko.SFTPClient:
        """The shared SFTP session (use it through ``_shared_sftp``)."""
        with self._lock:
            client = self._connection()
            sftp = self._sftp
            channel = sftp.get_channel() if sftp is not None else None
            if sftp is not None and channel is not None and not channel.closed:
                return sftp
        # Opened outside _lock: a login node slow to start sftp must not stall polls.
        sftp = self._open_sftp(client)
        with self._lock:
            if self._client is client:
                self._sftp = sftp
        return sftp

    def _open_sftp(self, client: paramiko.SSHClient) -> paramiko.SFTPClient:
        """A new SFTP session whose every read and write gives up after ``io_timeout``."""
        channel = self._open_channel(client)
        try:
            self._request(channel, lambda: channel.invoke_subsystem("sftp"))
            return paramiko.SFTPClient(channel)
        except BaseException:
            channel.close()
            raise

    def _open_channel(self, client: paramiko.SSHClient) -> paramiko.Channel:
        transport = client.get_transport()
        if transport is None:
            raise paramiko.SSHException("the SSH connection is closed")
        channel = transport.open_session(timeout=self._connect_timeout)
        channel.settimeout(self.io_timeout)
        return channel

    def _request(self, channel: paramiko.Channel, request: Callable[[], None]) -> None:
        """A channel request (exec, subsystem): paramiko waits for its answer without a
        timeout, so a watchdog closes the channel, which wakes the wait, after
        ``io_timeout``."""
        fired = threading.Event()

        def give_up() -> None:
            fired.set()
            channel.close()

        watchdog = threading.Timer(self.io_timeout, give_up)
        watchdog.daemon = True
        watchdog.start()
        try:
            request()
        except paramiko.SSHException:
            if fired.is_set():
                raise TimeoutError() from None
            raise
        finally:
            watchdog.cancel()

    @staticmethod
    def _exit_status(channel: paramiko.Channel) -> int:
        # recv_exit_status() alone would wait forever for a node that stopped answering.
        if not channel.status_event.wait(channel.gettimeout()):
            raise TimeoutError()
        return channel.recv_exit_status()

    def _with_connection(self, action: Callable[[], T], what: str, retry: bool = True) -> T:
        """Run ``action()`` needing the connection; reconnect once if the link was stale
        or stopped answering."""
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            client = self._connection()
            try:
                return action()
            except FileNotFoundError as exc:
                raise NotFound(f"Not found on {self.hostname} while {what}: {exc}") from None
            except PermissionError as exc:
                raise PermissionDenied(
                    f"{self.hostname} denied access while {what}: {exc}"
                ) from None
            except _CONNECTION_ERRORS as exc:
                self._drop(client)
                if attempt + 1 == attempts:
                    raise self._lost(exc, what) from None
        raise AssertionError("unreachable")

    def _lost(self, exc: BaseException, what: str) -> BackendUnavailable:
        if isinstance(exc, TimeoutError):
            return BackendUnavailable(
                f"The SSH server {self.hostname}:{self.port} did not answer within "
                f"{self.io_timeout:g} s while {what}; the connection was closed. Try again "
                "later; if it keeps happening, the login node may be overloaded or down."
            )
        return BackendUnavailable(
            f"Lost the SSH connection to {self.hostname}:{self.port} while {what}: "
            f"{describe_error(exc)}"
        )

    # ---- remote commands ----------------------------------------------------------------

    def _run(self, command: str, what: str, retry: bool = True) -> _Result:
        """Run one shell command; ``retry`` only for commands safe to run twice."""
        return self._with_connection(lambda: self._exec(command), what, retry)

    def _exec(self, command: str, timeout: float | None = None) -> _Result:
        """Run a command to its end; ``timeout`` (default ``io_timeout``) bounds each
        wait for output, not the whole command."""
        channel = self._open_stream(command)
        try:
            if timeout is not None:
                channel.settimeout(timeout)
            out, err = _drain(channel)
            return _Result(self._exit_status(channel), out, err)
        finally:
            channel.close()

    def _open_stream(
        self, command: str, client: paramiko.SSHClient | None = None
    ) -> paramiko.Channel:
        channel = self._open_channel(client or self._connection())
        self.commands_issued += 1
        try:
            self._request(channel, lambda: channel.exec_command(command))
        except BaseException:
            channel.close()
            raise
        return channel

    # ---- submit ---------------------------------------------------------------------------

    def submit(self, job: PreparedJob, progress: Progress | None = None) -> str:
        run_dir = posixpath.join(self.remote_base(), _safe_name(job.run_id, "run id"))
        files = self._files_to_ship(job)
        self._with_connection(
            lambda: self._upload(run_dir, job.local_dir, files, progress), "uploading the run"
        )
        pre = job.pre_login_commands
        command = self._submit_command(
            run_dir, job.job_name, files, pre_login_commands=pre, run_id=job.run_id
        )
        timeout = max(self.io_timeout, LOGIN_COMMAND_TIMEOUT) if pre else None
        # Not retried: a dropped link after sbatch ran would otherwise submit twice.
        result = self._with_connection(
            lambda: self._exec(command, timeout), "submitting", retry=False
        )
        if result.status != 0:
            self._raise_login_failure(result, job.run_id, run_dir)
            said = result.err_text or result.stdout.decode(errors="replace").strip()
            refused = f"sbatch on {self.hostname} refused the job of run {job.run_id}"
            culprit = sbatch_culprit(said, job.config)
            if culprit is not None:
                where, hint = culprit
                raise ConfigError(f"{refused} because of {where}: {said}\n{hint}")
            raise BackendRejected(f"{refused}: {said}")
        job_id = result.stdout.decode().strip().splitlines()[-1].split(";")[0]
        self._check_job_id(job_id)
        self._run_dirs[job_id] = run_dir
        log.info("submitted run %s as Slurm job %s on %s", job.run_id, job_id, self.hostname)
        return job_id

    @staticmethod
    def _files_to_ship(job: PreparedJob) -> list[str]:
        names = job.files or sorted(p.name for p in job.local_dir.iterdir() if p.is_file())
        for name in names:
            _safe_name(name, "file name")
        if layout.JOB_SCRIPT not in names:
            raise InvalidRequest(f"{job.local_dir} holds no {layout.JOB_SCRIPT} to submit")
        return names

    def _upload(
        self, run_dir: str, local_dir: Path, names: list[str], progress: Progress | None
    ) -> None:
        total = sum((local_dir / n).stat().st_size for n in names)
        done = 0
        sftp = self._open_sftp(self._connection())
        try:
            _sftp_makedirs(sftp, run_dir)
            for name in names:
                local = local_dir / name
                mode = stat.S_IMODE(local.stat().st_mode)
                with local.open("rb") as src, sftp.open(posixpath.join(run_dir, name), "wb") as dst:
                    # Mode first, data second: a secret is never readable by others remotely.
                    dst.chmod(mode)
                    dst.set_pipelined(True)
                    while chunk := src.read(layout.CHUNK):
                        dst.write(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
        finally:
            sftp.close()
        if progress:
            progress(total, total)

    @staticmethod
    def _submit_command(
        run_dir: str,
        job_name: str,
        files: list[str],
        *,
        pre_login_commands: tuple[str, ...] = (),
        run_id: str = "",
    ) -> str:
        """One remote command: unpack the code, run PreRunCommandOnLoginNode, sbatch.
        Whatever stops it before the job is queued deletes the credential file, which
        only the job script would delete otherwise."""
        q = shlex.quote
        creds = q(layout.CREDENTIALS_FILE)
        lines = [f"cd {q(run_dir)} || exit"]
        if layout.PACKAGE_FILE in files:
            code = layout.CODE_DIR
            lines.append(
                f"mkdir -p {code} && tar -xzf {q(layout.PACKAGE_FILE)} -C {code} "
                f'|| {{ mantik_rc=$?; rm -f -- {creds}; exit "$mantik_rc"; }}'
            )
        if pre_login_commands:
            script = login_commands_script(pre_login_commands, "PreRunCommandOnLoginNode")
            # As on UNICORE: the run id tells a login-node command which run it serves.
            ids = f"MLFLOW_RUN_ID={q(run_id)} MANTIK_RUN_ID={q(run_id)}"
            lines += [
                f"{ids} bash -c {q(script)} </dev/null >>{layout.LOGIN_LOG_FILE} 2>&1",
                "mantik_rc=$?",
                'if [ "$mantik_rc" -ne 0 ]; then',
                f"  rm -f -- {creds}",
                f'  echo "{MARK}login $mantik_rc" >&2',
                f"  tail -c {_LOGIN_LOG_TAIL} {layout.LOGIN_LOG_FILE} >&2",
                '  exit "$mantik_rc"',
                "fi",
                # Best effort: if the client gave up waiting and closed the channel, this
                # write kills the shell (SIGPIPE) and no job it will never hear of starts.
                f"echo {MARK}login-done",
            ]
        lines.append(
            f"sbatch --parsable --chdir={q(run_dir)} --job-name={q(job_name)} "
            f"{q(layout.JOB_SCRIPT)} "
            f'|| {{ mantik_rc=$?; rm -f -- {creds}; exit "$mantik_rc"; }}'
        )
        # sh -c: the script is POSIX sh, whatever the account's login shell (csh exists).
        return "sh -c " + q("\n".join(lines))

    def _raise_login_failure(self, result: _Result, run_id: str, run_dir: str) -> None:
        """The error of a failed PreRunCommandOnLoginNode, if that is what failed."""
        marker = f"{MARK}login "
        err = result.stderr.decode(errors="replace")
        if marker not in err:
            return
        status, _, tail = err.split(marker, 1)[1].partition("\n")
        raise BackendRejected(
            f"Environment.PreRunCommandOnLoginNode failed on {self.hostname} with exit "
            f"status {status.strip()}, so no job was submitted for run {run_id}. The end of "
            f"{posixpath.join(run_dir, layout.LOGIN_LOG_FILE)}:\n{tail.strip()}"
        )

    # ---- states ---------------------------------------------------------------------------

    def states(self, job_ids: list[str]) -> dict[str, JobStatus]:
        valid = [j for j in dict.fromkeys(str(j) for j in job_ids) if _JOB_ID.match(j)]
        answer = {str(j): JobStatus(RunState.UNKNOWN) for j in job_ids}
        # One command per batch: sshd drops the connection for a command over 256 KiB,
        # which thousands of runs (a parameter sweep) would need.
        for start in range(0, len(valid), STATES_BATCH):
            batch = valid[start : start + STATES_BATCH]
            result = self._run(self._status_command(batch), "asking Slurm for job states")
            sections = split_sections(result.stdout.decode(errors="replace"))
            squeue = parse_table(sections.get("squeue", ""), 3)
            sacct = parse_table(sections.get("sacct", ""), 3)
            codes = parse_table(sections.get("exitcodes", ""), 2)
            for job_id in batch:
                answer[job_id] = decide(squeue.get(job_id), sacct.get(job_id), codes.get(job_id))
        return answer

    def _status_command(self, job_ids: list[str]) -> str:
        """One shell line: squeue (active and recently ended jobs), then sacct only for
        the jobs squeue does not show as active (sacct is the slower of the two), then
        the ``mantik.exitcode`` files (for sites without accounting)."""
        ids = shlex.quote(",".join(job_ids))
        active = "|".join(sorted(ACTIVE))
        # awk prints the ids squeue did not report as active, comma-separated.
        not_active = (
            f"awk -F'|' -v ids={ids} 'BEGIN {{ n = split(ids, a, \",\"); "
            f"for (i = 1; i <= n; i++) want[a[i]] = 1 }} "
            f"$2 ~ /^({active})$/ {{ delete want[$1] }} "
            f'END {{ s = ""; for (k in want) s = s (s == "" ? "" : ",") k; print s }}\''
        )
        parts = [
            f"sq=$(squeue -h -t all -j {ids} -o '%i|%T|%r' 2>/dev/null)",
            f"echo {MARK}squeue",
            'printf "%s\\n" "$sq"',
            f'rest=$(printf "%s\\n" "$sq" | {not_active})',
            f"echo {MARK}sacct",
            'if [ -n "$rest" ]; then '
            'sacct -X -n -P -j "$rest" -o JobIDRaw,State,ExitCode 2>/dev/null; fi',
            f"echo {MARK}exitcodes",
        ]
        known = [(j, self._run_dirs[j]) for j in job_ids if j in self._run_dirs]
        if known:
            pairs = " ".join(
                f"{shlex.quote(j)} {shlex.quote(posixpath.join(d, layout.EXIT_CODE_FILE))}"
                for j, d in known
            )
            parts.append(
                f"set -- {pairs}; while [ $# -gt 1 ]; do "
                f'[ -f "$2" ] && printf "%s|%s\\n" "$1" "$(head -c 32 "$2")"; shift 2; done'
            )
        # sh -c: the script is POSIX sh, whatever the account's login shell (csh exists).
        return "sh -c " + shlex.quote("; ".join(parts) + "; true")

    # ---- logs, cancel ---------------------------------------------------------------------

    def read_log(self, job_id: str, offset: int = 0) -> tuple[bytes, int]:
        path = posixpath.join(self.run_dir_of(job_id), layout.LOG_FILE)

        def read() -> tuple[bytes, int]:
            with self._shared_sftp() as sftp:
                try:
                    with sftp.open(path, "rb") as f:
                        end = min(f.stat().st_size or 0, offset + layout.MAX_LOG_READ)
                        if end <= offset:
                            return b"", offset
                        f.seek(offset)
                        # Pipelined requests: one 32 KiB request at a time took a round
                        # trip each, so a follower fell behind a chatty job.
                        f.prefetch(end)
                        data = f.read(end - offset)
                except FileNotFoundError:
                    return b"", offset  # not started yet: no log so far
            return data, offset + len(data)

        return self._with_connection(read, "reading the log")

    def cancel(self, job_id: str) -> None:
        job_id = self._check_job_id(job_id)
        result = self._run(f"scancel {shlex.quote(job_id)}", "cancelling the job")
        err = result.err_text
        if result.status != 0 and "already completed" not in err and "Invalid job id" not in err:
            raise BackendRejected(f"scancel on {self.hostname} failed for job {job_id}: {err}")
        self._remove_credentials(job_id)

    def job_ended(self, job_id: str) -> None:
        # The job script keeps its credential file while Slurm may start it again; a job
        # that Slurm ended with SIGTERM (time limit, cancel outside mantik) leaves it.
        self._remove_credentials(self._check_job_id(job_id))

    def _remove_credentials(self, job_id: str) -> None:
        # A job cancelled while pending never runs the script that deletes its tracking
        # credential; without this it would stay in the run directory for good.
        try:
            path = posixpath.join(self.run_dir_of(job_id), layout.CREDENTIALS_FILE)
        except NotFound:
            return  # Slurm forgot the job and nobody told us where it lived

        def remove() -> None:
            with self._shared_sftp() as sftp:
                try:
                    sftp.remove(path)
                except FileNotFoundError:
                    pass  # the job started and deleted it itself

        self._with_connection(remove, "deleting the cancelled job's credential file")

    # ---- files ----------------------------------------------------------------------------

    def list_files(self, job_id: str, path: str = "") -> list[FileEntry]:
        """The entries of one directory of the run (not recursive), directories first."""
        run_dir = self.run_dir_of(job_id)
        rel = clean_relative(path)

        def listing() -> list[FileEntry]:
            with self._shared_sftp() as sftp:
                target = self._confined(sftp, run_dir, rel)
                if not stat.S_ISDIR(sftp.stat(target).st_mode or 0):
                    raise InvalidRequest(f"{path!r} of run directory {run_dir} is not a folder")
                attrs = sftp.listdir_attr(target)
            entries = [
                FileEntry(
                    path=posixpath.join(rel, a.filename) if rel else a.filename,
                    size=a.st_size or 0,
                    is_dir=stat.S_ISDIR(a.st_mode or 0),
                )
                for a in attrs
            ]
            return sorted(entries, key=lambda e: (not e.is_dir, e.path))

        return self._with_connection(listing, "listing files")

    def open_file(self, job_id: str, path: str) -> Iterator[bytes]:
        run_dir = self.run_dir_of(job_id)
        rel = clean_relative(path)
        sftp, target = self._with_connection(
            lambda: self._open_confined_file(run_dir, rel, path), "opening a file"
        )
        return self._stream_file(sftp, target)

    def _open_confined_file(
        self, run_dir: str, rel: str, path: str
    ) -> tuple[paramiko.SFTPClient, str]:
        # A session of its own: a long stream must not hold the shared one.
        sftp = self._open_sftp(self._connection())
        try:
            target = self._confined(sftp, run_dir, rel)
            if not stat.S_ISREG(sftp.stat(target).st_mode or 0):
                raise InvalidRequest(f"{path!r} of run directory {run_dir} is not a file")
        except BaseException:
            sftp.close()
            raise
        return sftp, target

    def _stream_file(self, sftp: paramiko.SFTPClient, target: str) -> Iterator[bytes]:
        try:
            with sftp.open(target, "rb") as f:
                f.prefetch()
                while chunk := f.read(layout.CHUNK):
                    yield chunk
        except (TimeoutError, paramiko.SSHException, EOFError, ConnectionError) as exc:
            raise BackendUnavailable(
                f"Lost the SSH connection to {self.hostname}:{self.port} while reading "
                f"{target}: {describe_error(exc)}"
            ) from None
        finally:
            sftp.close()

    def download(
        self, job_id: str, path: str, dest: Path, progress: Progress | None = None
    ) -> Path:
        """A file lands at ``dest`` (or inside it, if ``dest`` is a folder) and replaces
        an older copy. A folder travels as one tar stream and lands as ``dest/<name>``
        (or at ``dest`` if that does not exist yet); an existing one is a ``Conflict``."""
        run_dir = self.run_dir_of(job_id)
        rel = clean_relative(path)
        dest = Path(dest)

        def inspect() -> tuple[str, bool, int]:
            with self._shared_sftp() as sftp:
                target = self._confined(sftp, run_dir, rel)
                st = sftp.stat(target)
            return target, stat.S_ISDIR(st.st_mode or 0), st.st_size or 0

        target, is_dir, size = self._with_connection(inspect, "inspecting a file")
        name = posixpath.basename(rel) or posixpath.basename(run_dir)
        final = dest / name if dest.is_dir() else dest
        if is_dir:
            return self._download_folder(target, final, progress)
        return save_stream(self.open_file(job_id, rel), final, size, progress)

    def _download_folder(self, target: str, final: Path, progress: Progress | None) -> Path:
        parent, name = posixpath.split(target)
        q = shlex.quote
        # Size first (for progress), then the archive, on one channel. du's first line
        # only: it prints the name after the size, and a name may hold a newline.
        command = (
            f"cd {q(parent)} && du -sb -- {q(name)} | head -n 1 | cut -f1 && tar -cf - -- {q(name)}"
        )
        if final.exists():
            # Never delete or merge into a local folder the user may care about.
            raise Conflict(f"{final} exists already: remove it or download elsewhere")
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".mantik-download-", dir=final.parent))

        def open_stream() -> tuple[paramiko.SSHClient, paramiko.Channel]:
            client = self._connection()
            return client, self._open_stream(command, client)

        try:
            client, channel = self._with_connection(open_stream, "downloading")
            try:
                _untar_stream(channel, staging, progress)
                status = self._exit_status(channel)
                if status == -1 and _cut_off(channel):
                    # The stream ended between two members, which tar reads as the end
                    # of the archive; no exit status came: the link went, not tar.
                    raise EOFError(_CUT_OFF)
                err = _rest_of_stderr(channel).decode(errors="replace").strip()
            except _CONNECTION_ERRORS as exc:
                # Only the link this stream used: another thread may have replaced it
                # with a fresh one meanwhile, which must stay open.
                self._drop(client)
                raise BackendUnavailable(
                    f"Lost the SSH connection to {self.hostname}:{self.port} while "
                    f"downloading {target}: {describe_error(exc)}. Nothing was kept of "
                    "the folder; try the download again."
                ) from None
            finally:
                channel.close()
            if status != 0:
                raise BackendRejected(f"tar of {target} on {self.hostname} failed: {err}")
            (staging / name).replace(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final

    def _confined(self, sftp: paramiko.SFTPClient, run_dir: str, rel: str) -> str:
        """The real remote path of ``rel``; refuses anything resolving outside the run."""
        try:
            real_root = sftp.normalize(run_dir)
        except FileNotFoundError:
            raise NotFound(
                f"The run directory {run_dir} does not exist on {self.hostname}"
            ) from None
        candidate = posixpath.join(run_dir, rel) if rel else run_dir
        try:
            # The server's realpath resolves symlinks, so a link leading out is caught.
            real = sftp.normalize(candidate)
        except FileNotFoundError:
            raise NotFound(f"No file {rel!r} in run directory {run_dir}") from None
        if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
            raise UnsafePath(f"{rel!r} leads outside the run directory {run_dir}")
        return real

    # ---- helpers needing the connection -----------------------------------------------

    def _check_job_id(self, job_id: str) -> str:
        job_id = str(job_id)
        if not _JOB_ID.match(job_id):
            raise NotFound(f"{job_id!r} is not a Slurm job id")
        return job_id

    def _ask_slurm_workdir(self, job_id: str) -> str:
        q = shlex.quote(job_id)
        result = self._run(
            f"squeue -h -t all -j {q} -o %Z 2>/dev/null; "
            f"sacct -X -n -P -j {q} -o WorkDir 2>/dev/null; true",
            "asking Slurm for the job's directory",
        )
        for line in result.stdout.decode(errors="replace").splitlines():
            if line.strip():
                return line.strip()
        raise NotFound(
            f"Slurm on {self.hostname} does not know job {job_id}, and its run directory "
            "was not given (attach(job_id, run_dir))"
        )


# ---- pure helpers (no connection) -------------------------------------------------------


def _drain(channel: paramiko.Channel) -> tuple[bytes, bytes]:
    """stdout to its end, then stderr. Both share one SSH window, so this would stall
    only if a command wrote megabytes to stderr; none of ours does."""
    out = bytearray()
    while chunk := channel.recv(layout.CHUNK):
        out += chunk
    return bytes(out), _rest_of_stderr(channel)


def _rest_of_stderr(channel: paramiko.Channel) -> bytes:
    rest = bytearray()
    while chunk := channel.recv_stderr(layout.CHUNK):
        rest += chunk
    return bytes(rest)


class _CountingReader(io.RawIOBase):
    """A channel as a file for tarfile, reporting bytes read against an announced total."""

    def __init__(self, channel: paramiko.Channel, total: int, progress: Progress | None) -> None:
        self.channel = channel
        self.total = total
        self.done = 0
        self.progress = progress
        self._last = 0.0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.channel.recv(len(buffer))
        buffer[: len(data)] = data
        self.done += len(data)
        now = time.monotonic()
        if self.progress and (now - self._last > 0.2 or not data):
            self._last = now
            self.progress(min(self.done, self.total), self.total)
        return len(data)


def _skip_unsafe_members(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's "data" filter (no absolute names, no "..", no devices, no links leading
    out), but skipping such a member instead of failing the download: run directories
    often hold venvs whose links point to the cluster's own interpreters."""
    try:
        return tarfile.data_filter(member, dest)
    except tarfile.FilterError as exc:
        log.warning("download: skipped %s (%s)", member.name, exc)
        return None


def _read_line(channel: paramiko.Channel) -> bytes:
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = channel.recv(1)
        if not byte:
            break
        line += byte
    return bytes(line)


_CUT_OFF = "the SSH channel closed before the end of the folder's tar stream"


def _cut_off(channel: paramiko.Channel) -> bool:
    """Whether the channel's stream ended without the remote end saying so: the remote
    side sends EOF when its command's output ends (also when tar fails or is killed);
    a channel closed here, or with its connection, has none."""
    transport = channel.get_transport()
    link_gone = transport is None or not transport.is_active()
    return not channel.eof_received and (channel.closed or link_gone)


def _untar_stream(channel: paramiko.Channel, dest: Path, progress: Progress | None) -> None:
    size_line = _read_line(channel).strip()
    # tar adds headers and padding to the payload; progress is an estimate and is capped.
    total = int(size_line) + 10240 if size_line.isdigit() else 0
    reader = io.BufferedReader(_CountingReader(channel, total, progress), layout.CHUNK)
    try:
        with tarfile.open(fileobj=reader, mode="r|") as archive:
            archive.extractall(dest, filter=_skip_unsafe_members)  # noqa: S202 - filtered
    except tarfile.TarError as exc:
        if _cut_off(channel):
            # A channel closed under the stream (the connection dropped, or another
            # thread closed it) reads as a short stream: that is a lost link, to be
            # tried again, not a tar that failed on the cluster.
            raise EOFError(_CUT_OFF) from None
        raise BackendRejected(f"The folder arrived as a broken tar stream: {exc}") from None
    if progress:
        progress(total, total)


def _sftp_makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    missing = []
    while path not in ("", "/"):
        try:
            sftp.stat(path)
            break
        except FileNotFoundError:
            missing.append(path)
            path = posixpath.dirname(path)
    for directory in reversed(missing):
        # 0700: the run directory holds the tracking credential.
        sftp.mkdir(directory, mode=0o700)
