"""The bash job script that runs one MLproject entry point on a compute system.

The script is started with the run directory as working directory. That
directory holds ``code/`` (the unpacked project) and, for a moment,
``.mantik-credentials`` (mode 0600, ``KEY=VALUE`` lines) with the tracking
credential. The script reads that file without evaluating it, deletes it (under
Slurm when it ends, as a requeued job starts it again), and exports only the three
MLflow credential variables, so the secret is never part of the script text, a
command line or the log.

Every value from the config or the run that reaches the shell is quoted, except
the Pre-/PostRunCommand entries, which are shell code by intent and run as the
user wrote them, each on its own lines. Values in ``#SBATCH`` lines cannot be
quoted (sbatch parses them itself), so they are validated instead.

Paths and variable values may refer to environment variables as ``$NAME`` or
``${NAME}`` (Mantik's configs use ``$PROJECT/...`` on JSC systems); those
references are expanded, and nothing else is: no command substitution, no
globbing, no word splitting.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Literal
from urllib.parse import urlparse

from ..errors import ConfigError
from .config import (
    RESERVED_VARIABLES,
    SLURM_VALUE_RULES,
    Apptainer,
    ComputeConfig,
    check_slurm_value,
    format_slurm_time,
)
from .layout import CODE_DIR, CREDENTIALS_FILE, EXIT_CODE_FILE, LOG_FILE

# "slurm": the script is a batch script we submit with sbatch. "unicore": UNICORE submits
# it to the site's batch system, which we do not control. "none": a plain process.
Scheduler = Literal["slurm", "unicore", "none"]

CREDENTIAL_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")

_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ID = re.compile(r"[A-Za-z0-9._-]+")
_VARIABLE_REFERENCE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_JOB_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")


def safe_job_name(name: str) -> str:
    """A Slurm job name made from any text (e.g. a run name): safe for ``#SBATCH``."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return (cleaned or "mantik")[:128]


def render_job_script(
    config: ComputeConfig,
    *,
    command: str,
    run_id: str,
    experiment_id: str,
    tracking_uri: str,
    job_name: str,
    scheduler: Scheduler,
    project_dir: str | os.PathLike[str] | None = None,
) -> str:
    """The job script for one run. Raises ``ConfigError`` for values that cannot be used.

    ``project_dir`` is the directory the code package was built from; it is needed for a
    local Apptainer image, whose place in the package depends on where the image is.
    """
    _check_ids(run_id=run_id, experiment_id=experiment_id, tracking_uri=tracking_uri)
    if scheduler not in ("slurm", "unicore", "none"):
        raise ValueError(f"unknown scheduler {scheduler!r}; expected slurm, unicore or none")
    lines = ["#!/bin/bash"]
    if scheduler == "slurm":
        lines += sbatch_lines(config, job_name)
    lines += _preamble(run_id, scheduler)
    lines += _credentials(scheduler)
    lines += _tracking_exports(run_id, experiment_id, tracking_uri)
    lines += _user_environment(config)
    lines += _entry_point(config, command, scheduler, project_dir)
    lines += _post_run(config)
    lines += ['exit "$mantik_status"', ""]
    return "\n".join(lines)


def sbatch_lines(config: ComputeConfig, job_name: str) -> list[str]:
    """``#SBATCH`` lines from Resources, each value validated against Slurm's syntax."""
    if not _JOB_NAME.fullmatch(job_name):
        raise ConfigError(
            f"job name {job_name!r} cannot go into a #SBATCH line; use letters, digits, "
            "'.', '_' and '-' (at most 128), e.g. through safe_job_name()"
        )
    res = config.resources
    options: list[tuple[str, str | int | None]] = [
        ("job-name", job_name),
        ("partition", _checked("Queue", res.queue)),
        ("account", _checked("ComputeBudgetAccount", config.compute_budget_account)),
        ("time", _slurm_time(res.runtime)),
        ("nodes", _positive("Nodes", res.nodes)),
        ("ntasks", _positive("TotalCPUs", res.total_cpus)),
        ("ntasks-per-node", _positive("CPUsPerNode", res.cpus_per_node)),
        ("gpus-per-node", _positive("GPUsPerNode", res.gpus_per_node, minimum=0)),
        ("mem", _slurm_memory(res.memory_per_node)),
        ("reservation", _checked("Reservation", res.reservation)),
        ("constraint", _checked("NodeConstraints", res.node_constraints)),
        ("qos", _checked("QoS", res.qos)),
        # Relative to the job's working directory: the run directory.
        ("output", LOG_FILE),
        ("error", LOG_FILE),
        # A requeued job (node failure, preemption, scontrol requeue) starts the script
        # again; appending keeps the first attempt's log and the offsets of log readers.
        ("open-mode", "append"),
    ]
    return [f"#SBATCH --{name}={value}" for name, value in options if value is not None]


