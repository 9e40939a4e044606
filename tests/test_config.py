"""The compute backend config: Mantik compatibility, precise errors, units."""

from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path

import pytest
import yaml

from mantik_jupyter.compute.config import (
    Apptainer,
    ComputeConfig,
    MantikConfigWarning,
    MantikDeprecationWarning,
    find_config,
    format_slurm_time,
    load_config,
    parse_config,
    parse_memory,
    parse_runtime,
)
from mantik_jupyter.errors import ConfigError

UNICORE_URL = "https://zam2125.zam.kfa-juelich.de:9112/JUWELS/rest/core"

# A config as Mantik users write it today (docs example shape).
MANTIK_YAML = f"""\
UnicoreApiUrl: {UNICORE_URL}
Environment:
  Apptainer:
    Path: mantik-image.sif
    Type: local
    Options:
      - --nv
      - -B /p/scratch:/scratch
  Modules:
    - Stages/2024
    - GCC
    - Python/3.11.3
  Variables:
    OMP_NUM_THREADS: 08
    DATA_DIR: $PROJECT/data
    WANDB_MODE: offline
  PreRunCommandOnLoginNode:
    - echo "preparing"
    - mkdir -p $HOME/out
  PostRunCommandOnComputeNode: echo done
Resources:
  Queue: devel
  Runtime: 1h
  Nodes: 1
  TotalCPUs: 4
  CPUsPerNode: 4
  GPUsPerNode: 4
  MemoryPerNode: 10G
  NodeConstraints: mem192
Exclude:
  - "*.sif.bak"
  - mlruns/
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "MANTIK_SSH_USERNAME",
        "MANTIK_SSH_PRIVATE_KEY",
        "MANTIK_SSH_PASSWORD",
        "MANTIK_COMPUTE_BUDGET_ACCOUNT",
    ):
        monkeypatch.delenv(name, raising=False)


def write(tmp_path: Path, text: str, name: str = "compute-backend-config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def errors_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return excinfo.value.message.splitlines()[1:]


def yaml_backend(backend: dict[str, object]) -> str:
    """The backend section of a config as YAML lines."""
    return yaml.safe_dump(backend, sort_keys=False)


# --------------------------------------------------------------------------- Mantik configs


def test_existing_mantik_unicore_config_is_accepted_unchanged(tmp_path: Path) -> None:
    path = write(tmp_path, MANTIK_YAML)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning
        config = load_config(path)
    assert config.backend == "unicore"
    assert config.unicore is not None and config.unicore.api_url == UNICORE_URL
    assert config.ssh is config.firecrest is config.local is None
    assert config.source == path
    assert config.warnings == ()
    res = config.resources
    assert (res.queue, res.runtime, res.nodes, res.total_cpus) == ("devel", 3600, 1, 4)
    assert (res.cpus_per_node, res.gpus_per_node, res.memory_per_node) == (4, 4, 10240)
    assert res.node_constraints == "mem192"
    env = config.environment
    assert env.apptainer == Apptainer(
        path="mantik-image.sif", type="local", options=("--nv", "-B /p/scratch:/scratch")
    )
    assert env.modules == ("Stages/2024", "GCC", "Python/3.11.3")
    # Values as written: YAML 1.1 would make 08 the integer 8.
    assert env.variables == {
        "OMP_NUM_THREADS": "08",
        "DATA_DIR": "$PROJECT/data",
        "WANDB_MODE": "offline",
    }
    assert env.pre_run_command_on_login_node == ('echo "preparing"', "mkdir -p $HOME/out")
    assert env.post_run_command_on_compute_node == ("echo done",)
    assert config.exclude == ("*.sif.bak", "mlruns/")


def test_json_config_is_read_like_yaml(tmp_path: Path) -> None:
    data = {
        "UnicoreApiUrl": UNICORE_URL,
        "Environment": {"Apptainer": {"Path": "/p/images/x.sif", "Type": "remote"}},
        "Resources": {"Queue": "batch", "Nodes": 2, "Runtime": "2h"},
    }
    path = write(tmp_path, json.dumps(data, indent=2), "compute-backend-config.json")
    config = load_config(path)
    assert config.environment.apptainer == Apptainer(path="/p/images/x.sif", type="remote")
    assert config.resources.runtime == 7200
    assert config.resources.nodes == 2


def test_mantik_python_path_mapping_and_plain_string() -> None:
    base = {"Local": {}, "Resources": {}}
    mapping = parse_config({**base, "Environment": {"Python": {"Path": "/venv"}}})
    plain = parse_config({**base, "Environment": {"Python": "/venv"}})
    assert mapping.environment.python == plain.environment.python == "/venv"


def test_mantik_string_port_and_default_port() -> None:
    quoted = parse_config({"SSH": {"Hostname": "h", "Port": "2222"}, "Resources": {"Queue": "q"}})
    default = parse_config({"SSH": {"Hostname": "h"}, "Resources": {"Queue": "q"}})
    assert quoted.ssh is not None and quoted.ssh.port == 2222
    assert default.ssh is not None and default.ssh.port == 22


def test_firecrest_section() -> None:
    config = parse_config(
        {
            "Firecrest": {
                "ApiUrl": "https://firecrest.cscs.ch",
                "TokenUrl": "https://auth.cscs.ch/token",
                "Machine": "daint",
            },
            "Resources": {"Queue": "normal"},
        }
    )
    assert config.backend == "firecrest"
    assert config.firecrest is not None and config.firecrest.machine == "daint"


def test_local_backend_needs_no_resources() -> None:
    config = parse_config({"Local": None})
    assert config.backend == "local"
    assert config.local is not None and config.local.directory is None
    assert config.resources.queue is None


def test_sexagesimal_runtime_is_read_as_written(tmp_path: Path) -> None:
    # YAML 1.1 reads 1:30:00 as the integer 5400; it means 1 h 30 min.
    path = write(tmp_path, "Local: {}\nResources:\n  Runtime: 1:30:00\n")
    assert load_config(path).resources.runtime == 5400


@pytest.mark.parametrize("runtime", ["0", 0, "0m", "00:00:00"])
@pytest.mark.parametrize("memory", ["0", 0, "0G"])
def test_zero_runtime_and_memory_mean_no_limit_and_all_memory(
    runtime: object, memory: object
) -> None:
    # Mantik accepted both; Slurm reads --time=0 as no limit and --mem=0 as the whole node.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = parse_config(
            {
                "SSH": {"Hostname": "h"},
                "Resources": {"Queue": "q", "Runtime": runtime, "MemoryPerNode": memory},
            }
        )
    assert (config.resources.runtime, config.resources.memory_per_node) == (0, 0)
    assert parse_config(config.to_dict()).resources == config.resources


def test_zero_runtime_and_memory_are_left_out_for_unicore() -> None:
    # UNICORE has no request for "no limit"; sending 0 would be refused or misread.
    with pytest.warns(MantikConfigWarning) as record:
        config = parse_config(
            {
                "UnicoreApiUrl": UNICORE_URL,
                "Resources": {"Queue": "q", "Runtime": "0", "MemoryPerNode": 0},
            },
            "c.yaml",
        )
    assert config.resources.runtime is None
    assert config.resources.memory_per_node is None
    assert [str(w.message) for w in record] == list(config.warnings)
    assert config.warnings[0].startswith("c.yaml: Resources.Runtime: 0 (no time limit) cannot")
    assert config.warnings[1].startswith("c.yaml: Resources.MemoryPerNode: 0 (all of the node")


@pytest.mark.parametrize(
    ("backend", "written", "seconds", "unit", "suggestion"),
    [
        ({"UnicoreApiUrl": UNICORE_URL}, "3600", 3600, "seconds", "'1h'"),
        ({"UnicoreApiUrl": UNICORE_URL}, "Runtime: 90", 90, "seconds", "'90s'"),
        ({"SSH": {"Hostname": "h"}}, "3600", 216000, "minutes", "'60h'"),
        ({"SSH": {"Hostname": "h"}}, "Runtime: 90", 5400, "minutes", "'90m'"),
    ],
)
def test_plain_number_runtime_follows_the_scheduler_and_warns(
    tmp_path: Path,
    backend: dict[str, object],
    written: str,
    seconds: int,
    unit: str,
    suggestion: str,
) -> None:
    # UNICORE reads a plain Runtime as seconds, Slurm as minutes; Mantik handed it to
    # UNICORE unchanged, so an existing UNICORE config must keep meaning seconds.
    runtime = written.removeprefix("Runtime: ")
    line = f"Runtime: {runtime}" if written.startswith("Runtime") else f'Runtime: "{runtime}"'
    head = yaml_backend(backend)
    path = write(tmp_path, f"{head}Resources:\n  Queue: q\n  {line}\n")
    with pytest.warns(MantikConfigWarning) as record:
        config = load_config(path)
    assert config.resources.runtime == seconds
    (message,) = config.warnings
    assert message.startswith(f"{path}:{head.count(chr(10)) + 3}: Resources.Runtime: ")
    assert f"is read as {unit}" in message and f"e.g. {suggestion}" in message
    assert [str(w.message) for w in record] == [message]


def test_runtime_with_unit_means_the_same_everywhere_without_warning() -> None:
    for backend in ({"UnicoreApiUrl": UNICORE_URL}, {"SSH": {"Hostname": "h"}}):
        for runtime in ("1h", "60m", "01:00:00", "0-01:00:00"):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                config = parse_config({**backend, "Resources": {"Queue": "q", "Runtime": runtime}})
            assert config.resources.runtime == 3600


def test_unicore_plain_runtime_round_trips_through_to_dict() -> None:
    with pytest.warns(MantikConfigWarning):
        config = parse_config(
            {"UnicoreApiUrl": UNICORE_URL, "Resources": {"Queue": "q", "Runtime": 5400}}
        )
    assert config.to_dict()["Resources"]["Runtime"] == "0-01:30:00"
    assert parse_config(config.to_dict()).resources.runtime == 5400


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("SSH", "Port", "²²"),
        ("SSH", "Port", "２２"),
        ("Resources", "Nodes", "¹"),
        ("Resources", "TotalCPUs", "٤"),
    ],
)
def test_non_ascii_digits_are_a_config_error_naming_key_and_value(
    tmp_path: Path, section: str, key: str, value: str
) -> None:
    data: dict[str, dict[str, object]] = {"SSH": {"Hostname": "h"}, "Resources": {"Queue": "q"}}
    data[section][key] = value
    path = write(tmp_path, json.dumps(data, ensure_ascii=False), "compute-backend-config.json")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    (error,) = errors_of(excinfo)
    assert error.startswith(f"{path}:")
    assert f": {section}.{key}: expected an integer, got a string {value!r}" in error


# --------------------------------------------------------------------------- errors


def test_unknown_key_names_file_line_path_and_suggestion(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""\
        UnicoreApiUrl: {UNICORE_URL}
        Resources:
          Queue: batch
          Quueue: devel
        """,
    )
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert errors_of(excinfo) == [f"{path}:4: Resources.Quueue: unknown key; did you mean 'Queue'?"]


