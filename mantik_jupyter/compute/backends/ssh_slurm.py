"""Slurm over SSH: the backend for HPC login nodes reached with a key or password.

The backend submits with ``sbatch``, asks ``squeue``/``sacct`` for states, cancels
with ``scancel`` and reads logs; it talks through two collaborators: the SSH connection
and its remote commands (``ssh_connection.SshConnection``: login, host keys, timeouts,
reconnecting) and the run files over SFTP (``ssh_files.SshRunFiles``: upload, listing,
reading, downloading). A call that cannot reach the host raises ``BackendUnavailable``
(the RunService turns that into ``UNKNOWN``, never ``FAILED``).

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

A submission stopped half-way (Ctrl-C, SIGTERM, a lost link) deletes the uploaded
credential file, stops the remote command's process group (a login-node command would
otherwise run on and sbatch after it) and cancels a job it queued unbeknown to us. If the
client dies outright (SIGKILL) the remote command runs on until its next write to the
closed channel (after PreRunCommandOnLoginNode, before sbatch), and then deletes the
credential file itself. What PreRunCommandOnLoginNode started outside that process group
(``setsid``, ``nohup`` under setsid, a daemon) is stopped in both cases too: the command
runs with ``MANTIK_SUBMISSION``, a token of this submission alone, in its environment,
which every process it starts inherits, and the processes of the user whose
``/proc/<pid>/environ`` holds it get SIGTERM, and SIGKILL 5 s later. Why not the process
tree: a daemon's parent is init by then; nor cgroups: users cannot make them on a login
node. A process that cleared its environment (``env -i``), or whose environ the user may
not read (setuid, non-dumpable like ``ssh-agent``), escapes.

Security: every value that reaches the remote shell goes through ``shlex.quote``;
host keys, file confinement and credentials are the collaborators' (see there).
"""

from __future__ import annotations

import logging
import posixpath
import re
import shlex
import uuid
from collections.abc import Iterator
from pathlib import Path

import paramiko

from ...errors import BackendRejected, ConfigError, InvalidRequest, NotFound
from .. import layout
from ..script import expand_quoted, expanded_names, login_commands_script
from ..states import RunState
from .base import (
    Backend,
    Capabilities,
    FileEntry,
    FolderMember,
    JobStatus,
    PreparedJob,
    Progress,
    config_file,
    describe_error,
)
from .paths import safe_name as _safe_name
from .slurm_words import (
    ACTIVE,
    MARK,
    decide,
    parse_table,
    sbatch_culprit,
    split_sections,
)
from .ssh_connection import (
    COMMAND_TIMEOUT,
    NO_EXIT_STATUS,
    CommandResult,
    SshConnection,
    read_line,
)
from .ssh_files import SshRunFiles

__all__ = ["SshSlurmBackend", "describe_error"]

log = logging.getLogger(__name__)

# The submit command waits silently for PreRunCommandOnLoginNode (a venv to build, data
# to stage), so its channel may stay quiet far longer than any other command's.
LOGIN_COMMAND_TIMEOUT = 3600.0
# Jobs asked about in one status command (about 120 bytes each with their run directory).
STATES_BATCH = 500
# What sh prints, if anything, of a command a signal ended ("Killed", "Terminated").
_SHELL_SIGNAL_NOTE = re.compile(r"(.*\b(Killed|Terminated|Hangup)\b.*)?", re.S)
# How much of mantik-login.log a failed PreRunCommandOnLoginNode shows in its error.
_LOGIN_LOG_TAIL = 2000

_JOB_ID = re.compile(r"^\d+(_\d+)?$")

# PreRunCommandOnLoginNode runs with this variable set to a token of its submission alone;
# every process it starts inherits it, also one that left its process group (setsid, a
# daemon), so abandoning the submission finds them all in /proc/<pid>/environ.
SUBMISSION_ENV = "MANTIK_SUBMISSION"
# Tenths of a second between the SIGTERM to such a process and the SIGKILL if it still
# runs: 5 s, the grace a local job's cancel gives.
_SWEEP_GRACE_TENTHS = 50


