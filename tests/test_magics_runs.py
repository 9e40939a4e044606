"""The run magics in a real IPython shell and in a real kernel (nbclient), against the real
MLflow server, the loopback Slurm cluster and the local backend."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path

import nbformat
import pytest

from mantik_jupyter.compute.run_download import DownloadClash
from mantik_jupyter.compute.states import RunState
from mantik_jupyter.magics.display import Run

from .runs_helpers import (
    admin_api,
    artifact_bytes,
    artifact_names,
    copy_example,
    remote_run_dirs,
    slurm_config,
    write_config,
)

LOCAL_CONFIG = {"Local": {}, "Resources": {"Queue": "local"}, "Environment": {"Python": sys.prefix}}
EXAMPLE_NOTEBOOK = "weather-forecast.ipynb"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(monkeypatch, tmp_path, mlflow_server, user):
    """A kernel's environment: the tracking server and the user's credential, no lab."""
    monkeypatch.setenv("MANTIK_DATA_DIR", str(tmp_path / "mantik"))
    for name in ("MANTIK_CREDENTIALS_FILE", "MANTIK_TRACKING_URI", "JPY_SESSION_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    for key, value in mlflow_server.env(user).items():
        monkeypatch.setenv(key, value)
    return tmp_path


@pytest.fixture(scope="module")
def remote_base(slurm_cluster):
    yield from remote_run_dirs(slurm_cluster, "magics")


def execute_in_kernel(nb, path: Path, project: Path, timeout: int, on_cell_executed=None) -> None:
    """Run the notebook ``nb`` (read from ``path``) in a real kernel, in ``project``;
    ``on_cell_executed(cell=, cell_index=, execute_reply=)`` runs between cells."""
    from nbclient import NotebookClient

    kernel_env = {
        **os.environ,
        "JPY_SESSION_NAME": str(path),
        # The kernel imports mantik_jupyter from this checkout.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    hooks = {"on_cell_executed": on_cell_executed} if on_cell_executed else {}
    NotebookClient(
        nb, timeout=timeout, resources={"metadata": {"path": str(project)}}, **hooks
    ).execute(env=kernel_env)


def magics(ip):
    return ip.magics_manager.registry["MantikMagics"]


def one_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("mantik: ") and "Traceback" not in out
    return lines[0]


# ---- Slurm: submit, follow, list, status, download, cancel ---------------------------------


@pytest.mark.slurm
def test_magics_on_the_slurm_cluster(ip, env, slurm_cluster, remote_base, capsys):
    project = copy_example(env)
    write_config(project, slurm_config(slurm_cluster, remote_base))
    notebook = project / EXAMPLE_NOTEBOOK
    os.environ["JPY_SESSION_NAME"] = str(notebook)
    name = f"magic-{uuid.uuid4().hex[:6]}"

    run = ip.run_line_magic(
        "mantik_submit", f"-P epochs=3 --experiment magics-slurm --run-name {name}"
    )
    out = capsys.readouterr().out
    assert isinstance(run, Run), out
    assert run.info.state == RunState.QUEUED and run.info.backend == "ssh-slurm"
    assert run.info.source == "notebook" and run.info.params["epochs"] == "3"
    assert "Packaging the code" in out and "mantik warning" not in out
    assert f"#/experiments/{run.info.experiment_id}/runs/{run.run_id}" in out
    assert magics(ip).last_run_id == run.run_id

    # Follows the log live until the run ended.
    started = time.monotonic()
    ip.run_line_magic("mantik_logs", "last --follow")
    log = capsys.readouterr().out
    assert "epoch 1/3" in log and "epoch 3/3" in log and "exit status 0" in log
    assert time.monotonic() - started < 60
    assert run.state == "FINISHED"
    assert {"loss", "rmse"} <= set(run.metrics())

    ip.run_line_magic("mantik_logs", "last --tail 1")
    assert capsys.readouterr().out.strip().splitlines() == ["[mantik] exit status 0"]

    ip.run_line_magic("mantik_runs", "--experiment magics-slurm --limit 5")
    table = capsys.readouterr().out
    assert name in table and "FINISHED" in table and run.run_id[:8] in table

    status = ip.run_line_magic("mantik_status", run.run_id[:12])
    assert isinstance(status, Run) and status.info.state == RunState.FINISHED
    assert status.run_id == run.run_id
    assert "FINISHED" in status._repr_html_() and "loss=" in repr(status)
    by_name = ip.run_line_magic("mantik_status", name)
    assert by_name.run_id == run.run_id

    ip.run_line_magic("mantik_download", f"last code/outputs/forecast.csv --to {env}")
    out = capsys.readouterr().out
    # A download says what it copies (GBs of results took minutes without a word).
    assert out.startswith("Downloading… (") and "Downloaded to" in out, out
    forecast = env / "forecast.csv"
    assert forecast.read_text().startswith("station,")
    # Over the user's edit: refused in one line, naming the file and the flag.
    original = forecast.read_text()
    forecast.write_text("station,my own numbers\n")
    ip.run_line_magic("mantik_download", f"last code/outputs/forecast.csv --to {env}")
    out = one_line(capsys.readouterr().out)
    assert "'forecast.csv'" in out and "again with --overwrite" in out, out
    assert forecast.read_text() == "station,my own numbers\n"
    ip.run_line_magic("mantik_download", f"last code/outputs/forecast.csv --to {env} --overwrite")
    assert "1 file replaced: 'forecast.csv'" in capsys.readouterr().out
    assert forecast.read_text() == original
    # run.download() alike, with overwrite=True; an identical file is left as it was.
    forecast.write_text("station,edited again\n")
    with pytest.raises(DownloadClash, match="overwrite=True"):
        run.download("code/outputs/forecast.csv", to=env)
    assert run.download("code/outputs/forecast.csv", to=env, overwrite=True) == forecast
    assert run.download("code/outputs/forecast.csv", to=env) == forecast
    assert "identical, left as it was" in capsys.readouterr().out

    # Cancel a sleeping run.
    sleeper = ip.run_line_magic("mantik_submit", "-e sleep --experiment magics-slurm")
    capsys.readouterr()
    deadline = time.monotonic() + 60
    while sleeper.state != "RUNNING":
        assert time.monotonic() < deadline, sleeper.info
        time.sleep(0.5)
    ip.run_line_magic("mantik_cancel", "last")
    assert "KILLED" in capsys.readouterr().out
    assert sleeper.state == "KILLED"


def outputs_of(cell, kind: str) -> list:
    return [o for o in cell.outputs if o.output_type == kind]


def test_status_line_stays_live_without_wait(env, mlflow_server):
    """Without --wait the kernel is free at once, and the line still ends at FINISHED.

    The magic ending a cell showed its returned run as well: an Out[] rendered at
    submission, QUEUED for ever beside the live line. A run displayed later shows its
    state then (live while it is active), not the one it had when it was submitted."""
    project = copy_example(env)
    write_config(project, LOCAL_CONFIG)
    path = write_notebook(
        project,
        "%load_ext mantik_jupyter\n%config MantikMagics.poll_interval = 0.5",
        "%mantik_submit -P epochs=2",
        "run = _\nrun",
        # Waits through another object: `run` itself is not refreshed before it is shown.
        "import time\n"
        "for _ in range(400):\n"
        "    if get_ipython().run_line_magic('mantik_status', 'last').info.state.is_final:\n"
        "        break\n"
        "    time.sleep(0.5)\n"
        "time.sleep(3)  # the watchers' last updates",
        "run",
        "display(run)\nrun.info.state",
        "run.wait()",
    )
    nb = nbformat.read(path, as_version=4)
    execute_in_kernel(nb, path, project, timeout=240)
    cells = [c for c in nb.cells if c.cell_type == "code"][2:]
    submit, shown_early, _, shown_late, displayed, waited = cells
    for cell in cells:
        assert not outputs_of(cell, "error"), cell.outputs
    # The live line only: no Out[] with the state at submission.
    status = outputs_of(submit, "display_data")
    assert status and "FINISHED" in status[-1]["data"]["text/plain"], submit.outputs
    assert not outputs_of(submit, "execute_result"), submit.outputs
    # Displayed while it was active: a line that followed it to its end.
    early = outputs_of(shown_early, "display_data")
    assert len(early) == 1 and "FINISHED" in early[0]["data"]["text/plain"], shown_early.outputs
    assert "open in MLflow" in early[0]["data"]["text/html"]
    # Displayed once it ended: its state then, in text and HTML.
    for cell in (shown_late, displayed):
        shown = outputs_of(cell, "display_data") + outputs_of(cell, "execute_result")
        assert shown and "FINISHED" in shown[0]["data"]["text/plain"], cell.outputs
        assert "QUEUED" not in json.dumps(cell.outputs)
        assert "FINISHED" in shown[0]["data"]["text/html"]
    # run.wait() shows its line; the run it returns is not shown a second time.
    assert len(waited.outputs) == 1 and "FINISHED" in waited.outputs[0]["data"]["text/plain"]


LIVE_RUNS = 6


def test_many_live_lines_share_one_poller(env):
    """A notebook following a sweep: each live line polled in a thread of its own, each
    sending its own state query every tick, for as long as its run was queued (days on a
    cluster). One poller thread refreshes them all, with one state query per tick, and
    ends with the last of them."""
    project = copy_example(env)
    write_config(project, LOCAL_CONFIG)
    sweep = f"sweep-{uuid.uuid4().hex[:6]}"
    path = write_notebook(
        project,
        "%load_ext mantik_jupyter\n%config MantikMagics.poll_interval = 0.5",
        # The backend's state query, counted (each call: how many jobs it asks about).
        "import json, threading, time\n"
        "from mantik_jupyter.compute.backends.local import LocalBackend\n"
        "queries = []\n"
        "asked = LocalBackend.states\n"
        "def states(self, job_ids):\n"
        "    queries.append(len(job_ids))\n"
        "    return asked(self, job_ids)\n"
        "LocalBackend.states = states\n"
        "before = {t.ident for t in threading.enumerate()}",
        f"runs = [get_ipython().run_line_magic('mantik_submit', '-e sleep --experiment {sweep}')\n"
        f"        for _ in range({LIVE_RUNS})]",
        "for run in runs:\n    display(run)",
        "time.sleep(1)\n"
        "queries.clear()\n"
        "time.sleep(3)\n"
        "new = [t for t in threading.enumerate() if t.ident not in before]\n"
        "print(json.dumps({'queries': queries, 'threads': [t.name for t in new]}))",
        "for run in runs:\n"
        "    run.cancel()\n"
        "for _ in range(100):\n"
        "    if not any(t.is_alive() for t in new):\n"
        "        break\n"
        "    time.sleep(0.2)\n"
        "print(json.dumps([t.name for t in new if t.is_alive()]))",
    )
    nb = nbformat.read(path, as_version=4)
    execute_in_kernel(nb, path, project, timeout=300)
    cells = [c for c in nb.cells if c.cell_type == "code"][1:]
    for cell in cells:
        assert not outputs_of(cell, "error"), cell.outputs
    _, _, submitted, displayed, observed, ended = cells
    seen = json.loads(observed.outputs[-1]["text"])
    # 12 lines (6 submitted, 6 displayed): one thread, which asks about all 6 jobs at once.
    assert len(seen["threads"]) == 1, seen
    assert seen["queries"] and set(seen["queries"]) == {LIVE_RUNS}, seen
    assert len(seen["queries"]) <= 3 / 0.5 + 2, seen
    # Every line followed its run to its end; then the poller ended.
    for cell in (submitted, displayed):
        lines = outputs_of(cell, "display_data")
        assert len(lines) == LIVE_RUNS, cell.outputs
        for line in lines:
            assert "KILLED" in line["data"]["text/plain"], line
            assert "asking again failed" not in line["data"]["text/plain"], line
    assert json.loads(ended.outputs[-1]["text"]) == [], ended.outputs


def _experiment_permission(server, action: str, experiment: str, username: str) -> None:
    """``revoke`` or ``grant`` (MANAGE, as its creator had) ``username``'s access to an
    experiment, as its owner or an admin does."""
    api = admin_api(server)
    body = {
        "username": username,
        "resource_type": "experiment",
        "resource_id": api.get_experiment_by_name(experiment)["experiment_id"],
    }
    if action == "grant":
        body["permission"] = "MANAGE"
    api.client.request("POST", f"api/3.0/mlflow/users/permissions/{action}", json=body)


def test_a_live_line_that_cannot_be_refreshed_keeps_trying(env, mlflow_server, user):
    """One run the tracking server stops answering for (its experiment no longer shared
    with the user) does not stop the lines of the others; its own line says why, keeps
    its last state, and follows the run again once it answers."""
    project = copy_example(env)
    write_config(project, LOCAL_CONFIG)
    withdrawn, kept = (f"{word}-{uuid.uuid4().hex[:6]}" for word in ("withdrawn", "kept"))
    path = write_notebook(
        project,
        "%load_ext mantik_jupyter\n%config MantikMagics.poll_interval = 0.5",
        "submit = get_ipython().find_line_magic('mantik_submit')\n"
        f"run = submit('-e sleep --experiment {withdrawn}')\n"
        f"others = [submit('-e sleep --experiment {kept}') for _ in range(2)]",
        "import time\ntime.sleep(3)\nfor other in others:\n    other.cancel()\ntime.sleep(3)",
        "time.sleep(3)\nrun.cancel()\ntime.sleep(3)",
    )
    nb = nbformat.read(path, as_version=4)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    lines_cell = code[2]
    during: list = []

    def between_cells(cell, cell_index, execute_reply):
        if cell_index == lines_cell:
            _experiment_permission(mlflow_server, "revoke", withdrawn, user.username)
        elif cell_index == code[3]:
            during.extend(json.loads(json.dumps(outputs_of(nb.cells[lines_cell], "display_data"))))
            _experiment_permission(mlflow_server, "grant", withdrawn, user.username)

    execute_in_kernel(nb, path, project, timeout=300, on_cell_executed=between_cells)
    for cell in nb.cells:
        assert not outputs_of(cell, "error"), cell.outputs
    # While the run could not be read: its line says why, keeps trying; the others ended.
    assert len(during) == 3, during
    failing, *others = during
    text = failing["data"]["text/plain"]
    assert re.search(r": (QUEUED|RUNNING)", text) and "asking again failed" in text, text
    assert "trying again" in text and "KILLED" not in text, text
    assert "asking again failed" in failing["data"]["text/html"]
    for other in others:
        assert "KILLED" in other["data"]["text/plain"], other
        assert "asking again failed" not in other["data"]["text/plain"], other
    # Readable again: the line followed it to its end, without the note.
    final = outputs_of(nb.cells[lines_cell], "display_data")
    assert len(final) == 3, final
    for line in final:
        assert "KILLED" in line["data"]["text/plain"], line
        assert "asking again failed" not in line["data"]["text/plain"], line


def test_a_long_log_in_a_notebook_shows_its_end(env):
    # 5,000 lines of 100 bytes printed whole into the notebook: Jupyter drops output over
    # 1 MB/s ('IOPub data rate exceeded'), so the end of a long log was lost.
    project = env / "chatty"
    project.mkdir()
    (project / "MLproject").write_text(
        "name: chatty\nentry_points:\n  main:\n    command: python -c "
        "\"[print('line', i, 'x' * 90) for i in range(5000)]\"\n"
    )
    write_config(project, LOCAL_CONFIG)
    path = write_notebook(
        project, "%load_ext mantik_jupyter", "run = %mantik_submit --wait", "%mantik_logs last"
    )
    nb = nbformat.read(path, as_version=4)
    execute_in_kernel(nb, path, project, timeout=120)
    log = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    lines = log.splitlines()
    assert lines[0].startswith("[mantik: 4,002 earlier lines of this log are not shown"), lines[0]
    assert "%mantik_logs last --tail N" in lines[0]
    assert len(lines) == 1001 and lines[-1] == "[mantik] exit status 0"
    assert lines[1].startswith("line 4001 ")


# ---- --notebook mode ------------------------------------------------------------------------


def write_notebook(folder: Path, *cells: str, name: str = "study.ipynb") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            'epochs = 2\nstation = "Juelich"\nscale = 0.5', metadata={"tags": ["parameters"]}
        ),
        *(nbformat.v4.new_code_cell(c) for c in cells),
    ]
    path = folder / name
    nbformat.write(nb, path)
    return path


TRAIN_CELL = (
    "import mlflow\n"
    'print(f"training {station} for {epochs} epochs ({type(epochs).__name__}) x{scale}")\n'
    'mlflow.log_metric("epochs_seen", epochs)'
)


@pytest.mark.slurm
def test_notebook_mode_on_the_slurm_cluster(
    ip, env, slurm_cluster, remote_base, mlflow_server, capsys
):
    folder = env / "study"
    notebook = write_notebook(folder, TRAIN_CELL)
    write_config(folder, slurm_config(slurm_cluster, remote_base))
    before = sorted(p.name for p in folder.iterdir())
    os.environ["JPY_SESSION_NAME"] = str(notebook)

    run = ip.run_line_magic(
        "mantik_submit", "--notebook -P epochs=3 -P station=Bonn --wait --experiment nb-mode"
    )
    out = capsys.readouterr().out
    assert isinstance(run, Run), out
    assert run.info.state == RunState.FINISHED, (out, run.logs())
    assert "FINISHED" in out
    assert sorted(p.name for p in folder.iterdir()) == before  # the user's folder untouched
    info = run.refresh()
    assert info.params == {"epochs": "3", "station": "Bonn", "scale": "0.5"}
    assert info.metrics["epochs_seen"] == 3
    assert info.tags["mantik.notebook"] == "study.ipynb"
    assert info.tags["mlflow.source.name"] == str(notebook)
    assert "training Bonn for 3 epochs (int) x0.5" in run.logs()

    assert "notebook/study.ipynb" in artifact_names(mlflow_server, run.run_id)
    executed = nbformat.reads(
        artifact_bytes(mlflow_server, run.run_id, "notebook/study.ipynb").decode(), as_version=4
    )
    injected = executed.cells[1]
    assert injected.metadata["tags"] == ["injected-parameters"]
    assert "epochs = 3" in injected.source and "station = 'Bonn'" in injected.source
    assert "training Bonn for 3 epochs" in json.dumps(executed.cells[2].outputs)


def test_notebook_mode_failing_cell_fails_the_run(ip, env, capsys):
    folder = env / "failing"
    notebook = write_notebook(
        folder,
        'print(f"training {station} for {epochs} epochs ({type(epochs).__name__})")',
        'raise ValueError("bad weather in " + station)',
    )
    write_config(folder, LOCAL_CONFIG)
    os.environ["JPY_SESSION_NAME"] = str(notebook)

    # Quotes group words as in a shell, and are not part of the values.
    run = ip.run_line_magic(
        "mantik_submit",
        "--notebook --wait --experiment \"nb mode\" --run-name 'a failing run' "
        '-P "station=Bad Homburg"',
    )
    capsys.readouterr()
    assert run.info.state == RunState.FAILED, run.logs()
    assert run.info.exit_code == 1
    assert run.info.run_name == "a failing run" and run.info.params["station"] == "Bad Homburg"
    log = run.logs()
    assert "ValueError: bad weather in Bad Homburg" in log
    assert "training Bad Homburg for 2 epochs (int)" in log


# ---- mistakes are one line -----------------------------------------------------------------


def test_no_mlproject_names_both_ways_out(ip, env, capsys):
    notebook = write_notebook(env / "loose", TRAIN_CELL)
    write_config(notebook.parent, LOCAL_CONFIG)
    os.environ["JPY_SESSION_NAME"] = str(notebook)
    assert ip.run_line_magic("mantik_submit", "") is None
    line = one_line(capsys.readouterr().out)
    assert "MLproject" in line and "--notebook" in line and str(notebook.parent) in line


def test_unknown_parameters_list_the_valid_ones(ip, env, capsys):
    project = copy_example(env)
    write_config(project, LOCAL_CONFIG)
    os.environ["JPY_SESSION_NAME"] = str(project / EXAMPLE_NOTEBOOK)
    ip.run_line_magic("mantik_submit", "-P epochs=2 -P epoch=3")
    line = one_line(capsys.readouterr().out)
    assert "'epoch'" in line and "'epochs', 'learning_rate', 'station'" in line

    notebook = write_notebook(env / "nb", TRAIN_CELL)
    write_config(notebook.parent, LOCAL_CONFIG)
    os.environ["JPY_SESSION_NAME"] = str(notebook)
    ip.run_line_magic("mantik_submit", "--notebook -P stations=Bonn")
    line = one_line(capsys.readouterr().out)
    assert "'stations'" in line and "'epochs', 'station', 'scale'" in line
    assert not list((env / "mantik" / "runs").glob(".notebook-*"))  # nothing left behind


def test_errors_are_one_line_unless_tracebacks_are_asked_for(ip, env, capsys):
    ip.run_line_magic("mantik_logs", '"abc')
    assert "Close the quote" in one_line(capsys.readouterr().out)
    magics(ip).last_run_id = None
    ip.run_line_magic("mantik_logs", "last")
    assert "No run was submitted from this kernel" in one_line(capsys.readouterr().out)
    ip.run_line_magic("mantik_status", "no-such-run")
    assert "no-such-run" in one_line(capsys.readouterr().out)
    ip.run_line_magic("config", "MantikMagics.show_tracebacks = True")
    try:
        from mantik_jupyter.errors import NotFound

        with pytest.raises(NotFound):
            ip.run_line_magic("mantik_logs", "last")
    finally:
        ip.run_line_magic("config", "MantikMagics.show_tracebacks = False")


def test_help_is_real(ip):
    doc = ip.find_line_magic("mantik_submit").__doc__
    for option in ("--backend-config", "--entry-point", "-P", "--experiment", "--run-name"):
        assert option in doc
    assert "--wait" in doc and "--notebook" in doc
    assert "--follow" in ip.find_line_magic("mantik_logs").__doc__
    assert "--to" in ip.find_line_magic("mantik_download").__doc__


def test_a_run_in_a_terminal_shows_its_state_as_text(ip, env, capsys):
    """Terminal IPython (no live line): a run is its text, with its state when shown."""
    project = copy_example(env)
    write_config(project, LOCAL_CONFIG)
    os.environ["JPY_SESSION_NAME"] = str(project / EXAMPLE_NOTEBOOK)
    ip.run_cell("%mantik_submit -P epochs=1 --experiment terminal", store_history=True)
    out = capsys.readouterr().out
    run = ip.user_ns["_"]
    assert isinstance(run, Run), out
    assert "Submitted: Run " in out and re.search(r"\nOut\[\d+\]: \n?Run .*: QUEUED", out), out
    deadline = time.monotonic() + 60
    while not ip.run_line_magic("mantik_status", run.run_id).info.state.is_final:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    capsys.readouterr()
    # Shown again once it ended: FINISHED, though this object last saw it queued.
    ip.run_cell("_", store_history=True)
    out = capsys.readouterr().out
    assert re.match(r"Out\[\d+\]: \n?Run .*: FINISHED .*\nhttp.*/runs/" + run.run_id, out), out
    assert "QUEUED" not in out

    # A state that cannot be asked for is shown as last seen, with why, not as a traceback.
    run.info = dataclasses.replace(run.info, run_id=uuid.uuid4().hex)
    run._seen_at = 0.0
    ip.run_cell("_", store_history=True)
    out = capsys.readouterr().out
    assert "Traceback" not in out and "FINISHED" in out, out
    assert "(state as last seen; asking again failed: No run with id" in out, out
    assert run.run_id in out
