"""MLproject handling: find, load and resolve entry points with MLflow's own code.

Parsing and parameter substitution are MLflow's (``mlflow.projects._project_spec``), so a
command built here is byte for byte the one ``mlflow run`` builds. What is added on top is
what MLflow leaves to fail late on the cluster: structural checks with messages that name
the MLproject file, refusal of undeclared parameters, and checks of ``int``/``float`` values.

The code packaging lives in ``packaging.py``.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import InvalidRequest, ProjectError

MLPROJECT_FILE_NAME = "MLproject"

# Entry points MLflow accepts without declaration when they name a script file.
_SCRIPT_SUFFIXES = (".py", ".sh", ".R")

# MLflow itself knows string, float, path and uri; ``int`` is common in real projects
# (MLflow treats it as a string). Unknown types are passed through as strings like MLflow does.
_INT_TYPES = frozenset({"int", "integer"})
_FLOAT_TYPES = frozenset({"float", "double"})


@dataclass(frozen=True)
class ParameterSpec:
    """One declared parameter of an entry point, as plain data for forms and messages."""

    name: str
    type: str
    # The YAML default as MLflow turns it into a string (``str(value)``); None when required.
    default: str | None

    @property
    def required(self) -> bool:
        return self.default is None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "default": self.default,
            "required": self.required,
        }


@dataclass(frozen=True)
class EntryPointSpec:
    name: str
    command: str
    parameters: tuple[ParameterSpec, ...]

    def parameter_names(self) -> list[str]:
        return [p.name for p in self.parameters]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "command": self.command,
            "parameters": [p.describe() for p in self.parameters],
        }


@dataclass(frozen=True)
class Project:
    """A loaded MLproject: plain data plus MLflow's own spec object for substitution."""

    directory: Path
    mlproject_path: Path
    name: str | None
    # MLflow's environment kind (python_env, conda, docker) and its file, relative to directory.
    env_type: str | None
    env_file: str | None
    entry_points: dict[str, EntryPointSpec]
    spec: Any = field(repr=False, compare=False)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary for the UI (form fields per entry point)."""
        return {
            "name": self.name,
            "directory": str(self.directory),
            "mlproject": self.mlproject_path.name,
            "env_type": self.env_type,
            "env_file": self.env_file,
            "entry_points": [ep.describe() for ep in self.entry_points.values()],
        }


@dataclass(frozen=True)
class ResolvedEntryPoint:
    name: str
    # The shell command exactly as ``mlflow run`` builds it (user values shell-quoted).
    command: str
    # Every parameter with defaults filled in, as plain (unquoted) strings, in MLflow's order:
    # declared parameters first, then pass-through ones of script entry points.
    params: dict[str, str]
    # True for an undeclared script entry point such as ``train.py``.
    is_script: bool = False


# --- finding ---------------------------------------------------------------------------


def find_mlproject_file(directory: Path) -> Path | None:
    """The MLproject file of ``directory``, matched case-insensitively as MLflow does."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return None
    for name in names:
        if name.lower() == MLPROJECT_FILE_NAME.lower() and (directory / name).is_file():
            return directory / name
    return None


def find_project_dir(start: Path, root: Path | None = None) -> Path:
    """Nearest directory at or above ``start`` that holds an MLproject, not above ``root``."""
    start = Path(start).expanduser().resolve()
    current = start if start.is_dir() else start.parent
    top = Path(root).expanduser().resolve() if root is not None else None
    if top is not None and not current.is_relative_to(top):
        raise ProjectError(
            f"{start} is not inside {top}: open a notebook or file inside it, "
            "or pass the project directory explicitly."
        )
    looked: list[str] = []
    while True:
        looked.append(str(current))
        if find_mlproject_file(current) is not None:
            return current
        if current == top or current.parent == current:
            break
        current = current.parent
    raise ProjectError(
        f"No {MLPROJECT_FILE_NAME} file found in {', '.join(looked)}. "
        f"Create an {MLPROJECT_FILE_NAME} file in your project directory "
        "(see https://mlflow.org/docs/latest/projects.html)."
    )