def _group(channel: paramiko.Channel) -> str:
    """The process group the submit command announces first (after whatever a chatty
    shell startup file printed); "" if it did not."""
    for _ in range(100):
        line = read_line(channel).decode(errors="replace")
        if not line:
            return ""
        if line.startswith(MARK + "group"):
            word = line[len(MARK) + len("group") :].strip()
            return word if word.isdigit() and int(word) > 1 else ""
    return ""


class SshSlurmBackend(Backend):
    """Runs jobs with ``sbatch`` on a Slurm login node over SSH (paramiko).

    ``remote_dir`` is relative to the remote home unless absolute. Credentials:
    ``key_filename`` (a private key file), ``private_key`` (the key's text, e.g.
    from ``MANTIK_SSH_PRIVATE_KEY``) and ``password`` (an encrypted key's passphrase,
    else the login password); with none of them, the SSH agent and ``~/.ssh/id_*`` are
    tried, like ``ssh``.
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
        self.ssh = SshConnection(
            hostname,
            port,
            username,
            key_filename=key_filename,
            private_key=private_key,
            password=password,
            known_hosts=known_hosts,
            connect_timeout=connect_timeout,
            io_timeout=io_timeout,
        )
        self.files = SshRunFiles(self.ssh)
        self._remote_dir_setting = remote_dir
        self._remote_base: str | None = None
        self._run_dirs: dict[str, str] = dict(run_dirs or {})

    def __repr__(self) -> str:  # no credentials in reprs that end up in logs
        return f"SshSlurmBackend({self.ssh.where()})"

    @property
    def hostname(self) -> str:
        return self.ssh.hostname

    @property
    def port(self) -> int:
        return self.ssh.port

    @property
    def username(self) -> str | None:
        return self.ssh.username

    @property
    def known_hosts(self) -> Path:
        return self.ssh.known_hosts

    @property
    def io_timeout(self) -> float:
        return self.ssh.io_timeout

    @property
    def commands_issued(self) -> int:
        """Remote shell commands run so far; a benchmark asserts one per status poll."""
        return self.ssh.commands_issued

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
            self._remote_base = self.ssh.with_connection(
                self._resolve_remote_base, "finding SSH.RemoteDirectory"
            )
        return self._remote_base

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
        result = self.ssh.execute("sh -c " + shlex.quote(script))
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

    # ---- connection ---------------------------------------------------------------------

    def close(self) -> None:
        self.ssh.close()

    def check_credentials(self) -> None:
        # The login (key exchange, authentication) and the remote base: both are kept for
        # the submission. The base is asked once; a link that dropped since logs in anew.
        self.ssh.client()
        self.remote_base()

    def _run(self, command: str, what: str, retry: bool = True) -> CommandResult:
        """Run one shell command; ``retry`` only for commands safe to run twice."""
        return self.ssh.run(command, what, retry)

    # ---- submit ---------------------------------------------------------------------------

    def submit(self, job: PreparedJob, progress: Progress | None = None) -> str:
        run_dir = posixpath.join(self.remote_base(), _safe_name(job.run_id, "run id"))
        files = self._files_to_ship(job)
        pre = job.pre_login_commands
        submission = uuid.uuid4().hex if pre else ""
        command = self._submit_command(
            run_dir,
            job.job_name,
            files,
            pre_login_commands=pre,
            run_id=job.run_id,
            submission=submission,
        )
        timeout = max(self.io_timeout, LOGIN_COMMAND_TIMEOUT) if pre else None
        group: list[str] = []  # the remote command's process group, once it said it
        try:
            self.files.upload(run_dir, job.local_dir, files, progress, config_file(job.config))
            # Not retried: a dropped link after sbatch ran would otherwise submit twice.
            result = self.ssh.with_connection(
                lambda: self.ssh.execute(command, timeout, lambda c: group.append(_group(c))),
                "submitting",
                retry=False,
            )
        except BaseException:
            # Ctrl-C, SIGTERM, a lost link: the job script, which deletes the tracking
            # credential, may never run, and the remote command runs on without us.
            self._abandon_submission(run_dir, group[0] if group else "", submission)
            raise
        if result.status != 0:
            self._raise_unpack_failure(result, job, run_dir)
            self._raise_login_failure(result, job.run_id, run_dir)
            self._raise_if_stopped(
                result, job.run_id, run_dir, group[0] if group else "", submission
            )
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

    @staticmethod
    def _submit_command(
        run_dir: str,
        job_name: str,
        files: list[str],
        *,
        pre_login_commands: tuple[str, ...] = (),
        run_id: str = "",
        submission: str = "",
    ) -> str:
        """One remote command: unpack the code, run PreRunCommandOnLoginNode, sbatch.
        Whatever stops it before the job is queued deletes the credential file, which
        only the job script would delete otherwise."""
        q = shlex.quote
        creds = q(layout.CREDENTIALS_FILE)
        # First line of output: the process group, for _abandon_submission to stop.
        lines = [
            f"printf '%s\\n' \"{MARK}group $(ps -o pgid= -p $$ 2>/dev/null)\"",
            f"cd {q(run_dir)} || exit",
            # A client that died (SIGKILL, a dropped link) cannot clean up: the shell's
            # next write to the closed channel (SIGPIPE) or our TERM deletes the secret.
            f'trap "rm -f -- {creds}; exit 143" PIPE HUP TERM',
        ]
        if submission:
            # ... and stops what the login-node command left running for a job that will
            # never be queued. Not on our TERM: _abandon_submission stops them itself.
            lines += [
                *_sweep_function(submission),
                f'trap "rm -f -- {creds}; mantik_sweep; exit 143" PIPE HUP',
            ]
        if layout.PACKAGE_FILE in files:
            code = layout.CODE_DIR
            # A failure is marked for _raise_unpack_failure (tar's words come before the
            # mark); the partial code goes, it would only fill a full disk further.
            lines.append(
                f"mkdir -p {code} && tar -xzf {q(layout.PACKAGE_FILE)} -C {code} "
                f"|| {{ mantik_rc=$?; rm -f -- {creds}; rm -rf -- {code}; "
                f'echo "{MARK}unpack $mantik_rc" >&2; exit "$mantik_rc"; }}'
            )
        if pre_login_commands:
            script = login_commands_script(pre_login_commands, "PreRunCommandOnLoginNode")
            # As on UNICORE: the run id tells a login-node command which run it serves.
            # The submission's token only for it, not for sbatch: the job would inherit it.
            ids = f"MLFLOW_RUN_ID={q(run_id)} MANTIK_RUN_ID={q(run_id)}"
            if submission:
                ids = f"{SUBMISSION_ENV}={q(submission)} {ids}"
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
        return "sh -c " + q("\n".join(lines))

    def _abandon_submission(self, run_dir: str, group: str, submission: str = "") -> None:
        """Best effort after a submission stopped half-way: stop the remote command (a
        PreRunCommandOnLoginNode would otherwise run to its end and sbatch after it) and
        what that command started outside its process group (``submission``, see
        ``_sweep_function``), cancel a job it queued that we never learnt the id of,
        delete the credential."""
        q = shlex.quote
        me = '"$(id -un)"'
        # Only while the group is still this submission's: one whose command ended may
        # have left its id to another process group of the user by now (ids wrap).
        ours = (
            f"ps -eo pgid=,args= 2>/dev/null | awk -v g={q(group)} -v d={q(run_dir)} "
            "'$1 == g && index($0, d) { found = 1 } END { exit !found }'"
        )
        stop_group = f"{ours} && kill -s TERM -- -{group} 2>/dev/null" if group else "false"
        lines = [
            f"mantik_group=; {stop_group} && mantik_group={q(group)}",
            *([*_sweep_function(submission), "mantik_sweep"] if submission else []),
            f"cd {q(run_dir)} || exit 0",
            f"rm -f -- {q(layout.CREDENTIALS_FILE)}",
            # A job whose working directory is this run's was queued by this submission.
            f"squeue -h -u {me} -o '%i|%Z' 2>/dev/null | "
            f"awk -F'|' -v d={q(run_dir)} '$2 == d {{ print $1 }}' | xargs -r scancel",
        ]
        try:
            self.ssh.run("sh -c " + q("\n".join(lines)), "abandoning the submission")
        except Exception as exc:  # noqa: BLE001 - the original error is what matters
            log.warning(
                "could not delete %s/%s on %s after the submission stopped: %s",
                run_dir,
                layout.CREDENTIALS_FILE,
                self.hostname,
                describe_error(exc),
            )

    def _raise_unpack_failure(self, result: CommandResult, job: PreparedJob, run_dir: str) -> None:
        """The error of unpacking the code on the login node, if that is what failed: it
        was told as sbatch refusing the job, and a full disk or quota (the package fits,
        its contents do not) read as a Slurm problem."""
        marked = _marked(result, "unpack")
        if marked is None:
            return
        said = marked[0].strip()
        raise BackendRejected(
            f"Unpacking the code of run {job.run_id} into "
            f"{posixpath.join(run_dir, layout.CODE_DIR)} on {self.hostname} failed, so no "
            f"job was submitted: {said}\nIf the file system is full or over quota (No "
            "space left on device, Disk quota exceeded), free space there or choose "
            f"another SSH.RemoteDirectory in {config_file(job.config)}."
        )

    def _raise_if_stopped(
        self, result: CommandResult, run_id: str, run_dir: str, group: str, submission: str
    ) -> None:
        """The error of a submit command stopped by a signal before it ended: it was
        told as "sbatch refused the job: " with nothing after it. Whether sbatch had run
        is unknown, so a job this submission queued is cancelled."""
        signals = {
            NO_EXIT_STATUS: "SIGKILL or another signal",
            129: "SIGHUP",
            137: "SIGKILL",
            143: "SIGTERM",
        }
        # The sh that ran the submit command may say how its child ended, nothing more.
        if result.status not in signals or not _SHELL_SIGNAL_NOTE.fullmatch(result.err_text):
            return
        self._abandon_submission(run_dir, group, submission)
        raise BackendRejected(
            f"The submit command of run {run_id} on {self.hostname} was stopped "
            f"({signals[result.status]}) before it ended; no job of it is left queued. Something "
            "on the login node stopped it: a limit on the time or memory of login-node "
            "processes (Environment.PreRunCommandOnLoginNode runs there; long preparation "
            "belongs in PreRunCommandOnComputeNode), or an administrator. Submit again."
        )

    def _raise_login_failure(self, result: CommandResult, run_id: str, run_dir: str) -> None:
        """The error of a failed PreRunCommandOnLoginNode, if that is what failed."""
        marked = _marked(result, "login")
        if marked is None:
            return
        status, _, tail = marked[1].partition("\n")
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
            # Jobs whose exit-code file is looked for (the run directory is known then).
            looked_for = {j for j in batch if j in self._run_dirs}
            result = self._run(self._status_command(batch), "asking Slurm for job states")
            sections = split_sections(result.stdout.decode(errors="replace"))
            squeue = parse_table(sections.get("squeue", ""), 6)
            sacct = parse_table(sections.get("sacct", ""), 8)
            codes = parse_table(sections.get("exitcodes", ""), 2)
            users = parse_table(sections.get("users", ""), 2)
            for job_id in batch:
                answer[job_id] = decide(
                    squeue.get(job_id),
                    sacct.get(job_id),
                    codes.get(job_id),
                    users,
                    file_expected=job_id in looked_for,
                )
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
            # Times as seconds since the epoch, whatever the cluster's time zone; the
            # start and end times and node list come with the state, at no extra round
            # trip (a run ended while no one followed it ends when its job did).
            "export SLURM_TIME_FORMAT=%s",
            # The reason, time limit, requested memory and who cancelled say why Slurm
            # ended a job itself (time limit, memory, a failed launch, an admin's cancel).
            f"sq=$(squeue -h -t all -j {ids} -o '%i|%T|%r|%S|%N|%l|%e' 2>/dev/null)",
            f"echo {MARK}squeue",
            'printf "%s\\n" "$sq"',
            f'rest=$(printf "%s\\n" "$sq" | {not_active})',
            f"echo {MARK}sacct",
            'sa=; if [ -n "$rest" ]; then sa=$(sacct -X -n -P -j "$rest" '
            "-o JobIDRaw,State,ExitCode,Start,NodeList,Timelimit,ReqMem,UID,End 2>/dev/null); fi",
            'printf "%s\\n" "$sa"',
            # sacct says "CANCELLED by UID": the names of those uids, as "uid|name", and
            # our own uid (sacct's UID column reads 0 for a moment after a job ended).
            f"echo {MARK}users",
            'printf "me|%s\\n" "$(id -u)"',
            "for u in $(printf '%s\\n' \"$sa\" | "
            "sed -n 's/^[^|]*|CANCELLED by \\([0-9]*\\)|.*/\\1/p' | sort -u); do "
            'printf "%s|%s\\n" "$u" "$(getent passwd "$u" | cut -d: -f1)"; done',
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
        return "sh -c " + shlex.quote("; ".join(parts) + "; true")

    # ---- logs, cancel ---------------------------------------------------------------------

    def read_log(self, job_id: str, offset: int = 0) -> tuple[bytes, int]:
        path = posixpath.join(self.run_dir_of(job_id), layout.LOG_FILE)
        return self.files.read_from(path, offset, layout.MAX_LOG_READ, "reading the log")

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
        self.files.remove(path, "deleting the cancelled job's credential file")

    # ---- files ----------------------------------------------------------------------------

    def list_files(self, job_id: str, path: str = "") -> list[FileEntry]:
        """The entries of one directory of the run (not recursive), directories first."""
        return self.files.list(self.run_dir_of(job_id), path)

    def open_file(self, job_id: str, path: str) -> Iterator[bytes]:
        return self.files.open(self.run_dir_of(job_id), path)

    def download(
        self, job_id: str, path: str, dest: Path, progress: Progress | None = None
    ) -> Path:
        """A file lands at ``dest`` (or inside it, if ``dest`` is a folder) and replaces
        an older copy. A folder travels as one tar stream and lands as ``dest/<name>``
        (or at ``dest`` if that does not exist yet); an existing one is a ``Conflict``."""
        return self.files.download(self.run_dir_of(job_id), path, dest, progress)

    def folder_members(self, job_id: str, path: str) -> Iterator[FolderMember]:
        return self.files.folder_members(self.run_dir_of(job_id), path)


def _sweep_function(submission: str) -> list[str]:
    """sh lines that define ``mantik_sweep``: it stops every process of the user whose
    environment holds ``MANTIK_SUBMISSION=<submission>``, what a PreRunCommandOnLoginNode
    started, also in a session of its own (``setsid``, ``nohup``, a daemon), which the
    kill of the submit command's process group misses. Another user's process is never
    looked at, and no process of the user without the token is touched. SIGTERM (and
    SIGCONT, for one that is stopped) once to each, SIGKILL to what still runs after the
    grace; those of the process group ``$mantik_group`` had their SIGTERM already. Needs
    Linux's /proc and GNU grep (-z)."""
    want = shlex.quote(f"{SUBMISSION_ENV}={submission}")
    # Zombies have an empty environ: a killed process is not found again.
    return [
        'mantik_marked() { ps -u "$(id -u)" -o pid= 2>/dev/null | '
        'awk \'{ print "/proc/" $1 "/environ" }\' | '
        f"xargs -r grep -lsFxz -e {want} 2>/dev/null | awk -F/ '{{ print $3 }}'; }}",
        "mantik_sweep() {",
        # A second SIGTERM would cut short what a process does on the first.
        '  mantik_sent=" $(ps -eo pid=,pgid= 2>/dev/null | '
        'awk -v g="${mantik_group-}" \'g != "" && $2 == g { printf "%s ", $1 }\')"',
        "  mantik_n=0",
        '  while mantik_pids=$(mantik_marked); [ -n "$mantik_pids" ]; do',
        f'    if [ "$mantik_n" -ge {_SWEEP_GRACE_TENTHS} ]; then '
        "kill -s KILL $mantik_pids 2>/dev/null; break; fi",
        "    for p in $mantik_pids; do",
        '      case "$mantik_sent" in *" $p "*) continue ;; esac',
        '      kill -s TERM "$p" 2>/dev/null; kill -s CONT "$p" 2>/dev/null',
        '      mantik_sent="$mantik_sent$p "',
        "    done",
        # Without fractional sleep (not POSIX) the grace is ten times longer, never shorter.
        "    sleep 0.1 2>/dev/null || sleep 1",
        "    mantik_n=$((mantik_n + 1))",
        "  done",
        "}",
    ]


def _marked(result: CommandResult, word: str) -> tuple[str, str] | None:
    """The submit command's stderr before and after its ``MARK<word>`` line (a step of
    the command that failed marks itself so), or None if no step did."""
    before, marker, after = result.stderr.decode(errors="replace").partition(f"{MARK}{word} ")
    return (before, after) if marker else None
