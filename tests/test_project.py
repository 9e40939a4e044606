"""MLproject parsing and entry point resolution, against MLflow's real parser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mantik_jupyter.compute.project import (
    find_project_dir,
    load_project,
    parse_param_args,
    resolve_entry_point,
)
from mantik_jupyter.errors import InvalidRequest, ProjectError

MLPROJECT = """\
name: weather
entry_points:
  main:
    parameters:
      epochs: {type: int, default: 5}
      learning_rate: {type: float, default: 0.01}
      station: {type: string, default: Juelich}
      data: path
    command: "python train.py -e {epochs} --lr {learning_rate} --station {station} --data {data}"
  evaluate:
    parameters:
      source: {type: uri, default: "s3://bucket/x"}
    command: "python train.py {source}"
"""

ARGV_SCRIPT = """\
import json, sys
with open("argv.json", "w") as f:
    json.dump(sys.argv[1:], f)
"""


def make_project(root: Path, text: str = MLPROJECT, name: str = "MLproject") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)
    (root / "train.py").write_text(ARGV_SCRIPT)
    return root


# --- find_project_dir ------------------------------------------------------------------


def test_find_project_dir_from_nested_file(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj")
    nb = project / "notebooks" / "deep" / "analysis.ipynb"
    nb.parent.mkdir(parents=True)
    nb.write_text("{}")
    assert find_project_dir(nb) == project.resolve()
    assert find_project_dir(nb.parent, root=tmp_path) == project.resolve()
    assert find_project_dir(project) == project.resolve()


def test_find_project_dir_matches_case_insensitively_like_mlflow(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj", name="mlproject")
    assert find_project_dir(project / "train.py") == project.resolve()


def test_find_project_dir_stops_at_root_and_says_where_it_looked(tmp_path: Path) -> None:
    make_project(tmp_path)  # above the root: must not be found
    root = tmp_path / "work"
    start = root / "a" / "b"
    start.mkdir(parents=True)
    with pytest.raises(ProjectError) as err:
        find_project_dir(start, root=root)
    msg = err.value.message
    assert str(start.resolve()) in msg and str(root.resolve()) in msg
    assert str(tmp_path.resolve()) + "," not in msg


def test_find_project_dir_refuses_start_outside_root(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ProjectError, match="not inside"):
        find_project_dir(tmp_path / "a", root=tmp_path / "b")


# --- load_project ----------------------------------------------------------------------


def test_load_project_describes_entry_points_as_json(tmp_path: Path) -> None:
    project = load_project(make_project(tmp_path))
    assert project.name == "weather"
    described = json.loads(json.dumps(project.describe()))
    main = described["entry_points"][0]
    assert main["name"] == "main"
    assert main["parameters"] == [
        {"name": "epochs", "type": "int", "default": "5", "required": False},
        {"name": "learning_rate", "type": "float", "default": "0.01", "required": False},
        {"name": "station", "type": "string", "default": "Juelich", "required": False},
        {"name": "data", "type": "path", "default": None, "required": True},
    ]
    assert [e["name"] for e in described["entry_points"]] == ["main", "evaluate"]


def test_yaml_defaults_that_are_not_json_become_strings(tmp_path: Path) -> None:
    text = (
        "entry_points:\n  main:\n    parameters:\n      day: {default: 2024-01-31}\n"
        "    command: python train.py {day}\n"
    )
    described = load_project(make_project(tmp_path, text)).describe()
    assert json.dumps(described)
    assert described["entry_points"][0]["parameters"][0]["default"] == "2024-01-31"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("entry_points: [unclosed\n", "not valid YAML"),
        ("", "is empty"),
        ("- a\n- b\n", "must be a YAML mapping"),
        ("entry_points:\n  main:\n    parameters: {}\n", "entry point 'main' has no 'command'"),
        ("entry_points:\n  main: python x.py\n", "must be a mapping with a 'command'"),
        ("entry_points: python x.py\n", "'entry_points' must be a mapping"),
        ("entry_points:\n  main:\n    command: python x.py {alpha}\n", "'{alpha}'"),
        ("entry_points:\n  main:\n    command: python -c 'd={}'\n", "literal braces"),
        ("python_env: missing.yaml\nentry_points: {}\n", "missing.yaml"),
        ("python_env: a.yaml\nconda_env: b.yaml\nentry_points: {}\n", "multiple environment"),
    ],
)
def test_invalid_mlproject_names_the_file(tmp_path: Path, text: str, expected: str) -> None:
    make_project(tmp_path, text)
    with pytest.raises(ProjectError) as err:
        load_project(tmp_path)
    assert expected in err.value.message
    assert str(tmp_path.resolve() / "MLproject") in err.value.message


def test_load_project_without_mlproject(tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match="No MLproject file"):
        load_project(tmp_path)


# --- resolve_entry_point ---------------------------------------------------------------


def test_resolve_fills_defaults_as_strings(tmp_path: Path) -> None:
    project = load_project(make_project(tmp_path))
    resolved = resolve_entry_point(project, "main", {"data": "data/in.nc", "epochs": "10"})
    assert resolved.params == {
        "epochs": "10",
        "learning_rate": "0.01",
        "station": "Juelich",
        "data": "data/in.nc",
    }
    # path values stay relative: the command runs inside the unpacked package on the cluster.
    assert resolved.command == (
        "python train.py -e 10 --lr 0.01 --station Juelich --data data/in.nc"
    )
    assert not resolved.is_script


def test_command_is_the_one_mlflow_run_builds(tmp_path: Path) -> None:
    from mlflow.projects._project_spec import load_project as mlflow_load

    project = load_project(make_project(tmp_path))
    params = {"data": "s3://b/k", "station": "Bad Homburg", "learning_rate": "1e-3"}
    ours = resolve_entry_point(project, "main", params).command
    theirs = mlflow_load(str(tmp_path)).get_entry_point("main").compute_command(params, None)
    assert ours == theirs


def test_unknown_entry_point_lists_valid_ones(tmp_path: Path) -> None:
    project = load_project(make_project(tmp_path))
    with pytest.raises(ProjectError) as err:
        resolve_entry_point(project, "trian", {})
    assert "'trian'" in err.value.message
    assert "'main', 'evaluate'" in err.value.message


def test_missing_required_parameter_is_named(tmp_path: Path) -> None:
    project = load_project(make_project(tmp_path))
    with pytest.raises(ProjectError) as err:
        resolve_entry_point(project, "main", {"epochs": "3"})
    assert "Missing required parameter 'data'" in err.value.message
    assert "'epochs', 'learning_rate', 'station', 'data'" in err.value.message


def test_unknown_parameter_is_refused_with_valid_ones(tmp_path: Path) -> None:
    project = load_project(make_project(tmp_path))
    with pytest.raises(ProjectError) as err:
        resolve_entry_point(project, "main", {"data": "x", "epoch": "3"})
    assert "Unknown parameter 'epoch'" in err.value.message
    assert "'epochs', 'learning_rate', 'station', 'data'" in err.value.message


@pytest.mark.parametrize(
    ("name", "value"),
    [("learning_rate", "abc"), ("learning_rate", ""), ("epochs", "1.5"), ("epochs", "ten")],
)
def test_wrong_type_is_refused(tmp_path: Path, name: str, value: str) -> None:
    project = load_project(make_project(tmp_path))
    with pytest.raises(ProjectError) as err:
        resolve_entry_point(project, "main", {"data": "x", name: value})
    assert f"'{name}'" in err.value.message and repr(value) in err.value.message


def test_valid_numbers_pass(tmp_path: Path) -> None:
    project = load_project(make_project(tmp_path))
    resolved = resolve_entry_point(
        project, "main", {"data": "x", "learning_rate": "1e-4", "epochs": " 7"}
    )
    assert resolved.params["learning_rate"] == "1e-4"


def test_invalid_default_is_reported_as_the_mlprojects_fault(tmp_path: Path) -> None:
    text = (
        "entry_points:\n  main:\n    parameters:\n      n: {type: int, default: many}\n"
        "    command: python train.py {n}\n"
    )
    project = load_project(make_project(tmp_path, text))
    with pytest.raises(ProjectError, match="its default in the MLproject 'many'"):
        resolve_entry_point(project, "main", {})
    assert resolve_entry_point(project, "main", {"n": "3"}).params == {"n": "3"}


def test_values_mlflow_would_cut_short_are_refused(tmp_path: Path) -> None:
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, _validate_param

    at_limit, over = "x" * MAX_PARAM_VAL_LENGTH, "x" * (MAX_PARAM_VAL_LENGTH + 1)
    # What MLflow would record of the longer value: not what the job ran with.
    assert _validate_param("station", over) == Param("station", at_limit)
    project = load_project(make_project(tmp_path))
    with pytest.raises(ProjectError) as err:
        resolve_entry_point(project, "main", {"data": "x", "station": over})
    assert "'station'" in err.value.message and str(MAX_PARAM_VAL_LENGTH + 1) in err.value.message
    with pytest.raises(ProjectError, match="'alpha'"):
        resolve_entry_point(project, "train.py", {"alpha": over})
    resolved = resolve_entry_point(project, "main", {"data": "x", "station": at_limit})
    assert resolved.params["station"] == at_limit


def test_uri_parameter_is_checked_by_mlflow(tmp_path: Path) -> None:
    project = load_project(make_project(tmp_path))
    with pytest.raises(ProjectError, match="Expected URI"):
        resolve_entry_point(project, "evaluate", {"source": "not a uri"})
    assert resolve_entry_point(project, "evaluate", {}).command == "python train.py s3://bucket/x"


def test_script_entry_point_passes_extra_params_like_mlflow(tmp_path: Path) -> None:
    project = load_project(make_project(tmp_path))
    resolved = resolve_entry_point(project, "train.py", {"alpha": "0.5", "name": "a b"})
    assert resolved.is_script
    assert resolved.command == "python train.py --alpha 0.5 --name 'a b'"
    assert resolved.params == {"alpha": "0.5", "name": "a b"}


def test_script_entry_point_must_exist_inside_project(tmp_path: Path) -> None:
    project = load_project(make_project(tmp_path / "p"))
    (tmp_path / "outside.py").write_text("")
    for name in ("missing.py", "../outside.py"):
        with pytest.raises(ProjectError, match="nor a script file inside"):
            resolve_entry_point(project, name, {})


def test_shell_script_entry_point_uses_bash(tmp_path: Path) -> None:
    project = load_project(make_project(tmp_path))
    (tmp_path / "run.sh").write_text("echo hi\n")
    assert resolve_entry_point(project, "run.sh", {"x": "1"}).command == "bash run.sh --x 1"


INJECTIONS = [
    "1; touch pwned",
    "$(touch pwned)",
    "`touch pwned`",
    'it\'s "quoted" && touch pwned',
    "a\nb",
    "",
]


@pytest.mark.parametrize("value", INJECTIONS)
def test_values_reach_the_program_literally(tmp_path: Path, value: str) -> None:
    project = load_project(make_project(tmp_path))
    resolved = resolve_entry_point(project, "main", {"data": "d", "station": value})
    argv = _run(tmp_path, resolved.command)
    assert argv[argv.index("--station") + 1] == value
    assert not (tmp_path / "pwned").exists()


def test_script_extra_param_keys_and_values_are_quoted(tmp_path: Path) -> None:
    project = load_project(make_project(tmp_path))
    # A key MLflow records may hold spaces (no ';': see the test of refused names).
    resolved = resolve_entry_point(project, "train.py", {"k touch pwned": "1; touch pwned"})
    argv = _run(tmp_path, resolved.command)
    assert argv == ["--k touch pwned", "1; touch pwned"]
    assert not (tmp_path / "pwned").exists()


def _run(cwd: Path, command: str) -> list[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", command], cwd=cwd, env=env, check=True, timeout=60)
    return json.loads((cwd / "argv.json").read_text())


# --- parse_param_args ------------------------------------------------------------------


def test_parse_param_args() -> None:
    assert parse_param_args(["epochs=3", "expr=a=b", "empty="]) == {
        "epochs": "3",
        "expr": "a=b",
        "empty": "",
    }
    assert parse_param_args([]) == {}


@pytest.mark.parametrize("arg", ["epochs", "=3"])
def test_parse_param_args_refuses_malformed(arg: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_param_args(["ok=1", arg])
    assert repr(arg) in err.value.message and "name=value" in err.value.message


def test_parse_param_args_refuses_repeats() -> None:
    with pytest.raises(InvalidRequest, match="'epochs' is given twice"):
        parse_param_args(["epochs=1", "epochs=2"])


def test_example_project_loads() -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "weather-forecast"
    project = load_project(example)
    assert project.name == "weather-forecast"
    assert set(project.entry_points) == {"main", "fail", "sleep"}
    resolved = resolve_entry_point(project, "main", {"epochs": "2"})
    assert resolved.params == {"epochs": "2", "learning_rate": "0.01", "station": "Juelich"}


def test_parameter_names_mlflow_refuses_are_refused_before_a_run_exists(tmp_path: Path) -> None:
    # The run was created, then MLflow refused to log the parameter: a run that never ran
    # was left behind, and the error named only 'params[0].key'.
    text = """\
name: weather
entry_points:
  main:
    parameters:
      "T_2m (°C)": {type: float, default: 1.5}
      température: {type: float, default: 2.0}
    command: "python train.py"
"""
    project = load_project(make_project(tmp_path, text))
    with pytest.raises(ProjectError) as err:
        resolve_entry_point(project, "main", {})
    message = err.value.message
    assert "'T_2m (°C)'" in message and "Rename it in" in message and "MLproject" in message
    assert "température" not in message  # letters of any language are fine
    with pytest.raises(ProjectError, match="'a/../b'.*Pass it under another name"):
        resolve_entry_point(project, "train.py", {"a/../b": "1"})
    with pytest.raises(ProjectError, match="at most 250"):
        resolve_entry_point(project, "train.py", {"k" * 251: "1"})
    assert resolve_entry_point(project, "train.py", {"Δt": "1"}).params == {"Δt": "1"}