# --- loading ---------------------------------------------------------------------------


def load_project(directory: Path) -> Project:
    """Parse the MLproject of ``directory``; ProjectError names the file and what is wrong."""
    directory = Path(directory).expanduser().resolve()
    path = find_mlproject_file(directory)
    if path is None:
        raise ProjectError(
            f"No {MLPROJECT_FILE_NAME} file in {directory}: create one "
            "(see https://mlflow.org/docs/latest/projects.html)."
        )
    raw = _read_yaml(path)
    _check_structure(path, raw)
    spec = _mlflow_load(directory, path)
    entry_points = {name: _entry_point_spec(ep) for name, ep in spec._entry_points.items()}
    env_file = None
    if spec.env_config_path:
        env_file = os.path.relpath(spec.env_config_path, directory)
    return Project(
        directory=directory,
        mlproject_path=path,
        name=spec.name,
        env_type=str(spec.env_type) if spec.env_type else None,
        env_file=env_file,
        entry_points=entry_points,
        spec=spec,
    )


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProjectError(f"Cannot read {path}: {exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProjectError(f"{path} is not valid YAML: {exc}") from exc


def _check_structure(path: Path, raw: Any) -> None:
    """Catch what MLflow would only trip over with an AttributeError or KeyError later."""
    if raw is None:
        raise ProjectError(f"{path} is empty: declare 'name' and 'entry_points'.")
    if not isinstance(raw, dict):
        raise ProjectError(
            f"{path} must be a YAML mapping with 'name' and 'entry_points', "
            f"found {type(raw).__name__}."
        )
    entry_points = raw.get("entry_points", {})
    if not isinstance(entry_points, dict):
        raise ProjectError(f"{path}: 'entry_points' must be a mapping of name -> entry point.")
    for name, ep in entry_points.items():
        where = f"{path}: entry point '{name}'"
        if not isinstance(ep, dict):
            raise ProjectError(f"{where} must be a mapping with a 'command'.")
        command = ep.get("command")
        if not isinstance(command, str) or not command.strip():
            raise ProjectError(f"{where} has no 'command': add e.g. command: \"python train.py\".")
        params = ep.get("parameters", {}) or {}
        if not isinstance(params, dict):
            raise ProjectError(f"{where}: 'parameters' must be a mapping of name -> type/spec.")
        for pname, pspec in params.items():
            _check_parameter(where, str(pname), pspec)
        _check_placeholders(where, command, [str(p) for p in params])


def _check_parameter(where: str, name: str, pspec: Any) -> None:
    if isinstance(pspec, str):
        return
    if not isinstance(pspec, dict):
        raise ProjectError(
            f"{where}: parameter '{name}' must be a type name or a mapping with "
            "'type' and 'default'."
        )
    if not isinstance(pspec.get("type", "string"), str):
        raise ProjectError(f"{where}: parameter '{name}' has a 'type' that is not a name.")


def _check_placeholders(where: str, command: str, declared: list[str]) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(command) if f is not None]
    except ValueError as exc:
        raise ProjectError(
            f"{where}: the command is not a valid template ({exc}); write literal braces as "
            "'{{' and '}}'."
        ) from exc
    for name in fields:
        if name not in declared:
            raise ProjectError(
                f"{where}: the command uses '{{{name}}}' but no parameter '{name}' is declared "
                f"(declared: {_names(declared)}). Declare it under 'parameters' or write "
                "literal braces as '{{' and '}}'."
            )


def _mlflow_load(directory: Path, path: Path) -> Any:
    from mlflow.exceptions import MlflowException
    from mlflow.projects import _project_spec

    try:
        return _project_spec.load_project(str(directory))
    except MlflowException as exc:
        raise ProjectError(f"{path}: {exc.message}") from exc