def test_unknown_key_in_json_names_line(tmp_path: Path) -> None:
    text = json.dumps(
        {"Local": {}, "Environment": {"Modules": ["a"], "Varables": {"A": "1"}}}, indent=2
    )
    path = write(tmp_path, text, "compute-backend-config.json")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    line = text.splitlines().index('    "Varables": {') + 1
    assert errors_of(excinfo) == [
        f"{path}:{line}: Environment.Varables: unknown key; did you mean 'Variables'?"
    ]


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config({"Local": {}, "Resources": {"Banana": 1}}, "c.yaml")
    (error,) = errors_of(excinfo)
    assert error.startswith("c.yaml: Resources.Banana: unknown key; valid keys here are Queue,")


def test_case_slip_is_suggested() -> None:
    with pytest.raises(ConfigError, match="did you mean 'UnicoreApiUrl'"):
        parse_config({"UnicoreApiURL": UNICORE_URL, "Resources": {"Queue": "q"}})


def test_wrong_type_names_expected_type_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, "Local: {}\nResources:\n  Nodes: many\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert errors_of(excinfo) == [
        f"{path}:3: Resources.Nodes: expected an integer, got a string 'many'"
    ]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"Modules": "GCC"}, "Environment.Modules: expected a list of strings, got a string"),
        ({"Modules": ["GCC", 3]}, "Environment.Modules[1]: expected a string, got an integer 3"),
        ({"Variables": ["A=1"]}, "Environment.Variables: expected a mapping"),
        (
            {"Variables": {"A": ["x"]}},
            "Environment.Variables.A: expected a string, number or boolean, got a list",
        ),
        ({"Variables": {"A": None}}, "Environment.Variables.A: has no value"),
        ({"Variables": {"1A": "x"}}, "Environment.Variables.1A: is not a valid"),
        ({"Variables": {"A-B": "x"}}, "Environment.Variables.A-B: is not a valid"),
        ({"PreRunCommandOnComputeNode": {"a": 1}}, "expected a list of strings or a string"),
        ({"Apptainer": {"Type": "local"}}, "Environment.Apptainer.Path: missing"),
        ({"Apptainer": {"Path": "x.sif", "Type": "docker"}}, "must be 'local' or 'remote'"),
        (
            {"Apptainer": {"Path": "rel/x.sif", "Type": "remote"}},
            "a remote image path must be absolute",
        ),
        (
            {"Apptainer": {"Path": "x.sif", "Options": "--bind '/a"}},
            "Environment.Apptainer.Options[0]: cannot be split into words",
        ),
        (
            {"Apptainer": {"Path": "x.sif"}, "Python": "/venv"},
            "Apptainer and Python cannot both be given",
        ),
    ],
)
def test_environment_errors(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config({"Local": {}, "Environment": section})


def test_variable_values_are_not_shown_in_errors() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config({"Local": {}, "Environment": {"Variables": {"TOKEN": ["s3cr3t"]}}})
    assert "s3cr3t" not in excinfo.value.message


@pytest.mark.parametrize("backend", ["SSH", "UnicoreApiUrl", "Firecrest"])
def test_missing_queue_is_named(backend: str) -> None:
    sections = {
        "SSH": {"Hostname": "login.example.org"},
        "UnicoreApiUrl": UNICORE_URL,
        "Firecrest": {
            "ApiUrl": "https://f.example",
            "TokenUrl": "https://t.example",
            "Machine": "m",
        },
    }
    with pytest.raises(ConfigError) as excinfo:
        parse_config({backend: sections[backend], "Resources": {"Nodes": 1}}, "c.yaml")
    assert errors_of(excinfo) == [
        "c.yaml: Resources.Queue: missing; name the Slurm partition to run in, e.g. batch"
    ]


def test_missing_resources_section_is_named() -> None:
    with pytest.raises(ConfigError, match="Resources: missing; add a Resources section"):
        parse_config({"UnicoreApiUrl": UNICORE_URL})


def test_missing_hostname_is_named() -> None:
    with pytest.raises(ConfigError, match="SSH.Hostname: missing; this key is required"):
        parse_config({"SSH": {"Port": 22}, "Resources": {"Queue": "q"}})


def test_two_backends_are_named(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"UnicoreApiUrl: {UNICORE_URL}\nSSH:\n  Hostname: h\nResources:\n  Queue: q\n",
    )
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert errors_of(excinfo) == [
        f"{path}:2: SSH: only one backend section is allowed, found UnicoreApiUrl and SSH; keep one"
    ]


def test_no_backend_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config({"Resources": {"Queue": "q"}}, "c.yaml")
    (error,) = errors_of(excinfo)
    for choice in ("UnicoreApiUrl", "SSH", "Firecrest", "Local"):
        assert choice in error


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("MemoryPerNode", "lots", "memory 'lots' is not understood"),
        ("MemoryPerNode", "32X", "memory '32X' is not understood"),
        ("MemoryPerNode", -1, "memory -1 cannot be negative"),
        ("Runtime", "soon", "runtime 'soon' is not understood"),
        ("Runtime", "1h30x", "runtime '1h30x' is not understood"),
        ("Runtime", "10:75", "runtime '10:75' is not understood"),
        ("Runtime", -5, "runtime -5 cannot be negative"),
        ("Runtime", "３６００", "runtime '３６００' is not understood"),
        ("MemoryPerNode", "３２G", "memory '３２G' is not understood"),
    ],
)
def test_bad_memory_and_runtime_name_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config({"Local": {}, "Resources": {key: value}}, "c.yaml")
    (error,) = errors_of(excinfo)
    assert error.startswith(f"c.yaml: Resources.{key}: {message}")