def _checked(key: str, value: str | None) -> str | None:
    if value is None:
        return None
    assert key in SLURM_VALUE_RULES
    problem = check_slurm_value(key, value)
    if problem:
        where = key if key == "ComputeBudgetAccount" else f"Resources.{key}"
        raise ConfigError(f"{where}: {problem}")
    return value


def _slurm_time(seconds: int | None) -> str | None:
    seconds = _positive("Runtime", seconds, minimum=0)
    if seconds is None:
        return None
    # Slurm's own spelling of "no time limit" (up to the partition's limit), as Mantik wrote it.
    return "0" if seconds == 0 else format_slurm_time(seconds)


def _slurm_memory(megabytes: int | None) -> str | None:
    megabytes = _positive("MemoryPerNode", megabytes, minimum=0)
    if megabytes is None:
        return None
    # --mem=0: all of the node's memory, the usual HPC spelling of it.
    return "0" if megabytes == 0 else f"{megabytes}M"


def _positive(key: str, value: int | None, minimum: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"Resources.{key}: expected an integer of at least {minimum}, got {value!r}"
        )
    return value


def _check_ids(*, run_id: str, experiment_id: str, tracking_uri: str) -> None:
    # These come from MLflow, not from the user; a bad one is a programming error.
    for name, value in (("run_id", run_id), ("experiment_id", experiment_id)):
        if not _ID.fullmatch(value):
            raise ValueError(f"{name} {value!r} is not an MLflow id")
    parsed = urlparse(tracking_uri)
    if parsed.password or parsed.username:
        raise ValueError(
            "the tracking URI carries a credential; pass it through the credentials file instead"
        )
    if "\n" in tracking_uri or "\r" in tracking_uri:
        raise ValueError("the tracking URI must be one line")


def _preamble(run_id: str, scheduler: Scheduler) -> list[str]:
    lines = [
        f"# mantik-jupyter job script for MLflow run {run_id}.",
        "# Started with the run directory as working directory.",
        "set -uo pipefail",
        'RUN_DIR="$PWD"',
        # An earlier attempt's exit status (a requeued job) is not this attempt's.
        f'rm -f -- "$RUN_DIR/{EXIT_CODE_FILE}"',
    ]
    if scheduler == "slurm":
        lines.append(
            'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then echo "[mantik] Slurm requeued '
            'the job: attempt $((SLURM_RESTART_COUNT + 1)) of the run starts"; fi'
        )
    return lines + [
        "mantik_status=0",
        "mantik_fail() {",
        '    echo "[mantik] $2 failed with exit status $1" >&2',
        f'    echo "$1" > "$RUN_DIR/{EXIT_CODE_FILE}"',
        '    echo "[mantik] exit status $1"',
        '    exit "$1"',
        "}",
    ]


