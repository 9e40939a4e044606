"""What Slurm's commands say and what it means for a run: state words, the sections and
tables of the one combined status command, exit codes, and sbatch's refusals of a
request. No connection here: ``ssh_slurm.py`` runs the commands.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from ..config import ENV_COMPUTE_BUDGET_ACCOUNT, ComputeConfig, format_slurm_time
from ..states import RunState
from .base import RUN_CONFIG, JobStatus, config_file

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
    (
        # A QoS the cluster does not know, or one the account may not use.
        "invalid qos specification",
        "QoS",
        "qos",
        "use a QoS your account may use (`sacctmgr -n show assoc user=$USER "
        "format=account,partition,qos` lists them), or leave QoS out for the default",
    ),
    (
        # More than the partition's (or QoS's) time limit, where the site enforces it.
        "requested time limit is invalid",
        "Runtime",
        "runtime",
        "ask for at most the partition's time limit (`sinfo -o '%P %l'` lists them)",
    ),
    (
        # More nodes than the partition has or allows, where the site enforces it.
        "node count specification invalid",
        "Nodes",
        "nodes",
        "ask for at most as many nodes as the partition allows (`sinfo -o '%P %D'` lists "
        "how many it has)",
    ),
    # "Job violates accounting/QOS policy" comes with the limit's name in a line of its own:
    # QOSMaxWallDurationPerJobLimit, AssocMaxWallDurationPerJobLimit (sites with
    # DenyOnLimit or strict limits refuse such a job instead of letting it wait).
    (
        "maxwalldurationperjoblimit",
        "Runtime",
        "runtime",
        "ask for at most the time limit of your QoS or account (`sacctmgr -n show qos "
        "format=name,maxwall` lists them), or use a QoS that allows more (Resources.QoS)",
    ),
    (
        "maxnodeperjoblimit",
        "Nodes",
        "nodes",
        "ask for at most the node limit of your QoS or account (`sacctmgr -n show qos "
        "format=name,maxtresperjob` lists them), or use a QoS that allows more (Resources.QoS)",
    ),
)
# Not a field of Resources: the budget Slurm charges (--account), from the file's
# ComputeBudgetAccount or else the environment. Slurm says so for an account the cluster
# does not know, one the user is not in, and one not allowed in the partition; and for a
# user without a default account who named none.
_ACCOUNT_REFUSAL = "invalid account or account/partition combination specified"
_ACCOUNT_HINT = (
    "use an account (compute budget, project) you belong to and that may use the partition "
    "(`sacctmgr -n show assoc user=$USER format=account,partition` lists them)"
)


def sbatch_refusal(said: str) -> tuple[str, str] | None:
    """The config key sbatch's error points at (``ComputeBudgetAccount`` or
    ``Resources.<key>``) and what to do; None when sbatch's words name no key. For a
    refusal that reaches mantik without the config (UNICORE's TSI runs sbatch)."""
    lowered = said.lower()
    if _ACCOUNT_REFUSAL in lowered:
        return "ComputeBudgetAccount", _ACCOUNT_HINT
    for words, key, _field, hint in _SBATCH_REFUSALS:
        if words in lowered:
            return f"Resources.{key}", hint
    return None


def sbatch_culprit(said: str, config: ComputeConfig | None) -> tuple[str, str] | None:
    """What in the config sbatch's error points at (key, value and where it was set), and
    what to do; None when sbatch's words name no key."""
    if config is None:
        return None
    lowered = said.lower()
    if _ACCOUNT_REFUSAL in lowered:
        return _account_culprit(config), _ACCOUNT_HINT
    for words, key, field, hint in _SBATCH_REFUSALS:
        if words in lowered:
            value = getattr(config.resources, field)
            if value is None:
                shown = "(not set)"
            elif key == "MemoryPerNode":
                shown = f"({value} MB)"
            elif key == "Runtime":
                shown = f"({format_slurm_time(value)})"
            else:
                shown = repr(value)
            return f"Resources.{key} {shown} in {config_file(config)}", hint
    return None


def _account_culprit(config: ComputeConfig) -> str:
    account = config.compute_budget_account
    if account is None:
        return (
            f"ComputeBudgetAccount (not set: {config_file(config)} has none, nor does "
            f"{ENV_COMPUTE_BUDGET_ACCOUNT})"
        )
    if os.environ.get(ENV_COMPUTE_BUDGET_ACCOUNT) == account:
        # The file's key wins over the variable; with the same value either may be it.
        return (
            f"ComputeBudgetAccount {account!r} (in {config_file(config)}, or from "
            f"{ENV_COMPUTE_BUDGET_ACCOUNT} when the file sets none)"
        )
    return f"ComputeBudgetAccount {account!r} in {config_file(config)}"


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
            rows[cells[0]] = cells[1:]
    return rows


def _exit_code(text: str | None) -> int | None:
    """Slurm's ``3:0`` (code:signal) or the exit-code file's ``3``."""
    if not text:
        return None
    head = text.strip().split(":")[0]
    return int(head) if head.lstrip("-").isdigit() else None


def decide(
    squeue: list[str] | None,
    sacct: list[str] | None,
    exitcode: list[str] | None,
    users: dict[str, list[str]] | None = None,
    file_expected: bool = False,
) -> JobStatus:
    """One job's status from what squeue, sacct and the exit-code file said.

    A final state wins over an active one (sacct lags a moment behind slurmctld,
    and squeue forgets a job ``MinJobAge`` after it ended); sacct is preferred
    among final states because it carries the exit code. The rows are squeue's
    ``State|Reason|StartTime|NodeList|TimeLimit|EndTime`` and sacct's
    ``State|ExitCode|Start|NodeList|Timelimit|ReqMem|UID|End`` (the columns after the
    first two may be missing); a running or ended job gets its start time, an ended one
    its end time. ``users`` maps the
    uid in sacct's ``CANCELLED by UID`` to its name (and ``me`` to our own uid).
    ``file_expected``: the exit-code file was looked for (the run directory is known), so
    its absence means the job script never recorded an end.
    """
    unrecorded = file_expected and exitcode is None
    status = _decide_state(squeue, sacct, exitcode, _Context(users or {}, unrecorded))
    if status.state != RunState.RUNNING and not status.state.is_final:
        return status  # a pending job's StartTime is when Slurm expects to start it
    started = _started_at(squeue) or _started_at(sacct)
    if started:
        status = replace(status, started_at=started)
    if status.state.is_final:
        ended = _epoch_ms(_cell(sacct, 7)) or _epoch_ms(_cell(squeue, 5))
        if ended:
            status = replace(status, ended_at=ended)
    return status


def _epoch_ms(text: str) -> int | None:
    """A time Slurm gave as seconds since the epoch (``SLURM_TIME_FORMAT=%s``) in ms;
    None for ``Unknown``, ``None`` and the like."""
    return int(text) * 1000 if text.isdigit() and int(text) > 0 else None


def _started_at(row: list[str] | None) -> int | None:
    """The start of the job's latest attempt in ms (``SLURM_TIME_FORMAT=%s``), if it got
    nodes: a job cancelled while pending has the cancel time as its StartTime and no
    nodes (sacct: ``None assigned``)."""
    if not row or len(row) < 4:
        return None
    start, nodes = row[2].strip(), row[3].strip()
    if nodes in ("", "None assigned", "(null)"):
        return None
    return _epoch_ms(start)


def _decide_state(
    squeue: list[str] | None,
    sacct: list[str] | None,
    exitcode: list[str] | None,
    context: _Context,
) -> JobStatus:
    file_code = _exit_code(exitcode[0]) if exitcode else None
    sq_state = squeue[0].split()[0] if squeue and squeue[0].strip() else None
    sa_state = sacct[0].split()[0] if sacct and sacct[0].strip() else None
    if sa_state in _FINAL:
        assert sacct is not None
        return _final(sa_state, _exit_code(sacct[1]), file_code, _said(squeue, sacct, context))
    if sq_state in _FINAL:
        return _final(sq_state, None, file_code, _said(squeue, None, context))
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
# for, and how to submit it again (with the command that lists what the cluster gives).
def _partition(what: str, columns: str) -> tuple[str, str]:
    return what, f"a request the partition can meet (`sinfo -o '{columns}'`)"


def _limit(what: str, fix: str, columns: str) -> tuple[str, str]:
    return what, f"{fix} (`sacctmgr -n show qos format=name,{columns}` lists them)"


_CPUS = "Resources (TotalCPUs, CPUsPerNode, Nodes)"
_RUNTIME = _limit(
    "Resources.Runtime is more than the time limit of its QoS or account",
    "a shorter Resources.Runtime, or a Resources.QoS that allows more",
    "maxwall",
)
_NODES = _limit(
    "Resources.Nodes is more than its QoS or account allows per job",
    "fewer Resources.Nodes, or a Resources.QoS that allows more",
    "maxtresperjob",
)
_CPUS_PER_JOB = _limit(
    f"{_CPUS} ask for more CPUs than its QoS or account allows per job",
    "fewer CPUs, or a Resources.QoS that allows more",
    "maxtresperjob",
)
_CPUS_PER_NODE = _limit(
    f"{_CPUS} ask for more CPUs on a node than its QoS or account allows",
    "fewer CPUs per node, or a Resources.QoS that allows more",
    "maxtrespernode",
)
_CPU_MINUTES = _limit(
    f"{_CPUS} times Resources.Runtime is more CPU time than its QoS or account allows per job",
    "fewer CPUs or a shorter Resources.Runtime, or a Resources.QoS that allows more",
    "maxtresminsperjob",
)
_MEMORY_PER_JOB = _limit(
    "Resources.MemoryPerNode (times Nodes) is more memory than its QoS or account allows per job",
    "less Resources.MemoryPerNode, or a Resources.QoS that allows more",
    "maxtresperjob",
)
_MEMORY_PER_NODE = _limit(
    "Resources.MemoryPerNode is more than its QoS or account allows per node",
    "less Resources.MemoryPerNode, or a Resources.QoS that allows more",
    "maxtrespernode",
)
_GPUS_PER_JOB = _limit(
    "Resources.GPUsPerNode (times Nodes) is more GPUs than its QoS or account allows per job",
    "fewer Resources.GPUsPerNode, or a Resources.QoS that allows more",
    "maxtresperjob",
)
_GPUS_PER_NODE = _limit(
    "Resources.GPUsPerNode is more than its QoS or account allows per node",
    "fewer Resources.GPUsPerNode, or a Resources.QoS that allows more",
    "maxtrespernode",
)
_ASSOCIATIONS = "`sacctmgr -n show assoc user=$USER format=account,partition,qos` lists them"
_BLOCKED = {
    "PartitionNodeLimit": _partition(
        "Resources.Nodes is more than the partition allows", "%P %D %c"
    ),
    "PartitionConfig": _partition(
        f"{_CPUS} ask for more CPUs than the partition's nodes have", "%P %D %c"
    ),
    "PartitionTimeLimit": _partition(
        "Resources.Runtime is more than the partition's time limit", "%P %l"
    ),
    # Per-job limits of the job's QoS or association (account, user), where the QoS lacks
    # DenyOnLimit and the site lets such a job wait: it never fits, however long it waits.
    # Not the Grp* and *PerUser limits: those clear when other jobs end.
    "QOSMaxWallDurationPerJobLimit": _RUNTIME,
    "AssocMaxWallDurationPerJobLimit": _RUNTIME,
    "QOSMaxNodePerJobLimit": _NODES,
    "AssocMaxNodePerJobLimit": _NODES,
    "QOSMaxCpuPerJobLimit": _CPUS_PER_JOB,
    "AssocMaxCpuPerJobLimit": _CPUS_PER_JOB,
    "QOSMaxCpuPerNode": _CPUS_PER_NODE,
    "AssocMaxCpuPerNode": _CPUS_PER_NODE,
    "QOSMaxCpuMinutesPerJobLimit": _CPU_MINUTES,
    "AssocMaxCpuMinutesPerJobLimit": _CPU_MINUTES,
    "QOSMaxMemoryPerJob": _MEMORY_PER_JOB,
    "AssocMaxMemPerJob": _MEMORY_PER_JOB,
    "QOSMaxMemoryPerNode": _MEMORY_PER_NODE,
    "AssocMaxMemPerNode": _MEMORY_PER_NODE,
    "QOSMaxGRESPerJob": _GPUS_PER_JOB,
    "AssocMaxGRESPerJob": _GPUS_PER_JOB,
    "QOSMaxGRESPerNode": _GPUS_PER_NODE,
    "AssocMaxGRESPerNode": _GPUS_PER_NODE,
    "QOSMinCpuNotSatisfied": _limit(
        f"{_CPUS} ask for fewer CPUs than its QoS requires",
        "more CPUs, or a Resources.QoS without that minimum",
        "mintres",
    ),
    # The account or QoS went away (or the user left it) after the job was accepted, or
    # the partition does not admit it (AllowAccounts/DenyAccounts, AllowQos/DenyQos).
    "InvalidAccount": (
        "ComputeBudgetAccount is not an account the user may use (any more)",
        f"an account you belong to ({_ASSOCIATIONS})",
    ),
    "AccountNotAllowed": (
        "the partition (Resources.Queue) does not admit the account ComputeBudgetAccount",
        "another ComputeBudgetAccount or Resources.Queue (`scontrol show partition` lists "
        "each partition's AllowAccounts and DenyAccounts)",
    ),
    "InvalidQOS": (
        "Resources.QoS is not a QoS the account may use (any more)",
        f"a Resources.QoS your account may use ({_ASSOCIATIONS}), or without one",
    ),
    "QOSNotAllowed": (
        "the partition (Resources.Queue) does not admit the QoS Resources.QoS",
        "another Resources.QoS or Resources.Queue (`scontrol show partition` lists each "
        "partition's AllowQos and DenyQos)",
    ),
}


def waiting_for_good(reason: str) -> str | None:
    """What a pending job's Slurm reason (``Reason=`` of ``scontrol show job``) means when
    the job can never start as it asked; None for a reason that clears by waiting. For a
    cluster reached without a shell (UNICORE): without the commands that list limits."""
    blocked = _BLOCKED.get(reason.strip())
    if blocked is None:
        return None
    what, how = blocked
    return _blocked_reason(reason, (what, how.split(" (`")[0]))


def _blocked_reason(word: str, blocked: tuple[str, str]) -> str:
    what, how = blocked
    return (
        f"waiting for good (Slurm: {word.strip()}): {what}. Cancel the run and submit "
        f"it again with {how}."
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


@dataclass(frozen=True)
class _Said:
    """What Slurm said of an ended job beyond its state word, for the run's reason."""

    reason: str = ""  # squeue's reason (job_reason_string), while squeue remembers the job
    nodes: str = ""
    time_limit: str = ""
    memory: str = ""  # sacct's ReqMem: what the job asked for
    exit_code: str = ""  # sacct's ExitCode as it said it (code:signal)
    cancelled_by: str = ""  # the name (or uid) of who cancelled it, when not its owner
    unrecorded: bool = False  # the job script wrote no exit-code file


@dataclass(frozen=True)
class _Context:
    users: dict[str, list[str]]  # uid -> [name], and "me" -> [our uid]
    unrecorded: bool


def _cell(row: list[str] | None, index: int) -> str:
    return row[index].strip() if row and len(row) > index else ""


# Placeholders where Slurm has no value; none of them tells the user anything.
_NO_VALUE = {"", "None", "None assigned", "(null)", "N/A", "UNLIMITED", "Partition_Limit"}


_TIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")  # [days-]hours:minutes:seconds, or less
_MEMORY = re.compile(r"^\d+(\.\d+)?[KMGTP]$")


def _first(*values: str) -> str:
    return next((v for v in values if v not in _NO_VALUE), "")


def _said(squeue: list[str] | None, sacct: list[str] | None, context: _Context) -> _Said:
    users = context.users
    by = _cell(sacct, 0).partition(" by ")[2].strip()  # "CANCELLED by 0"
    # Whoever we log in as submitted the job; else the job's owner as sacct says it.
    me = _cell(users.get("me"), 0) or _cell(sacct, 6)
    cancelled_by = ""
    if by and by != me:
        name = _cell(users.get(by), 0)
        cancelled_by = f"user {name}" if name else f"uid {by}"
    # Right after a job ended sacct may say nonsense for a moment ("16?" for ReqMem, an
    # empty Timelimit): only values of the right shape count.
    memory = _cell(sacct, 5)
    memory = memory[:-1] if memory[-1:] in ("n", "c") else memory  # per node, per CPU
    return _Said(
        reason=_first(_cell(squeue, 1)),
        nodes=_first(_cell(sacct, 3), _cell(squeue, 3)),
        time_limit=_first(*(t for t in (_cell(sacct, 4), _cell(squeue, 4)) if _TIME.match(t))),
        memory=memory if _MEMORY.match(memory) else "",
        exit_code=_cell(sacct, 1),
        cancelled_by=cancelled_by,
        unrecorded=context.unrecorded,
    )


_AGAIN = "Submit the run again; if it keeps happening, tell the site's admins."


def _on(nodes: str) -> str:
    return f"node {nodes}" if nodes else "its node"


def _ended_by_slurm(word: str, said: _Said) -> str | None:
    """Why Slurm ended the job itself, in words, with what to do; None for an end of the
    job's own program (its exit code says it) or a cancel by its owner."""
    if word == "TIMEOUT":
        limit = f"time limit of {said.time_limit}" if said.time_limit else "time limit"
        return (
            f"Slurm ended the job: {limit} reached. Raise Resources.Runtime in {RUN_CONFIG} "
            "(at most the partition's limit, `sinfo -o '%P %l'`) and submit the run again."
        )
    if word == "OUT_OF_MEMORY":
        asked = f"the {said.memory} " if said.memory else "what "
        return (
            f"Slurm ended the job: out of memory (the job used more than {asked}it asked "
            f"for, Resources.MemoryPerNode). Raise Resources.MemoryPerNode in {RUN_CONFIG} (at "
            "most a node's memory, `sinfo -o '%P %m'` in MB) and submit the run again."
        )
    if word == "NODE_FAIL" or (word == "FAILED" and said.reason == "NodeDown"):
        return f"Slurm ended the job: {_on(said.nodes)} failed. {_AGAIN}"
    if word == "BOOT_FAIL":
        return f"Slurm ended the job: {_on(said.nodes)} failed to boot for it. {_AGAIN}"
    if word == "DEADLINE":
        return "Slurm ended the job: its deadline passed before it could end. " + _AGAIN
    if word == "PREEMPTED":
        return (
            "Slurm ended the job: a job of higher priority preempted it. Submit the run "
            "again, or choose a Resources.Queue or Resources.QoS whose jobs are not preempted."
        )
    if word == "REVOKED":
        return "Slurm revoked the job: a copy of it ran on another cluster of the federation."
    if word == "CANCELLED":
        if not said.cancelled_by:
            return None
        return (
            f"Slurm ended the job: cancelled by {said.cancelled_by} (not you). Ask the "
            "site why before you submit the run again."
        )
    if said.reason == "JobLaunchFailure":
        return (
            f"Slurm could not launch the job on {_on(said.nodes)} (JobLaunchFailure): "
            "its script never ran. slurmd's log on that node says why; often the node "
            "cannot write the run's log in SSH.RemoteDirectory (not on a file system the "
            f"compute nodes share) or the job's credential was revoked. {_AGAIN}"
        )
    if said.reason == "SystemFailure":
        return f"Slurm ended the job: a failure of the cluster (SystemFailure). {_AGAIN}"
    return None


def ended_by_slurm(word: str, details: Mapping[str, str]) -> str | None:
    """``_ended_by_slurm`` for Slurm's ``scontrol show job`` fields as a site reported
    them (UNICORE logs them for a job its batch system ended): the same words as a
    Slurm-over-SSH run, with what to do."""

    def field(name: str, shape: re.Pattern[str] | None = None) -> str:
        value = _first(str(details.get(name, "")).strip())
        return value if shape is None or shape.match(value) else ""

    said = _Said(
        reason=field("Reason"),
        nodes=field("NodeList"),
        time_limit=field("TimeLimit", _TIME),
        memory=field("MinMemoryNode", _MEMORY),
    )
    return _ended_by_slurm(word, said)


def _final(
    word: str, slurm_code: int | None, file_code: int | None, said: _Said | None = None
) -> JobStatus:
    said = said or _Said()
    # The job script's own record beats Slurm's: a script may exit 0 after a failed command.
    code = file_code if file_code is not None else slurm_code
    if word == "COMPLETED":
        if code:
            return JobStatus(RunState.FAILED, word, code, f"exit code {code}")
        return JobStatus(RunState.FINISHED, word, code or 0)
    # A script that recorded a failure ran to its end: Slurm did not stop it.
    slurm = None if word == "FAILED" and file_code else _ended_by_slurm(word, said)
    if word == "CANCELLED":
        # Slurm's ExitCode of a cancelled job is 0:0 or 0:15, no exit status of the
        # script's: it showed as 'Exit code: 0' beside KILLED, as if the job ended well.
        return JobStatus(RunState.KILLED, word, file_code, slurm or "CANCELLED")
    if slurm:
        return JobStatus(RunState.FAILED, word, code, slurm)
    if word == "FAILED" and said.unrecorded:
        # Slurm's exit code is not the program's: a launch slurmd refused (a revoked job
        # credential) is FAILED 1:0, and squeue, which would say so, forgot the job.
        shown = f" (ExitCode {said.exit_code})" if said.exit_code else ""
        return JobStatus(
            RunState.FAILED,
            word,
            code,
            f"Slurm ended the job as FAILED{shown} before its script recorded an exit "
            "status: Slurm could not launch it on its node, or stopped it on the way. "
            f"mantik.log shows how far it got. {_AGAIN}",
        )
    if word == "FAILED":
        if code:
            return JobStatus(RunState.FAILED, word, code, f"exit code {code}")
        if said.exit_code:
            return JobStatus(
                RunState.FAILED,
                word,
                code,
                f"Slurm marked the job FAILED (ExitCode {said.exit_code}) without saying "
                "why; the run's log (mantik.log) may tell more.",
            )
        return JobStatus(RunState.FAILED, word, code, "FAILED")
    return JobStatus(RunState.FAILED, word, code, word)