def test_all_errors_are_collected_one_per_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        SSH:
          Hostname: h
          Prot: 22
        Resources:
          Nodes: two
          MemoryPerNode: much
        Enviroment: {}
        """,
    )
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    message = excinfo.value.message
    assert message.splitlines()[0] == f"{path}: 5 problems in the compute backend config:"
    assert errors_of(excinfo) == [
        f"{path}:3: SSH.Prot: unknown key; did you mean 'Port'?",
        f"{path}:4: Resources.Queue: missing; name the Slurm partition to run in, e.g. batch",
        f"{path}:5: Resources.Nodes: expected an integer, got a string 'two'",
        f"{path}:6: Resources.MemoryPerNode: memory 'much' is not understood; write a number "
        "with a unit such as 32G, 32GB, 12GiB, 500M or 1T (a plain number counts megabytes; "
        "0 means all of the node's memory)",
        f"{path}:7: Enviroment: unknown key; did you mean 'Environment'?",
    ]


def test_sbatch_unsafe_values_are_rejected_at_load() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(
            {
                "SSH": {"Hostname": "h"},
                "Resources": {"Queue": "batch\n#SBATCH --uid=0", "QoS": "a b"},
            }
        )
    message = excinfo.value.message
    assert "Resources.Queue: must be on one line" in message
    assert "Resources.QoS: 'a b' cannot go into a #SBATCH line" in message


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "Local: {}\nResources:\n  Nodes: 1\n  Nodes: 2\n")
    with pytest.raises(ConfigError, match=r":4: Resources.Nodes: is given twice"):
        load_config(path)


def test_firecrest_rejects_login_node_commands() -> None:
    with pytest.raises(ConfigError, match="cannot run through firecREST"):
        parse_config(
            {
                "Firecrest": {"ApiUrl": "https://a.b", "TokenUrl": "https://c.d", "Machine": "m"},
                "Resources": {"Queue": "q"},
                "Environment": {"PreRunCommandOnLoginNode": "echo hi"},
            }
        )


def test_bad_url_is_named() -> None:
    with pytest.raises(ConfigError, match="UnicoreApiUrl: expected an http\\(s\\) URL"):
        parse_config({"UnicoreApiUrl": "zam2125:9112/JUWELS", "Resources": {"Queue": "q"}})


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "compute-backend-config.yaml"
    with pytest.raises(ConfigError, match=f"{missing} does not exist"):
        load_config(missing)


def test_a_config_folder_means_the_config_in_it(tmp_path: Path) -> None:
    from mantik_jupyter.compute.run_inputs import resolve_config

    project, cluster = tmp_path / "project", tmp_path / "configs" / "juwels"
    project.mkdir()
    cluster.mkdir(parents=True)
    # It said "does not exist" of a folder that exists.
    with pytest.raises(ConfigError, match="is a folder without a config .*Name the config file"):
        resolve_config(project, cluster, None)
    config = write(cluster, "Local: {}\n")
    assert resolve_config(project, cluster, None) == config
    assert resolve_config(project, str(cluster), tmp_path) == config


def test_invalid_yaml_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "Local: {}\nResources:\n  Queue: [batch\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4:1: invalid YAML: "):
        load_config(path)


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '{\n  "Local": {},\n  "Resources": {,}\n}', "c.json")
    with pytest.raises(ConfigError, match=rf"^{path}:3:17: invalid JSON: "):
        load_config(path)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just text\n"])
def test_config_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="it needs a backend section"):
        load_config(write(tmp_path, text))


def test_unsupported_extension(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="use a .yaml, .yml or .json file"):
        load_config(write(tmp_path, "Local: {}", "config.toml"))


# --------------------------------------------------------------------------- legacy keys


def test_legacy_keys_work_and_warn(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""\
        UnicoreApiUrl: {UNICORE_URL}
        Resources:
          Queue: batch
          CPUs: 48
          Memory: 64G
        Environment:
          Singularity:
            Path: image.sif
          PreRunCommand:
            Command: module list
            ExecuteOnLoginNode: true
          PostRunCommand:
            Command: echo finished
            ExecuteOnLoginNode: false
        """,
    )
    with pytest.warns(MantikDeprecationWarning) as record:
        config = load_config(path)
    assert config.resources.total_cpus == 48
    assert config.resources.memory_per_node == 65536
    assert config.environment.apptainer == Apptainer(path="image.sif")
    assert config.environment.pre_run_command_on_login_node == ("module list",)
    assert config.environment.post_run_command_on_compute_node == ("echo finished",)
    assert config.warnings == (
        f"{path}:4: Resources.CPUs: is deprecated; rename it to 'Resources.TotalCPUs'",
        f"{path}:5: Resources.Memory: is deprecated; rename it to 'Resources.MemoryPerNode'",
        f"{path}:7: Environment.Singularity: is deprecated; rename it to 'Environment.Apptainer'",
        f"{path}:9: Environment.PreRunCommand: is deprecated; write it as "
        "'Environment.PreRunCommandOnLoginNode'",
        f"{path}:12: Environment.PostRunCommand: is deprecated; write it as "
        "'Environment.PostRunCommandOnComputeNode'",
    )
    assert [str(w.message) for w in record] == list(config.warnings)


