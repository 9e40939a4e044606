"""What Slurm's commands say and what it means for a run: state words, the sections and
tables of the one combined status command, exit codes, and sbatch's refusals of a
request. No connection here: ``ssh_slurm.py`` runs the commands.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import ComputeConfig
from ..states import RunState
from .base import JobStatus

# Separates the sections of the one combined status command's output.
MARK = "@@mantik@@"

# Slurm state words (first word: sacct says "CANCELLED by 1001").
ACTIVE = {
    "PENDING": RunState.QUEUED,
    "CONFIGURING": RunState.QUEUED,
    "REQUEUED": RunState.QUEUED,
    "REQUEUE_FED": RunState.QUEUED,
    "REQUEUE_HOLD": RunState.QUEUED,
    # Requeued and held (RequeueExitHold, `scontrol requeuehold State=SpecialExit`):
    # a release lets it run again.
    "SPECIAL_EXIT": RunState.QUEUED,
    # Pending and held (priority 0) because the reservation it asked for ended or was
    # deleted; it never starts unless released. squeue's reason says which reservation.
    "RESV_DEL_HOLD": RunState.QUEUED,
    "RESIZING": RunState.QUEUED,
    "SUSPENDED": RunState.QUEUED,
    "RUNNING": RunState.RUNNING,
    "COMPLETING": RunState.RUNNING,
    "STAGE_OUT": RunState.RUNNING,
    "SIGNALING": RunState.RUNNING,
    "STOPPED": RunState.RUNNING,
}
_FAILED = {"FAILED", "OUT_OF_MEMORY", "NODE_FAIL", "TIMEOUT", "BOOT_FAIL", "DEADLINE"}
_FINAL = _FAILED | {"COMPLETED", "CANCELLED", "PREEMPTED", "REVOKED"}


# sbatch's words for a request the cluster refuses, the config key (and Resources
# field) that made it, and what to do.
_SBATCH_REFUSALS = (
    (
        "invalid partition",
        "Queue",
        "queue",
        "use a partition of the cluster (`sinfo -s` lists them)",
    ),
    (
        "memory specification can not be satisfied",
        "MemoryPerNode",
        "memory_per_node",
        "ask for at most the memory of one node (`sinfo -o '%P %m'` lists it in MB), "
        "or 0 for the whole node",
    ),
    (
        "invalid generic resource",
        "GPUsPerNode",
        "gpus_per_node",
        "use a partition with GPUs, or at most as many as one node has (`sinfo -o '%P %G'`)",
    ),
    (
        "reservation is invalid",
        "Reservation",
        "reservation",
        "use a reservation you may use (`scontrol show reservation`)",
    ),
    (
        "invalid feature specification",
        "NodeConstraints",
        "node_constraints",
        "use features the nodes have (`sinfo -o '%P %f'` lists them)",
    ),
)


def sbatch_culprit(said: str, config: ComputeConfig | None) -> tuple[str, str] | None:
    """The config key (with its value) that sbatch's error points at, and what to do."""
    if config is None:
        return None
    lowered = said.lower()
    for words, key, field, hint in _SBATCH_REFUSALS:
        if words in lowered:
            value = getattr(config.resources, field)
            shown = f"({value} MB)" if key == "MemoryPerNode" else repr(value)
            return f"Resources.{key} {shown}", hint
    return None


def split_sections(text: str) -> dict[str, str]:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(MARK):
            current = sections.setdefault(line[len(MARK) :].strip(), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in sections.items()}


def parse_table(text: str, columns: int) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = line.strip().split("|")
        if len(cells) >= columns and cells[0]:
            rows[cells[0]] = cells[1:columns]
    return rows


def _exit_code(text: str | None) -> int | None:
    """Slurm's ``3:0`` (code:signal) or the exit-code file's ``3``."""
    if not text:
        return None
    head = text.strip().split(":")[0]
    return int(head) if head.lstrip("-").isdigit() else None