def _credentials(scheduler: Scheduler) -> list[str]:
    keys = "|".join(CREDENTIAL_KEYS)
    traps = ["trap 'rm -f -- \"$MANTIK_CREDENTIALS\"' EXIT"]
    if scheduler == "slurm":
        # Slurm may requeue the job (node failure, preemption, scontrol requeue) and start
        # this script again, which then needs the credential too. So the file goes when
        # the script ends by itself, not when it starts; when a signal ended the script
        # or its entry point (requeue, cancel, time limit: Slurm cannot tell the script
        # which, and signals the job's processes one by one) it stays, and the backend
        # deletes it once the run is over. The job's environment holds it meanwhile anyway.
        remove_now: list[str] = []
        traps = [
            "trap '[ \"${mantik_status:-0}\" -ge 128 ] || rm -f -- \"$MANTIK_CREDENTIALS\"' EXIT",
            "trap 'trap - EXIT; exit 143' TERM",
        ]
        when = "the file is removed when the script ends."
    else:
        remove_now = ['    rm -f -- "$MANTIK_CREDENTIALS"']
        when = "the file is removed at once."
    return [
        "# The tracking credential arrives in a 0600 file; it is read as data (no",
        f"# source/eval), only known keys are taken, and {when}",
        f'MANTIK_CREDENTIALS="$RUN_DIR/{CREDENTIALS_FILE}"',
        *traps,
        'if [ -f "$MANTIK_CREDENTIALS" ]; then',
        # Split at the first '=' by hand: `IFS='=' read k v` would drop a trailing
        # '=' of the value, which base64 tokens end with.
        '    while IFS= read -r mantik_line || [ -n "$mantik_line" ]; do',
        '        mantik_key="${mantik_line%%=*}"',
        '        case "$mantik_key" in',
        f'            {keys}) export "$mantik_key=${{mantik_line#*=}}" ;;',
        "        esac",
        '    done < "$MANTIK_CREDENTIALS"',
        *remove_now,
        "fi",
        "unset mantik_line mantik_key",
    ]


def _tracking_exports(run_id: str, experiment_id: str, tracking_uri: str) -> list[str]:
    return [
        f"export MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)}",
        f"export MLFLOW_RUN_ID={shlex.quote(run_id)}",
        f"export MLFLOW_EXPERIMENT_ID={shlex.quote(experiment_id)}",
    ]


def _user_environment(config: ComputeConfig) -> list[str]:
    env = config.environment
    lines = [
        f'cd "$RUN_DIR/{CODE_DIR}" || '
        f'mantik_fail 1 "entering the code directory $RUN_DIR/{CODE_DIR}"',
        # Module systems, venv activation and user commands are rarely safe
        # under `set -u`; the script's own variables are all set by now.
        "set +u",
    ]
    for name, value in env.variables.items():
        if not _SHELL_NAME.fullmatch(name):
            raise ConfigError(f"Environment.Variables: {name!r} is not a valid variable name")
        if name in RESERVED_VARIABLES:
            continue
        lines.append(f"export {name}={expand_quoted(value)}")
    if env.modules:
        lines += _module_init()
        for module in env.modules:
            lines.append(
                f"module load {shlex.quote(module)} || "
                f"mantik_fail $? {shlex.quote('module load ' + module)}"
            )
    lines += _user_commands(env.pre_run_command_on_compute_node, "PreRunCommandOnComputeNode", True)
    if env.python is not None:
        activate = expand_quoted(env.python.rstrip("/") + "/bin/activate")
        lines.append(f"source {activate} || mantik_fail $? 'activating the venv'")
    return lines


def _module_init() -> list[str]:
    # A batch shell is not a login shell, so `module` may be undefined; load the
    # usual Lmod/Environment Modules init scripts when it is.
    return [
        "if ! type module >/dev/null 2>&1; then",
        "    for mantik_init in /etc/profile.d/lmod.sh /etc/profile.d/modules.sh \\",
        "            /usr/share/lmod/lmod/init/bash /usr/share/modules/init/bash; do",
        '        if [ -f "$mantik_init" ]; then . "$mantik_init"; break; fi',
        "    done",
        "fi",
    ]


def _user_commands(commands: tuple[str, ...], key: str, stop_on_failure: bool) -> list[str]:
    lines: list[str] = []
    for index, command in enumerate(commands):
        label = f"{key}[{index}]"
        lines.append(f"echo {shlex.quote(f'[mantik] {label}')}")
        # User shell code, as written. The blank line ends a trailing
        # backslash continuation so the status check stays a command of its own.
        lines += [command, ""]
        if stop_on_failure:
            quoted = shlex.quote(label)
            lines.append(
                f'mantik_rc=$?; [ "$mantik_rc" -eq 0 ] || mantik_fail "$mantik_rc" {quoted}'
            )
        else:
            lines.append(
                f'mantik_rc=$?; [ "$mantik_rc" -eq 0 ] || '
                f'echo "[mantik] {label} failed with exit status $mantik_rc" >&2'
            )
    return lines