def test_legacy_pre_run_command_defaults_to_compute_node() -> None:
    with pytest.warns(MantikDeprecationWarning, match="PreRunCommandOnComputeNode"):
        config = parse_config(
            {"Local": {}, "Environment": {"PreRunCommand": {"Command": ["a", "b"]}}}
        )
    assert config.environment.pre_run_command_on_compute_node == ("a", "b")


@pytest.mark.parametrize(
    ("section", "resources"),
    [
        ({"Singularity": {"Path": "a.sif"}, "Apptainer": {"Path": "b.sif"}}, {}),
        ({}, {"CPUs": 1, "TotalCPUs": 2}),
        ({}, {"Memory": "1G", "MemoryPerNode": "2G"}),
        (
            {"PreRunCommand": {"Command": "a"}, "PreRunCommandOnComputeNode": "b"},
            {},
        ),
    ],
)
def test_old_and_new_key_together_is_an_error(
    section: dict[str, object], resources: dict[str, object]
) -> None:
    with pytest.raises(ConfigError, match="is the old (name|form) of"):
        parse_config({"Local": {}, "Resources": resources, "Environment": section})


def test_reserved_variable_is_ignored_with_a_warning() -> None:
    with pytest.warns(MantikConfigWarning, match="MLFLOW_TRACKING_URI: is set by mantik"):
        config = parse_config(
            {"Local": {}, "Environment": {"Variables": {"MLFLOW_TRACKING_URI": "x", "A": 1}}}
        )
    assert config.environment.variables == {"A": "1"}


