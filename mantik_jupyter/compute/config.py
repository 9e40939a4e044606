"""Mantik's compute backend config: load, validate, normalise.

Existing ``compute-backend-config.yaml|.yml|.json`` files of Mantik work
unchanged. Where Mantik was silent or fragile this module is loud and precise:
an unknown key is an error that names the file, line and key path and suggests
the close valid key; old key names still work but produce a warning naming the
new one; memory and runtime accept the spellings people actually write.

All problems of one file are collected and raised as one ``ConfigError``, one
problem per line, so a user fixes the file in one pass.

Secrets (SSH password or private key) only ever come from the environment,
are kept out of ``repr`` and never appear in ``to_dict`` or in a message.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shlex
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml

from ..errors import ConfigError
from .packaging import package_place

CONFIG_FILENAMES = (
    "compute-backend-config.yaml",
    "compute-backend-config.yml",
    "compute-backend-config.json",
)

Backend = Literal["ssh", "unicore", "firecrest", "local"]
# What a plain-number Runtime counts: each scheduler's own reading of one.
PlainRuntimeUnit = Literal["minutes", "seconds"]
KeyPath = tuple[str | int, ...]

ENV_SSH_USERNAME = "MANTIK_SSH_USERNAME"
ENV_SSH_PRIVATE_KEY = "MANTIK_SSH_PRIVATE_KEY"  # the key itself, not a path
ENV_SSH_PASSWORD = "MANTIK_SSH_PASSWORD"  # noqa: S105 - a variable name
ENV_COMPUTE_BUDGET_ACCOUNT = "MANTIK_COMPUTE_BUDGET_ACCOUNT"

# Mantik set these for every run; a value in the config would fight the run's own.
RESERVED_VARIABLES = frozenset(
    {
        "MLFLOW_TRACKING_URI",
        "MLFLOW_RUN_ID",
        "MLFLOW_EXPERIMENT_ID",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
    }
)

# Values that end up in ``#SBATCH`` lines cannot be shell-quoted (sbatch parses
# them itself), so they are restricted to what Slurm names actually use.
_SLURM_NAME = re.compile(r"[A-Za-z0-9._+-]+(,[A-Za-z0-9._+-]+)*")
_SLURM_CONSTRAINT = re.compile(r"[A-Za-z0-9._,&|()\[\]*:!+-]+")
SLURM_VALUE_RULES: dict[str, tuple[re.Pattern[str], str]] = {
    "Queue": (_SLURM_NAME, "letters, digits, '.', '_', '+', '-' (comma-separated list allowed)"),
    "Reservation": (_SLURM_NAME, "letters, digits, '.', '_', '+', '-' (comma-separated)"),
    "QoS": (_SLURM_NAME, "letters, digits, '.', '_', '+', '-'"),
    "ComputeBudgetAccount": (_SLURM_NAME, "letters, digits, '.', '_', '+', '-'"),
    "NodeConstraints": (
        _SLURM_CONSTRAINT,
        "letters, digits and Slurm's constraint operators . _ , & | ( ) [ ] * : ! + -",
    ),
}

_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class MantikConfigWarning(UserWarning):
    """Something in a config that works but deserves the user's attention."""


class MantikDeprecationWarning(MantikConfigWarning):
    """An old Mantik key name that still works; the message names the new one.

    A ``UserWarning`` (not ``DeprecationWarning``) on purpose: Python hides
    ``DeprecationWarning`` outside ``__main__``, and the reader here is the
    person who wrote the config, not a developer.
    """


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class SshSection:
    hostname: str
    port: int = 22
    username: str | None = None
    identity_file: str | None = None
    known_hosts_file: str | None = None
    remote_directory: str | None = None
    # Secrets come only from the environment; repr=False keeps them out of logs.
    private_key: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return _without_none(
            {
                "Hostname": self.hostname,
                "Port": self.port,
                "Username": self.username,
                "IdentityFile": self.identity_file,
                "KnownHostsFile": self.known_hosts_file,
                "RemoteDirectory": self.remote_directory,
            }
        )


@dataclass(frozen=True)
class UnicoreSection:
    api_url: str


@dataclass(frozen=True)
class FirecrestSection:
    api_url: str
    token_url: str
    machine: str

    def to_dict(self) -> dict[str, Any]:
        return {"ApiUrl": self.api_url, "TokenUrl": self.token_url, "Machine": self.machine}


@dataclass(frozen=True)
class LocalSection:
    directory: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _without_none({"Directory": self.directory})


@dataclass(frozen=True)
class Resources:
    queue: str | None = None
    runtime: int | None = None  # seconds
    nodes: int | None = None
    total_cpus: int | None = None
    cpus_per_node: int | None = None
    gpus_per_node: int | None = None
    memory_per_node: int | None = None  # megabytes, as Slurm's --mem counts
    reservation: str | None = None
    node_constraints: str | None = None
    qos: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _without_none(
            {
                "Queue": self.queue,
                "Runtime": None if self.runtime is None else format_slurm_time(self.runtime),
                "Nodes": self.nodes,
                "TotalCPUs": self.total_cpus,
                "CPUsPerNode": self.cpus_per_node,
                "GPUsPerNode": self.gpus_per_node,
                "MemoryPerNode": None
                if self.memory_per_node is None
                else f"{self.memory_per_node}M",
                "Reservation": self.reservation,
                "NodeConstraints": self.node_constraints,
                "QoS": self.qos,
            }
        )