def decide(
    squeue: list[str] | None, sacct: list[str] | None, exitcode: list[str] | None
) -> JobStatus:
    """One job's status from what squeue, sacct and the exit-code file said.

    A final state wins over an active one (sacct lags a moment behind slurmctld,
    and squeue forgets a job ``MinJobAge`` after it ended); sacct is preferred
    among final states because it carries the exit code.
    """
    file_code = _exit_code(exitcode[0]) if exitcode else None
    sq_state = squeue[0].split()[0] if squeue and squeue[0].strip() else None
    sa_state = sacct[0].split()[0] if sacct and sacct[0].strip() else None
    if sa_state in _FINAL:
        assert sacct is not None
        return _final(sa_state, _exit_code(sacct[1]), file_code)
    if sq_state in _FINAL:
        return _final(sq_state, None, file_code)
    if sq_state in _HELD:
        said = squeue[1].strip() if squeue is not None and squeue[1:] else ""
        return JobStatus(ACTIVE[sq_state], sq_state, None, _HELD[sq_state](said))
    if sq_state in ACTIVE and squeue is not None and squeue[1:]:
        blocked = _BLOCKED.get(squeue[1].strip())
        if blocked:
            return JobStatus(ACTIVE[sq_state], sq_state, None, _blocked_reason(squeue[1], blocked))
    for word in (sq_state, sa_state):
        if word in ACTIVE:
            return JobStatus(ACTIVE[word], native_state=word)
    if file_code is not None:
        # Slurm forgot the job (no accounting, MinJobAge passed); the file remains.
        return _final("COMPLETED", None, file_code)
    return JobStatus(RunState.UNKNOWN, native_state=sq_state or sa_state or "")


# squeue's reasons for a pending job that asks for more than its partition can ever give:
# sites without EnforcePartLimits accept such a job, and it waits for good. What it asked
# for, and the sinfo format that lists what the partitions give.
_BLOCKED = {
    "PartitionNodeLimit": ("Resources.Nodes is more than the partition allows", "%P %D %c"),
    "PartitionConfig": (
        "Resources (TotalCPUs, CPUsPerNode, Nodes) ask for more CPUs than the partition's "
        "nodes have",
        "%P %D %c",
    ),
    "PartitionTimeLimit": (
        "Resources.Runtime is more than the partition's time limit",
        "%P %l",
    ),
}


def _blocked_reason(word: str, blocked: tuple[str, str]) -> str:
    what, columns = blocked
    return (
        f"waiting for good (Slurm: {word.strip()}): {what}. Cancel the run and submit "
        f"it again with a request the partition can meet (`sinfo -o '{columns}'`)."
    )


def _reservation_gone(said: str) -> str:
    # squeue's reason is the job's state description, "Reservation NAME was deleted".
    why = said or "its reservation was deleted"
    return (
        f"held by Slurm (RESV_DEL_HOLD: {why}): it will not start unless released. Cancel "
        "the run and submit it again with a Resources.Reservation that exists (`scontrol "
        "show reservation`) or without one."
    )


# Held states: the job waits, but not for its turn; what to tell the user.
_HELD: dict[str, Callable[[str], str]] = {"RESV_DEL_HOLD": _reservation_gone}


def _final(word: str, slurm_code: int | None, file_code: int | None) -> JobStatus:
    # The job script's own record beats Slurm's: a script may exit 0 after a failed command.
    code = file_code if file_code is not None else slurm_code
    if word == "COMPLETED":
        if code:
            return JobStatus(RunState.FAILED, word, code, f"exit code {code}")
        return JobStatus(RunState.FINISHED, word, code or 0)
    if word == "CANCELLED":
        return JobStatus(RunState.KILLED, word, code, "CANCELLED")
    if word == "FAILED":
        return JobStatus(RunState.FAILED, word, code, f"exit code {code}" if code else "FAILED")
    return JobStatus(RunState.FAILED, word, code, word)
