"""RunService lifecycle with the local backend, against a real MLflow server."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from mantik_jupyter.compute import run_submit
from mantik_jupyter.compute.backends import local
from mantik_jupyter.compute.backends.base import PreparedJob
from mantik_jupyter.compute.backends.local import LocalBackend
from mantik_jupyter.compute.run_inputs import check_tracking_uri
from mantik_jupyter.compute.runs import RunService
from mantik_jupyter.compute.states import RunState
from mantik_jupyter.errors import (
    BackendRejected,
    ConfigError,
    Conflict,
    NotFound,
    PermissionDenied,
    ProjectError,
    TrackingUnavailable,
    UnsafePath,
)
from mantik_jupyter.tracking.rest import TrackingClient
from mantik_jupyter.tracking.runs_api import RunsApi

from .backends.test_ssh_slurm import check_odd_files, make_job, odd_files_body
from .backends.test_ssh_slurm import wait_for as wait_for_job
from .runs_helpers import (
    FINAL,
    RUN_ARTIFACTS,
    RunUserSpy,
    admin_api,
    artifact_bytes,
    artifact_names,
    assert_no_secret,
    big_log_project,
    copy_example,
    login_works,
    run_failing_entry_point,
    wait_for,
    write_config,
)

LOCAL_CONFIG = {
    "Local": {},
    "Resources": {"Queue": "local"},
    # The job's python (with mlflow and numpy): this test's venv.
    "Environment": {"Python": sys.prefix, "Variables": {"EVIL": "$(touch pwned)"}},
}


@pytest.fixture
def project(tmp_path):
    project = copy_example(tmp_path)
    write_config(project, LOCAL_CONFIG)
    return project


def test_lifecycle_finishes_with_everything_in_mlflow(
    service, project, mlflow_server, user, monkeypatch, tmp_path, experiment_name
):
    spy = RunUserSpy(monkeypatch)
    stages = []
    info = service.submit(
        project,
        params={"epochs": "4", "station": "1; touch pwned"},
        experiment_name=experiment_name,
        run_name="first try",
        source="lab",
        progress=lambda stage, done, total: stages.append((stage, total)),
    )
    assert {"package", "upload"} <= {stage for stage, _ in stages}
    # The upload's total is announced as the backend counts it (it jumped at the first count).
    assert len({total for stage, total in stages if stage == "upload"}) == 1, stages
    assert info.state == RunState.QUEUED
    assert info.backend == "local" and info.job_id.startswith("local-")
    assert info.source == "lab" and info.user == user.username
    assert info.run_name == "first try" and info.entry_point == "main"

    # The log is readable while the job runs, and follow_logs ends with the run.
    text = "".join(service.follow_logs(info.run_id[:10], poll_interval=0.2))
    assert "epoch 1/4" in text and "epoch 4/4" in text
    final = wait_for(service, info.run_id, FINAL, timeout=30)
    assert final.state == RunState.FINISHED, final.tags
    assert final.mlflow_status == "FINISHED" and final.end_time
    assert final.exit_code == 0
    # The local process's start, recorded with the run's state change.
    assert final.running_since is not None
    assert final.start_time <= final.running_since <= final.end_time
    assert final.tags["mantik.running_since"] == str(final.running_since)

    # Params with defaults, the user value arrives literally.
    assert final.params == {
        "epochs": "4",
        "learning_rate": "0.01",
        "station": "1; touch pwned",
    }
    assert {"loss", "rmse"} <= set(final.metrics)
    tags = final.tags
    assert tags["mantik.backend"] == "local"
    assert tags["mantik.entry_point"] == "main"
    assert tags["mlflow.source.type"] == "PROJECT"
    assert tags["mlflow.project.entryPoint"] == "main"
    assert len(tags["mantik.package_sha256"]) == 64
    assert tags["mantik.run_dir"]
    names = artifact_names(mlflow_server, info.run_id)
    assert RUN_ARTIFACTS <= names
    assert b"epoch 4/4" in artifact_bytes(mlflow_server, info.run_id, "mantik/mantik.log")
    run_dir = Path(tags["mantik.run_dir"])
    assert not list(run_dir.rglob("pwned")) and not (project / "pwned").exists()
    assert not (run_dir / ".mantik-credentials").exists()
    assert not (service.work_dir / info.run_id).exists()  # job dir cleaned up

    # Files and downloads, confined to the run directory.
    entries = {e.path: e for e in service.files(info.run_id)}
    assert entries["code"].is_dir and "mantik.log" in entries
    got = service.download(info.run_id, "code/outputs/forecast.csv", tmp_path / "dl").path
    assert got.read_text().startswith("station,day_ahead")
    folder = service.download(info.run_id, "", tmp_path / "whole").path
    assert (folder / "code" / "train.py").is_file() and (folder / "mantik.log").is_file()
    for bad in ("../x", "/etc/passwd", "code/../../x"):
        with pytest.raises(UnsafePath):
            service.files(info.run_id, bad)
        with pytest.raises(UnsafePath):
            service.download(info.run_id, bad, tmp_path / "bad")
    (run_dir / "escape").symlink_to("/etc")
    with pytest.raises(UnsafePath):
        service.files(info.run_id, "escape")

    # The per-run user worked and is gone; no secret was stored anywhere.
    cred = spy.created[info.run_id]
    assert len(cred.password) >= 12
    assert tags["mantik.run_user"] == cred.username
    assert not login_works(mlflow_server, cred)
    assert_no_secret(mlflow_server, info.run_id, [cred.password, user.password])

    with pytest.raises(Conflict):
        service.cancel(info.run_id)
    chunk = service.logs(info.run_id)
    assert chunk.final is False and "epoch 1/4" in chunk.text
    assert service.logs(info.run_id, chunk.offset).final


def test_failing_entry_point(service, project, experiment_name):
    info = run_failing_entry_point(service, project, experiment_name, timeout=30)
    text = "".join(service.follow_logs(info.run_id))
    assert "simulated failure" in text


def test_cancel_kills_the_process_group(service, project, experiment_name):
    info = service.submit(project, entry_point="sleep", experiment_name=experiment_name)
    running = wait_for(service, info.run_id, {RunState.RUNNING}, timeout=20)
    assert info.running_since is None  # queued at submission
    run_dir = Path(running.tags["mantik.run_dir"])
    started = (run_dir / "mantik.jobid").stat().st_mtime_ns // 1_000_000
    assert running.running_since == started
    pid = int(info.job_id.split("-")[1])
    killed = service.cancel(info.run_id)
    assert killed.state == RunState.KILLED and killed.mlflow_status == "KILLED"
    assert killed.reason == "CANCELLED"
    assert _gone([pid], timeout=local.CANCEL_GRACE + 5)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: being reaped as we read
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _kill_left(pids: list[int], lab_child: subprocess.Popen | None = None) -> None:
    """Clean up after a test: what it left of a job, and the lab's own process."""
    if lab_child is not None:
        lab_child.kill()
        lab_child.wait()
    for pid in pids:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def _script_job(tmp_path: Path, script: str, run_id: str = "r1") -> PreparedJob:
    local = tmp_path / run_id
    local.mkdir()
    (local / "mantik-job.sh").write_text(script)
    return PreparedJob(run_id=run_id, local_dir=local, job_name="t")