@dataclass(frozen=True)
class Apptainer:
    path: str
    type: Literal["local", "remote"] = "local"
    # As written by the user: each entry may hold several words ("-B /a:/b").
    options: tuple[str, ...] = ()

    def package_path(self, project_dir: str | os.PathLike[str]) -> str:
        """Where a local image lives inside the shipped ``code/`` directory.

        Asked of the packaging, which resolves the path (relative to the
        project, ``~``, symlinks) the way it does when it ships the image: an
        image inside the project keeps its relative place however it is
        written, any other goes to ``images/<name>``.
        """
        return package_place(project_dir, self.path)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Path": self.path, "Type": self.type}
        if self.options:
            out["Options"] = list(self.options)
        return out


@dataclass(frozen=True)
class Environment:
    apptainer: Apptainer | None = None
    python: str | None = None  # path of a venv on the compute system
    modules: tuple[str, ...] = ()
    variables: Mapping[str, str] = field(default_factory=dict)
    pre_run_command_on_login_node: tuple[str, ...] = ()
    post_run_command_on_login_node: tuple[str, ...] = ()
    pre_run_command_on_compute_node: tuple[str, ...] = ()
    post_run_command_on_compute_node: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.apptainer is not None:
            out["Apptainer"] = self.apptainer.to_dict()
        if self.python is not None:
            # Mantik's own form; our reader takes the plain string as well.
            out["Python"] = {"Path": self.python}
        if self.modules:
            out["Modules"] = list(self.modules)
        if self.variables:
            out["Variables"] = dict(self.variables)
        for key, commands in self._commands().items():
            if commands:
                out[key] = list(commands)
        return out

    def _commands(self) -> dict[str, tuple[str, ...]]:
        return {
            "PreRunCommandOnLoginNode": self.pre_run_command_on_login_node,
            "PostRunCommandOnLoginNode": self.post_run_command_on_login_node,
            "PreRunCommandOnComputeNode": self.pre_run_command_on_compute_node,
            "PostRunCommandOnComputeNode": self.post_run_command_on_compute_node,
        }