# --------------------------------------------------------------------------- SSH credentials


def test_ssh_credentials_from_env_stay_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANTIK_SSH_USERNAME", "alice")
    monkeypatch.setenv("MANTIK_SSH_PASSWORD", "hunter2-pw")
    monkeypatch.setenv("MANTIK_SSH_PRIVATE_KEY", "-----BEGIN KEY-----secretkey")
    config = parse_config({"SSH": {"Hostname": "login"}, "Resources": {"Queue": "q"}})
    assert config.ssh is not None
    assert config.ssh.username == "alice"
    assert config.ssh.password == "hunter2-pw"
    assert config.ssh.private_key == "-----BEGIN KEY-----secretkey"
    for text in (repr(config), repr(config.ssh), json.dumps(config.to_dict())):
        assert "hunter2-pw" not in text
        assert "secretkey" not in text
    assert config.to_dict()["SSH"] == {"Hostname": "login", "Port": 22, "Username": "alice"}


def test_username_in_file_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANTIK_SSH_USERNAME", "alice")
    config = parse_config(
        {"SSH": {"Hostname": "h", "Username": "bob"}, "Resources": {"Queue": "q"}}
    )
    assert config.ssh is not None and config.ssh.username == "bob"


def test_error_messages_hold_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANTIK_SSH_PASSWORD", "hunter2-pw")
    with pytest.raises(ConfigError) as excinfo:
        parse_config({"SSH": {"Hostname": "h", "Pasword": "x"}, "Resources": {}})
    assert "hunter2-pw" not in excinfo.value.message