def _children(backend: LocalBackend, job_id: str, count: int) -> list[int]:
    children = Path(backend.run_dir_of(job_id)) / "children"
    deadline = time.monotonic() + 10
    while len(children.read_text().split() if children.exists() else []) < count:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return [int(p) for p in children.read_text().split()]


def _stubborn_job(tmp_path: Path, run_id: str = "r1") -> PreparedJob:
    """A job whose script ignores SIGTERM, with a child that ignores it too and one in a
    process group of its own; the children file lists the script and those two."""
    return _script_job(
        tmp_path,
        "trap '' TERM\n"
        "echo $$ >> children\n"
        "(exec sleep 300) & echo $! >> children\n"
        'python3 -c \'import os; os.setpgid(0, 0); os.execvp("sleep", ["sleep", "300"])\' &\n'
        "echo $! >> children\n"
        "sleep 300\n",
        run_id,
    )


def test_cancel_answers_at_once_and_kills_every_child_after_the_grace(tmp_path):
    # As scancel: the answer and KILLED come once SIGTERM is sent, not after the grace
    # of what ignores it; the SIGKILL after the grace still comes.
    backend = LocalBackend(tmp_path / "runs")
    job_id = backend.submit(_stubborn_job(tmp_path))
    pids = _children(backend, job_id, 3)
    try:
        start = time.monotonic()
        backend.cancel(job_id)
        assert time.monotonic() - start < local.CANCEL_GRACE / 2
        assert backend.states([job_id])[job_id].state == RunState.KILLED
        assert _running(pids[0])  # the script ignores SIGTERM: it has its grace
        assert _gone(pids, timeout=local.CANCEL_GRACE + 5), [p for p in pids if _running(p)]
        assert backend.states([job_id])[job_id].state == RunState.KILLED
    finally:
        _kill_left(pids)


def test_close_hurries_the_kill_of_a_cancelled_job(tmp_path):
    # A lab that shuts down right after a cancel neither waits out the grace nor leaves
    # the job's processes running.
    backend = LocalBackend(tmp_path / "runs")
    job_id = backend.submit(_stubborn_job(tmp_path))
    pids = _children(backend, job_id, 3)
    try:
        backend.cancel(job_id)
        assert _running(pids[0])
        start = time.monotonic()
        backend.close()
        assert time.monotonic() - start < local.CANCEL_GRACE / 2
        assert not [pid for pid in pids if _running(pid)]
    finally:
        _kill_left(pids)


def test_the_end_of_a_cancelled_job_sends_no_second_sigterm(tmp_path, monkeypatch):
    # The RunService records the end of a cancelled job at once (it reads KILLED), and
    # job_ended SIGTERMed the job again while its supervisor waited out the grace: a
    # second SIGTERM cuts short what a job does on the first (a checkpoint).
    monkeypatch.setattr(local, "CANCEL_GRACE", 1.5)
    backend = LocalBackend(tmp_path / "runs")
    job_id = backend.submit(
        _script_job(
            tmp_path,
            "exec python3 -c 'import os, signal, time\n"
            'signal.signal(signal.SIGTERM, lambda *_: open("terms", "a").write("term\\n"))\n'
            'open("children", "a").write(f"{os.getpid()}\\n")\n'
            "while True: time.sleep(1)'\n",
        )
    )
    pids = _children(backend, job_id, 1)
    terms = Path(backend.run_dir_of(job_id)) / "terms"
    try:
        backend.cancel(job_id)
        assert backend.states([job_id])[job_id].state == RunState.KILLED
        time.sleep(0.3)  # the sync reads the run, finds it KILLED, stores its log
        backend.job_ended(job_id)
        assert _gone(pids, timeout=local.CANCEL_GRACE + 5)
        assert terms.read_text().split() == ["term"]
    finally:
        _kill_left(pids)


