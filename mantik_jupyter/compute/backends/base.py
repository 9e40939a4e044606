"""The interface every compute backend implements.

A backend knows how to put a prepared run directory (code package, job script,
credential file) onto a machine, start it, tell its state, read its log, cancel
it and hand back its files. It knows nothing of MLflow: the RunService does the
tracking. Backends declare what they can do through ``capabilities``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import InvalidRequest
from ..config import ComputeConfig
from ..states import RunState

Progress = Callable[[int, int], None]
"""A callback ``progress(done_bytes, total_bytes)`` for long transfers."""

# How a job's status names its config file: a backend serves the runs of many config files
# and, after a restart of the lab, knows a job by its id alone. The RunService, which
# knows the run, puts the file's name in its place (``name_config``).
RUN_CONFIG = "the run's compute backend config"


def config_file(config: ComputeConfig | None) -> str:
    """The config file a message about a job being submitted names."""
    return config.name if config is not None and config.name else RUN_CONFIG


def name_config(text: str, name: str | None) -> str:
    """A backend's words about a run with its config file named (``name``: the one it was
    submitted with; None for a run from before mantik recorded it)."""
    return text.replace(RUN_CONFIG, name) if name else text


@dataclass(frozen=True)
class Capabilities:
    name: str
    cancel: bool = True
    logs: bool = True
    files: bool = True
    download_folder: bool = True
    batch_states: bool = True
    description: str = ""


@dataclass(frozen=True)
class JobStatus:
    state: RunState
    # The backend's own state word (e.g. Slurm's TIMEOUT), for display and the reason tag.
    native_state: str = ""
    exit_code: int | None = None
    # Why a job ended when it did not finish cleanly, in words a user acts on: an exit
    # code, CANCELLED, what the scheduler says it did (a time limit reached, a node lost).
    reason: str | None = None
    # When the job's latest attempt started running (ms since the epoch), where the
    # status call learns it anyway (Slurm's StartTime, a local process's start); None
    # when the backend does not say or the job never ran. The sync falls back to the
    # moment it first sees the job RUNNING.
    started_at: int | None = None
    # When an ended job ended (ms since the epoch), where the status call learns it
    # (Slurm's End, a local job's end); None: the sync records the moment it learns of
    # the end, which is late when no one followed the run then.
    ended_at: int | None = None
    # False for an ended job whose outcome the backend cannot tell (a UNICORE site
    # deleted the job and its directory): the sync then keeps a status the run's own
    # MLflow client recorded (the entry point ended its run) over this one.
    outcome_known: bool = True


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the run directory, "/"-separated
    size: int
    is_dir: bool


FileOpener = Callable[[], tuple[int, Iterator[bytes]]]
"""Opens a file of a folder being archived: its size now, and its data. Raises
``FileNotFoundError`` or ``NotFound`` for one gone since it was listed."""


@dataclass(frozen=True)
class FolderMember:
    """One entry of a folder being archived (``Backend.folder_members``)."""

    path: str  # relative to the folder, "/"-separated
    kind: str  # "file", "dir" or "link"
    mtime: float = 0.0
    mode: int = 0o644
    target: str = ""  # where a link points, as it was written
    open: FileOpener | None = None  # a file's data


@dataclass
class PreparedJob:
    """Everything a backend needs to start one run, made by the RunService.

    ``local_dir`` holds the files to ship: ``package.tar.gz`` (the code),
    ``mantik-job.sh`` (the job script) and ``.mantik-credentials`` (mode 0600,
    may be absent). The backend copies them to the run directory it owns.
    """

    run_id: str
    local_dir: Path
    job_name: str
    files: list[str] = field(default_factory=list)
    # The run's compute backend config, for what a backend does beyond shipping the
    # files: login-node commands, UNICORE's job description. None: nothing beyond.
    config: ComputeConfig | None = None

    @property
    def pre_login_commands(self) -> tuple[str, ...]:
        env = self.config.environment if self.config else None
        return tuple(env.pre_run_command_on_login_node) if env else ()

    @property
    def post_login_commands(self) -> tuple[str, ...]:
        env = self.config.environment if self.config else None
        return tuple(env.post_run_command_on_login_node) if env else ()


class Backend(abc.ABC):
    capabilities: Capabilities

    @abc.abstractmethod
    def submit(self, job: PreparedJob, progress: Progress | None = None) -> str:
        """Ship and start a job; return the backend's job id."""

    @abc.abstractmethod
    def states(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """States of many jobs at once (one round trip where the backend allows it).

        A job whose state cannot be learnt now maps to ``RunState.UNKNOWN``;
        a backend that cannot be reached at all raises ``BackendUnavailable``.
        """

    @abc.abstractmethod
    def read_log(self, job_id: str, offset: int = 0) -> tuple[bytes, int]:
        """Bytes of ``mantik.log`` from ``offset``; returns (data, new offset)."""

    @abc.abstractmethod
    def cancel(self, job_id: str) -> None:
        """Stop a job and delete its credential file if the job never got to it.
        Cancelling a job that already ended is not an error."""

    @abc.abstractmethod
    def list_files(self, job_id: str, path: str = "") -> list[FileEntry]:
        """Files below ``path`` (relative to the run directory)."""

    @abc.abstractmethod
    def download(
        self, job_id: str, path: str, dest: Path, progress: Progress | None = None
    ) -> Path:
        """Copy a file or folder of the run directory to ``dest``; return the local path."""

    @abc.abstractmethod
    def open_file(self, job_id: str, path: str) -> Iterator[bytes]:
        """Stream one file of the run directory in chunks."""

    def folder_members(self, job_id: str, path: str) -> Iterator[FolderMember]:
        """The entries below the folder ``path`` of the run directory ("" for all of it),
        each folder before what is in it, for an archive made while it streams. Checks
        the folder before it returns (``NotFound``; ``InvalidRequest`` for a file); the
        walk itself may skip what a running job removes meanwhile."""
        raise InvalidRequest(
            f"The {self.capabilities.name} backend cannot send a folder as one archive; "
            "download it with `mantik runs download`."
        )

    def run_dir_of(self, job_id: str) -> str:
        """Where the job's run directory is (a path or URL on the backend's machine), to
        record next to the job id; "" for a backend without one."""
        return ""

    def attach(self, job_id: str, run_dir: str) -> None:  # noqa: B027 - optional hook
        """Tell the backend the run directory of a job submitted earlier (before a restart
        of the lab), as ``run_dir_of`` gave it then."""

    def job_ended(self, job_id: str) -> None:  # noqa: B027 - optional hook
        """Called once when the RunService records the job's end: delete what a job
        killed from outside leaves behind (a Slurm job keeps its credential file while
        it may be requeued; a local job's processes outlive its script). The sync loop
        waits for it, so anything slow goes to a thread. May raise ``MantikError``; the
        caller only logs it."""

    def check_credentials(self) -> None:  # noqa: B027 - optional hook
        """Log in, or check the credential, before the RunService creates the MLflow run,
        so that a credential or host the cluster refuses leaves no FAILED run behind.
        Called in a thread while the project is packaged; what it opens is kept for the
        submission. Raises the domain error (``AuthenticationFailed``, ``HostKeyUnknown``,
        ``BackendUnavailable``, ``ConfigError``)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def describe_error(exc: BaseException) -> str:
    """An exception for a user message: its type and text (``TimeoutError`` alone when it
    has no text, as socket timeouts do). The SSH and UNICORE backends say it alike."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
