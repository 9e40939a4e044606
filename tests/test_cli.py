"""The ``mantik`` command, run as a real process against a real MLflow server.

Runs use the example project with its Local backend, so the whole path (package,
MLflow run, job script, process, log, files) is the one an HPC run takes.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from mantik_jupyter.cli_format import run_details, run_duration
from mantik_jupyter.errors import exit_code_table
from mantik_jupyter.tracking.credentials import Credential
from mantik_jupyter.tracking.rest import TrackingClient
from mantik_jupyter.tracking.runs_api import RunsApi

from .mlflow_fixtures import MlflowServer, start_mlflow_server, stop_mlflow_server
from .runs_helpers import (
    admin_api,
    big_log_project,
    copy_example,
    remote_run_dirs,
    slurm_config,
    write_config,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "weather-forecast"
RUN_TIMEOUT = 180


def _base_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MANTIK_"))}
    env.pop("COLUMNS", None)  # tables as for a pipe, whatever terminal runs the tests
    env["MANTIK_DATA_DIR"] = str(data_dir)
    # The local backend runs `python train.py`: the venv's python must come first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # This checkout, whether or not it is installed in the venv.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class Mantik:
    """Runs the real command in a fresh process with a fixed environment."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env, self.cwd = env, cwd

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "mantik_jupyter.cli", *args]

    def __call__(
        self, *args: str, input: str | None = None, timeout: float = RUN_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            env=self.env,
            cwd=self.cwd,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            # No controlling terminal: getpass must never wait on the test's tty.
            start_new_session=True,
        )


@pytest.fixture
def anon(mlflow_server: MlflowServer, tmp_path: Path) -> Mantik:
    """`mantik` pointed at the server, with no credential anywhere."""
    env = _base_env(tmp_path / "data")
    env["MLFLOW_TRACKING_URI"] = mlflow_server.uri
    return Mantik(env, tmp_path)


@pytest.fixture
def mantik(mlflow_server: MlflowServer, tmp_path: Path) -> Mantik:
    """`mantik` with a fresh MLflow user's credential in the environment, as in CI jobs."""
    user = mlflow_server.create_user()
    env = _base_env(tmp_path / "data")
    env.update(mlflow_server.env(user))
    return Mantik(env, tmp_path)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    dest = tmp_path / "weather-forecast"
    shutil.copytree(EXAMPLE, dest)
    return dest


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result).stdout, parse_constant=_not_json)


def _not_json(constant: str) -> None:
    raise AssertionError(f"{constant} in --json output: not JSON (jq refuses it)")