def _escaping_job(tmp_path: Path, name: str) -> PreparedJob:
    """A job whose children leave its session: setsid, and a double fork into a session
    of its own that ignores SIGTERM (as daemons, ``nohup setsid ...``, do)."""
    return _script_job(
        tmp_path,
        "setsid bash -c 'echo $$ >> children; exec sleep 300' &\n"
        "nohup python3 -c 'import os, signal\n"
        "os.setsid()\n"
        "if os.fork(): os._exit(0)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        'open("children", "a").write(f"{os.getpid()}\\n")\n'
        'os.execvp("sleep", ["sleep", "300"])\' >/dev/null 2>&1 &\n'
        "sleep 300\n",
        name,
    )


def test_cancel_stops_children_that_left_the_session(tmp_path):
    backend = LocalBackend(tmp_path / "runs")
    job_id = backend.submit(_escaping_job(tmp_path, "r1"))
    other_id = backend.submit(_escaping_job(tmp_path, "r2"))
    # A process of the lab, with the environment the jobs got from it.
    lab_child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    pids = _children(backend, job_id, 2)
    others = _children(backend, other_id, 2)
    try:
        for pid in pids:
            assert os.getsid(pid) != os.getsid(int(job_id.split("-")[1]))
        backend.cancel(job_id)
        assert backend.states([job_id])[job_id].state == RunState.KILLED
        assert _gone(pids, timeout=local.CANCEL_GRACE + 5)
        # Another job's escaped children and the lab's own processes stay.
        assert all(_running(pid) for pid in others) and lab_child.poll() is None
        assert backend.states([other_id])[other_id].state == RunState.RUNNING
        # As after a restart of the lab: the marker comes from the run directory.
        LocalBackend(tmp_path / "runs").cancel(other_id)
        assert _gone(others, timeout=local.CANCEL_GRACE + 5)
        assert lab_child.poll() is None
    finally:
        for job in (job_id, other_id):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(job.split("-")[1]), signal.SIGKILL)
        _kill_left(pids + others, lab_child)


# Leaves the job every way a process can: `setsid env -i` starts it in a session of its
# own with an empty environment (no MANTIK_LOCAL_JOB), and a double fork orphans the
# daemon (its parent exits). It ignores SIGTERM and writes its pid to argv[1].
ESCAPE = """\
import os, signal, sys
if os.fork():
    os._exit(0)
if os.fork():
    os._exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1], "a") as f:
    f.write(f"{os.getpid()}\\n")
os.execvp("sleep", ["sleep", "300"])
"""


def _env_clearing_job(tmp_path: Path, run_id: str, then: str) -> PreparedJob:
    job = _script_job(
        tmp_path,
        'setsid env -i "$(command -v python3)" escape.py "$PWD/children"\n' + then,
        run_id,
    )
    (job.local_dir / "escape.py").write_text(ESCAPE)
    return job


def _escaped(backend: LocalBackend, job_id: str) -> int:
    """The daemon of an _env_clearing_job, checked to have left the job every way."""
    [pid] = _children(backend, job_id, 1)
    script = int(job_id.split("-")[1])
    assert os.getsid(pid) != os.getsid(script)
    assert b"MANTIK_LOCAL_JOB" not in Path(f"/proc/{pid}/environ").read_bytes()
    stat = Path(f"/proc/{pid}/stat").read_text()
    assert int(stat[stat.rindex(")") + 2 :].split()[1]) != script  # an orphan
    return pid


def test_cancel_and_the_end_of_a_job_stop_children_that_cleared_their_environment(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(local, "CANCEL_GRACE", 1.0)
    backend = LocalBackend(tmp_path / "runs")
    cancelled = backend.submit(_env_clearing_job(tmp_path, "r1", "sleep 300\n"))
    ending = backend.submit(
        _env_clearing_job(
            tmp_path, "r2", "while [ ! -e go ]; do sleep 0.05; done\necho 0 > mantik.exitcode\n"
        )
    )
    # A process of the lab that did the same: it is nobody's job.
    lab_child = subprocess.Popen(["setsid", "env", "-i", "sleep", "300"])
    pids: list[int] = []
    try:
        pids = [_escaped(backend, cancelled), _escaped(backend, ending)]
        backend.cancel(cancelled)
        assert _gone(pids[:1], timeout=local.CANCEL_GRACE + 5)
        # Another job's daemon and the lab's own process stay.
        assert _running(pids[1]) and lab_child.poll() is None
        assert backend.states([ending])[ending].state == RunState.RUNNING
        # The other job ends by itself; its end stops its daemon (here in a backend
        # made afresh, as after a restart of the lab: the supervisor is on file).
        (Path(backend.run_dir_of(ending)) / "go").touch()
        assert wait_for_job(backend, ending, FINAL).state == RunState.FINISHED
        assert _running(pids[1])
        LocalBackend(tmp_path / "runs").job_ended(ending)
        assert _gone(pids[1:], timeout=local.CANCEL_GRACE + 5)
        assert lab_child.poll() is None
    finally:
        for job in (cancelled, ending):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(job.split("-")[1]), signal.SIGKILL)
        _kill_left(pids, lab_child)