def test_compute_budget_account_from_file_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"UnicoreApiUrl": UNICORE_URL, "Resources": {"Queue": "q"}}
    assert parse_config(base).compute_budget_account is None
    monkeypatch.setenv("MANTIK_COMPUTE_BUDGET_ACCOUNT", "deepacf")
    assert parse_config(base).compute_budget_account == "deepacf"
    in_file = parse_config({**base, "ComputeBudgetAccount": "training2400"})
    assert in_file.compute_budget_account == "training2400"


# --------------------------------------------------------------------------- to_dict, find


def test_to_dict_is_canonical_and_round_trips(tmp_path: Path) -> None:
    # Old keys and the plain-number Runtime both warn.
    with pytest.warns(MantikConfigWarning):
        config = parse_config(
            {
                "SSH": {"Hostname": "h", "Port": 2222, "RemoteDirectory": "/scratch/me"},
                "Resources": {"Queue": "q", "Runtime": 90, "Memory": "1.5G", "CPUs": 8},
                "Environment": {
                    "Singularity": {"Path": "a.sif", "Options": "--nv"},
                    "Variables": {"A": True},
                    "PostRunCommand": "echo bye",
                },
                "Exclude": ["data/"],
            },
            "c.yaml",
        )
    data = config.to_dict()
    assert data == {
        "SSH": {"Hostname": "h", "Port": 2222, "RemoteDirectory": "/scratch/me"},
        "Resources": {
            "Queue": "q",
            "Runtime": "0-01:30:00",
            "TotalCPUs": 8,
            "MemoryPerNode": "1536M",
        },
        "Environment": {
            "Apptainer": {"Path": "a.sif", "Type": "local", "Options": ["--nv"]},
            "Variables": {"A": "true"},
            "PostRunCommandOnComputeNode": ["echo bye"],
        },
        "Exclude": ["data/"],
    }
    again = load_config(write(tmp_path, json.dumps(data), "compute-backend-config.json"))
    assert again.warnings == ()
    assert again.to_dict() == data
    assert isinstance(again, ComputeConfig)