def wait_state(mantik: Mantik, run_id: str, states: set[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = as_json(mantik("runs", "status", run_id, "--json"))
        if run["state"] in states:
            return run
        assert time.monotonic() < deadline, f"run {run_id} still {run['state']}"
        time.sleep(1)


# ---- help and usage ----------------------------------------------------------------------


def test_help_documents_exit_codes(tmp_path: Path) -> None:
    result = ok(Mantik(_base_env(tmp_path), tmp_path)("--help"))
    assert "exit codes:" in result.stdout
    for code, reasons in exit_code_table():
        assert f"{code:>3}  {reasons}" in result.stdout
    assert "130" in result.stdout
    for sub in ("login", "logout", "status", "runs"):
        assert sub in result.stdout
    # What ID and --local-path take: 'ID' had no word, and README's
    # `--remote-path code/outputs --local-path ./results` put the files into results/
    # or results/outputs/ depending on whether results/ existed, which no help said.
    download = ok(Mantik(_base_env(tmp_path), tmp_path)("runs", "download", "--help")).stdout
    assert "unique prefix of it, its run name, or 'last'" in " ".join(download.split())
    assert "into a folder that exists, else under this name" in " ".join(download.split())


def test_mantik_flags_parse(tmp_path: Path) -> None:
    from mantik_jupyter.cli import build_parser

    args = build_parser().parse_args(
        [
            "runs",
            "submit",
            "proj",
            "--backend-config",
            "c.yaml",
            "--entry-point",
            "train",
            "-P",
            "epochs=3",
            "-P",
            "expr=a=b",
            "--experiment-id",
            "7",
            "--run-name",
            "r1",
            "--json",
        ]  # fmt: skip
    )
    assert (args.path, args.backend_config, args.entry_point) == ("proj", "c.yaml", "train")
    assert args.param == ["epochs=3", "expr=a=b"]
    assert (args.experiment_id, args.run_name, args.json) == ("7", "r1", True)
    # --json before the command works as well as after it.
    args = build_parser().parse_args(["--json", "runs", "list"])
    assert args.json is True
    result = Mantik(_base_env(tmp_path), tmp_path)(
        "runs", "submit", "p", "--experiment-id", "1", "--experiment-name", "x"
    )
    assert result.returncode == 2 and "not allowed with" in result.stderr


# ---- login, status, logout ---------------------------------------------------------------


def test_login_status_logout(anon: Mantik, mlflow_server: MlflowServer, tmp_path: Path) -> None:
    status = as_json(anon("status", "--json"))
    assert status["tracking_uri"] == mlflow_server.uri
    assert status["logged_in"] is False

    user = mlflow_server.create_user()
    result = ok(
        anon("login", "--username", user.username, "--password-stdin", input=user.password + "\n")
    )
    assert user.username in result.stdout and mlflow_server.uri in result.stdout
    assert user.password not in result.stdout + result.stderr
    stored = tmp_path / "data" / "credentials.json"
    assert stored.stat().st_mode & 0o777 == 0o600

    status = as_json(anon("status", "--json"))
    assert status["logged_in"] is True and status["username"] == user.username
    assert user.password not in json.dumps(status)
    human = ok(anon("status")).stdout
    assert f"logged in as {user.username}" in human

    status = as_json(anon("logout", "--json"))
    assert status["logged_in"] is False
    assert as_json(anon("status", "--json"))["logged_in"] is False


def test_status_says_the_server_refuses_the_environments_password(anon: Mantik) -> None:
    anon.env.update(MLFLOW_TRACKING_USERNAME="someone", MLFLOW_TRACKING_PASSWORD="wrong-pass")
    out = ok(anon("status")).stdout
    assert "not logged in" in out and "refused" in out and "MLFLOW_TRACKING_USERNAME" in out
    assert "wrong-pass" not in out
    status = as_json(anon("status", "--json"))
    assert status["logged_in"] is False and status["credential_source"] == "environment"
    assert "refused" in ok(anon("logout")).stdout


def test_logout_says_when_a_credential_from_the_environment_stays(
    mantik: Mantik, mlflow_server: MlflowServer
) -> None:
    env_user = mantik.env["MLFLOW_TRACKING_USERNAME"]
    other = mlflow_server.create_user()
    ok(mantik("login", "--username", other.username, "--password-stdin", input=other.password))
    assert as_json(mantik("status", "--json"))["credential_source"] == "login"
    # It said "Logged out" while every later call went on as the environment's user.
    first = ok(mantik("logout")).stdout
    assert "Logged out" in first and f"Still logged in as {env_user}" in first
    assert "MLFLOW_TRACKING_USERNAME" in first
    status = as_json(mantik("status", "--json"))
    assert status["username"] == env_user and status["credential_source"] == "environment"
    assert "(MLFLOW_TRACKING_USERNAME" in ok(mantik("status")).stdout
    again = ok(mantik("logout")).stdout
    assert again.startswith("No stored login") and f"Still logged in as {env_user}" in again


def test_login_wrong_password(anon: Mantik, mlflow_server: MlflowServer) -> None:
    user = mlflow_server.create_user()
    result = anon(
        "login", "--username", user.username, "--password-stdin", input="wrong-password-123\n"
    )
    assert result.returncode == 3, result
    assert result.stderr.startswith("error: ")
    assert mlflow_server.uri in result.stderr
    assert "wrong-password-123" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_login_without_a_terminal_asks_for_password_stdin(
    anon: Mantik, mlflow_server: MlflowServer
) -> None:
    # No terminal and nothing on stdin: getpass raised EOFError, a traceback and exit 1.
    user = mlflow_server.create_user()
    result = anon("login", "--username", user.username, input="")
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert "--password-stdin" in result.stderr and user.username in result.stderr
    # One line that says what to do: not getpass's fallback first, which printed
    # 'GetPassWarning: Can not control echo' with its source file and line, 'Password input
    # may be echoed' and a prompt that nobody could answer.
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    # A password piped in without --password-stdin is not read as if typed (with those
    # warnings): the same error.
    result = anon("login", "--username", user.username, input=user.password + "\n")
    assert result.returncode == 2 and result.stderr.startswith("error: "), result


def test_login_token_stdin_refused(anon: Mantik, mlflow_server: MlflowServer) -> None:
    # The basic-auth server knows no tokens: the refusal names the server, exit 3.
    result = anon("login", "--token-stdin", input="not-a-token\n")
    assert result.returncode == 3 and mlflow_server.uri in result.stderr, result


def test_unreachable_server(tmp_path: Path) -> None:
    from mantik_jupyter.tracking.embedded import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    result = Mantik(_base_env(tmp_path), tmp_path)(
        "login", "--tracking-uri", uri, "--username", "u", "--password-stdin", input="p" * 12
    )
    assert result.returncode == 5 and uri in result.stderr, result


def _submit_to_login_node(mantik: Mantik, project: Path, server: socket.socket):
    """``mantik runs submit`` to a stand-in login node listening on ``server`` (closed after)."""
    port = server.getsockname()[1]
    write_config(project, {"SSH": {"Hostname": "127.0.0.1", "Port": port, "Username": "u"},
                           "Resources": {"Queue": "batch"}})  # fmt: skip
    try:
        return mantik("runs", "submit", str(project))
    finally:
        server.close()


def test_a_login_node_that_resets_the_connection_is_one_error_line(
    mantik: Mantik, project: Path
) -> None:
    # A login node that drops new connections (sshd's MaxStartups, a firewall) after
    # taking them: paramiko logged it as a 25-line traceback above mantik's own error.
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def reset_each() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            time.sleep(0.3)  # the client's banner is unread: closing resets the connection
            conn.close()

    threading.Thread(target=reset_each, daemon=True).start()
    result = _submit_to_login_node(mantik, project, server)
    assert result.returncode == 5, result
    progress = ("package ", "logging in to the cluster")
    errors = [line for line in result.stderr.splitlines() if not line.startswith(progress)]
    assert errors == [errors[0]] and errors[0].startswith("error: "), result.stderr
    assert f"127.0.0.1:{port}" in errors[0] and "Traceback" not in result.stderr


def test_a_login_node_that_never_answers(mantik: Mantik, project: Path) -> None:
    # A host that takes the connection and stays silent (a hung sshd, a proxy): nothing
    # was said for 15 s after "package 100%", then "SSHException: No existing session".
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    result = _submit_to_login_node(mantik, project, server)
    assert result.returncode == 5, result
    lines = result.stderr.splitlines()
    assert "logging in to the cluster\u2026" in lines, lines
    assert "no answer within 15 s" in lines[-1] and "SSH.Hostname and SSH.Port" in lines[-1]
    assert f"ssh -p {port} u@127.0.0.1" in lines[-1], lines[-1]


def test_no_tracking_server_names_where_it_looked(tmp_path: Path) -> None:
    # It said only to start JupyterLab or set MLFLOW_TRACKING_URI: not which data dir had
    # no embedded server (a lab with another MANTIK_DATA_DIR runs its own elsewhere), nor
    # that the command takes --tracking-uri.
    result = Mantik(_base_env(tmp_path / "data"), tmp_path)("runs", "list")
    assert result.returncode == 5, result
    assert f"looked in {tmp_path / 'data'}" in result.stderr and "--tracking-uri" in result.stderr


def test_a_web_server_that_is_not_mlflow(tmp_path: Path) -> None:
    # A wrong port that reaches another web server: the error ended in the first line of
    # its page, 'failed with HTTP 501: <!DOCTYPE HTML>'.
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mantik = Mantik(_base_env(tmp_path), tmp_path)
    mantik.env.update(MLFLOW_TRACKING_USERNAME="u", MLFLOW_TRACKING_PASSWORD="p" * 12)
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        result = mantik("runs", "list", "--tracking-uri", uri)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 5, result
    assert "a web page titled 'Error response', not an answer of MLflow's API" in result.stderr
    assert "address is the MLflow server's" in result.stderr and "DOCTYPE" not in result.stderr


def test_tls_failures_at_the_tracking_server_say_what_to_fix(
    anon: Mantik, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from .tls_helpers import make_test_ca

    login = ("login", "--username", "u", "--password-stdin")
    # MLflow serves plain HTTP: an https:// address of it was blamed on the certificate
    # and the CA ('could not be verified ... set MLFLOW_TRACKING_SERVER_CERT_PATH').
    https = mlflow_server.uri.replace("http://", "https://")
    result = anon(*login, "--tracking-uri", https, input="p" * 12)
    assert result.returncode == 5 and "did not answer in TLS" in result.stderr, result
    assert "starts with http://" in result.stderr and "CERT_PATH" not in result.stderr
    # A certificate of a CA this machine does not trust: the setting, and that it is read
    # from the environment of this command (it said: of `jupyter lab`).
    ca = make_test_ca(tmp_path / "ca")
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server.socket = ca.server_context().wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"https://127.0.0.1:{server.server_address[1]}"
        result = anon(*login, "--tracking-uri", uri, input="p" * 12)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 5 and "could not be verified" in result.stderr, result
    assert "MLFLOW_TRACKING_SERVER_CERT_PATH" in result.stderr
    assert "of the `mantik` command" in result.stderr


def test_tracking_uri_that_is_no_http_address(tmp_path: Path) -> None:
    # 'localhost:5000' (no scheme) and an MLflow file store were a traceback at login
    # and 'Not logged in' everywhere else.
    mantik = Mantik(_base_env(tmp_path), tmp_path)
    for uri in ("localhost:5000", "not a uri", "ftp://u:pw-in-uri@x", "http://[::1"):
        result = mantik(
            "login", "--tracking-uri", uri, "--username", "u", "--password-stdin", input="p" * 12
        )
        assert result.returncode == 2, (uri, result)
        assert "Traceback" not in result.stderr and "--tracking-uri" in result.stderr
        assert "http://" in result.stderr and "pw-in-uri" not in result.stderr
    mantik.env["MLFLOW_TRACKING_URI"] = "./mlruns"
    result = mantik("runs", "list")
    assert result.returncode == 2 and "'./mlruns' (from $MLFLOW_TRACKING_URI)" in result.stderr


def test_job_tracking_uri_that_is_no_http_address(mantik: Mantik, project: Path) -> None:
    # It was accepted: the run was made and queued, and the job failed in MLflow's words.
    experiment = f"cli-{uuid.uuid4().hex[:8]}"
    result = mantik("runs", "submit", str(project), "--experiment-name", experiment,
                    "--job-tracking-uri", "localhost:5000")  # fmt: skip
    assert result.returncode == 2, result
    assert "job tracking URI 'localhost:5000'" in result.stderr
    # A user:password@ in it was a ValueError traceback from the job script, and a FAILED run.
    result = mantik("runs", "submit", str(project), "--experiment-name", experiment,
                    "--job-tracking-uri", "http://ada:pw-in-job-uri@127.0.0.1:5000")  # fmt: skip
    assert result.returncode == 2, result
    assert "carries a user name and password" in result.stderr
    assert "pw-in-job-uri" not in result.stderr and "Traceback" not in result.stderr
    assert mantik("runs", "list", "--experiment-name", experiment).returncode == 4  # none made


# ---- runs ------------------------------------------------------------------------------


def test_runs_lifecycle(
    mantik: Mantik, project: Path, tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    experiment = f"cli-{uuid.uuid4().hex[:8]}"
    run_name = f"cli-run-{uuid.uuid4().hex[:6]}"
    result = ok(
        mantik(
            "runs",
            "submit",
            str(project),
            "--backend-config",
            "compute-backend-config.yaml",
            "--entry-point",
            "main",
            "-P",
            "epochs=2",
            "-P",
            "station=Bonn",
            "--experiment-name",
            experiment,
            "--run-name",
            run_name,
            "--json",
        )  # fmt: skip
    )
    run = json.loads(result.stdout)
    run_id = run["run_id"]
    # Progress without repeats ("upload 100%" came twice: the backend reports the end twice).
    progress = result.stderr.splitlines()
    assert any(p.startswith("upload") for p in progress) and len(set(progress)) == len(progress)
    assert run["run_name"] == run_name and run["source"] == "cli"
    assert run["params"]["epochs"] == "2" and run["params"]["station"] == "Bonn"

    # Follow the log by a unique prefix until the run ends; the command ends with it.
    follow = ok(mantik("runs", "logs", run_id[:8], "--follow"))
    assert "exit status 0" in follow.stdout

    # The run's name names it too.
    status = as_json(mantik("runs", "status", run_name, "--json"))
    assert status["run_id"] == run_id and status["state"] == "FINISHED"
    human_status = ok(mantik("runs", "status", run_id)).stdout
    assert "FINISHED" in human_status
    # How long the job waited and how long it ran, not the time since submission only.
    assert status["running_since"] >= status["start_time"]
    assert "Queued:" in human_status and "Ran:" in human_status, human_status

    listing = as_json(mantik("runs", "list", "--experiment-name", experiment, "--json"))
    assert [r["run_id"] for r in listing["runs"]] == [run_id]
    table = ok(mantik("runs", "list", "--experiment-name", experiment)).stdout.splitlines()
    assert table[0].split() == ["ID", "NAME", "STATE", "BACKEND", "STARTED", "DURATION"]
    assert table[1].startswith(run_id[:8]) and run_name in table[1] and "FINISHED" in table[1]
    assert "(queued " in table[1], table
    assert as_json(mantik("runs", "list", "--state", "RUNNING", "--experiment-name", experiment,
                          "--json"))["runs"] == []  # fmt: skip

    info = as_json(mantik("runs", "info", run_id, "--json"))
    assert info["metrics"] and info["params"]["epochs"] == "2"
    # A diverged metric keeps the output JSON (no bare NaN), as MLflow spells it.
    admin_api(mlflow_server).client.api(
        "POST", "runs/log-metric", run_id=run_id, key="loss", value="NaN", timestamp=1, step=9
    )
    assert as_json(mantik("runs", "info", run_id, "--json"))["metrics"]["loss"] == "NaN"
    human = ok(mantik("runs", "info", run_id)).stdout
    assert "Params:" in human and "epochs = 2" in human and "Metrics:" in human

    logs = as_json(mantik("runs", "logs", run_id, "--json"))
    assert logs["text"] == follow.stdout
    tail = as_json(mantik("runs", "logs", run_id, "--offset", str(logs["offset"]), "--json"))
    assert tail["text"] == "" and tail["final"] is True

    # What there is to download: the download errors ask the user to look, and the
    # command had no way to.
    top = ok(mantik("runs", "files", run_id)).stdout.splitlines()
    assert top[0].split() == ["PATH", "SIZE"] and top[1].split() == ["code/", "-"]
    assert any(line.startswith("mantik.log ") for line in top)
    listed = as_json(mantik("runs", "files", run_id, "code/outputs", "--json"))["files"]
    assert listed == [{"path": "code/outputs/forecast.csv", "size": listed[0]["size"],
                       "is_dir": False}]  # fmt: skip
    assert mantik("runs", "files", run_id, "../x").returncode == 2
    # A wrong name says how to see what there is (it named the run directory only).
    for wrong, look in (("nope.csv", run_id), ("code/outputs/nope.csv", f"{run_id} code/outputs")):
        result = mantik("runs", "download", run_id, "--remote-path", wrong)
        assert result.returncode == 4 and f"'mantik runs files {look}' lists" in result.stderr

    one = tmp_path / "one"
    result = ok(
        mantik("runs", "download", run_id, "--remote-path", "mantik.log", "--local-path", str(one))
    )
    got = Path(result.stdout.strip().removeprefix("Downloaded to ").split(" (")[0])
    assert got.is_file() and got.read_text() == follow.stdout
    # Onto a file the user changed: refused, naming it and the flag; the file is theirs.
    again = ("runs", "download", run_id, "--remote-path", "mantik.log", "--local-path", str(one))
    assert "1 file already there and identical" in ok(mantik(*again)).stdout
    one.write_text("my notes\n")
    result = mantik(*again)
    assert result.returncode == 4 and "'one'" in result.stderr, result
    assert "again with --overwrite to replace" in result.stderr and "Traceback" not in result.stderr
    assert one.read_text() == "my notes\n"
    replaced = as_json(mantik(*again, "--overwrite", "--json"))
    assert replaced["replaced"] == ["one"] and one.read_text() == follow.stdout
    everything = tmp_path / "all"
    target = as_json(mantik("runs", "download", run_id, "--local-path", str(everything), "--json"))
    files = {p.name for p in Path(target["path"]).rglob("*")}
    assert "mantik.log" in files
    assert ".mantik-credentials" not in files

    result = mantik("runs", "cancel", run_id)
    assert result.returncode == 4 and "already ended" in result.stderr, result

    # A destination that cannot be a folder: a message naming it, no traceback.
    (tmp_path / "afile").write_text("")
    result = mantik("runs", "download", run_id, "--remote-path", "mantik.log",
                    "--local-path", str(tmp_path / "afile" / "sub"))  # fmt: skip
    assert result.returncode == 2 and "Cannot write the download to" in result.stderr, result
    assert "Traceback" not in result.stderr


def test_logs_prints_a_log_longer_than_one_read(mantik: Mantik, tmp_path: Path) -> None:
    project = big_log_project(tmp_path, {"Local": {}, "Resources": {"Queue": "local"}})
    run = as_json(mantik("runs", "submit", str(project), "--wait", "--json"))
    text = ok(mantik("runs", "logs", run["run_id"])).stdout
    assert len(text.encode()) > 4 * 1024 * 1024 and text.rstrip().endswith("exit status 0")
    assert "\U0001f3c3" * 1000 + "\nend\n" in text
    whole = as_json(mantik("runs", "logs", run["run_id"], "--json"))
    assert whole["text"] == text and whole["final"] is True


def test_submit_wait_failing_run(mantik: Mantik, project: Path) -> None:
    result = mantik(
        "runs", "submit", str(project), "--entry-point", "fail", "--wait",
        "--backend-config", "compute-backend-config.yaml",
        "--experiment-name", f"cli-{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    assert result.returncode == 7, result
    assert "FAILED" in result.stdout


def test_follow_interrupted_leaves_run(mantik: Mantik, project: Path, tmp_path: Path) -> None:
    run = as_json(
        mantik(
            "runs",
            "submit",
            str(project),
            "--entry-point",
            "sleep",
            "-P",
            "seconds=600",
            "--backend-config",
            "compute-backend-config.yaml",
            "--experiment-name",
            f"cli-{uuid.uuid4().hex[:8]}",
            "--json",
        )  # fmt: skip
    )
    run_id = run["run_id"]
    try:
        wait_state(mantik, run_id, {"RUNNING"})
        proc = subprocess.Popen(
            mantik.argv("runs", "logs", run_id, "--follow"),
            env=mantik.env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        time.sleep(4)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, (out, err)
        assert "Traceback" not in err
        # Ctrl-C stops srun's job: the user is told it did not stop this one, and how to.
        assert f"Stopped following run {run_id}; the run keeps running" in err, err
        assert f"mantik runs cancel {run_id}" in err
        assert as_json(mantik("runs", "status", run_id, "--json"))["state"] == "RUNNING"
    finally:
        cancelled = as_json(mantik("runs", "cancel", run_id, "--json"))
    assert cancelled["state"] == "KILLED"


@pytest.fixture(scope="module")
def remote_base(slurm_cluster):
    yield from remote_run_dirs(slurm_cluster, "cli")


def submit_to_slurm(mantik: Mantik, tmp_path: Path, config: dict, *args: str) -> dict:
    """The example project submitted with ``config``, in an experiment of its own."""
    project = copy_example(tmp_path)
    write_config(project, config)
    return as_json(mantik("runs", "submit", str(project), *args, "--json",
                          "--experiment-name", f"cli-{uuid.uuid4().hex[:8]}"))  # fmt: skip


@pytest.mark.slurm
def test_runs_on_a_cluster_that_cannot_be_reached_say_why_once(
    mantik: Mantik, tmp_path: Path, slurm_cluster, remote_base: str
) -> None:
    # A login node in maintenance: `runs list` printed the same long 'state unknown: Cannot
    # reach ...' line once per run (the first time; after that, nothing said why), and
    # `runs status` said UNKNOWN without a word.
    import paramiko

    from .login_gate import Gate

    gate = Gate((slurm_cluster.host, slurm_cluster.port))
    gate.open = True
    keys = paramiko.HostKeys(str(slurm_cluster.known_hosts))
    entry = keys.lookup(f"[{slurm_cluster.host}]:{slurm_cluster.port}")
    assert entry is not None
    known = paramiko.HostKeys()
    for kind, value in entry.items():
        known.add(f"[127.0.0.1]:{gate.port}", kind, value)
    known.save(str(tmp_path / "gate_known_hosts"))
    config = slurm_config(slurm_cluster, remote_base)
    config["SSH"].update(Port=gate.port, KnownHostsFile=str(tmp_path / "gate_known_hosts"))
    first = submit_to_slurm(mantik, tmp_path / "a", config, "-e", "sleep")
    experiment = ("--experiment-id", first["experiment_id"])
    second = as_json(mantik("runs", "submit", str(tmp_path / "a" / "weather-forecast"),
                            "-e", "sleep", "--json", *experiment))  # fmt: skip
    ids = [first["run_id"], second["run_id"]]
    try:
        gate.open = False
        for _ in range(2):  # as the runs turn UNKNOWN, and once they are
            result = ok(mantik("runs", "list", *experiment))
            said = [line for line in result.stderr.splitlines() if "Cannot reach" in line]
            assert len(said) == 1 and f"127.0.0.1:{gate.port}" in said[0], result.stderr
            assert all(run_id[:8] in said[0] for run_id in ids), said
        result = ok(mantik("runs", "status", ids[0]))
        assert "State:         UNKNOWN" in result.stdout
        assert "Why unknown:   Cannot reach the SSH server" in result.stdout, result.stdout
        assert "Cannot reach" not in result.stderr, result.stderr
    finally:
        gate.open = True
        for run_id in ids:
            mantik("runs", "cancel", run_id)
        gate.close()


@pytest.mark.slurm
def test_a_cancelled_slurm_run_shows_no_exit_code(
    mantik: Mantik, tmp_path: Path, slurm_cluster, remote_base: str
) -> None:
    # Slurm's ExitCode of a cancelled job (0:0) was shown as 'Exit code: 0' beside KILLED.
    run_id = submit_to_slurm(mantik, tmp_path, slurm_config(slurm_cluster, remote_base),
                             "-e", "sleep")["run_id"]  # fmt: skip
    wait_state(mantik, run_id, {"RUNNING"})
    assert as_json(mantik("runs", "cancel", run_id, "--json"))["state"] == "KILLED"
    run = as_json(mantik("runs", "info", run_id, "--json"))
    assert run["reason"] == "CANCELLED" and run["exit_code"] is None, run
    assert "Exit code" not in ok(mantik("runs", "status", run_id)).stdout


@pytest.mark.slurm
def test_following_a_queued_run_says_it_waits(
    mantik: Mantik, tmp_path: Path, slurm_cluster, remote_base: str
) -> None:
    # A job waits hours in a cluster's queue: `runs logs --follow` said nothing meanwhile,
    # as if it hung. Five nodes on a one-node partition: pending for good, with a reason.
    config = slurm_config(slurm_cluster, remote_base, Nodes=5)
    run_id = submit_to_slurm(mantik, tmp_path, config)["run_id"]
    try:
        proc = subprocess.Popen(
            mantik.argv("runs", "logs", run_id[:10], "--follow"), env=mantik.env,
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        assert proc.stderr is not None
        select.select([proc.stderr], [], [], 30)
        proc.send_signal(signal.SIGINT)
        first = proc.stderr.readline()
        out, err = proc.communicate(timeout=30)
        assert first.startswith(f"Run {run_id} (") and " is QUEUED" in first, first + err
        assert "its log follows once the job starts" in first and out == "", (first, out)
    finally:
        ok(mantik("runs", "cancel", run_id))


@pytest.mark.slurm
def test_ctrl_c_during_an_ssh_download(
    mantik: Mantik, tmp_path: Path, slurm_cluster, remote_base: str
) -> None:
    run = submit_to_slurm(mantik, tmp_path, slurm_config(slurm_cluster, remote_base),
                          "-P", "epochs=1")  # fmt: skip
    # A file that takes seconds to read over SSH (sparse: it costs no disk on the cluster).
    big = Path(run["tags"]["mantik.run_dir"]) / "big.bin"
    with open(big, "wb") as f:
        f.truncate(8 * 1024**3)
    big.chmod(0o644)
    dest = tmp_path / "big.bin"
    # Where the interrupt lands varies (inside an SFTP packet or between two): two tries.
    for _ in range(2):
        proc = subprocess.Popen(
            mantik.argv("runs", "download", run["run_id"], "--remote-path", "big.bin",
                        "--local-path", str(dest)),
            env=mantik.env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            first = proc.stderr.readline()  # the progress bar's first line: bytes flow
            assert first.startswith("download"), first
            time.sleep(0.5)
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            # Closing the file politely after the interrupt waited for every read in
            # flight: 5-9 s, or a hang until a second Ctrl-C.
            out, err = proc.communicate(timeout=30)
            assert time.monotonic() - started < 4, (out, err)
        finally:
            if proc.poll() is None:
                proc.kill()
        # Ctrl-C inside an SFTP packet left the channel mid-packet; closing the file then
        # failed with 'Garbage packet received': a traceback and exit 1, not 130.
        assert proc.returncode == 130, (out, err)
        # (paramiko's prefetch thread printed its own 'Socket is closed')
        assert "Garbage packet" not in err and "Traceback" not in err, err
        assert not dest.exists() and not list(tmp_path.glob(".*big.bin*"))


@pytest.mark.slurm
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_while_submitting_marks_the_run_killed(
    mantik: Mantik, tmp_path: Path, slurm_cluster, remote_base: str, signum: int, code: int
) -> None:
    # SIGTERM (a CI job's time limit, `timeout`) killed the command outright: the run
    # stayed SUBMITTING for ever.
    project = copy_example(tmp_path)
    config = slurm_config(slurm_cluster, remote_base)
    # Runs on the login node before sbatch, within the submission: time to press Ctrl-C.
    config["Environment"]["PreRunCommandOnLoginNode"] = "sleep 20"
    write_config(project, config)
    name = f"interrupted-{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen(
        mantik.argv("runs", "submit", str(project), "--run-name", name,
                    "--experiment-name", f"cli-{uuid.uuid4().hex[:8]}"),
        env=mantik.env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("upload") and "100%" in line:
                break
        time.sleep(1)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, (out, err)
    run = as_json(mantik("runs", "status", name, "--json"))
    # It was FAILED with the reason 'submission failed: KeyboardInterrupt: '.
    assert run["state"] == "KILLED" and run["mlflow_status"] == "KILLED", run
    assert run["reason"] == "the submission was interrupted before the job was queued"
    assert not run["job_id"]


def test_following_a_run_whose_server_went_away(project: Path, tmp_path: Path) -> None:
    # Following ended with 'cannot be reached' and exit 5 as if the run had failed; it
    # keeps running, and the message now says so and how to follow it again.
    server = start_mlflow_server(tmp_path / "private-mlflow")
    try:
        env = _base_env(tmp_path / "data")
        env.update(server.env(server.create_user()))
        mantik = Mantik(env, tmp_path)
        run = as_json(
            mantik("runs", "submit", str(project), "-e", "sleep", "-P", "seconds=4", "--json")
        )
        proc = subprocess.Popen(
            mantik.argv("runs", "logs", run["run_id"], "--follow"),
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("sleeping"):
                    break
            stop_mlflow_server(server.proc)
            out, err = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        stop_mlflow_server(server.proc)
    assert proc.returncode == 5, (out, err)
    assert "cannot be reached" in err, err
    assert "the run itself is not affected" in err
    assert f"mantik runs logs {run['run_id']} --follow" in err


# ---- errors ----------------------------------------------------------------------------


def test_missing_config_exit_2(mantik: Mantik, project: Path) -> None:
    result = mantik("runs", "submit", str(project), "--backend-config", "nope.yaml")
    assert result.returncode == 2, result
    assert result.stderr.startswith("error: ") and "nope.yaml" in result.stderr
    # A name is looked for in the project folder, then in the current one: the error
    # named the current folder's only, where the user had not meant it to be.
    assert str(project / "nope.yaml") in result.stderr, result.stderr
    assert str(mantik.cwd / "nope.yaml") in result.stderr, result.stderr
    # A name in the project folder is found from anywhere, a file in the current folder too.
    shutil.copy(project / "compute-backend-config.yaml", project / "local.yaml")
    args = ("runs", "submit", str(project), "-e", "nope")  # refused once the config is read
    result = mantik(*args, "--backend-config", "local.yaml")
    assert result.returncode == 2 and "Unknown entry point 'nope'" in result.stderr, result
    (project / "local.yaml").rename(mantik.cwd / "here.yaml")
    result = mantik(*args, "--backend-config", "here.yaml")
    assert result.returncode == 2 and "Unknown entry point 'nope'" in result.stderr, result


def test_bad_parameter_exit_2(mantik: Mantik, project: Path) -> None:
    result = mantik(
        "runs", "submit", str(project), "--backend-config", "compute-backend-config.yaml",
        "-P", "epochs",
    )  # fmt: skip
    assert result.returncode == 2 and "-P name=value" in result.stderr, result
    result = mantik(
        "runs", "submit", str(project), "--backend-config", "compute-backend-config.yaml",
        "-P", "no_such=1",
    )  # fmt: skip
    assert result.returncode == 2 and "no_such" in result.stderr, result


def test_config_warnings_are_one_line_each(mantik: Mantik, project: Path) -> None:
    # They came in Python's format: mantik's own source file and line, the warning class,
    # and the line of code that raised it.
    write_config(project, {"Local": {}, "Resources": {"Queue": "local", "CPUs": 1}})
    result = mantik("runs", "submit", str(project), "-P", "no_such=1")
    assert result.returncode == 2, result  # stopped by the parameter: nothing is created
    warned = [line for line in result.stderr.splitlines() if "CPUs" in line]
    assert len(warned) == 1, result.stderr
    assert warned[0].startswith("warning: ") and warned[0].endswith(
        "Resources.CPUs: is deprecated; rename it to 'Resources.TotalCPUs'"
    )
    assert "Warning:" not in result.stderr and ".py:" not in result.stderr


def test_unknown_experiment_id(mantik: Mantik, project: Path) -> None:
    # MLflow answers an unknown id like a forbidden one: it said the experiment
    # 'belongs to someone else', of an experiment that does not exist.
    result = mantik("runs", "submit", str(project), "--experiment-id", "987654")
    assert result.returncode == 3, result
    assert "experiment id 987654: there is no such experiment, or it" in result.stderr


@pytest.mark.parametrize("experiment_id", ["987654", "abc"])
def test_listing_an_unknown_experiment_id_says_so(mantik: Mantik, experiment_id: str) -> None:
    # It showed an empty table, exit 0, as if the experiment had no runs.
    result = mantik("runs", "list", "--experiment-id", experiment_id)
    assert result.returncode == 4, result
    assert f"No experiment with id {experiment_id!r}" in result.stderr
    empty = user_api(mantik).create_experiment(f"empty-{uuid.uuid4().hex[:8]}")
    assert ok(mantik("runs", "list", "--experiment-id", empty)).returncode == 0


def test_listing_by_state_shows_the_runs_in_that_state_now(
    mantik: Mantik, project: Path, mlflow_server: MlflowServer
) -> None:
    # The filter read the state recorded on the run, stale with no lab syncing it: a run
    # that had ended was listed under `--state active` (shown as FINISHED), and
    # `--state FINISHED` left it out.
    experiment = f"cli-{uuid.uuid4().hex[:8]}"
    run_id = as_json(mantik("runs", "submit", str(project), "--experiment-name", experiment,
                            "--json"))["run_id"]  # fmt: skip
    admin = admin_api(mlflow_server)
    tags = {t["key"]: t["value"] for t in admin.get_run(run_id)["data"]["tags"]}
    # The job has ended once its supervisor wrote this (the entry point's MLflow run
    # ended a moment before).
    ended = Path(tags["mantik.run_dir"]) / "mantik.ended"
    deadline = time.monotonic() + RUN_TIMEOUT
    while not ended.exists():
        assert time.monotonic() < deadline, tags
        time.sleep(0.5)
    tags = {t["key"]: t["value"] for t in admin.get_run(run_id)["data"]["tags"]}
    assert tags["mantik.state"] in ("QUEUED", "RUNNING"), tags  # nothing asked its backend

    def listed(state: str) -> list[tuple[str, str]]:
        found = as_json(mantik("runs", "list", "--state", state, "--experiment-name",
                               experiment, "--json"))["runs"]  # fmt: skip
        return [(r["run_id"], r["state"]) for r in found]

    assert listed("FINISHED") == [(run_id, "FINISHED")]
    assert listed("active") == []
    assert listed("final") == [(run_id, "FINISHED")]


def test_a_run_from_another_installation_is_listed_with_its_warning(
    mantik: Mantik, project: Path, tmp_path: Path
) -> None:
    # README: such a run "is listed with its last recorded state and a warning". The
    # warning was in --json only (and lost with --state): the table showed the run QUEUED
    # for as long as nobody where it was submitted looked, as if that were current.
    experiment = f"cli-{uuid.uuid4().hex[:8]}"
    run_id = as_json(mantik("runs", "submit", str(project), "-e", "sleep", "--json",
                            "--experiment-name", experiment))["run_id"]  # fmt: skip
    try:
        elsewhere = Mantik({**mantik.env, "MANTIK_DATA_DIR": str(tmp_path / "other")}, tmp_path)
        for args in (("list",), ("list", "--state", "active"), ("status", run_id)):
            result = ok(elsewhere("runs", *args, "--experiment-name", experiment)
                        if args[0] == "list" else elsewhere("runs", *args))  # fmt: skip
            assert run_id[:8] in result.stdout, (args, result.stdout)
            assert f"warning: run {run_id[:8]}: Not followed here" in result.stderr, (args, result)
        listed = as_json(elsewhere("runs", "list", "--state", "active", "--experiment-name",
                                   experiment, "--json"))["runs"]  # fmt: skip
        assert listed[0]["warnings"] and "Not followed here" in listed[0]["warnings"][0]
    finally:
        ok(mantik("runs", "cancel", run_id))


def user_api(mantik: Mantik) -> RunsApi:
    """MLflow's REST API as the user of ``mantik``."""
    user = Credential(
        username=mantik.env["MLFLOW_TRACKING_USERNAME"],
        password=mantik.env["MLFLOW_TRACKING_PASSWORD"],
    )
    return RunsApi(TrackingClient(mantik.env["MLFLOW_TRACKING_URI"], user))


def test_long_run_names_are_cut_in_the_table(mantik: Mantik) -> None:
    # One 300-character name made every row of `runs list` 300 characters wide.
    api = user_api(mantik)
    experiment = api.create_experiment(f"names-{uuid.uuid4().hex[:8]}")
    tags = {"mantik.backend": "local", "mantik.state": "FINISHED"}
    run = api.create_run(experiment, run_name="n" * 300, tags=tags)["info"]["run_id"]
    api.update_run(run, status="FINISHED", end_time=int(time.time() * 1000))
    table = ok(mantik("runs", "list", "--experiment-id", experiment)).stdout.splitlines()
    assert table[1].startswith(run[:8]) and "n" * 39 + "\u2026 " in table[1]
    assert max(map(len, table)) < 100, table
    assert as_json(mantik("runs", "info", run, "--json"))["run_name"] == "n" * 300
    # On an 80-column terminal that table wrapped: every row took two lines. The names
    # are cut to fit it ($COLUMNS, as a terminal sets it).
    mantik.env["COLUMNS"] = "80"
    table = ok(mantik("runs", "list", "--experiment-id", experiment)).stdout.splitlines()
    assert max(map(len, table)) <= 80 and "nnn\u2026 " in table[1], table
    mantik.env["COLUMNS"] = "30"  # narrower still: wrapped, not cut to nothing
    assert "n" * 11 + "\u2026 " in ok(mantik("runs", "list", "--experiment-id", experiment)).stdout


def test_names_from_the_server_cannot_break_the_table_or_drive_the_terminal(
    mantik: Mantik,
) -> None:
    # Run names and tags are anyone's text (a colleague's run, the training code's tags):
    # a newline split a row in two, an escape sequence went to the terminal as it was,
    # and a table with Chinese names was two columns short per character.
    from mantik_jupyter.cli_format import width

    api = user_api(mantik)
    experiment = api.create_experiment(f"names-{uuid.uuid4().hex[:8]}")
    tags = {"mantik.backend": "local", "mantik.state": "FINISHED"}
    names = ["天气预报模型", "two\nlines\x1b]0;pwned\x07", "Zürich \u2600"]
    ids = []
    for name in names:
        run = api.create_run(experiment, run_name=name, tags=tags)["info"]["run_id"]
        api.update_run(run, status="FINISHED", end_time=int(time.time() * 1000))
        ids.append(run)
    api.log_batch(ids[1], tags={"note": "\x1b[2J\x1b[31mred\nnext"})
    table = ok(mantik("runs", "list", "--experiment-id", experiment)).stdout
    assert "\x1b" not in table and "two\\nlines\\x1b]0;pwned\\x07" in table, table
    rows = table.splitlines()
    assert len(rows) == 4, rows
    # STATE starts in the same terminal column on every row.
    assert len({width(row[: row.index("FINISHED")]) for row in rows[1:]}) == 1, rows
    assert width(rows[0][: rows[0].index("STATE")]) == width(rows[1][: rows[1].index("FINISHED")])
    info = ok(mantik("runs", "info", ids[1])).stdout
    assert "\x1b" not in info and "note = \\x1b[2J\\x1b[31mred\\nnext" in info, info
    # --json keeps the values as they are.
    assert as_json(mantik("runs", "info", ids[1], "--json"))["run_name"] == names[1]
    # An output that cannot spell them (a Latin-1 login node, PYTHONIOENCODING=ascii)
    # ended in a UnicodeEncodeError traceback.
    mantik.env["PYTHONIOENCODING"] = "ascii"
    listed = ok(mantik("runs", "list", "--experiment-id", experiment)).stdout
    assert "\\u5929\\u6c14" in listed and "Z\\xfcrich" in listed, listed


def test_a_run_mantik_did_not_submit_has_no_log(mantik: Mantik) -> None:
    # A plain MLflow run (a notebook's mlflow.start_run) has no job: following its log
    # waited for ever, reading it printed nothing and succeeded.
    api = user_api(mantik)
    experiment = api.create_experiment(f"plain-{uuid.uuid4().hex[:8]}")
    run_id = api.create_run(experiment, run_name="plain")["info"]["run_id"]  # RUNNING
    for follow in ((), ("--follow",)):
        result = mantik("runs", "logs", run_id, *follow, timeout=60)
        assert result.returncode == 4, (follow, result)
        assert "not submitted by mantik" in result.stderr


def test_unknown_run_exit_4(mantik: Mantik) -> None:
    for args in (("status", "no-such-run"), ("info", "deadbeef"), ("logs", "no-such-run")):
        result = mantik("runs", *args)
        assert result.returncode == 4, (args, result)
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    # With --json the error is JSON as well, with its reason: exit 4 also means a prefix
    # of several runs, or a run that already ended.
    result = mantik("runs", "status", "no-such-run", "--json")
    assert result.returncode == 4 and result.stdout == "", result
    error = json.loads(result.stderr)["error"]
    assert error["reason"] == "not_found" and "'no-such-run'" in error["message"], error


def test_last_is_the_newest_run_you_submitted(mantik: Mantik, project: Path) -> None:
    # The magics knew 'last'; `mantik runs logs last --follow` after a submission said
    # "No run with id, id prefix or name 'last'".
    none = mantik("runs", "status", "last")
    assert none.returncode == 4 and "'last' is the newest run you submitted" in none.stderr
    experiment = f"cli-{uuid.uuid4().hex[:8]}"
    submitted = [
        as_json(
            mantik(
                "runs", "submit", str(project), "--entry-point", "fail", "--json",
                "--backend-config", "compute-backend-config.yaml", "--experiment-name", experiment,
            )
        )["run_id"]
        for _ in range(2)
    ]  # fmt: skip
    assert as_json(mantik("runs", "status", "last", "--json"))["run_id"] == submitted[-1]
    # With a token, runs record no user: 'last' would be anyone's newest run.
    token = Mantik({**mantik.env, "MLFLOW_TRACKING_TOKEN": "t0ken-from-ci"}, mantik.cwd)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        token.env.pop(name, None)
    refused = token("runs", "status", "last")
    assert refused.returncode == 2 and "token login" in refused.stderr, refused
    assert "t0ken-from-ci" not in refused.stderr


def test_not_logged_in_exit_3(anon: Mantik) -> None:
    result = anon("runs", "list")
    assert result.returncode == 3 and "mantik login" in result.stderr, result


def test_durations_split_queue_wait_and_running_time() -> None:
    minute = 60_000
    ran = {"state": "FINISHED", "start_time": minute, "running_since": 121 * minute,
           "end_time": 124 * minute + 5_000}  # fmt: skip
    assert run_duration(ran) == "3m05s (queued 2h00m)"
    running = {**ran, "state": "RUNNING", "end_time": None}
    assert run_duration(running, now=(121 * minute + 30_000) / 1000) == "30s (queued 2h00m)"
    assert "Running for:   " in run_details(running, full=False)
    assert "Queued:        2h00m" in run_details(ran, full=False)
    waiting = {"state": "QUEUED", "start_time": minute, "running_since": None, "end_time": None}
    assert run_duration(waiting, now=6 * 60) == "queued 5m00s"
    assert "Queued:" not in run_details(waiting, full=False)
    # Recorded before mantik kept the start of running: the time since submission.
    old = {"state": "FINISHED", "start_time": minute, "end_time": 4 * minute}
    assert run_duration(old) == "3m00s"