@contextlib.contextmanager
def _ended_job_with_a_daemon(tmp_path: Path) -> Iterator[tuple[LocalBackend, str, int]]:
    """A job that FINISHED and left running a daemon of its own session that ignores
    SIGTERM: (backend, job id, the daemon's pid)."""
    job = _script_job(
        tmp_path,
        "setsid bash -c 'trap \"\" TERM; echo $$ > children; exec sleep 300' &\n"
        "while [ ! -s children ]; do sleep 0.05; done\n"
        "echo 0 > mantik.exitcode\n",
    )
    backend = LocalBackend(tmp_path / "runs")
    job_id = backend.submit(job)
    [pid] = _children(backend, job_id, 1)
    try:
        assert wait_for_job(backend, job_id, FINAL).state == RunState.FINISHED
        yield backend, job_id, pid
    finally:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def test_cancel_after_the_script_ended_stops_what_it_left_running(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "CANCEL_GRACE", 1.0)
    with _ended_job_with_a_daemon(tmp_path) as (backend, job_id, pid):
        assert _running(pid)
        backend.cancel(job_id)
        assert _gone([pid], timeout=local.CANCEL_GRACE + 5)
        assert backend.states([job_id])[job_id].state == RunState.FINISHED


def test_a_job_that_cannot_start_is_refused_with_why(tmp_path, monkeypatch):
    # Its supervisor starts, the script's shell cannot: the refusal says why.
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    backend = LocalBackend(tmp_path / "runs")
    with pytest.raises(BackendRejected, match="Cannot start the job of run r1: .*bash"):
        backend.submit(_script_job(tmp_path, "true\n"))


def test_cancel_deletes_a_credential_file_the_job_never_read(tmp_path):
    # As for a job killed before its script reached the credential file.
    job = _script_job(tmp_path, "sleep 300\n")
    (job.local_dir / ".mantik-credentials").write_text("MLFLOW_TRACKING_TOKEN=t0ken\n")
    backend = LocalBackend(tmp_path / "runs")
    job_id = backend.submit(job)
    creds = Path(backend.run_dir_of(job_id)) / ".mantik-credentials"
    assert creds.is_file()
    backend.cancel(job_id)
    assert backend.states([job_id])[job_id].state == RunState.KILLED
    assert not creds.exists()


# What a local job's end does, as Slurm does at the end of a job: its processes go, and so
# does its credential file. The RunService calls job_ended when it records the end.

LEAVER = """\
# A data-loader daemon that left the job's session and ignores SIGTERM, and a plain
# background child: both outlive the entry point unless the end of the job stops them.
setsid bash -c 'trap "" TERM; echo $$ >> "$1"; exec sleep 300' leaver "$1" &
sleep 300 &
echo $! >> "$1"
while [ "$(wc -l < "$1")" -lt 2 ]; do sleep 0.05; done
echo left two behind
"""


def _leaver_project(tmp_path: Path) -> Path:
    project = tmp_path / "leaver"
    project.mkdir()
    (project / "MLproject").write_text(
        "name: leaver\nentry_points:\n  main:\n    parameters:\n      out: {type: string}\n"
        "    command: 'bash leave.sh {out}'\n"
    )
    (project / "leave.sh").write_text(LEAVER)
    write_config(project, LOCAL_CONFIG)
    return project


def _timed_job_ended(monkeypatch) -> list[float]:
    """Durations of LocalBackend.job_ended calls (the sync loop waits for them)."""
    durations: list[float] = []
    original = LocalBackend.job_ended

    def timed(self, job_id):
        start = time.monotonic()
        try:
            return original(self, job_id)
        finally:
            durations.append(time.monotonic() - start)

    monkeypatch.setattr(LocalBackend, "job_ended", timed)
    return durations


def _gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while [pid for pid in pids if _running(pid)]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_processes_a_finished_job_left_behind_are_stopped(
    service, tmp_path, monkeypatch, experiment_name
):
    monkeypatch.setattr(local, "CANCEL_GRACE", 2.0)
    durations = _timed_job_ended(monkeypatch)
    out = tmp_path / "children"
    lab_child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    info = service.submit(
        _leaver_project(tmp_path), params={"out": str(out)}, experiment_name=experiment_name
    )
    pids: list[int] = []
    try:
        final = wait_for(service, info.run_id, FINAL, timeout=30)
        pids = [int(p) for p in out.read_text().split()]
        assert final.state == RunState.FINISHED and final.exit_code == 0, final.tags
        # The sync did not wait out the grace of the daemon that ignores SIGTERM.
        assert len(durations) == 1 and durations[0] < 1.0, durations
        assert _gone(pids, timeout=2 * 2.0 + 5), [p for p in pids if _running(p)]
        # The lab's own processes stay, and the run stays FINISHED (not cancelled).
        assert lab_child.poll() is None
        assert not (Path(final.tags["mantik.run_dir"]) / local.CANCELLED_FILE).exists()
        assert service.get(info.run_id).state == RunState.FINISHED
    finally:
        _kill_left(pids, lab_child)


def _submit_stubborn(service: RunService, tmp_path: Path, experiment: str) -> tuple[str, Path]:
    """Submit a run whose entry point ignores SIGTERM and has a child: (its run id, the
    file that lists the pids of both)."""
    project = tmp_path / "stubborn"
    project.mkdir()
    (project / "MLproject").write_text(
        "name: stubborn\nentry_points:\n  main:\n    parameters:\n      out: {type: string}\n"
        "    command: 'bash stubborn.sh {out}'\n"
    )
    (project / "stubborn.sh").write_text(
        'trap \'\' TERM\necho $$ >> "$1"\nsleep 300 &\necho $! >> "$1"\nwait\n'
    )
    write_config(project, LOCAL_CONFIG)
    out = tmp_path / "children"
    info = service.submit(project, params={"out": str(out)}, experiment_name=experiment)
    return info.run_id, out