def _entry_point(
    config: ComputeConfig,
    command: str,
    scheduler: Scheduler,
    project_dir: str | os.PathLike[str] | None,
) -> list[str]:
    run = f"bash -c {shlex.quote(command)}"
    apptainer = config.environment.apptainer
    if apptainer is not None:
        image = _image(apptainer, project_dir)
        words = ["apptainer", "run", *_apptainer_options(apptainer), image, run]
        if scheduler == "slurm":
            words.insert(0, "srun")
            run = " ".join(words)
        elif scheduler == "unicore":
            # Mantik runs the container with srun, so a job of N tasks runs N copies
            # (distributed training). A UNICORE site's batch system is known only on it:
            # srun where the job is a Slurm job, the container alone elsewhere.
            container = " ".join(words)
            run = (
                'if [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null 2>&1; '
                f"then srun {container}; else {container}; fi"
            )
        else:
            run = " ".join(words)
    return [
        f"echo {shlex.quote('[mantik] starting entry point: ' + command)}",
        run,
        "mantik_status=$?",
        f'echo "$mantik_status" > "$RUN_DIR/{EXIT_CODE_FILE}"',
        'echo "[mantik] exit status $mantik_status"',
    ]


def _apptainer_options(apptainer: Apptainer) -> list[str]:
    words: list[str] = []
    for option in apptainer.options:
        try:
            words += [expand_quoted(word) for word in shlex.split(option)]
        except ValueError as exc:
            raise ConfigError(
                f"Environment.Apptainer.Options: {option!r} cannot be split into words ({exc})"
            ) from None
    return words


def _image(apptainer: Apptainer, project_dir: str | os.PathLike[str] | None) -> str:
    if apptainer.type == "remote":
        return expand_quoted(apptainer.path)
    if project_dir is None:
        # Guessing would give a path the package may not have; the job would fail
        # on the cluster, after waiting in the queue, with "image not found".
        raise ValueError(
            "render_job_script needs project_dir for a local Apptainer image "
            f"({apptainer.path!r}): its place in the package depends on the project"
        )
    relative = apptainer.package_path(project_dir)
    return f'"$RUN_DIR/{CODE_DIR}"/{shlex.quote(relative)}'


def _post_run(config: ComputeConfig) -> list[str]:
    commands = config.environment.post_run_command_on_compute_node
    # The entry point's status is already recorded; a failing post command is only reported.
    return _user_commands(commands, "PostRunCommandOnComputeNode", False)


def expand_quoted(value: str) -> str:
    """``value`` as one shell word in which only ``$NAME``/``${NAME}`` expand.

    A leading ``~/`` means the home directory, as users expect of paths.
    Everything else is literal: ``$(...)``, backticks, ``;``, globs, spaces.
    """
    if "\n" in value or "\r" in value or "\0" in value:
        raise ConfigError(f"{value[:40]!r}...: a path or value must be one line")
    parts: list[str] = []
    rest = value
    if rest == "~" or rest.startswith("~/"):
        parts.append('"$HOME"')
        rest = rest[1:]
    position = 0
    for match in _VARIABLE_REFERENCE.finditer(rest):
        if match.start() > position:
            parts.append(shlex.quote(rest[position : match.start()]))
        parts.append(f'"${{{match.group(1) or match.group(2)}}}"')
        position = match.end()
    if position < len(rest) or not parts:
        parts.append(shlex.quote(rest[position:]))
    return "".join(parts)


def expanded_names(value: str) -> list[str]:
    """The variables ``expand_quoted(value)`` expands, each once, in order (``HOME`` for
    a leading ``~``)."""
    names = ["HOME"] if value == "~" or value.startswith("~/") else []
    names += [m.group(1) or m.group(2) for m in _VARIABLE_REFERENCE.finditer(value)]
    return list(dict.fromkeys(names))


def login_commands_script(commands: tuple[str, ...], key: str) -> str:
    """bash text running the config's login-node commands (``key`` names them in the log)
    in order; the first failing one ends it with its status. The same text on every
    backend that runs them."""
    lines: list[str] = []
    for index, command in enumerate(commands):
        label = f"{key}[{index}]"
        lines.append(f"echo {shlex.quote(f'[mantik] {label}')}")
        # User shell code, as written; the blank line ends a trailing continuation.
        lines += [command, ""]
        lines.append(
            f'mantik_rc=$?; [ "$mantik_rc" -eq 0 ] || {{ echo "[mantik] {label} failed '
            f'with exit status $mantik_rc"; exit "$mantik_rc"; }}'
        )
    return "\n".join(lines) + "\n"