def test_to_dict_of_the_mantik_example_round_trips(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MANTIK_YAML))
    assert parse_config(config.to_dict()).to_dict() == config.to_dict()


def test_find_config_order(tmp_path: Path) -> None:
    assert find_config(tmp_path) is None
    (tmp_path / "compute-backend-config.json").write_text("{}")
    assert find_config(tmp_path) == tmp_path / "compute-backend-config.json"
    (tmp_path / "compute-backend-config.yml").write_text("")
    assert find_config(tmp_path) == tmp_path / "compute-backend-config.yml"
    (tmp_path / "compute-backend-config.yaml").write_text("")
    assert find_config(tmp_path) == tmp_path / "compute-backend-config.yaml"


def test_local_image_place_in_package_follows_the_resolved_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    project = home / "project"
    (project / "containers").mkdir(parents=True)
    (project / "containers" / "x.sif").write_text("SIF")
    (home / "shared").mkdir()
    (home / "shared" / "y.sif").write_text("SIF")
    (project / "link.sif").symlink_to(project / "containers" / "x.sif")
    (project / "out.sif").symlink_to(home / "shared" / "y.sif")
    monkeypatch.setenv("HOME", str(home))
    places = {
        "image.sif": "image.sif",
        "images/x.sif": "images/x.sif",
        "./containers/x.sif": "containers/x.sif",
        # inside the project however it is written: keeps its place
        str(project / "containers" / "x.sif"): "containers/x.sif",
        "~/project/containers/x.sif": "containers/x.sif",
        "link.sif": "containers/x.sif",
        # outside the project: where packaging puts extra files
        str(home / "shared" / "y.sif"): "images/y.sif",
        "../shared/y.sif": "images/y.sif",
        "~/shared/y.sif": "images/y.sif",
        "out.sif": "images/y.sif",
    }
    for path, place in places.items():
        assert Apptainer(path=path).package_path(project) == place, path


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("value", "megabytes"),
    [
        ("32G", 32768),
        ("32GB", 32768),
        ("32gb", 32768),
        ("12GiB", 12288),
        ("500M", 500),
        ("500MB", 500),
        ("1T", 1048576),
        ("1TiB", 1048576),
        ("2048K", 2),
        ("1.5G", 1536),
        ("4096", 4096),
        (" 8 G ", 8192),
        (4096, 4096),
        (100.5, 101),
        # --mem=0: all of the node's memory
        ("0", 0),
        ("0G", 0),
        (0, 0),
    ],
)
def test_parse_memory(value: str | int | float, megabytes: int) -> None:
    assert parse_memory(value) == megabytes