def _listed_pids(out: Path, count: int) -> list[int]:
    deadline = time.monotonic() + 20
    while len(out.read_text().split() if out.exists() else []) < count:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return [int(p) for p in out.read_text().split()]


def test_cancel_of_a_run_that_ignores_sigterm_answers_at_once(service, tmp_path, experiment_name):
    # What the REST handler, the magic and the CLI call: the run reads KILLED once
    # SIGTERM is sent, and the entry point still gets its SIGKILL after the grace.
    run_id, out = _submit_stubborn(service, tmp_path, experiment_name)
    pids: list[int] = []
    try:
        pids = _listed_pids(out, 2)
        start = time.monotonic()
        killed = service.cancel(run_id)
        assert time.monotonic() - start < local.CANCEL_GRACE / 2
        assert killed.state == RunState.KILLED and killed.mlflow_status == "KILLED"
        assert killed.reason == "CANCELLED"
        assert _gone(pids, timeout=local.CANCEL_GRACE + 5), [p for p in pids if _running(p)]
    finally:
        _kill_left(pids)


def test_mantik_runs_cancel_exits_at_once_and_the_job_is_killed_after_the_grace(
    tracking, mlflow_server, user, tmp_path, experiment_name
):
    # The command answered at once but exited only after the grace: the SIGKILL for
    # what ignores SIGTERM came from a thread of the command's own process. The job's
    # supervisor, which lives as long as the job, now sends it.
    data = tmp_path / "data"
    # The CLI's own installation (its key signs and verifies the run).
    service = RunService(tracking, work_dir=data / "runs", key_file=data / "run-key.json")
    pids: list[int] = []
    try:
        run_id, out = _submit_stubborn(service, tmp_path, experiment_name)
        pids = _listed_pids(out, 2)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MANTIK_"))}
        env.update(mlflow_server.env(user))
        env["MANTIK_DATA_DIR"] = str(data)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
        proc = subprocess.Popen(
            [sys.executable, "-m", "mantik_jupyter.cli", "runs", "cancel", run_id],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            answer = proc.stdout.readline()
            answered = time.monotonic()
            assert answer.startswith(f"Cancelled run {run_id}"), (answer, proc.communicate())
            proc.wait(timeout=local.CANCEL_GRACE + 10)
            exited = time.monotonic()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0
        assert exited - answered < 1.5, f"exited {exited - answered:.1f} s after answering"
        # The script ignores SIGTERM: it is still there, and gone after the grace.
        assert _running(pids[0])
        assert _gone(pids, timeout=local.CANCEL_GRACE + 5), [p for p in pids if _running(p)]
        assert service.get(run_id).state == RunState.KILLED
    finally:
        service.close()
        _kill_left(pids)


def test_a_job_killed_from_outside_leaves_no_credential_nor_process(
    service, project, tmp_path, monkeypatch, experiment_name
):
    # The script stalls before it reads (and deletes) its credential file, as a job whose
    # SIGKILL comes early; its foreground child outlives it.
    real_render = run_submit.render_job_script

    def stalling(*args, **kwargs):
        shebang, rest = real_render(*args, **kwargs).split("\n", 1)
        return f"{shebang}\nsleep 300 & echo $! > sleeper.pid; wait $!\n{rest}"

    monkeypatch.setattr(run_submit, "render_job_script", stalling)
    durations = _timed_job_ended(monkeypatch)
    info = service.submit(project, entry_point="sleep", experiment_name=experiment_name)
    pid = int(info.job_id.split("-")[1])
    run_dir = Path(service.get(info.run_id).tags["mantik.run_dir"])
    sleeper = run_dir / "sleeper.pid"
    deadline = time.monotonic() + 10
    while not sleeper.exists() or not sleeper.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(sleeper.read_text())
    try:
        assert (run_dir / ".mantik-credentials").is_file()
        os.kill(pid, signal.SIGKILL)
        final = wait_for(service, info.run_id, FINAL, timeout=30)
        assert final.state == RunState.FAILED and final.reason == "killed by signal 9"
        assert not (run_dir / ".mantik-credentials").exists()
        assert durations and max(durations) < 1.0, durations
        assert _gone([child], timeout=local.CANCEL_GRACE + 5)
    finally:
        if _running(child):
            os.kill(child, signal.SIGKILL)


def test_a_short_lived_process_that_records_the_end_stops_the_leftovers(tmp_path):
    # `mantik runs status` records the end and exits without closing its backends; the
    # run is over then and nobody calls job_ended again.
    code = (
        "import sys\n"
        "from mantik_jupyter.compute.backends import local\n"
        "local.CANCEL_GRACE = 1.0\n"
        "local.LocalBackend(sys.argv[1]).job_ended(sys.argv[2])\n"
    )
    with _ended_job_with_a_daemon(tmp_path) as (_, job_id, pid):
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "runs"), job_id],
            env=env,
            check=True,
            timeout=30,
        )
        assert _gone([pid], timeout=2)


def test_close_hurries_the_stop_of_what_ended_jobs_left(tmp_path):
    # A lab that shuts down does not wait out the grace, nor leaves the daemon running.
    with _ended_job_with_a_daemon(tmp_path) as (backend, job_id, pid):
        backend.job_ended(job_id)
        time.sleep(0.3)  # SIGTERM sent, ignored
        assert _running(pid)
        start = time.monotonic()
        backend.close()
        assert time.monotonic() - start < local.CANCEL_GRACE
        assert not _running(pid)
        assert backend.states([job_id])[job_id].state == RunState.FINISHED


