"""The job script: #SBATCH lines, quoting, credentials, exit status.

Most tests run the generated script with bash (scheduler "none") in a temporary
run directory, with small fake ``module``/``apptainer`` programs on PATH that
record the arguments they were given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.projects._project_spec import load_project

from mantik_jupyter.compute.config import (
    Apptainer,
    ComputeConfig,
    Environment,
    Resources,
    parse_config,
)
from mantik_jupyter.compute.packaging import build_package
from mantik_jupyter.compute.run_inputs import extra_files
from mantik_jupyter.compute.script import (
    expand_quoted,
    render_job_script,
    safe_job_name,
    sbatch_lines,
)
from mantik_jupyter.errors import ConfigError

RUN_ID = "0123456789abcdef0123456789abcdef"
SECRET = "s3cr3t-t0ken=="

SHOW_ARGS = """\
import json, os, sys
print("ARGS=" + json.dumps(sys.argv[1:]))
print("ENV=" + json.dumps({k: os.environ.get(k) for k in sys.argv[1:] if k.isidentifier()}))
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MANTIK_COMPUTE_BUDGET_ACCOUNT", raising=False)


def local_config(**environment: Any) -> ComputeConfig:
    return parse_config({"Local": {}, "Environment": environment or None}, "c.yaml")


def render(
    config: ComputeConfig,
    command: str = "true",
    scheduler: str = "none",
    project_dir: Path | None = Path("/nonexistent/project"),
) -> str:
    return render_job_script(
        config,
        command=command,
        run_id=RUN_ID,
        experiment_id="7",
        tracking_uri="http://127.0.0.1:5000",
        job_name="mantik-test",
        scheduler=scheduler,  # type: ignore[arg-type]
        project_dir=project_dir,
    )


