"""The notebook face as a new user meets it, in real kernels (jupyter_client, nbclient)
against the real MLflow server and the local backend: logging in where no prompt can be
shown and to a server of one's own choosing, following a log in "Run All", and what a
mantik error raised by the Python API looks like."""

from __future__ import annotations

import json
import os
import queue
import time
import uuid
from pathlib import Path

import nbformat
import pytest

from . import test_magics_runs
from .runs_helpers import copy_example, write_config
from .test_magics_runs import LOCAL_CONFIG, REPO, execute_in_kernel, outputs_of, write_notebook

env = test_magics_runs.env  # the kernel's environment: the tracking server, the user's login
# This module's user owns the experiments it makes: not the example's, which others use.
EXPERIMENT = f"kernel-{uuid.uuid4().hex[:8]}"


class Kernel:
    """A real IPython kernel driven as JupyterLab drives it: input prompts answered,
    interrupts sent, every output of a cell collected."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        from jupyter_client.manager import KernelManager

        self.manager = KernelManager(kernel_name="python3")
        kernel_env = {
            **env,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        }
        self.manager.start_kernel(env=kernel_env, cwd=str(cwd))
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def run(
        self,
        code: str,
        *,
        inputs: list[str] | None = None,
        interrupt_after: float | None = None,
        interrupt_when: str | None = None,
        cell_id: str | None = None,
        timeout: float = 120,
    ) -> tuple[list[dict], list[dict], float]:
        """Run a cell: (its outputs, the input prompts it showed, seconds it took).
        ``interrupt_after`` seconds, or once an output shows ``interrupt_when``, the
        kernel is interrupted. ``cell_id``: the notebook cell it is, as JupyterLab says."""
        request = self.client.session.msg(
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": inputs is not None,
                "stop_on_error": True,
            },
            metadata={"cellId": cell_id} if cell_id else {},
        )
        self.client.shell_channel.send(request)
        msg_id = request["header"]["msg_id"]
        outputs: list[dict] = []
        prompts: list[dict] = []
        answers = list(inputs or [])
        started = time.monotonic()
        interrupted = False
        while True:
            elapsed = time.monotonic() - started
            assert elapsed < timeout, f"cell still running after {timeout} s: {outputs}"
            due = interrupt_after is not None and elapsed > interrupt_after
            due = due or (interrupt_when is not None and interrupt_when in json.dumps(outputs))
            if due and not interrupted:
                self.manager.interrupt_kernel()
                interrupted = True
            if inputs is not None:
                try:
                    request = self.client.stdin_channel.get_msg(timeout=0.05)
                except queue.Empty:
                    pass
                else:
                    prompts.append(request["content"])
                    self.client.input(answers.pop(0))
            try:
                msg = self.client.iopub_channel.get_msg(timeout=0.1)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                return outputs, prompts, time.monotonic() - started
            if kind in ("stream", "display_data", "update_display_data", "execute_result"):
                outputs.append({"type": kind, **content})
            elif kind == "error":
                outputs.append({"type": kind, **content})

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def text_of(outputs: list[dict]) -> str:
    return "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in outputs)


def errors_of(outputs: list[dict]) -> list[dict]:
    return [o for o in outputs if o["type"] == "error"]


@pytest.fixture
def kernels():
    started: list[Kernel] = []

    def start(cwd: Path, environ: dict[str, str]) -> Kernel:
        kernel = Kernel(cwd, environ)
        started.append(kernel)
        return kernel

    yield start
    for kernel in started:
        kernel.close()


def example_kernel(folder: Path, kernels, data_mb: int = 0) -> Kernel:
    """A kernel in a copy of the example project on the local backend (with a data
    file of ``data_mb`` MB to package)."""
    project = copy_example(folder)
    write_config(project, LOCAL_CONFIG)
    if data_mb:
        (project / "era5-sample.bin").write_bytes(os.urandom(data_mb * 2**20))
    return kernels(project, {**os.environ, "JPY_SESSION_NAME": str(project / "x.ipynb")})


# ---- %mantik_login ------------------------------------------------------------------------


def test_login_where_no_prompt_can_be_shown_says_how_to_log_in(env, mlflow_server):
    # nbconvert --execute, papermill: the password prompt was a 30-line
    # StdinNotImplementedError traceback that said nothing of how to log in.
    project = env / "study"
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(name, None)
    path = write_notebook(project, "%load_ext mantik_jupyter", "%mantik_login -u alice")
    nb = nbformat.read(path, as_version=4)
    execute_in_kernel(nb, path, project, timeout=120)  # no error output: it would raise
    out = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("mantik: %mantik_login cannot ask for the password for ")
    assert mlflow_server.uri in lines[0] and "`mantik login`" in lines[0]
    assert "MLFLOW_TRACKING_PASSWORD" in lines[0] and "Traceback" not in out


def test_login_to_another_server_is_the_server_the_kernel_uses(
    env, mlflow_server, kernels, tmp_path
):
    # Logged in with --tracking-uri, every magic after it still asked the default server:
    # "No tracking server is configured and no embedded one is running".
    user = mlflow_server.create_user()
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MANTIK_TRACKING"))
    }
    kernel = kernels(tmp_path, environ)
    kernel.run("%load_ext mantik_jupyter")
    before, _, _ = kernel.run("%mantik_runs")
    assert "No tracking server is configured" in text_of(before)

    out, prompts, _ = kernel.run(
        f"%mantik_login --tracking-uri {mlflow_server.uri} -u {user.username}",
        inputs=[user.password],
    )
    assert prompts == [{"prompt": "Password: ", "password": True}]
    said = text_of([o for o in out if o["type"] == "stream"])
    assert f"Logged in to {mlflow_server.uri} as {user.username}." in said
    assert "magics of this kernel use it from now on" in said

    runs, _, _ = kernel.run("%mantik_runs --limit 3")
    assert not errors_of(runs) and "No tracking server" not in text_of(runs), runs
    assert "No runs." in text_of(runs)
    # The widgets from Python reach the same server.
    table, _, _ = kernel.run(
        "from mantik_jupyter.widgets import RunTable\nRunTable().api.client.uri"
    )
    assert mlflow_server.uri in text_of(table), table
    history, _, _ = kernel.run("%history -g")
    assert user.password not in json.dumps(history)


def test_login_from_python_asks_for_the_password(env, mlflow_server, kernels, tmp_path):
    # mantik_jupyter.login(username=...) without a password was an InvalidRequest
    # traceback: the only way was to type the password into the cell, where it stays in
    # the notebook and the kernel's history.
    user = mlflow_server.create_user()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    kernel = kernels(tmp_path, environ)
    out, prompts, _ = kernel.run(
        "import mantik_jupyter\n"
        f"mantik_jupyter.login(username={user.username!r}, tracking_uri={mlflow_server.uri!r})",
        inputs=[user.password],
    )
    assert not errors_of(out), out
    assert prompts == [{"prompt": "Password: ", "password": True}]
    assert "'logged_in': True" in text_of(out) and user.password not in json.dumps(out)
    history, _, _ = kernel.run("%history -g")
    assert user.password not in json.dumps(history)


# ---- the Python API's errors ------------------------------------------------------------------


def test_a_mantik_error_from_python_is_its_message(env, mlflow_server, kernels):
    # RunTable(experiment="typo") or run.download("../x") printed 40 lines of
    # traceback through the core around the one line that said what was wrong.
    kernel = kernels(env, dict(os.environ))
    kernel.run("%load_ext mantik_jupyter")
    out, _, _ = kernel.run(
        "from mantik_jupyter.widgets import RunTable\nRunTable(experiment='no-such-exp')"
    )
    (error,) = errors_of(out)
    assert error["ename"] == "NotFound"
    assert error["traceback"] == [
        f"NotFound: No experiment named 'no-such-exp' on {mlflow_server.uri}",
        "(%config MantikMagics.show_tracebacks = True shows where it was raised)",
    ]
    # Asked for, the traceback is all there.
    out, _, _ = kernel.run(
        "%config MantikMagics.show_tracebacks = True\nRunTable(experiment='no-such-exp')"
    )
    (error,) = errors_of(out)
    assert len(error["traceback"]) > 2 and "run_table.py" in "".join(error["traceback"])


# ---- %mantik_logs --follow in a notebook ------------------------------------------------


def test_follow_runs_until_the_run_ended_and_leaves_the_log_in_the_notebook(env):
    # "Run All" went on at once past %mantik_logs --follow (the log view followed in the
    # background): the next cell saw the run still RUNNING, and the saved notebook showed
    # '<mantik_jupyter.widgets.log_view.LogView object at 0x...>' instead of the log.
    project = copy_example(env)
    write_config(project, LOCAL_CONFIG)
    path = write_notebook(
        project,
        "%load_ext mantik_jupyter",
        f"run = %mantik_submit -P epochs=3 --experiment {EXPERIMENT}\n%mantik_logs last --follow",
        "run.state",
        "run.download('../../etc', to='.')",
    )
    nb = nbformat.read(path, as_version=4)
    from nbclient import NotebookClient

    NotebookClient(
        nb, timeout=180, allow_errors=True, resources={"metadata": {"path": str(project)}}
    ).execute(
        env={
            **os.environ,
            "JPY_SESSION_NAME": str(path),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
    )
    follow, state, download = nb.cells[-3:]
    assert not outputs_of(follow, "error"), follow.outputs
    (view,) = [
        o
        for o in outputs_of(follow, "display_data")
        if "application/vnd.jupyter.widget-view+json" in o["data"]
    ]
    shown = view["data"]["text/plain"]
    # The log so far is printed first, the view follows from there: the epochs may be
    # in either, the job's last line comes while it is followed.
    printed = "".join(o.get("text", "") for o in outputs_of(follow, "stream"))
    assert "epoch 3/3" in printed + shown and "[mantik] exit status 0" in shown, shown
    assert shown.endswith("[The run ended.]") and "object at 0x" not in shown
    # The cell after it ran once the run had ended.
    (result,) = outputs_of(state, "execute_result")
    assert result["data"]["text/plain"] == "'FINISHED'"
    (error,) = outputs_of(download, "error")
    assert error["ename"] == "UnsafePath" and len(error["traceback"]) == 2, error
    assert "'../../etc' leads outside the run directory" in error["traceback"][0]


def test_interrupting_a_followed_log_stops_following_not_the_run(env, kernels):
    kernel = example_kernel(env, kernels)
    kernel.run("%load_ext mantik_jupyter")
    out, _, _ = kernel.run(
        f"run = %mantik_submit -e sleep -P seconds=120 --experiment {EXPERIMENT}"
    )
    assert not errors_of(out), out
    out, _, took = kernel.run("%mantik_logs last --follow", interrupt_after=4, timeout=60)
    assert not errors_of(out), out
    said = text_of(out)
    assert "sleeping 120 s" in said and "[Stopped following.]" in said, out
    assert "mantik: stopped following run" in said and "it keeps running" in said
    assert 4 <= took < 15, took
    state, _, _ = kernel.run("run.state")
    assert "'RUNNING'" in text_of(state)
    kernel.run("%mantik_cancel last")


# ---- %mantik_compare with runs that lack the metric or a param ---------------------------------


def test_compare_leaves_out_what_it_cannot_plot_and_says_so(env, kernels):
    # A run whose final loss was NaN made every update of the params plot a message
    # that is not JSON: jupyter-client's "Out of range float values are not JSON
    # compliant" warning landed in whichever cell ran then. A run without a param was
    # drawn at 0 on that param's axis (a learning rate it never had).
    kernel = kernels(env, dict(os.environ))
    out, _, _ = kernel.run(
        "import mlflow, uuid\n"
        "mlflow.set_experiment(f'nan-{uuid.uuid4().hex[:8]}')\n"
        "ids = []\n"
        "for lr, layers, loss in [(0.1, 4, 0.5), (0.2, 8, 0.3)]:\n"
        "    with mlflow.start_run() as r:\n"
        "        mlflow.log_params({'lr': lr, 'layers': layers})\n"
        "        mlflow.log_metric('loss', loss)\n"
        "        ids.append(r.info.run_id)\n"
        "with mlflow.start_run() as r:\n"
        "    mlflow.log_params({'lr': 0.3, 'layers': 2})\n"
        "    mlflow.log_metric('loss', float('nan'))\n"
        "    ids.append(r.info.run_id)\n"
        "with mlflow.start_run() as r:\n"
        "    mlflow.log_metric('loss', 0.4)\n"
        "    ids.append(r.info.run_id)\n",
        timeout=120,
    )
    assert not errors_of(out), out
    kernel.run("%load_ext mantik_jupyter")
    out, _, _ = kernel.run('comp = %mantik_compare {" ".join(ids)} --metric loss')
    assert not errors_of(out), out
    out, _, _ = kernel.run(
        "import time\n"
        "for _ in range(120):\n"
        "    if comp.params_figure.data:\n"
        "        break\n"
        "    time.sleep(0.25)\n"
        "time.sleep(1)  # the figure's messages to the frontend\n"
        "par = comp.params_figure.data[0]\n"
        "print(par.type, [(d['label'], list(d['values'])) for d in par.dimensions])\n"
        "print(comp.params_figure.layout.title.text)",
        timeout=60,
    )
    said = text_of(out)
    assert "not JSON compliant" not in said and not errors_of(out), out
    assert (
        "parcoords [('layers', [4.0, 8.0]), ('lr', [0.1, 0.2]), ('final loss', [0.5, 0.3])]"
        in said
    ), said
    assert (
        "left out: 1 without a final loss (none logged, or NaN/inf); "
        "1 without a plotted param" in said
    ), said
    # A prefix finds mantik runs only: the message said no more than 'No run with ...'.
    out, _, _ = kernel.run('%mantik_compare {ids[0][:8]} {ids[1]} --metric loss')
    said = text_of(out)
    assert said.startswith("mantik: No run with id, id prefix or name "), out
    assert "for another MLflow run give its full 32-character run id." in said


# ---- interrupting %mantik_submit ------------------------------------------------------------


def test_interrupting_the_packaging_says_nothing_was_submitted(env, kernels):
    # "mantik: interrupted; a submitted run keeps running." while nothing had been
    # submitted, under a packaging line left at its last percentage.
    kernel = example_kernel(env, kernels, data_mb=150)  # slow enough to interrupt
    kernel.run("%load_ext mantik_jupyter")
    out, _, took = kernel.run(
        f"run = %mantik_submit --experiment {EXPERIMENT}", interrupt_when="Packaging the code"
    )
    assert not errors_of(out), out
    said = text_of(out)
    assert "keeps running" not in said, out
    line = [o for o in out if o["type"] == "update_display_data"][-1]["data"]["text/plain"]
    assert line.startswith("mantik: Submission interrupted before its job was queued: nothing")
    assert "Uploading" not in said and "QUEUED" not in said, out


def test_interrupting_the_wait_keeps_the_run_and_its_line(env, kernels):
    # `run = %mantik_submit --wait` interrupted left run = None, and the status line
    # said RUNNING for ever.
    kernel = example_kernel(env, kernels)
    kernel.run("%load_ext mantik_jupyter\n%config MantikMagics.poll_interval = 0.5")
    out, _, _ = kernel.run(
        f"run = %mantik_submit --wait -e sleep -P seconds=120 --experiment {EXPERIMENT}",
        interrupt_when="RUNNING",
    )
    assert not errors_of(out), out
    (display_id,) = {o["transient"]["display_id"] for o in out if o.get("transient")}
    said = text_of([o for o in out if o["type"] == "stream"])
    assert "mantik: stopped waiting; run " in said and "keeps running (%mantik_cancel " in said
    state, _, _ = kernel.run("run.state")
    assert text_of(state) == "'RUNNING'", state
    out, _, _ = kernel.run("%mantik_cancel last\nimport time; time.sleep(3)")
    updates = [
        o["data"]["text/plain"]
        for o in out
        if o["type"] == "update_display_data" and o["transient"]["display_id"] == display_id
    ]
    assert updates and "RUNNING → KILLED" in updates[-1], out


# ---- %mantik_runs --state ------------------------------------------------------------------


def finished_run_recorded_as_running(
    folder: Path, kernels, mlflow_server, user, name: str
) -> tuple[Kernel, str, str]:
    """A kernel, and a run it submitted that finished while its recorded state stayed
    RUNNING (as when no one followed it to its end): (kernel, run id, experiment)."""
    from mantik_jupyter.compute.run_record import TAG_STATE
    from mantik_jupyter.tracking.rest import TrackingClient
    from mantik_jupyter.tracking.runs_api import RunsApi

    kernel = example_kernel(folder, kernels)
    kernel.run("%load_ext mantik_jupyter")
    experiment = f"{EXPERIMENT}-{name}"
    out, _, _ = kernel.run(f"run = %mantik_submit --wait -P epochs=1 --experiment {experiment}")
    said, _, _ = kernel.run("print(run.run_id, run.info.state)")
    run_id, state = text_of(said).split()
    assert state == "FINISHED", out
    RunsApi(TrackingClient(mlflow_server.uri, user)).set_tags(run_id, {TAG_STATE: "RUNNING"})
    return kernel, run_id, experiment


def test_runs_by_state_lists_only_runs_in_that_state_now(env, kernels, mlflow_server, user):
    # A run that ended while no one followed it still had RUNNING recorded: listed under
    # `--state running`, after its state was asked for, as FINISHED.
    kernel, run_id, experiment = finished_run_recorded_as_running(
        env, kernels, mlflow_server, user, "state"
    )
    out, _, _ = kernel.run(f"%mantik_runs --state running --experiment {experiment}")
    assert not errors_of(out), out
    assert text_of(out).strip() == "No runs.", out
    out, _, _ = kernel.run(f"%mantik_runs --state final --experiment {experiment}")
    assert run_id[:8] in text_of(out) and "FINISHED" in text_of(out), out


# ---- a run that failed -------------------------------------------------------------------------


def test_a_failed_run_shows_the_end_of_its_log(env, kernels):
    # "QUEUED → RUNNING → FAILED (exit code 3)" and nothing else: the reason was a
    # second cell away.
    kernel = example_kernel(env, kernels)
    kernel.run("%load_ext mantik_jupyter")
    out, _, _ = kernel.run(f"run = %mantik_submit --wait -e fail --experiment {EXPERIMENT}")
    assert not errors_of(out), out
    said = text_of([o for o in out if o["type"] == "stream"])
    ref, _, _ = kernel.run("print(run.run_id[:8])")
    ref = text_of(ref).strip()
    assert f"mantik: run {ref} failed. The last lines of its log:\n" in said, said
    assert "ERROR: simulated failure" in said and "[mantik] exit status 3" in said, said
    assert said.rstrip().endswith(f"(all of it: %mantik_logs {ref})"), said
    ok, _, _ = kernel.run(f"run = %mantik_submit --wait -P epochs=1 --experiment {EXPERIMENT}")
    assert "failed" not in text_of([o for o in ok if o["type"] == "stream"]), ok


def test_a_run_table_brings_a_stale_state_up_to_date(env, kernels, mlflow_server, user):
    # The table refreshed only runs MLflow had as active: one whose job ended while no one
    # followed it (MLflow FINISHED, its recorded state RUNNING) stayed RUNNING for good.
    kernel, run_id, experiment = finished_run_recorded_as_running(
        env, kernels, mlflow_server, user, "table"
    )
    out, _, _ = kernel.run(
        "from mantik_jupyter.widgets import RunTable\n"
        f"table = RunTable(experiment={experiment!r}, refresh_interval=0.5)\n"
        "import time\n"
        "for _ in range(40):\n"
        "    if str(table.rows[0].info.state) != 'RUNNING':\n"
        "        break\n"
        "    time.sleep(0.25)\n"
        "print(table.rows[0].run_id, table.rows[0].info.state)"
    )
    assert text_of(out).split() == [run_id, "FINISHED"], out


def test_a_cell_run_again_stops_the_refresh_of_the_table_it_showed_before(env, kernels):
    # Each run of a %mantik_runs cell left its table's refresh thread behind (the output
    # was gone): ten runs of the cell, ten threads asking the tracking server and the
    # cluster every 10 s for as long as the kernel lived.
    kernel = kernels(env, dict(os.environ))
    kernel.run("%load_ext mantik_jupyter")
    count = (
        "import threading\n"
        "print(sum(t.name == 'mantik-table-refresh' for t in threading.enumerate()))"
    )
    for _ in range(3):
        out, _, _ = kernel.run("%mantik_runs --limit 5", cell_id="cell-a")
        assert not errors_of(out), out
    assert text_of(kernel.run(count)[0]).strip() == "1"
    # Two tables of one run of a cell, and the tables of other cells, stay.
    kernel.run("%mantik_runs --limit 5\n%mantik_runs --limit 6", cell_id="cell-b")
    kernel.run("%mantik_runs --limit 5")  # a frontend that sends no cell id
    assert text_of(kernel.run(count)[0]).strip() == "4"
    kernel.run("%mantik_runs --limit 5", cell_id="cell-b")
    assert text_of(kernel.run(count)[0]).strip() == "3"


def test_an_unquoted_run_name_with_spaces_says_to_quote_it(env, kernels):
    kernel = kernels(env, dict(os.environ))
    kernel.run("%load_ext mantik_jupyter")
    out, _, _ = kernel.run("%mantik_logs lr 0.05")
    assert text_of(out).strip() == (
        "UsageError: unrecognized arguments: 0.05 (a run name or a value with spaces needs "
        'quotes, as in a shell: "lr 0.05")'
    ), out