def test_odd_file_names_list_and_download(tmp_path):
    backend = LocalBackend(tmp_path / "runs")
    job_id = backend.submit(make_job(tmp_path, odd_files_body()))
    assert wait_for_job(backend, job_id, FINAL).state == RunState.FINISHED
    check_odd_files(backend, job_id, tmp_path)


def test_a_log_longer_than_one_read_comes_whole_in_chunks(tracking, tmp_path, experiment_name):
    service = RunService(tracking, work_dir=tmp_path / "work")
    info = service.submit(big_log_project(tmp_path, LOCAL_CONFIG), experiment_name=experiment_name)
    assert wait_for(service, info.run_id, FINAL, timeout=60).state == RunState.FINISHED
    texts, offset = [], 0
    while not (chunk := service.logs(info.run_id, offset)).final:
        texts.append(chunk.text)
        offset = chunk.offset
    # The first read ends one byte into a 4-byte character: the chunk stops before it.
    assert len(texts[0].encode()) == 4 * 1024 * 1024 - 1 and len(texts) >= 2
    text = "".join(texts)
    assert "\ufffd" not in text and "\U0001f3c3" * 1000 + "\nend\n" in text
    assert "".join(service.follow_logs(info.run_id)) == text
    service.close()


def test_restarted_lab_still_tracks_the_run(
    tracking, project, tmp_path, mlflow_server, experiment_name
):
    first = RunService(tracking, work_dir=tmp_path / "work")
    info = first.submit(
        project, entry_point="sleep", params={"seconds": "3"}, experiment_name=experiment_name
    )
    first.close()
    del first
    second = RunService(tracking, work_dir=tmp_path / "work")
    assert info.run_id in {r.run_id for r in second.sync()}
    final = wait_for(second, info.run_id, FINAL, timeout=30)
    assert final.state == RunState.FINISHED
    # And a backend object built from the run's tags alone (no process handle) agrees.
    backend = LocalBackend(Path(final.tags["mantik.run_dir"]).parent)
    assert backend.states([info.job_id])[info.job_id].state == RunState.FINISHED


def test_list_resolve_and_get(service, project, experiment_name):
    info = service.submit(
        project, params={"epochs": "1"}, experiment_name=experiment_name, run_name="listed-run"
    )
    wait_for(service, info.run_id, FINAL, timeout=30)
    assert service.resolve(info.run_id) == info.run_id
    assert service.resolve(info.run_id[:12]) == info.run_id
    assert service.resolve("listed-run") == info.run_id
    with pytest.raises(NotFound):
        service.resolve("no-such-run-name")
    runs, _ = service.list(experiment_name=experiment_name, state="finished")
    assert info.run_id in {r.run_id for r in runs}
    runs, _ = service.list(experiment_name=experiment_name, state="RUNNING")
    assert info.run_id not in {r.run_id for r in runs}
    json_form = service.get(info.run_id).to_json()
    assert json_form["state"] == "FINISHED" and json_form["is_final"]
    kinds = {b["name"]: b for b in service.backends()}
    assert kinds["local"]["supported"] and kinds["unicore"]["supported"]


def test_a_refreshed_list_asks_for_no_run_it_already_has(
    service, project, experiment_name, monkeypatch
):
    # A refreshed page (the sidebar's poll) fetched each active run again before asking
    # its backend: a page of 50 running runs cost 50 extra requests every poll.
    runs = [
        service.submit(project, entry_point="sleep", experiment_name=experiment_name)
        for _ in range(3)
    ]
    for run in runs:
        wait_for(service, run.run_id, {RunState.RUNNING})
    fetched: list[str] = []
    get_run = RunsApi.get_run

    def counted(api: RunsApi, run_id: str) -> dict:
        fetched.append(run_id)
        return get_run(api, run_id)

    monkeypatch.setattr(RunsApi, "get_run", counted)
    listed, _ = service.list(experiment_name=experiment_name, refresh=True)
    assert [i.state for i in listed] == [RunState.RUNNING] * 3
    assert fetched == []
    for run in runs:
        service.cancel(run.run_id)
    listed, _ = service.list(experiment_name=experiment_name, refresh=True)
    # Each run whose state changed is read back once, with what the sync wrote.
    assert {i.state for i in listed} == {RunState.KILLED}


def count_tracking_requests(monkeypatch) -> collections.Counter[str]:
    """``METHOD endpoint`` of every request this process sends to a tracking server."""
    sent: collections.Counter[str] = collections.Counter()
    request = TrackingClient.request

    def counted(client: TrackingClient, method: str, path: str, **kwargs):
        sent[f"{method} {path.removeprefix('api/2.0/mlflow/')}"] += 1
        return request(client, method, path, **kwargs)

    monkeypatch.setattr(TrackingClient, "request", counted)
    return sent


