"""What UNICORE is told about a run (the job description) and how its answers become a
run's state. No I/O here: the backend (``unicore.py``) does the talking."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from typing import Any

from .. import layout
from ..config import ComputeConfig
from ..script import login_commands_script
from ..states import RunState
from .base import JobStatus
from .slurm_words import ended_by_slurm, sbatch_refusal

# JobProcessor/AsyncCommandProcessor: "Pre-command(s) failed: [Command exited with
# non-zero exit code: <2>. More information ...]".
_PRE_COMMAND_FAILED = re.compile(r"Pre-command\(s\) failed:.*?exit code: <(-?\d+)>", re.S)
# How much of mantik-login.log the reason of a failed login-node step shows.
LOGIN_TAIL_LINES = 8
LOGIN_TAIL_CHARS = 800
# Execution.handleCompleted: a batch job that wrote no exit code (killed by the batch
# system) fails with this message, and the batch system's details go into the job's log.
NOT_NORMALLY = "Job did not complete normally on BSS"
BSS_DETAILS = "Detailed job information from batch system:"
# The details are Slurm's `scontrol show job`: Key=Value fields over several lines.
_BSS_FIELD = re.compile(r"\b([A-Za-z]+)=(\S*)")
# JobProcessor.submitMainExecutable: the job did not get to the batch system. UNICORE/X
# takes any resource request with the job and checks it only then, after the stage-in
# and the user precommand: against the site's queues and their ranges (GrounderImpl),
# then sbatch (through the TSI) may refuse it.
NOT_SUBMITTED = "Could not submit job:"
_OUT_OF_RANGE = re.compile(r"Resource request <\s*(\w+)\s*=\s*(.*?)\s*> is out of range")
_NOT_IN_QUEUE = re.compile(r"Resource <(\w+)> is not available for partition <(.*?)>")
_NO_SUCH_QUEUE = re.compile(r"Partition/Queue <(.*?)> is not available")
# The TSI's reply when sbatch failed (Utils.run_command, newlines made ":").
_TSI_COMMAND = re.compile(r"TSI_FAILED: Command '.*?' failed with code -?\d+: (.*)", re.S)
# The site's resource names are Mantik's Resources keys; Project is the budget.
_CONFIG_KEY = {"Project": "ComputeBudgetAccount"}
# Slurm's words, as the Slurm backend reports them (docs/states.md).
_BSS_FAILURES = {
    "TIMEOUT", "DEADLINE", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "PREEMPTED", "REVOKED"
}  # fmt: skip
_ACTIVE = {
    "UNDEFINED": RunState.QUEUED,
    "READY": RunState.QUEUED,
    "STAGINGIN": RunState.QUEUED,
    "QUEUED": RunState.QUEUED,
    "RUNNING": RunState.RUNNING,
    "STAGINGOUT": RunState.RUNNING,
}


def job_description(config: ComputeConfig | None, job_name: str, run_id: str) -> dict[str, Any]:
    """The UNICORE job description of one run (no secret ever goes in here)."""
    description: dict[str, Any] = {
        "Name": batch_job_name(job_name),
        "Job type": "BATCH",
        "Executable": "bash",
        "Arguments": [layout.JOB_SCRIPT],
        "Stdout": layout.LOG_FILE,
        "Stderr": layout.LOG_FILE,
        "haveClientStageIn": "true",
        "Umask": "077",
        # Run ids are hex; they tell a login-node command which run it serves.
        "Environment": {"MLFLOW_RUN_ID": run_id, "MANTIK_RUN_ID": run_id},
        "Tags": ["mantik", f"mantik-run-{run_id}"],
        "User precommand": _pre_commands(()),
        "RunUserPrecommandOnLoginNode": "true",
    }
    if config is None:
        return description
    env = config.environment
    if env.pre_run_command_on_login_node:
        description["User precommand"] = _pre_commands(env.pre_run_command_on_login_node)
    if env.post_run_command_on_login_node:
        description["User postcommand"] = _post_commands(env.post_run_command_on_login_node)
        description["RunUserPostcommandOnLoginNode"] = "true"
        # UNICORE runs the user postcommand only after exit code 0 and fails the job when
        # it fails. As on the other backends it runs however the job ended, and the run's
        # state stays the job's: the job ends SUCCESSFUL with its exit code, which
        # decide() reads.
        description["IgnoreNonZeroExitCode"] = "true"
    resources = unicore_resources(config)
    if resources:
        description["Resources"] = resources
    if config.compute_budget_account:
        description["Project"] = config.compute_budget_account
    return description


def batch_job_name(name: str) -> str:
    """The job's name as UNICORE's Slurm TSI keeps it for the batch job (``--job-name``).

    The TSI replaces a name holding anything but ``0-9a-zA-Z.:=~/`` with ``UNICORE_job``,
    so the run's name (``safe_job_name``: letters, digits, ``.``, ``_``, ``-``) would show
    as that in the site's ``squeue`` and ``sacct`` whenever it held a ``-`` or ``_``, as
    most do. Those become ``.``: ``weather-forecast_v2`` shows as ``weather.forecast.v2``.
    """
    cleaned = re.sub(r"[^0-9A-Za-z.]+", ".", name).strip(".")
    return cleaned[:128] or "mantik"


def unicore_resources(config: ComputeConfig) -> dict[str, str]:
    """``Resources`` of the config as UNICORE resource requests (values as strings)."""
    res = config.resources
    values: dict[str, Any] = {
        "Queue": res.queue,
        "Runtime": _whole_minutes(res.runtime),
        "Nodes": res.nodes,
        "TotalCPUs": res.total_cpus,
        "CPUsPerNode": res.cpus_per_node,
        "GPUsPerNode": res.gpus_per_node,
        "MemoryPerNode": None if res.memory_per_node is None else f"{res.memory_per_node}M",
        "Reservation": res.reservation,
        "NodeConstraints": res.node_constraints,
        "QoS": res.qos,
    }
    return {key: str(value) for key, value in values.items() if value is not None}


def _whole_minutes(seconds: int | None) -> int | None:
    """A run time limit in seconds (UNICORE's unit for a plain number), rounded up to
    whole minutes. UNICORE's Slurm TSI writes ``--time`` in minutes, truncated: 90 s
    became 1 minute, and TSIs before 8.3 made anything under 60 s 0, which Slurm reads as
    no limit at all. Slurm itself rounds seconds up, so this asks for what the Slurm
    backend gets for the same Runtime, whatever the site's TSI."""
    if seconds is None:
        return None
    return -(-seconds // 60) * 60


def _pre_commands(commands: tuple[str, ...]) -> str:
    """The user precommand: unpack the code, then PreRunCommandOnLoginNode; output to
    mantik-login.log, the first failing step ends it with its status (UNICORE then
    fails the job)."""
    q = shlex.quote
    return (
        f"exec >> {layout.LOGIN_LOG_FILE} 2>&1\n"
        f"if [ -f {q(layout.PACKAGE_FILE)} ]; then mkdir -p {layout.CODE_DIR} && "
        f"tar -xzf {q(layout.PACKAGE_FILE)} -C {layout.CODE_DIR} || "
        '{ mantik_rc=$?; echo "[mantik] unpacking the code failed"; exit $mantik_rc; }; fi\n'
        + login_commands_script(commands, "PreRunCommandOnLoginNode")
    )


def _post_commands(commands: tuple[str, ...]) -> str:
    """The user postcommand: PostRunCommandOnLoginNode, its failure only logged."""
    script = login_commands_script(commands, "PostRunCommandOnLoginNode")
    lines = [
        f"exec >> {layout.LOGIN_LOG_FILE} 2>&1",
        f"bash -c {shlex.quote(script)} </dev/null",
        "exit 0",
    ]
    return "\n".join(lines) + "\n"


# ---- states ----------------------------------------------------------------------------


def bss_details(line: str) -> dict[str, str] | None:
    """The batch system's fields (``JobState``, ``TimeLimit``, ...) of a job log line in
    which UNICORE reported them, else None."""
    _, found, details = line.partition(BSS_DETAILS)
    return dict(_BSS_FIELD.findall(details)) if found else None


def decide(
    status: str,
    message: str,
    exit_code: int | None,
    bss: Mapping[str, str] | None = None,
    project: str | None = None,
    login_tail: str = "",
) -> JobStatus:
    """One job's status from UNICORE's ``status``, ``statusMessage`` and exit code, and
    the batch system's fields where UNICORE logged them (a job without an exit code).
    ``project``: the job's ``Project``, to name in a refusal of the account;
    ``login_tail``: the end of mantik-login.log, for a failed login-node step."""
    bss = bss or {}
    bss_state = bss.get("JobState")
    if status in _ACTIVE:
        return JobStatus(_ACTIVE[status], native_state=status)
    lowered = message.lower()
    if status == "SUCCESSFUL":
        if exit_code:
            return JobStatus(RunState.FAILED, status, exit_code, f"exit code {exit_code}")
        return JobStatus(RunState.FINISHED, status, 0)
    if status == "FAILED":
        if "abort" in lowered or "cancel" in lowered or bss_state == "CANCELLED":
            return JobStatus(RunState.KILLED, status, exit_code, "CANCELLED")
        if bss_state in _BSS_FAILURES:
            return JobStatus(RunState.FAILED, status, exit_code, _words(bss_state, bss))
        if "timeout" in lowered or "time limit" in lowered:
            return JobStatus(RunState.FAILED, status, exit_code, _words("TIMEOUT", bss))
        if "out_of_memory" in lowered or "out of memory" in lowered or "oom" in lowered.split():
            return JobStatus(RunState.FAILED, status, exit_code, _words("OUT_OF_MEMORY", bss))
        if exit_code:
            return JobStatus(RunState.FAILED, status, exit_code, f"exit code {exit_code}")
        refused = not_submitted(message, project)
        if refused:
            return JobStatus(RunState.FAILED, status, exit_code, refused)
        pre = _PRE_COMMAND_FAILED.match(message.strip())
        if pre:
            # UNICORE's message points at the job directory; say which file to read.
            # A reason is one line (the run's lists and the CLI show it so).
            lines = [line.strip() for line in login_tail.splitlines() if line.strip()]
            tail = " | ".join(lines[-LOGIN_TAIL_LINES:])[-LOGIN_TAIL_CHARS:]
            said = (
                f"; the end of {layout.LOGIN_LOG_FILE}: {tail}"
                if tail
                else f"; its output is in {layout.LOGIN_LOG_FILE}"
            )
            return JobStatus(
                RunState.FAILED,
                status,
                None,
                "unpacking the code or PreRunCommandOnLoginNode failed on the login node "
                f"(exit code {pre.group(1)}){said}",
            )
        first = message.strip().splitlines()[0] if message.strip() else "FAILED"
        return JobStatus(RunState.FAILED, status, exit_code, first)
    return JobStatus(RunState.UNKNOWN, native_state=status)


def login_step_failed(message: str) -> bool:
    """Whether UNICORE failed the job because the user precommand failed (unpacking the
    code, PreRunCommandOnLoginNode), whose output is in mantik-login.log."""
    return _PRE_COMMAND_FAILED.match(message.strip()) is not None


def needs_project(message: str) -> bool:
    """Whether the reason of a job that failed so names the budget account it asked for
    (the batch system refused it); UNICORE's message does not say it."""
    said = _tsi_said(message)
    return said is not None and (sbatch_refusal(said) or ("",))[0] == _CONFIG_KEY["Project"]


def _tsi_said(message: str) -> str | None:
    if not message.strip().startswith(NOT_SUBMITTED):
        return None
    found = _TSI_COMMAND.search(message)
    # The TSI made each line end of sbatch's output a ":".
    return found.group(1).strip().rstrip(":").strip() if found else None


def not_submitted(message: str, project: str | None = None) -> str | None:
    """The reason of a job the site would not pass to its batch system, naming the
    config key and value at fault and what to do; None for another failure."""
    text = message.strip()
    if not text.startswith(NOT_SUBMITTED):
        return None
    said = _tsi_said(text)
    if said is not None:
        refusal = sbatch_refusal(said)
        if refusal is None:
            return f"the site's batch system refused the job: {said}"
        # Not the Slurm backend's hint: it names commands of the cluster's login node,
        # which a user who reaches the site through UNICORE may have no shell on.
        key, _ = refusal
        if key == _CONFIG_KEY["Project"]:
            shown = f"{key} {project!r}" if project else f"{key} (not set)"
            return (
                f"the site's batch system refused the job because of {shown}: {said}; "
                f"set {key} to a compute budget (project) you belong to that may use the "
                "queue, as the site's user portal lists them"
            )
        return (
            f"the site's batch system refused the job because of {key}: {said}; ask for "
            "what the queue allows, as the site documents it"
        )
    found = _OUT_OF_RANGE.search(text)
    if found and found.group(1) == "Queue":
        return _unknown_queue(found.group(2))
    if found:
        name, value = found.groups()
        unit = " s" if name == "Runtime" else ""
        return (
            f"the site refused the job: {_key(name)} = {value}{unit} is outside what the "
            "site allows for the queue; ask for what the queue allows (the site documents "
            "its limits), or use a queue that allows it (Resources.Queue)"
        )
    found = _NOT_IN_QUEUE.search(text)
    if found:
        name, queue = found.groups()
        return (
            f"the site refused the job: queue {queue!r} has no resource {_key(name)}; "
            "leave it out, or use a queue that has it (Resources.Queue)"
        )
    found = _NO_SUCH_QUEUE.search(text)
    return _unknown_queue(found.group(1)) if found else None


def _key(name: str) -> str:
    return _CONFIG_KEY.get(name, f"Resources.{name}")


def _unknown_queue(queue: str) -> str:
    return (
        f"the site refused the job: Resources.Queue {queue!r} is not a queue (partition) "
        "you may use there; use one of the site's queues"
    )


def _words(state: str, bss: Mapping[str, str]) -> str:
    """The reason of a job the batch system ended: as a Slurm-over-SSH run says it."""
    return ended_by_slurm(state, bss) or state


def exit_code(value: Any) -> int | None:
    """UNICORE's ``exitCode`` ("0", 0, "3", absent). Not pyunicore's ``Job.exit_code``,
    which turns 0 into None."""
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else None