@pytest.mark.parametrize(
    "value", ["", "G", "32X", "32 GBs", "-1G", -1, -0.5, float("nan"), True, None, [1]]
)
def test_parse_memory_rejects(value: object) -> None:
    with pytest.raises(ConfigError):
        parse_memory(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30m", 1800),
        ("1h30m", 5400),
        ("1h 30m", 5400),
        ("2d", 172800),
        ("90s", 90),
        ("2h", 7200),
        ("1.5h", 5400),
        ("1d2h3m4s", 93784),
        ("45min", 2700),
        ("2 hours", 7200),
        ("01:30:00", 5400),
        ("100:00:00", 360000),
        ("10:30", 630),
        ("1-12:00:00", 129600),
        ("2-06", 194400),
        ("1-02:30", 95400),
        ("90", 5400),
        (90, 5400),
    ],
)
def test_parse_runtime(value: str | int, seconds: int) -> None:
    assert parse_runtime(value) == seconds


@pytest.mark.parametrize(
    ("value", "minutes", "seconds"),
    [("90", 5400, 90), (90, 5400, 90), (" 7 ", 420, 7), ("0", 0, 0), (0, 0, 0), ("2h", 7200, 7200)],
)
def test_parse_runtime_plain_number_unit(value: str | int, minutes: int, seconds: int) -> None:
    assert parse_runtime(value) == parse_runtime(value, plain="minutes") == minutes
    assert parse_runtime(value, plain="seconds") == seconds


@pytest.mark.parametrize(
    "value",
    ["", "soon", "1x", "1:60", "1:00:60", "1-24", "1-2:3:4:5", "-5", -5, True, 1.5, "²", "٣٠m"],
)
def test_parse_runtime_rejects(value: object) -> None:
    with pytest.raises(ConfigError):
        parse_runtime(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0-00:00:00"), (90, "0-00:01:30"), (5400, "0-01:30:00"), (129600, "1-12:00:00")],
)
def test_format_slurm_time(seconds: int, text: str) -> None:
    assert format_slurm_time(seconds) == text
    assert parse_runtime(text) == seconds