def test_syncing_runs_by_id_sends_no_request_per_run(
    service, project, experiment_name, mlflow_server, user, monkeypatch
):
    # A notebook's live lines sync their runs by id every tick: each run was fetched with
    # a runs/get of its own, 50 requests a tick for a sweep of 50 runs.
    submitted = [
        service.submit(project, entry_point="sleep", experiment_name=experiment_name)
        for _ in range(3)
    ]
    for run in submitted:
        wait_for(service, run.run_id, {RunState.RUNNING})
    experiment = submitted[0].experiment_id
    # Runs logged from a notebook beside them: more ids than one search takes.
    mine = RunsApi(TrackingClient(mlflow_server.uri, user))
    plain = [mine.create_run(experiment)["info"]["run_id"] for _ in range(120)]
    ids = [*plain[:60], *(r.run_id for r in submitted), *plain[60:]]
    sent = count_tracking_requests(monkeypatch)
    infos = service.sync(ids, experiment_ids=[experiment])
    assert [i.run_id for i in infos] == ids
    assert [i.state for i in infos[60:63]] == [RunState.RUNNING] * 3
    # 123 runs: two searches (100 ids each at most), whatever the number of runs.
    assert sent == {"POST runs/search": 2}, sent
    sent.clear()
    # Without the experiments: they are looked up once.
    assert [i.run_id for i in service.sync(ids)] == ids
    assert sent == {"POST experiments/search": 1, "POST runs/search": 2}, sent
    for run in submitted:
        service.cancel(run.run_id)
    sent.clear()
    infos = service.sync([r.run_id for r in submitted], experiment_ids=[experiment])
    assert {i.state for i in infos} == {RunState.KILLED}
    assert sent["POST runs/search"] == 1 and sent["GET runs/get"] <= 3, sent


def test_syncing_a_deleted_or_unknown_run_by_id_answers_as_before(
    service, experiment_name, mlflow_server, user
):
    # Runs the search cannot find are fetched one by one, as all runs were before.
    mine = RunsApi(TrackingClient(mlflow_server.uri, user))
    experiment, _ = mine.get_or_create_experiment(experiment_name)
    kept, deleted = (mine.create_run(experiment)["info"]["run_id"] for _ in range(2))
    mine.client.api("POST", "runs/delete", run_id=deleted)
    infos = service.sync([kept, deleted], experiment_ids=[experiment])
    assert [i.run_id for i in infos] == [kept, deleted]
    # No such run: MLflow's auth layer answers 403 (PermissionDenied) for an unknown id.
    for gone in ("0" * 32, "not-an-id"):
        with pytest.raises((NotFound, PermissionDenied)) as direct:
            mine.get_run(gone)
        for ids, experiments in (([kept, gone], [experiment]), ([gone, kept], None)):
            with pytest.raises(type(direct.value)) as synced:
                service.sync(ids, experiment_ids=experiments)
            assert synced.value.message == direct.value.message


def test_cancel_leaves_a_run_mantik_did_not_submit_alone(service, mlflow_server, user):
    # E.g. a colleague's notebook run, logging live: nothing of mantik's to stop.
    mine = RunsApi(TrackingClient(mlflow_server.uri, user))
    experiment_id, _ = mine.get_or_create_experiment("plain-runs")
    run_id = mine.create_run(experiment_id)["info"]["run_id"]
    with pytest.raises(Conflict, match="not submitted by mantik"):
        service.cancel(run_id)
    assert mine.get_run(run_id)["info"]["status"] == "RUNNING"


def _run_count(mlflow_server, name):
    api = admin_api(mlflow_server)
    found = api.get_experiment_by_name(name)
    if found is None:
        return 0
    return len(api.search_runs([found["experiment_id"]])[0])


def test_errors_come_before_anything_is_created(
    service, project, mlflow_server, tmp_path, experiment_name
):
    with pytest.raises(ProjectError, match="valid parameters"):
        service.submit(project, params={"epoch": "3"}, experiment_name=experiment_name)
    with pytest.raises(ProjectError, match="Unknown entry point"):
        service.submit(project, entry_point="nope", experiment_name=experiment_name)
    # A parameter name MLflow would refuse to log, once the run existed.
    with pytest.raises(ProjectError, match="'lr;x'.*cannot be recorded in MLflow"):
        service.submit(
            project, entry_point="train.py", params={"lr;x": "1"}, experiment_name=experiment_name
        )
    (project / "compute-backend-config.yaml").unlink()
    with pytest.raises(ConfigError, match="compute-backend-config.yaml"):
        service.submit(project, experiment_name=experiment_name)
    firecrest = {"ApiUrl": "https://f.example", "TokenUrl": "https://t.example", "Machine": "m"}
    write_config(project, {"Firecrest": firecrest, "Resources": {"Queue": "batch"}})
    with pytest.raises(ConfigError, match="Firecrest.*not supported yet"):
        service.submit(project, experiment_name=experiment_name)
    assert _run_count(mlflow_server, experiment_name) == 0

    confined = RunService(service.tracking, work_dir=tmp_path / "w2", root_dir=tmp_path / "jail")
    (tmp_path / "jail").mkdir()
    with pytest.raises(UnsafePath):
        confined.submit(project, experiment_name=experiment_name)
    with pytest.raises(UnsafePath):
        confined.submit("../weather-forecast", experiment_name=experiment_name)


def test_a_colleagues_experiment_is_refused_with_what_to_do(
    service, project, mlflow_server, monkeypatch, user
):
    colleague = mlflow_server.create_user()
    theirs = RunsApi(TrackingClient(mlflow_server.uri, colleague))
    exp_id = theirs.create_experiment("colleagues-forecasts")
    spy = RunUserSpy(monkeypatch)
    advice = "add runs to the experiment {}: .*Ask its owner for EDIT permission"
    # Not even readable (the server's default is no permission).
    with pytest.raises(PermissionDenied, match=advice.format("'colleagues-forecasts'")) as err:
        service.submit(project, experiment_name="colleagues-forecasts")
    assert user.username in err.value.message and mlflow_server.uri in err.value.message
    with pytest.raises(PermissionDenied, match=advice.format(f"id {exp_id}")):
        service.submit(project, experiment_id=exp_id)
    # Readable, but not to add runs to.
    theirs.client.request(
        "POST", "api/3.0/mlflow/users/permissions/grant",
        json={"username": user.username, "resource_type": "experiment",
              "resource_id": exp_id, "permission": "READ"},
    )  # fmt: skip
    with pytest.raises(PermissionDenied, match=advice.format("'colleagues-forecasts'")):
        service.submit(project, experiment_name="colleagues-forecasts")
    assert _run_count(mlflow_server, "colleagues-forecasts") == 0
    # The per-run user made beside the refused run creation is gone again.
    assert len(spy.made) == 1 and not login_works(mlflow_server, spy.made[0])
    assert not list(service.work_dir.glob("*"))