@dataclass(frozen=True)
class ComputeConfig:
    source: Path
    backend: Backend
    ssh: SshSection | None
    unicore: UnicoreSection | None
    firecrest: FirecrestSection | None
    local: LocalSection | None
    resources: Resources
    environment: Environment
    exclude: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    # Slurm --account / UNICORE Project. From the file, else MANTIK_COMPUTE_BUDGET_ACCOUNT.
    compute_budget_account: str | None = None
    # The file as messages name it, the one the user edits (``config_name``).
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The resolved config in canonical (new-key) form, without secrets.

        Suitable for storing as a run artifact; reading it back gives an equal
        config (apart from ``source`` and ``warnings``).
        """
        out: dict[str, Any] = {}
        if self.unicore is not None:
            out["UnicoreApiUrl"] = self.unicore.api_url
        if self.ssh is not None:
            out["SSH"] = self.ssh.to_dict()
        if self.firecrest is not None:
            out["Firecrest"] = self.firecrest.to_dict()
        if self.local is not None:
            out["Local"] = self.local.to_dict()
        if self.compute_budget_account is not None:
            out["ComputeBudgetAccount"] = self.compute_budget_account
        out["Resources"] = self.resources.to_dict()
        environment = self.environment.to_dict()
        if environment:
            out["Environment"] = environment
        if self.exclude:
            out["Exclude"] = list(self.exclude)
        return out


# --------------------------------------------------------------------------- public API


def find_config(directory: str | os.PathLike[str]) -> Path | None:
    """The compute backend config in ``directory`` (.yaml, then .yml, then .json)."""
    base = Path(directory)
    for name in CONFIG_FILENAMES:
        candidate = base / name
        if candidate.is_file():
            return candidate
    return None


def config_name(path: str | os.PathLike[str], project: str | os.PathLike[str] | None) -> str:
    """How messages name a config file: relative to the project folder when it lies in it
    (``slurm.yml``, ``configs/juwels.json``: as the user gives it and the sidebar lists
    it), else its full path. Messages said "compute-backend-config.yaml" whatever the
    file, and a user who submitted with another config edited the wrong one."""
    source = Path(os.path.abspath(path))
    if project is not None:
        base = Path(os.path.abspath(project))
        for inside, folder in ((source, base), (source.resolve(), base.resolve())):
            if inside.is_relative_to(folder) and inside != folder:
                return inside.relative_to(folder).as_posix()
    return str(source)


def load_config(
    path: str | os.PathLike[str], project: str | os.PathLike[str] | None = None
) -> ComputeConfig:
    """Read, validate and normalise one config file; raise ``ConfigError`` listing all faults.
    ``project``: the project folder it is used with, for its ``name`` (``config_name``)."""
    source = Path(path)
    text = _read_text(source)
    if source.suffix.lower() == ".json":
        document = _parse_json(text, source)
    elif source.suffix.lower() in (".yaml", ".yml"):
        document = _parse_yaml(text, source)
    else:
        raise ConfigError(
            f"{source}: unsupported config file type {source.suffix or '(none)'!r}; "
            "use a .yaml, .yml or .json file"
        )
    return _build(document, source, config_name(source, project))


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> ComputeConfig:
    """Validate a config already read into a mapping (no line numbers in messages)."""
    return _build(_Document(data), Path(source), source)


def parse_memory(value: int | float | str) -> int:
    """Memory per node in megabytes (Slurm's ``--mem`` unit; G means 1024 M, as in Slurm).

    Accepts ``32G``, ``32GB``, ``12GiB``, ``500M``, ``1T``, ``512K``, ``1.5G``
    and plain numbers, which count megabytes. 0 asks for all of a node's
    memory (Slurm's ``--mem=0``), as Mantik allowed.
    """
    if isinstance(value, bool):
        raise ConfigError(_memory_help(value))
    if isinstance(value, int | float):
        megabytes = float(value)
    elif isinstance(value, str):
        match = _MEMORY.fullmatch(value.strip())
        if match is None:
            raise ConfigError(_memory_help(value))
        number, unit = match.groups()
        megabytes = float(number) * _MEMORY_UNITS[(unit or "M").upper()]
    else:
        raise ConfigError(_memory_help(value))
    if not math.isfinite(megabytes):
        raise ConfigError(_memory_help(value))
    if megabytes < 0:
        raise ConfigError(
            f"memory {value!r} cannot be negative; write a size such as 32G, "
            "or 0 for all of the node's memory"
        )
    return math.ceil(megabytes)


def parse_runtime(value: int | str, *, plain: PlainRuntimeUnit = "minutes") -> int:
    """A run time limit in seconds; 0 means no limit (Slurm's ``--time=0``).

    Accepts unit forms (``30m``, ``1h30m``, ``2d``, ``90s``, ``1.5h``), Slurm's
    forms (``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) and
    plain numbers, which count ``plain`` units: minutes as Slurm reads them,
    seconds as UNICORE reads them.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(_runtime_help(value))
    seconds: int | None
    if is_plain_number(value):
        seconds = int(value) * _PLAIN_RUNTIME_FACTORS[plain]
    elif isinstance(value, int):
        seconds = value  # negative: refused below
    else:
        text = value.strip().lower()
        seconds = _runtime_units(text) if _RUNTIME_UNITS.fullmatch(text) else None
        if seconds is None:
            seconds = _runtime_slurm(text)
        if seconds is None:
            raise ConfigError(_runtime_help(value))
    if seconds < 0:
        raise ConfigError(
            f"runtime {value!r} cannot be negative; write a duration such as 2h, or 0 for "
            "no time limit"
        )
    return seconds


def is_plain_number(value: object) -> bool:
    """Whether ``value`` is a whole number without a unit (``90``, ``"90"``).

    Only ASCII digits: ``str.isdigit`` is also true for ``"²"``, which ``int`` refuses.
    """
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, str) and _ASCII_DIGITS.fullmatch(value.strip()) is not None


def format_slurm_time(seconds: int) -> str:
    """Seconds as Slurm's ``D-HH:MM:SS``."""
    if seconds < 0:
        raise ValueError(f"a time limit cannot be negative: {seconds}")
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"


def check_slurm_value(key: str, value: str) -> str | None:
    """Why ``value`` cannot go into a ``#SBATCH`` line for ``key``, or None if it can."""
    pattern, allowed = SLURM_VALUE_RULES[key]
    if pattern.fullmatch(value):
        return None
    return f"{value!r} cannot go into a #SBATCH line; use only {allowed}"


# --------------------------------------------------------------------------- units

# [0-9], not \d: \d also matches other scripts' digits ("３２G"), which no scheduler reads.
_ASCII_DIGITS = re.compile(r"[0-9]+")
_MEMORY = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(?:([KMGTkmgt])(?:i?[Bb])?)?")
_MEMORY_UNITS = {"K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 * 1024}

_RUNTIME_UNITS = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?\s*[a-z]+\s*)+")
_RUNTIME_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([a-z]+)")
_RUNTIME_FACTORS = {
    **dict.fromkeys(("d", "day", "days"), 86400),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1),
}
_RUNTIME_SLURM = re.compile(r"(?:([0-9]+)-)?([0-9]+)(?::([0-9]+))?(?::([0-9]+))?")
_PLAIN_RUNTIME_FACTORS: dict[PlainRuntimeUnit, int] = {"minutes": 60, "seconds": 1}


def _memory_help(value: object) -> str:
    return (
        f"memory {value!r} is not understood; write a number with a unit such as "
        "32G, 32GB, 12GiB, 500M or 1T (a plain number counts megabytes; 0 means all "
        "of the node's memory)"
    )


def _runtime_help(value: object) -> str:
    return (
        f"runtime {value!r} is not understood; write e.g. 30m, 1h30m, 2d, 90s, "
        "HH:MM:SS, D-HH:MM:SS or D-HH, which mean the same everywhere (a plain number "
        "counts minutes for Slurm and seconds for UNICORE, as each scheduler reads it; "
        "0 means no time limit)"
    )


def _with_unit(seconds: int) -> str:
    """A duration in the largest whole unit, for suggesting a spelling."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _runtime_units(text: str) -> int | None:
    total = 0.0
    for number, unit in _RUNTIME_PART.findall(text):
        factor = _RUNTIME_FACTORS.get(unit)
        if factor is None:
            return None
        total += float(number) * factor
    return math.ceil(total)


def _runtime_slurm(text: str) -> int | None:
    match = _RUNTIME_SLURM.fullmatch(text)
    if match is None:
        return None
    days, first, second, third = match.groups()
    if days is not None:
        # D-HH[:MM[:SS]]
        hours, minutes, secs = int(first), int(second or 0), int(third or 0)
        if hours >= 24 or minutes >= 60 or secs >= 60:
            return None
        return int(days) * 86400 + hours * 3600 + minutes * 60 + secs
    if third is not None:  # HH:MM:SS
        if int(second) >= 60 or int(third) >= 60:
            return None
        return int(first) * 3600 + int(second) * 60 + int(third)
    if second is not None:  # MM:SS
        if int(second) >= 60:
            return None
        return int(first) * 60 + int(second)
    return None  # a plain number (MM in Slurm) depends on the scheduler: parse_runtime


# --------------------------------------------------------------------------- reading


@dataclass
class _Document:
    """Parsed data plus where each key was written."""

    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)
    # Plain (unquoted) YAML scalars as written, because YAML 1.1 turns
    # ``Runtime: 1:30:00`` into the integer 5400 and ``on`` into True.
    raw: dict[KeyPath, str] = field(default_factory=dict)
    duplicates: list[KeyPath] = field(default_factory=list)


def _read_text(source: Path) -> str:
    try:
        return source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"compute backend config {source} does not exist; check the path "
            f"(expected one of {', '.join(CONFIG_FILENAMES)})"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{source} is a directory, not a config file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot be read ({exc.strerror})") from None


def _parse_yaml(text: str, source: Path) -> _Document:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else str(source)
        problem = " ".join(filter(None, [exc.context, exc.problem]))
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    document = _Document(data)
    if node is not None:
        _record_yaml(node, (), document)
    return document


def _record_yaml(node: yaml.Node, path: KeyPath, document: _Document) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                key_node, yaml.ScalarNode
            ):
                continue
            key_path = (*path, key_node.value)
            if key_node.value in seen:
                document.duplicates.append(key_path)
            seen.add(key_node.value)
            document.lines[key_path] = key_node.start_mark.line + 1
            _record_yaml(value_node, key_path, document)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            document.lines[(*path, index)] = item.start_mark.line + 1
            _record_yaml(item, (*path, index), document)
    elif isinstance(node, yaml.ScalarNode) and node.style is None:
        document.raw[path] = node.value


def _parse_json(text: str, source: Path) -> _Document:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    document = _Document(data)
    _record_json(text, data, (), 0, document)
    return document


def _record_json(text: str, value: Any, path: KeyPath, start: int, document: _Document) -> None:
    # The json module keeps no positions; find each key after its parent's.
    # Good enough for line numbers in messages, which is all this is for.
    if not isinstance(value, dict):
        return
    position = start
    for key, child in value.items():
        pattern = re.escape(json.dumps(key, ensure_ascii=False)) + r"\s*:"
        match = re.compile(pattern).search(text, position)
        if match is None:
            continue
        document.lines[(*path, key)] = text.count("\n", 0, match.start()) + 1
        _record_json(text, child, (*path, key), match.end(), document)
        position = match.end()


# --------------------------------------------------------------------------- checking


def _dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


class _Checker:
    """Collects problems with their file position, and deprecation notes."""

    def __init__(self, document: _Document, source: Path) -> None:
        self.document = document
        self.source = source
        self._errors: list[tuple[int, str]] = []
        self.notes: list[tuple[str, type[Warning]]] = []

    @property
    def errors(self) -> list[str]:
        """Problems in file order, so they read top to bottom like the file."""
        return [text for _, text in sorted(self._errors, key=lambda item: item[0])]

    def line(self, path: KeyPath) -> int | None:
        probe = path
        while probe:
            line = self.document.lines.get(probe)
            if line is not None:
                return line
            probe = probe[:-1]
        return None

    def where(self, path: KeyPath) -> str:
        line = self.line(path)
        return str(self.source) if line is None else f"{self.source}:{line}"

    def error(self, path: KeyPath, message: str) -> None:
        self._errors.append(
            (self.line(path) or 0, f"{self.where(path)}: {_dotted(path)}: {message}")
        )

    def warn(
        self, path: KeyPath, message: str, category: type[Warning] = MantikDeprecationWarning
    ) -> None:
        self.notes.append((f"{self.where(path)}: {_dotted(path)}: {message}", category))

    def raw(self, path: KeyPath) -> str | None:
        return self.document.raw.get(path)

    def wrong_type(self, path: KeyPath, expected: str, value: Any) -> None:
        self.error(path, f"expected {expected}, got {_type_name(value)} {_show(value)}")

    def keys(
        self,
        mapping: Mapping[Any, Any],
        path: KeyPath,
        allowed: tuple[str, ...],
        legacy: tuple[str, ...] = (),
    ) -> None:
        for key in mapping:
            if key in allowed or key in legacy:
                continue
            self.error((*path, str(key)), f"unknown key{_suggest(str(key), allowed)}")


def _suggest(key: str, allowed: tuple[str, ...]) -> str:
    by_lower = {name.lower(): name for name in allowed}
    close = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {by_lower[close[0]]!r}?"
    return f"; valid keys here are {', '.join(allowed)}"


def _mapping(ck: _Checker, value: Any, path: KeyPath) -> Mapping[str, Any] | None:
    if value is None:
        return {}  # an empty section (``Resources:`` with nothing under it)
    if isinstance(value, Mapping):
        return value
    ck.wrong_type(path, "a mapping (a section with keys)", value)
    return None


def _string(
    ck: _Checker, section: Mapping[str, Any], key: str, path: KeyPath, required: bool = False
) -> str | None:
    value = section.get(key)
    if value is None:
        if required:
            ck.error((*path, key), "missing; this key is required")
        return None
    if isinstance(value, str) and value.strip():
        if "\n" in value or "\r" in value:
            ck.error((*path, key), f"must be on one line, got {_show(value)}")
            return None
        return value
    ck.wrong_type((*path, key), "a non-empty string", value)
    return None


def _integer(
    ck: _Checker, section: Mapping[str, Any], key: str, path: KeyPath, minimum: int = 1
) -> int | None:
    value = section.get(key)
    if value is None:
        return None
    # Mantik wrote some numbers as strings (``Port: "22"``): accept digit strings.
    if isinstance(value, str) and is_plain_number(value):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        ck.wrong_type((*path, key), "an integer", value)
        return None
    if value < minimum:
        ck.error((*path, key), f"must be at least {minimum}, got {value}")
        return None
    return value


def _url(ck: _Checker, value: Any, path: KeyPath) -> str | None:
    if not isinstance(value, str) or not value.strip():
        ck.wrong_type(path, "a URL string (https://...)", value)
        return None
    parsed = urlparse(value.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        ck.error(path, f"expected an http(s) URL such as https://host/path, got {_show(value)}")
        return None
    return value.strip()


def _string_list(
    ck: _Checker, value: Any, path: KeyPath, *, allow_single: bool, scalars: bool = False
) -> tuple[str, ...]:
    """A list of strings; optionally one string; optionally numbers turned into text."""
    if value is None:
        return ()
    if isinstance(value, str) and allow_single:
        return (value,)
    expected = "a list of strings" + (" or a string" if allow_single else "")
    if not isinstance(value, list):
        ck.wrong_type(path, expected, value)
        return ()
    out: list[str] = []
    for index, item in enumerate(value):
        if isinstance(item, str):
            out.append(item)
        elif scalars and isinstance(item, int | float) and not isinstance(item, bool):
            out.append(str(item))  # Mantik accepted ``- 1`` as the command "1"
        else:
            ck.wrong_type((*path, index), "a string", item)
    return tuple(out)


def _legacy_key(
    ck: _Checker, section: Mapping[str, Any], path: KeyPath, old: str, new: str, note: str = ""
) -> str:
    """The key to read: ``new``, or ``old`` with a deprecation note when only it is there."""
    if old not in section:
        return new
    if new in section:
        ck.error((*path, old), f"is the old name of {new!r}, which is also given; remove {old!r}")
        return new
    ck.warn((*path, old), f"is deprecated; rename it to {_dotted((*path, new))!r}{note}")
    return old


# --------------------------------------------------------------------------- sections

_TOP_KEYS = (
    "UnicoreApiUrl",
    "SSH",
    "Firecrest",
    "Local",
    "ComputeBudgetAccount",
    "Resources",
    "Environment",
    "Exclude",
)
_BACKEND_KEYS: dict[str, Backend] = {
    "UnicoreApiUrl": "unicore",
    "SSH": "ssh",
    "Firecrest": "firecrest",
    "Local": "local",
}
_SSH_KEYS = ("Hostname", "Port", "Username", "IdentityFile", "KnownHostsFile", "RemoteDirectory")
_FIRECREST_KEYS = ("ApiUrl", "TokenUrl", "Machine")
_LOCAL_KEYS = ("Directory",)
_RESOURCE_KEYS = (
    "Queue",
    "Runtime",
    "Nodes",
    "TotalCPUs",
    "CPUsPerNode",
    "GPUsPerNode",
    "MemoryPerNode",
    "Reservation",
    "NodeConstraints",
    "QoS",
)
_ENVIRONMENT_KEYS = (
    "Apptainer",
    "Python",
    "Modules",
    "Variables",
    "PreRunCommandOnLoginNode",
    "PostRunCommandOnLoginNode",
    "PreRunCommandOnComputeNode",
    "PostRunCommandOnComputeNode",
)
_APPTAINER_KEYS = ("Path", "Type", "Options")


def _build(document: _Document, source: Path, name: str) -> ComputeConfig:
    ck = _Checker(document, source)
    for duplicate in document.duplicates:
        ck.error(duplicate, "is given twice; YAML would silently keep only the last one")
    data = document.data
    if not isinstance(data, Mapping):
        what = "empty" if data is None else f"{_type_name(data)}, not a mapping"
        raise ConfigError(
            f"{source}: the config is {what}; it needs a backend section "
            f"({' | '.join(_BACKEND_KEYS)}) and Resources"
        )
    ck.keys(data, (), _TOP_KEYS)
    backend = _backend(ck, data)
    unicore = _unicore(ck, data) if "UnicoreApiUrl" in data else None
    ssh = _ssh(ck, data["SSH"]) if "SSH" in data else None
    firecrest = _firecrest(ck, data["Firecrest"]) if "Firecrest" in data else None
    local = _local(ck, data["Local"]) if "Local" in data else None
    needs_queue = any(key in data for key in ("UnicoreApiUrl", "SSH", "Firecrest"))
    resources = _resources(ck, data, needs_queue, backend)
    environment = _environment(ck, data.get("Environment"), ("Environment",))
    if "Firecrest" in data and (
        environment.pre_run_command_on_login_node or environment.post_run_command_on_login_node
    ):
        ck.error(
            ("Environment",),
            "Pre-/PostRunCommandOnLoginNode cannot run through firecREST; "
            "use Pre-/PostRunCommandOnComputeNode instead",
        )
    if "SSH" in data and environment.post_run_command_on_login_node:
        ck.error(
            ("Environment", "PostRunCommandOnLoginNode"),
            "is supported on UNICORE only: over SSH nothing on the login node notices when "
            "the Slurm job ends; use Environment.PostRunCommandOnComputeNode (it runs at the "
            "end of the job script) or remove the key",
        )
    exclude = _string_list(ck, data.get("Exclude"), ("Exclude",), allow_single=False)
    account = _account(ck, data)
    if ck.errors or backend is None:
        count = len(ck.errors)
        raise ConfigError(
            f"{source}: {count} problem{'s' if count != 1 else ''} in the compute backend "
            "config:\n" + "\n".join(ck.errors)
        )
    for message, category in ck.notes:
        warnings.warn(message, category, stacklevel=3)
    return ComputeConfig(
        source=source,
        backend=backend,
        ssh=ssh,
        unicore=unicore,
        firecrest=firecrest,
        local=local,
        resources=resources,
        environment=environment,
        exclude=exclude,
        warnings=tuple(message for message, _ in ck.notes),
        compute_budget_account=account,
        name=name,
    )


def _backend(ck: _Checker, data: Mapping[str, Any]) -> Backend | None:
    present = [key for key in _BACKEND_KEYS if key in data]
    if len(present) == 1:
        return _BACKEND_KEYS[present[0]]
    if not present:
        ck.error(
            (),
            "no backend section; add exactly one of UnicoreApiUrl (UNICORE), SSH (Slurm over "
            "SSH), Firecrest or Local (processes on this machine)",
        )
    else:
        ck.error(
            (present[1],),
            f"only one backend section is allowed, found {' and '.join(present)}; keep one",
        )
    return None


def _unicore(ck: _Checker, data: Mapping[str, Any]) -> UnicoreSection | None:
    value = data["UnicoreApiUrl"]
    if isinstance(value, str) and "@" in urlparse(value.strip()).netloc:
        # The URL goes into run tags, the config artifact and messages: never show it.
        ck.error(
            ("UnicoreApiUrl",),
            "the URL carries a user name or password (user:password@host); remove them and "
            "set MANTIK_UNICORE_USERNAME and MANTIK_UNICORE_PASSWORD, or MANTIK_UNICORE_TOKEN, "
            "in the environment",
        )
        return None
    url = _url(ck, value, ("UnicoreApiUrl",))
    return UnicoreSection(api_url=url) if url else None


def _account(ck: _Checker, data: Mapping[str, Any]) -> str | None:
    account = _string(ck, data, "ComputeBudgetAccount", ())
    if account is None and "ComputeBudgetAccount" not in data:
        # Mantik took the budget account from the environment only; keep that working.
        account = os.environ.get(ENV_COMPUTE_BUDGET_ACCOUNT) or None
    if account is not None:
        problem = check_slurm_value("ComputeBudgetAccount", account)
        if problem:
            ck.error(("ComputeBudgetAccount",), problem)
            return None
    return account


def _ssh(ck: _Checker, value: Any) -> SshSection | None:
    path: KeyPath = ("SSH",)
    section = _mapping(ck, value, path)
    if section is None:
        return None
    ck.keys(section, path, _SSH_KEYS)
    hostname = _string(ck, section, "Hostname", path, required=True)
    port = _integer(ck, section, "Port", path)
    if port is not None and port > 65535:
        ck.error((*path, "Port"), f"must be a TCP port (1-65535), got {port}")
    username = _string(ck, section, "Username", path) or os.environ.get(ENV_SSH_USERNAME) or None
    if hostname is None:
        return None
    return SshSection(
        hostname=hostname,
        port=port or 22,
        username=username,
        identity_file=_string(ck, section, "IdentityFile", path),
        known_hosts_file=_string(ck, section, "KnownHostsFile", path),
        remote_directory=_string(ck, section, "RemoteDirectory", path),
        private_key=os.environ.get(ENV_SSH_PRIVATE_KEY) or None,
        password=os.environ.get(ENV_SSH_PASSWORD) or None,
    )


def _firecrest(ck: _Checker, value: Any) -> FirecrestSection | None:
    path: KeyPath = ("Firecrest",)
    section = _mapping(ck, value, path)
    if section is None:
        return None
    ck.keys(section, path, _FIRECREST_KEYS)
    for key in ("ApiUrl", "TokenUrl"):
        if key not in section:
            ck.error((*path, key), "missing; this key is required")
    api_url = _url(ck, section["ApiUrl"], (*path, "ApiUrl")) if "ApiUrl" in section else None
    token_url = (
        _url(ck, section["TokenUrl"], (*path, "TokenUrl")) if "TokenUrl" in section else None
    )
    machine = _string(ck, section, "Machine", path, required=True)
    if api_url and token_url and machine:
        return FirecrestSection(api_url=api_url, token_url=token_url, machine=machine)
    return None


def _local(ck: _Checker, value: Any) -> LocalSection | None:
    path: KeyPath = ("Local",)
    section = _mapping(ck, value, path)
    if section is None:
        return None
    ck.keys(section, path, _LOCAL_KEYS)
    return LocalSection(directory=_string(ck, section, "Directory", path))


def _resources(
    ck: _Checker, data: Mapping[str, Any], needs_queue: bool, backend: Backend | None
) -> Resources:
    path: KeyPath = ("Resources",)
    if "Resources" not in data:
        if needs_queue:
            ck.error(path, "missing; add a Resources section with at least Queue (the partition)")
        return Resources()
    section = _mapping(ck, data["Resources"], path)
    if section is None:
        return Resources()
    ck.keys(section, path, _RESOURCE_KEYS, legacy=("CPUs", "Memory"))
    if needs_queue and section.get("Queue") is None:
        ck.error((*path, "Queue"), "missing; name the Slurm partition to run in, e.g. batch")
    cpus_key = _legacy_key(ck, section, path, "CPUs", "TotalCPUs")
    memory_key = _legacy_key(ck, section, path, "Memory", "MemoryPerNode")
    names = {
        key: _slurm_string(ck, section, key, path)
        for key in ("Queue", "Reservation", "NodeConstraints", "QoS")
    }
    runtime = _runtime(ck, section, path, backend)
    memory = _unit_value(ck, section, memory_key, path, parse_memory)
    if backend == "unicore":
        runtime, memory = _unicore_zeros(ck, path, runtime, memory, memory_key)
    return Resources(
        queue=names["Queue"],
        runtime=runtime,
        nodes=_integer(ck, section, "Nodes", path),
        total_cpus=_integer(ck, section, cpus_key, path),
        cpus_per_node=_integer(ck, section, "CPUsPerNode", path),
        gpus_per_node=_integer(ck, section, "GPUsPerNode", path, minimum=0),
        memory_per_node=memory,
        reservation=names["Reservation"],
        node_constraints=names["NodeConstraints"],
        qos=names["QoS"],
    )


def _runtime(
    ck: _Checker, section: Mapping[str, Any], path: KeyPath, backend: Backend | None
) -> int | None:
    # Mantik handed Runtime to UNICORE unchanged, and UNICORE counts a plain number in
    # seconds; Slurm counts it in minutes. Reading it the target's way keeps existing
    # configs asking for what they asked for before.
    plain: PlainRuntimeUnit = "seconds" if backend == "unicore" else "minutes"
    scheduler = "UNICORE" if backend == "unicore" else "Slurm"
    seconds = _unit_value(
        ck, section, "Runtime", path, lambda value: parse_runtime(value, plain=plain)
    )
    value = ck.raw((*path, "Runtime")) or section.get("Runtime")
    if seconds and is_plain_number(value):
        ck.warn(
            (*path, "Runtime"),
            f"the plain number {value!r} is read as {plain}, as {scheduler} reads it "
            "(Slurm counts minutes, UNICORE seconds); write a unit to make it unambiguous, "
            f"e.g. {_with_unit(seconds)!r}",
            MantikConfigWarning,
        )
    return seconds


def _unicore_zeros(
    ck: _Checker, path: KeyPath, runtime: int | None, memory: int | None, memory_key: str
) -> tuple[int | None, int | None]:
    """UNICORE has no request for "no time limit" or "all memory": leave such a 0 out."""
    if runtime == 0:
        ck.warn(
            (*path, "Runtime"),
            "0 (no time limit) cannot be requested from UNICORE; it is left out, so the "
            "queue's default limit applies. Give a limit such as 24h to choose one.",
            MantikConfigWarning,
        )
        runtime = None
    if memory == 0:
        ck.warn(
            (*path, memory_key),
            "0 (all of the node's memory) cannot be requested from UNICORE; it is left out, "
            "so the site's default applies. Give a size such as 64G to choose one.",
            MantikConfigWarning,
        )
        memory = None
    return runtime, memory


def _slurm_string(ck: _Checker, section: Mapping[str, Any], key: str, path: KeyPath) -> str | None:
    value = _string(ck, section, key, path)
    if value is None:
        return None
    problem = check_slurm_value(key, value)
    if problem:
        ck.error((*path, key), problem)
        return None
    return value


def _unit_value(
    ck: _Checker,
    section: Mapping[str, Any],
    key: str,
    path: KeyPath,
    parse: Callable[[Any], int],
) -> int | None:
    if section.get(key) is None:
        return None
    value = ck.raw((*path, key)) or section[key]
    try:
        return parse(value)
    except ConfigError as exc:
        ck.error((*path, key), exc.message)
        return None


def _environment(ck: _Checker, value: Any, path: KeyPath) -> Environment:
    section = _mapping(ck, value, path)
    if section is None:
        return Environment()
    ck.keys(
        section, path, _ENVIRONMENT_KEYS, legacy=("Singularity", "PreRunCommand", "PostRunCommand")
    )
    apptainer_key = _legacy_key(ck, section, path, "Singularity", "Apptainer")
    if section.get(apptainer_key) is not None and section.get("Python") is not None:
        ck.error(
            (*path, "Python"),
            f"{apptainer_key} and Python cannot both be given; choose the container or the venv",
        )
    commands = _run_commands(ck, section, path)
    return Environment(
        apptainer=_apptainer(ck, section.get(apptainer_key), (*path, apptainer_key)),
        python=_python(ck, section.get("Python"), (*path, "Python")),
        modules=_string_list(ck, section.get("Modules"), (*path, "Modules"), allow_single=False),
        variables=_variables(ck, section.get("Variables"), (*path, "Variables")),
        **commands,
    )


def _apptainer(ck: _Checker, value: Any, path: KeyPath) -> Apptainer | None:
    if value is None:
        return None
    section = _mapping(ck, value, path)
    if section is None:
        return None
    ck.keys(section, path, _APPTAINER_KEYS)
    image = _string(ck, section, "Path", path, required=True)
    kind = section.get("Type", "local")
    if kind not in ("local", "remote"):
        ck.error((*path, "Type"), f"must be 'local' or 'remote', got {_show(kind)}")
        kind = "local"
    options = _string_list(ck, section.get("Options"), (*path, "Options"), allow_single=True)
    for index, option in enumerate(options):
        try:
            shlex.split(option)
        except ValueError as exc:
            ck.error((*path, "Options", index), f"cannot be split into words ({exc})")
    if image is None:
        return None
    if kind == "remote" and not image.startswith(("/", "~", "$")):
        ck.error(
            (*path, "Path"),
            f"a remote image path must be absolute on the cluster, got {image!r}",
        )
    return Apptainer(path=image, type=kind, options=options)


def _python(ck: _Checker, value: Any, path: KeyPath) -> str | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        # Mantik's form ``Python: {Path: /path/to/venv}``.
        ck.keys(value, path, ("Path",))
        return _string(ck, value, "Path", path, required=True)
    if isinstance(value, str) and value.strip() and "\n" not in value:
        return value
    ck.wrong_type(path, "the path of a venv (a string)", value)
    return None


def _variables(ck: _Checker, value: Any, path: KeyPath) -> dict[str, str]:
    section = _mapping(ck, value, path)
    if section is None:
        return {}
    out: dict[str, str] = {}
    for name, item in section.items():
        key_path = (*path, str(name))
        if not isinstance(name, str) or not _SHELL_NAME.fullmatch(name):
            ck.error(
                key_path,
                "is not a valid environment variable name; use letters, digits and _, "
                "not starting with a digit",
            )
            continue
        if name in RESERVED_VARIABLES:
            ck.warn(
                key_path,
                "is set by mantik for every run; the value in the config is ignored",
                MantikConfigWarning,
            )
            continue
        text = _variable_value(ck, item, key_path)
        if text is not None:
            out[name] = text
    return out


def _variable_value(ck: _Checker, value: Any, path: KeyPath) -> str | None:
    # The value is not shown in messages: variables often carry tokens.
    if value is None:
        ck.error(path, "has no value; write '' for an empty value")
        return None
    if isinstance(value, list | dict):
        ck.error(path, f"expected a string, number or boolean, got {_type_name(value)}")
        return None
    raw = ck.raw(path)
    if raw is not None:
        return raw  # as written: ``08`` stays 08, ``yes`` stays yes
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_COMMAND_KEYS = {
    "PreRunCommandOnLoginNode": "pre_run_command_on_login_node",
    "PostRunCommandOnLoginNode": "post_run_command_on_login_node",
    "PreRunCommandOnComputeNode": "pre_run_command_on_compute_node",
    "PostRunCommandOnComputeNode": "post_run_command_on_compute_node",
}


def _run_commands(
    ck: _Checker, section: Mapping[str, Any], path: KeyPath
) -> dict[str, tuple[str, ...]]:
    out = {
        attribute: _string_list(ck, section.get(key), (*path, key), allow_single=True, scalars=True)
        for key, attribute in _COMMAND_KEYS.items()
    }
    for phase in ("Pre", "Post"):
        legacy = f"{phase}RunCommand"
        if section.get(legacy) is None:
            continue
        target, commands = _legacy_command(ck, section[legacy], (*path, legacy), phase)
        if target is None:
            continue
        if section.get(target) is not None:
            ck.error((*path, legacy), f"is the old form of {target!r}, which is also given")
            continue
        ck.warn((*path, legacy), f"is deprecated; write it as {_dotted((*path, target))!r}")
        out[_COMMAND_KEYS[target]] = commands
    return out


def _legacy_command(
    ck: _Checker, value: Any, path: KeyPath, phase: str
) -> tuple[str | None, tuple[str, ...]]:
    """Old ``PreRunCommand: {Command, ExecuteOnLoginNode}`` → (new key, commands)."""
    if isinstance(value, str | list):
        commands = _string_list(ck, value, path, allow_single=True, scalars=True)
        return f"{phase}RunCommandOnComputeNode", commands
    section = _mapping(ck, value, path)
    if section is None:
        return None, ()
    ck.keys(section, path, ("Command", "ExecuteOnLoginNode"))
    if section.get("Command") is None:
        ck.error((*path, "Command"), "missing; this key is required")
        return None, ()
    commands = _string_list(
        ck, section["Command"], (*path, "Command"), allow_single=True, scalars=True
    )
    on_login = section.get("ExecuteOnLoginNode", False)
    if not isinstance(on_login, bool):
        ck.wrong_type((*path, "ExecuteOnLoginNode"), "true or false", on_login)
        return None, ()
    node = "LoginNode" if on_login else "ComputeNode"
    return f"{phase}RunCommandOn{node}", commands


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}