def _entry_point_spec(ep: Any) -> EntryPointSpec:
    params = tuple(
        ParameterSpec(
            name=p.name,
            type=str(p.type),
            default=None if p.default is None else str(p.default),
        )
        for p in ep.parameters.values()
    )
    return EntryPointSpec(name=ep.name, command=ep.command, parameters=params)


# --- resolving -------------------------------------------------------------------------


def resolve_entry_point(
    project: Project, entry_point: str, params: Mapping[str, object]
) -> ResolvedEntryPoint:
    """Check ``params`` against the entry point and build its command as ``mlflow run`` does.

    The command is built with ``storage_dir=None``: it runs on the compute machine inside the
    unpacked package, so ``path`` values must stay as given (relative to the project) instead
    of being made absolute or downloaded here, on the submitting machine.
    """
    values = {str(k): str(v) for k, v in params.items()}
    declared = project.entry_points.get(entry_point)
    if declared is None:
        ep = _script_entry_point(project, entry_point)
        for name, given in values.items():
            _check_name(project, entry_point, name, declared_here=False)
            _check_length(project, entry_point, name, given, from_default=False)
        return _compute(project, ep, values, is_script=True)
    _check_known(project, declared, values)
    _check_required(project, declared, values)
    for name in declared.parameter_names():
        _check_name(project, entry_point, name, declared_here=True)
    for spec in declared.parameters:
        from_default = spec.name not in values
        value = spec.default if from_default else values[spec.name]
        _check_type(project, declared, spec, value, from_default)
        _check_length(project, entry_point, spec.name, value, from_default)
    ep = project.spec._entry_points[entry_point]
    return _compute(project, ep, values, is_script=False)


def _script_entry_point(project: Project, entry_point: str) -> Any:
    from mlflow.projects._project_spec import EntryPoint
    from mlflow.utils.string_utils import quote

    suffix = os.path.splitext(entry_point)[1]
    if suffix not in _SCRIPT_SUFFIXES:
        raise ProjectError(
            f"Unknown entry point '{entry_point}' in {project.mlproject_path}: valid entry points "
            f"are {_names(project.entry_points)}, or a script file ending in "
            f"{', '.join(_SCRIPT_SUFFIXES)}."
        )
    script = (project.directory / entry_point).resolve()
    if not script.is_relative_to(project.directory) or not script.is_file():
        raise ProjectError(
            f"Entry point '{entry_point}' is neither declared in {project.mlproject_path} "
            f"(declared: {_names(project.entry_points)}) nor a script file inside "
            f"{project.directory}."
        )
    if suffix == ".sh":
        # MLflow uses the submitting user's $SHELL here, which need not exist on the cluster.
        return EntryPoint(name=entry_point, parameters={}, command=f"bash {quote(entry_point)}")
    return project.spec.get_entry_point(entry_point)


def _check_known(project: Project, ep: EntryPointSpec, values: Mapping[str, str]) -> None:
    unknown = [k for k in values if k not in ep.parameter_names()]
    if unknown:
        raise ProjectError(
            f"Unknown parameter {_names(unknown)} for entry point '{ep.name}' of "
            f"{project.mlproject_path}: valid parameters are {_names(ep.parameter_names())}."
        )


def _check_required(project: Project, ep: EntryPointSpec, values: Mapping[str, str]) -> None:
    missing = [p.name for p in ep.parameters if p.required and p.name not in values]
    if missing:
        raise ProjectError(
            f"Missing required parameter {_names(missing)} for entry point '{ep.name}' of "
            f"{project.mlproject_path}: pass it with -P {missing[0]}=VALUE "
            f"(valid parameters: {_names(ep.parameter_names())})."
        )