def test_failed_submission_marks_the_run_and_removes_its_user(
    service, project, mlflow_server, monkeypatch, experiment_name
):
    spy = RunUserSpy(monkeypatch)

    def refuse(self, job, progress=None):
        raise BackendRejected("no room at the inn")

    monkeypatch.setattr(LocalBackend, "submit", refuse)
    with pytest.raises(BackendRejected):
        service.submit(project, experiment_name=experiment_name)
    (run_id,) = spy.created
    info = service.get(run_id)
    assert info.state == RunState.FAILED and info.mlflow_status == "FAILED"
    assert "no room at the inn" in info.reason
    assert not login_works(mlflow_server, spy.created[run_id])
    assert not (service.work_dir / run_id).exists()


def test_a_failure_after_submission_keeps_the_job(service, project, monkeypatch, experiment_name):
    # The artifacts upload while the job is submitted: their failure must not lose it.
    upload = RunsApi.upload_artifact

    def flaky(self, run, path, data):
        if path == "mantik/code.tar.gz":
            raise TrackingUnavailable("disk full")
        return upload(self, run, path, data)

    monkeypatch.setattr(RunsApi, "upload_artifact", flaky)
    info = service.submit(project, entry_point="fail", experiment_name=experiment_name)
    assert info.job_id and info.state == RunState.QUEUED
    assert any("mantik/code.tar.gz" in w and "disk full" in w for w in info.warnings)
    stored = service.get(info.run_id, refresh=False)
    assert stored.job_id == info.job_id and "disk full" in stored.tags["mantik.warning"]
    assert wait_for(service, info.run_id, FINAL, timeout=30).exit_code == 3


def test_loopback_warning_for_a_remote_cluster():
    notes = check_tracking_uri(
        "http://127.0.0.1:5000", {"kind": "ssh", "Hostname": "juwels.fz-juelich.de"}
    )
    assert notes and "loopback" in notes[0]
    assert not check_tracking_uri("http://127.0.0.1:5000", {"kind": "ssh", "Hostname": "localhost"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not check_tracking_uri("http://127.0.0.1:5000", {"kind": "local"})


def test_a_folder_download_interrupted_leaves_nothing_and_can_be_tried_again(tmp_path):
    # Ctrl-C half-way through a folder download left the folder with truncated files, and
    # the next download refused: "... exists already".
    backend = LocalBackend(tmp_path / "runs")
    body = "mkdir out && for i in 1 2 3 4; do head -c 3000000 /dev/zero > out/part$i; done"
    job_id = backend.submit(make_job(tmp_path, body))
    assert wait_for_job(backend, job_id, FINAL).state == RunState.FINISHED
    dest = tmp_path / "dl"
    dest.mkdir()

    def interrupt(done: int, total: int) -> None:
        if done > 4_000_000:
            raise KeyboardInterrupt  # as Ctrl-C does, between two copied files

    with pytest.raises(KeyboardInterrupt):
        backend.download(job_id, "out", dest, interrupt)
    assert list(dest.iterdir()) == []  # no partial folder, no staging left behind
    folder = backend.download(job_id, "out", dest)
    assert folder == dest / "out"
    assert sorted(p.stat().st_size for p in folder.iterdir()) == [3_000_000] * 4


def test_a_run_cancelled_while_it_is_submitted_does_not_run(
    service, tracking, project, mlflow_server, experiment_name
):
    # A cancel from the sidebar or another command while the code was uploading marked
    # the run KILLED, but the submission went on, queued the job and marked the run
    # QUEUED again: the job ran (without its tracking user, which the cancel removed).
    other = RunService(tracking, work_dir=service.work_dir.parent / "other")
    cancelled: list = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "upload" and not cancelled:
            api = admin_api(mlflow_server)
            found = api.get_experiment_by_name(experiment_name)
            (run,) = api.search_runs([found["experiment_id"]])[0]
            cancelled.append(other.cancel(run["info"]["run_id"]))

    try:
        with pytest.raises(Conflict) as err:
            service.submit(
                project, entry_point="sleep", experiment_name=experiment_name, progress=progress
            )
    finally:
        other.close()
    (gone,) = cancelled
    assert gone.state == RunState.KILLED
    assert "cancelled while it was being submitted" in err.value.message
    info = service.get(gone.run_id, refresh=False)
    assert info.state == RunState.KILLED and info.mlflow_status == "KILLED" and info.job_id
    assert f"job {info.job_id} was cancelled as soon as it was queued" in err.value.message
    backend = LocalBackend(service.work_dir / "local-runs")
    backend.attach(info.job_id, info.tags["mantik.run_dir"])
    deadline = time.monotonic() + 30
    while not backend.states([info.job_id])[info.job_id].state.is_final:
        assert time.monotonic() < deadline, "the job of the cancelled run still runs"
        time.sleep(0.2)