def mlflow_command(tmp_path: Path, params: dict[str, str]) -> str:
    """The entry-point command exactly as MLflow builds it from an MLproject."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "MLproject").write_text(
        textwrap.dedent(
            """\
            name: quoting
            entry_points:
              main:
                parameters:
                  x: {type: string, default: "a"}
                  lr: {type: float, default: 0.1}
                command: "python show.py {x} --lr {lr}"
            """
        )
    )
    entry_point = load_project(str(project)).get_entry_point("main")
    return entry_point.compute_command(params, str(tmp_path / "storage"))


def make_tool(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / name
    tool.write_text("#!/bin/bash\n" + body)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)


@dataclasses.dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path


def run_script(
    tmp_path: Path,
    script: str,
    credentials: str | None = None,
    code: str = SHOW_ARGS,
    package: Path | None = None,
) -> Run:
    run_dir = tmp_path / "run"
    (run_dir / "code").mkdir(parents=True)
    (run_dir / "code" / "show.py").write_text(code)
    if package is not None:
        with tarfile.open(package) as tar:
            tar.extractall(run_dir / "code", filter="data")
    (run_dir / "mantik-job.sh").write_text(script)
    if credentials is not None:
        creds = run_dir / ".mantik-credentials"
        creds.write_text(credentials)
        creds.chmod(0o600)
    env = {
        "PATH": f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "TOOL_LOG": str(tmp_path / "tool.log"),
    }
    done = subprocess.run(
        ["bash", "mantik-job.sh"],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return Run(done.returncode, done.stdout, done.stderr, run_dir)


def printed(run: Run, prefix: str) -> Any:
    (line,) = [line for line in run.stdout.splitlines() if line.startswith(prefix)]
    return json.loads(line[len(prefix) :])


def no_files_created(tmp_path: Path) -> None:
    assert not list(tmp_path.rglob("pwned*"))


# --------------------------------------------------------------------------- #SBATCH


def test_sbatch_lines_from_resources() -> None:
    config = parse_config(
        {
            "SSH": {"Hostname": "h"},
            "ComputeBudgetAccount": "deepacf",
            "Resources": {
                "Queue": "booster",
                "Runtime": "1d2h",
                "Nodes": 2,
                "TotalCPUs": 96,
                "CPUsPerNode": 48,
                "GPUsPerNode": 4,
                "MemoryPerNode": "32G",
                "Reservation": "maint-1",
                "NodeConstraints": "gpu&mem192",
                "QoS": "normal",
            },
        }
    )
    script = render(config, scheduler="slurm")
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert header == [
        "#SBATCH --job-name=mantik-test",
        "#SBATCH --partition=booster",
        "#SBATCH --account=deepacf",
        "#SBATCH --time=1-02:00:00",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks=96",
        "#SBATCH --ntasks-per-node=48",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --mem=32768M",
        "#SBATCH --reservation=maint-1",
        "#SBATCH --constraint=gpu&mem192",
        "#SBATCH --qos=normal",
        "#SBATCH --output=mantik.log",
        "#SBATCH --error=mantik.log",
        "#SBATCH --open-mode=append",
    ]
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    # sbatch stops reading options at the first command.
    assert lines[1 : len(header) + 1] == header


@pytest.mark.parametrize(
    ("runtime", "memory"), [("0", "0"), (0, 0), ("00:00:00", "0G")]
)
def test_zero_runtime_and_memory_are_slurm_no_limit_and_whole_node(
    runtime: object, memory: object
) -> None:
    # As Mantik wrote them: --time=0 is no limit (up to the partition's), --mem=0 all memory.
    config = parse_config(
        {
            "SSH": {"Hostname": "h"},
            "Resources": {"Queue": "q", "Runtime": runtime, "MemoryPerNode": memory},
        }
    )
    header = [line for line in render(config, scheduler="slurm").splitlines() if "#SBATCH" in line]
    assert "#SBATCH --time=0" in header
    assert "#SBATCH --mem=0" in header


def test_no_sbatch_lines_without_scheduler() -> None:
    script = render(local_config(), scheduler="none")
    assert "#SBATCH" not in script
    assert "srun" not in script


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("queue", "batch\n#SBATCH --uid=0", "Resources.Queue"),
        ("queue", "batch --uid=0", "Resources.Queue"),
        ("reservation", "r;x", "Resources.Reservation"),
        ("node_constraints", "gpu\nrm -rf /", "Resources.NodeConstraints"),
        ("qos", "a b", "Resources.QoS"),
        ("nodes", 0, "Resources.Nodes"),
        ("memory_per_node", -5, "Resources.MemoryPerNode"),
    ],
)
def test_unsafe_sbatch_values_are_rejected(field: str, value: object, key: str) -> None:
    # Built directly, skipping the config checks, to test the script's own guard.
    config = dataclasses.replace(
        local_config(), resources=dataclasses.replace(Resources(queue="q"), **{field: value})
    )
    with pytest.raises(ConfigError, match=f"^{key}: "):
        render(config, scheduler="slurm")


def test_unsafe_job_name_is_rejected_and_can_be_made_safe() -> None:
    with pytest.raises(ConfigError, match="job name"):
        sbatch_lines(local_config(), "my run\n#SBATCH --x")
    assert safe_job_name("my run\n#SBATCH --x") == "my-run-SBATCH---x"
    assert safe_job_name("!!!") == "mantik"


def test_tracking_uri_with_credentials_is_refused() -> None:
    with pytest.raises(ValueError, match="credentials file"):
        render_job_script(
            local_config(),
            command="true",
            run_id=RUN_ID,
            experiment_id="1",
            tracking_uri="https://user:pw@mlflow.example.org",
            job_name="j",
            scheduler="none",
        )


# --------------------------------------------------------------------------- syntax


@pytest.mark.parametrize(
    "environment",
    [
        {},
        {"Python": "/opt/venv"},
        {"Apptainer": {"Path": "img/x.sif", "Options": ["--nv", "-B /a:/b"]}},
        {"Apptainer": {"Path": "$PROJECT/x.sif", "Type": "remote"}},
        {
            "Modules": ["Stages/2024", "GCC"],
            "Variables": {"A": "it's", "B": "$HOME/x"},
            "PreRunCommandOnComputeNode": ["echo 'pre' \\", "cat <<EOF\nhello\nEOF"],
            "PostRunCommandOnComputeNode": "echo post",
        },
    ],
)
@pytest.mark.parametrize("scheduler", ["slurm", "none"])
def test_script_passes_bash_syntax_check(
    tmp_path: Path, environment: dict[str, Any], scheduler: str
) -> None:
    path = tmp_path / "job.sh"
    config = parse_config(
        {"SSH": {"Hostname": "h"}, "Resources": {"Queue": "q"}, "Environment": environment}
    )
    path.write_text(render(config, command="python x.py --a 'b c'", scheduler=scheduler))
    subprocess.run(["bash", "-n", str(path)], check=True)


# --------------------------------------------------------------------------- running


def test_parameters_arrive_literally(tmp_path: Path) -> None:
    value = "1; touch pwned $(touch pwned2) `touch pwned3` \"q\" 'r' $HOME \\"
    command = mlflow_command(tmp_path, {"x": value})
    run = run_script(tmp_path, render(local_config(), command=command))
    assert run.returncode == 0, run.stderr
    assert printed(run, "ARGS=") == [value, "--lr", "0.1"]
    no_files_created(tmp_path)


def test_entry_point_status_is_recorded_and_returned(tmp_path: Path) -> None:
    run = run_script(tmp_path, render(local_config(), command="python -c 'exit(3)'"))
    assert run.returncode == 3
    assert (run.run_dir / "mantik.exitcode").read_text().strip() == "3"
    assert "[mantik] starting entry point: python -c 'exit(3)'" in run.stdout
    assert "[mantik] exit status 3" in run.stdout


def test_credentials_are_read_exported_and_deleted(tmp_path: Path) -> None:
    script = render(
        local_config(),
        command="python show.py MLFLOW_TRACKING_TOKEN "
        "MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD EVIL MLFLOW_RUN_ID",
    )
    assert SECRET not in script
    credentials = (
        f"MLFLOW_TRACKING_TOKEN={SECRET}\n"
        "MLFLOW_TRACKING_USERNAME=alice=x\n"
        "EVIL=$(touch pwned)\n"
        "PATH=/nowhere\n"
        "MLFLOW_TRACKING_PASSWORD=p w $(touch pwned2) `touch pwned3`"  # no final newline
    )
    run = run_script(tmp_path, script, credentials=credentials)
    assert run.returncode == 0, run.stderr
    assert printed(run, "ENV=") == {
        "MLFLOW_TRACKING_TOKEN": SECRET,  # the trailing '=' survives
        "MLFLOW_TRACKING_USERNAME": "alice=x",
        "MLFLOW_TRACKING_PASSWORD": "p w $(touch pwned2) `touch pwned3`",
        "EVIL": None,
        "MLFLOW_RUN_ID": RUN_ID,
    }
    assert not (run.run_dir / ".mantik-credentials").exists()
    assert SECRET not in run.stderr
    no_files_created(tmp_path)


def test_credentials_file_is_deleted_even_when_the_run_fails_early(tmp_path: Path) -> None:
    config = local_config(PreRunCommandOnComputeNode="exit 9")
    run = run_script(tmp_path, render(config), credentials=f"MLFLOW_TRACKING_TOKEN={SECRET}\n")
    assert run.returncode == 9
    assert not (run.run_dir / ".mantik-credentials").exists()


def test_slurm_script_keeps_the_credential_for_a_requeue(tmp_path: Path) -> None:
    # Slurm ends an attempt with SIGTERM to all of the job's processes and may start the
    # script again: the credential must still be there, the old exit status must not.
    run_dir = tmp_path / "run"
    (run_dir / "code").mkdir(parents=True)
    (run_dir / "mantik-job.sh").write_text(render(local_config(), "sleep 30", "slurm"))
    creds = run_dir / ".mantik-credentials"
    creds.write_text(f"MLFLOW_TRACKING_TOKEN={SECRET}\n")
    creds.chmod(0o600)
    exit_code = run_dir / "mantik.exitcode"
    exit_code.write_text("0\n")  # an earlier attempt's
    proc = subprocess.Popen(
        ["bash", "mantik-job.sh"], cwd=run_dir, start_new_session=True, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert b"starting entry point" in proc.stdout.readline()
    time.sleep(0.5)  # the entry point's process exists: Slurm signals every process
    os.killpg(proc.pid, 15)
    assert proc.wait(timeout=10) != 0
    proc.stdout.close()
    assert creds.exists() and not exit_code.exists()
    # An attempt that ends by itself removes the file.
    again = render(local_config(), "python show.py MLFLOW_TRACKING_TOKEN", "slurm")
    done = run_script(tmp_path / "again", again, creds.read_text())
    assert done.returncode == 0, done.stderr
    assert printed(done, "ENV=") == {"MLFLOW_TRACKING_TOKEN": SECRET}
    assert not (done.run_dir / ".mantik-credentials").exists()


def test_slurm_script_keeps_the_credential_when_only_its_entry_point_was_signalled(
    tmp_path: Path,
) -> None:
    # Slurm signals the job's processes one by one: the entry point may die of SIGTERM
    # while the script goes on for a moment and ends before its own signal arrives.
    run_dir = tmp_path / "run"
    (run_dir / "code").mkdir(parents=True)
    command = "sleep 30 & echo $! > ../entry.pid; wait $!"
    (run_dir / "mantik-job.sh").write_text(render(local_config(), command, "slurm"))
    creds = run_dir / ".mantik-credentials"
    creds.write_text(f"MLFLOW_TRACKING_TOKEN={SECRET}\n")
    creds.chmod(0o600)
    proc = subprocess.Popen(["bash", "mantik-job.sh"], cwd=run_dir, start_new_session=True)
    entry = run_dir / "entry.pid"
    deadline = time.monotonic() + 10
    while not entry.exists() or not entry.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(int(entry.read_text()), 15)
    assert proc.wait(timeout=10) == 143
    assert creds.exists()


def test_script_without_credentials_file_runs(tmp_path: Path) -> None:
    run = run_script(tmp_path, render(local_config(), command="python show.py x"))
    assert run.returncode == 0, run.stderr
    assert printed(run, "ARGS=") == ["x"]


def test_tracking_variables_are_exported(tmp_path: Path) -> None:
    command = "python show.py MLFLOW_TRACKING_URI MLFLOW_RUN_ID MLFLOW_EXPERIMENT_ID"
    run = run_script(tmp_path, render(local_config(), command=command))
    assert printed(run, "ENV=") == {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "MLFLOW_RUN_ID": RUN_ID,
        "MLFLOW_EXPERIMENT_ID": "7",
    }


def test_variable_values_cannot_inject(tmp_path: Path) -> None:
    variables = {
        "A": "$(touch pwned)",
        "B": "`touch pwned2`; touch pwned3",
        "C": 'it\'s "quoted" *',
        "D": "${HOME}/data and $HOME",
        "E": "$1 $$ ${HOME:-x} $(",
    }
    config = local_config(Variables=variables)
    run = run_script(tmp_path, render(config, command="python show.py A B C D E"))
    assert run.returncode == 0, run.stderr
    home = str(tmp_path / "home")
    assert printed(run, "ENV=") == {
        **variables,
        # Only $NAME and ${NAME} expand (Mantik configs use $PROJECT/...).
        "D": f"{home}/data and {home}",
    }
    no_files_created(tmp_path)


@pytest.mark.parametrize("name", ["A;touch pwned", "A B", "1A", "A=B", "$(touch pwned)"])
def test_variable_names_are_validated(name: str) -> None:
    config = dataclasses.replace(local_config(), environment=Environment(variables={name: "x"}))
    with pytest.raises(ConfigError, match="not a valid variable name"):
        render(config)


def test_modules_are_loaded_one_quoted_word_each(tmp_path: Path) -> None:
    make_tool(tmp_path / "bin", "module", 'printf "%s|" "$@" >> "$TOOL_LOG"; echo >> "$TOOL_LOG"\n')
    config = local_config(Modules=["Stages/2024", "x; touch pwned", "$(touch pwned2)"])
    run = run_script(tmp_path, render(config))
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "tool.log").read_text().splitlines() == [
        "load|Stages/2024|",
        "load|x; touch pwned|",
        "load|$(touch pwned2)|",
    ]
    no_files_created(tmp_path)


def test_failing_module_load_stops_the_run(tmp_path: Path) -> None:
    make_tool(tmp_path / "bin", "module", "exit 4\n")
    run = run_script(tmp_path, render(local_config(Modules=["Nope"]), command="touch ran"))
    assert run.returncode == 4
    assert (run.run_dir / "mantik.exitcode").read_text().strip() == "4"
    assert not (run.run_dir / "code" / "ran").exists()
    assert "[mantik] module load Nope failed with exit status 4" in run.stderr


def test_pre_and_post_commands_run_as_written_in_order(tmp_path: Path) -> None:
    config = local_config(
        PreRunCommandOnComputeNode=["export FROM_PRE=yes", "echo pre-ran \\", "cd ."],
        PostRunCommandOnComputeNode=["echo post-sees-$FROM_PRE", "false", "echo last"],
    )
    run = run_script(tmp_path, render(config, command="python show.py FROM_PRE"))
    assert run.returncode == 0, run.stderr  # a failing post command does not fail the run
    out = run.stdout
    assert out.index("pre-ran") < out.index("ENV=") < out.index("post-sees-yes") < out.index("last")
    assert printed(run, "ENV=") == {"FROM_PRE": "yes"}
    assert "PostRunCommandOnComputeNode[1] failed with exit status 1" in run.stderr
    assert (run.run_dir / "mantik.exitcode").read_text().strip() == "0"


def test_failing_pre_command_skips_the_entry_point(tmp_path: Path) -> None:
    config = local_config(PreRunCommandOnComputeNode=["false"])
    run = run_script(tmp_path, render(config, command="touch ran"))
    assert run.returncode == 1
    assert not (run.run_dir / "code" / "ran").exists()
    assert (run.run_dir / "mantik.exitcode").read_text().strip() == "1"
    assert "PreRunCommandOnComputeNode[0] failed with exit status 1" in run.stderr


def test_python_venv_is_activated(tmp_path: Path) -> None:
    venv = tmp_path / "my venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("export VENV_ACTIVE=yes\n")
    run = run_script(
        tmp_path, render(local_config(Python=str(venv)), command="python show.py VENV_ACTIVE")
    )
    assert run.returncode == 0, run.stderr
    assert printed(run, "ENV=") == {"VENV_ACTIVE": "yes"}


def test_missing_venv_fails_clearly(tmp_path: Path) -> None:
    run = run_script(tmp_path, render(local_config(Python="/nonexistent/venv")))
    assert run.returncode != 0
    assert "activating the venv failed" in run.stderr
    assert (run.run_dir / "mantik.exitcode").exists()


def test_apptainer_local_image_runs_from_the_package(tmp_path: Path) -> None:
    make_tool(tmp_path / "bin", "apptainer", 'printf "%s\\n" "$@" > "$TOOL_LOG"\n')
    config = local_config(
        Apptainer={"Path": "images/x.sif", "Options": ["--nv", "-B /a:/b", "--env X='1 2'"]}
    )
    command = mlflow_command(tmp_path, {"x": "1; touch pwned"})
    run = run_script(tmp_path, render(config, command=command))
    assert run.returncode == 0, run.stderr
    args = (tmp_path / "tool.log").read_text().splitlines()
    assert args == [
        "run",
        "--nv",
        "-B",
        "/a:/b",
        "--env",
        "X=1 2",
        f"{run.run_dir}/code/images/x.sif",
        "bash",
        "-c",
        command,
    ]
    no_files_created(tmp_path)


def test_apptainer_remote_image_with_srun_under_slurm() -> None:
    config = parse_config(
        {
            "SSH": {"Hostname": "h"},
            "Resources": {"Queue": "q"},
            "Environment": {"Apptainer": {"Path": "$PROJECT/img x.sif", "Type": "remote"}},
        }
    )
    script = render(config, command="python train.py", scheduler="slurm")
    assert "srun apptainer run \"${PROJECT}\"'/img x.sif' bash -c 'python train.py'" in script
    unscheduled = render(config, command="python train.py", scheduler="none")
    assert '\napptainer run "${PROJECT}"' in unscheduled
    assert "srun" not in unscheduled


def test_apptainer_under_unicore_uses_srun_only_in_a_slurm_job(tmp_path: Path) -> None:
    """As in Mantik, a UNICORE job of N tasks runs the container with srun (N copies) when
    the site's batch system is Slurm; elsewhere the container runs once. ``srun`` and
    ``apptainer`` are stand-ins that print how they were called (Apptainer cannot run here)."""
    config = parse_config(
        {
            "UnicoreApiUrl": "https://unicore.example.org/SITE/rest/core",
            "Resources": {"Queue": "q", "TotalCPUs": 4},
            "Environment": {"Apptainer": {"Path": "/p/img.sif", "Type": "remote"}},
        }
    )
    script = render(config, command="python train.py", scheduler="unicore")
    (line,) = [ln for ln in script.splitlines() if "apptainer run" in ln]
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in ("srun", "apptainer"):
        stub = stubs / name
        stub.write_text(f'#!/bin/bash\necho {name} "$@"\n')
        stub.chmod(0o755)
    # Only the stubs on PATH: this machine has a real srun (the test cluster's).
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = str(stubs)

    def called(**extra: str) -> str:
        done = subprocess.run(
            ["/bin/bash", "-c", line],
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    assert called(SLURM_JOB_ID="42") == "srun apptainer run /p/img.sif bash -c python train.py"
    assert called() == "apptainer run /p/img.sif bash -c python train.py"
    (stubs / "srun").unlink()  # a Slurm job without srun on its PATH
    assert called(SLURM_JOB_ID="42") == "apptainer run /p/img.sif bash -c python train.py"


def test_script_text_holds_no_credential_values() -> None:
    script = render(local_config(Variables={"A": "1"}), scheduler="slurm")
    assert "MLFLOW_TRACKING_PASSWORD=" not in script.replace('"$mantik_key=', "")
    assert 'source "$MANTIK_CREDENTIALS"' not in script
    assert '. "$MANTIK_CREDENTIALS"' not in script
    commands = [line.strip() for line in script.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in commands if line.startswith(("eval", 'source "$MANTIK'))]


# --------------------------------------------------------------------------- quoting helper


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", "plain"),
        ("~/venv", "HOME/venv"),
        ("$PROJECT/a b", "PROJ/a b"),
        ("${PROJECT}x", "PROJx"),
        ("$(touch pwned)", "$(touch pwned)"),
        ("`touch pwned`", "`touch pwned`"),
        ("a*b?", "a*b?"),
        ("$1$$", "$1$$"),
        ("", ""),
    ],
)
def test_expand_quoted(tmp_path: Path, value: str, expected: str) -> None:
    word = expand_quoted(value)
    done = subprocess.run(
        ["bash", "-c", f"printf %s {word}"],
        cwd=tmp_path,
        env={"HOME": "HOME", "PROJECT": "PROJ", "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout == expected
    no_files_created(tmp_path)


def test_expand_quoted_rejects_newlines() -> None:
    with pytest.raises(ConfigError, match="one line"):
        expand_quoted("a\nb")


def test_local_image_outside_project_is_under_images() -> None:
    # Where the packaging puts a file from outside the project (compute/packaging.py).
    config = dataclasses.replace(
        local_config(), environment=Environment(apptainer=Apptainer(path="/home/me/x.sif"))
    )
    assert '"$RUN_DIR/code"/images/x.sif' in render(config)


def test_local_image_needs_the_project_dir() -> None:
    # Without it the script would have to guess where the package holds the image.
    config = local_config(Apptainer={"Path": "x.sif"})
    with pytest.raises(ValueError, match="project_dir"):
        render(config, project_dir=None)
    remote = local_config(Apptainer={"Path": "/p/x.sif", "Type": "remote"})
    assert "apptainer run /p/x.sif" in render(remote, project_dir=None)


def local_image_cases(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A project, an alias of it, and image paths as users write them -> the image's content."""
    home = tmp_path / "home"
    project = home / "project"
    (project / "containers").mkdir(parents=True)
    (project / "MLproject").write_text("name: p\nentry_points:\n  main:\n    command: x\n")
    (project / "containers" / "x.sif").write_text("inside")
    (project / "top.sif").write_text("top")
    (home / "shared").mkdir()
    (home / "shared" / "y.sif").write_text("outside")
    (project / "link.sif").symlink_to(home / "shared" / "y.sif")
    alias = tmp_path / "alias"
    alias.symlink_to(project)
    return (
        project,
        alias,
        {
            "containers/x.sif": "inside",
            "top.sif": "top",
            str(project / "containers" / "x.sif"): "inside",
            "~/project/containers/x.sif": "inside",
            str(alias / "top.sif"): "top",
            str(home / "shared" / "y.sif"): "outside",
            "~/shared/y.sif": "outside",
            "../shared/y.sif": "outside",
            "link.sif": "outside",
        },
    )


@pytest.mark.parametrize("through_alias", [False, True])
def test_local_image_is_where_the_package_put_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, through_alias: bool
) -> None:
    # However the image path is written (relative, absolute, ~, through a symlink), the
    # package built for the run and the job script must agree on its place.
    project, alias, cases = local_image_cases(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    project_dir = alias if through_alias else project
    wrong = []
    for index, (path, content) in enumerate(cases.items()):
        work = tmp_path / f"case{index}"
        work.mkdir()
        make_tool(
            work / "bin",
            "apptainer",
            '[ -f "$2" ] || { echo "no image at $2" >&2; exit 9; }\ncat "$2" > "$TOOL_LOG"\n',
        )
        config = parse_config(
            {"Local": {}, "Environment": {"Apptainer": {"Path": path, "Type": "local"}}}
        )
        package = build_package(
            project_dir,
            work / "package.tar.gz",
            exclude=["*.sif"],  # the image reaches the package only as an extra file
            extra_files=extra_files(config, project_dir),
        )
        script = render(config, project_dir=project_dir)
        run = run_script(work, script, package=package.path)
        if run.returncode != 0 or (work / "tool.log").read_text() != content:
            wrong.append((path, run.stderr.strip(), package.files))
    assert wrong == []