def _check_type(
    project: Project,
    ep: EntryPointSpec,
    spec: ParameterSpec,
    value: str | None,
    from_default: bool,
) -> None:
    if value is None:
        return
    kind = spec.type.lower()
    ok = True
    if kind in _INT_TYPES:
        ok = _parses(int, value)
    elif kind in _FLOAT_TYPES:
        ok = _parses(float, value)
    if ok:
        return
    origin = "its default in the MLproject" if from_default else "the given value"
    raise ProjectError(
        f"Parameter '{spec.name}' of entry point '{ep.name}' ({project.mlproject_path}) has "
        f"type {spec.type}, but {origin} {value!r} is not a valid {spec.type}."
    )


def _check_name(project: Project, entry_point: str, name: str, *, declared_here: bool) -> None:
    # The run is created before its parameters are logged: a name MLflow refuses left a
    # run behind that never ran, and the error was MLflow's own, naming 'params[0].key'.
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, _validate_param_name

    try:
        _validate_param_name(name)
        why = (
            f"it has {len(name)} characters, MLflow takes at most {MAX_ENTITY_KEY_LENGTH}"
            if len(name) > MAX_ENTITY_KEY_LENGTH
            else ""
        )
    except MlflowException as exc:
        why = exc.message.split("supplied: ", 1)[-1].rstrip(".")
    if not why:
        return
    fix = (
        f"Rename it in {project.mlproject_path} (and where its command uses it)"
        if declared_here
        else "Pass it under another name"
    )
    raise ProjectError(
        f"Parameter name {name!r} of entry point '{entry_point}' cannot be recorded in "
        f"MLflow: {why}. {fix}; letters of any language, digits, _ - . : / and spaces are "
        "accepted."
    )


def _check_length(
    project: Project, entry_point: str, name: str, value: str | None, from_default: bool
) -> None:
    # MLflow cuts a longer param value short when it is logged: the run would record
    # something other than what the job ran with.
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    if value is None or len(value) <= MAX_PARAM_VAL_LENGTH:
        return
    origin = "its default in the MLproject" if from_default else "the given value"
    raise ProjectError(
        f"Parameter '{name}' of entry point '{entry_point}' ({project.mlproject_path}): "
        f"{origin} has {len(value)} characters, but MLflow records at most "
        f"{MAX_PARAM_VAL_LENGTH} per parameter and would cut it short. Pass a shorter value, "
        "e.g. the path of a file in the project that holds it."
    )


def _parses(kind: type, value: str) -> bool:
    try:
        kind(value.strip())
    except ValueError:
        return False
    return bool(value.strip())


def _compute(
    project: Project, ep: Any, values: dict[str, str], *, is_script: bool
) -> ResolvedEntryPoint:
    from mlflow.exceptions import MlflowException

    try:
        command = ep.compute_command(values, None)
    except MlflowException as exc:
        raise ProjectError(
            f"Entry point '{ep.name}' of {project.mlproject_path}: {exc.message}"
        ) from exc
    resolved: dict[str, str] = {}
    for name, pobj in ep.parameters.items():
        value = values.get(name, pobj.default)
        resolved[name] = str(value)
    for name, value in values.items():
        resolved.setdefault(name, value)
    return ResolvedEntryPoint(name=ep.name, command=command, params=resolved, is_script=is_script)


# --- -P key=value ----------------------------------------------------------------------


def parse_param_args(args: Iterable[str]) -> dict[str, str]:
    """``["epochs=3", "expr=a=b"]`` -> ``{"epochs": "3", "expr": "a=b"}`` (split at first =)."""
    out: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidRequest(
                f"Invalid parameter argument {arg!r}: use -P name=value (e.g. -P epochs=10)."
            )
        if key in out:
            raise InvalidRequest(
                f"Parameter '{key}' is given twice (-P {key}={out[key]} and -P {arg}): "
                "give it once."
            )
        out[key] = value
    return out


def _names(names: Iterable[str]) -> str:
    listed = [f"'{n}'" for n in names]
    return ", ".join(listed) if listed else "(none)"
