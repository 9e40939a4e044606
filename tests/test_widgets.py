"""RunTable, MetricComparison and LogView state, against runs in the real MLflow server.

Runs are made once per module with as few requests as MLflow allows (the basic-auth
server answers in 0.5-1 s per request on a loaded machine).
"""

from __future__ import annotations

import gc
import math
import sys
import time

import pytest
from IPython.core.error import UsageError

from mantik_jupyter.compute.run_record import TAG_BACKEND, TAG_JOB_ID, TAG_STATE, RunInfo
from mantik_jupyter.compute.runs import RunService
from mantik_jupyter.errors import NotFound
from mantik_jupyter.tracking.credentials import CredentialStore
from mantik_jupyter.tracking.rest import TrackingClient
from mantik_jupyter.tracking.runs_api import RunsApi
from mantik_jupyter.tracking.service import TrackingService
from mantik_jupyter.widgets import LogView, MetricComparison, RunTable

from .runs_helpers import FINAL, copy_example, wait_for, write_config
from .widgets_helpers import make_run

pytestmark = pytest.mark.timeout(240)

STEPS = 3000  # 3 log-batch requests per run and metric
SPIKE = 1717


def loss_curve(scale: float, spike: bool = False) -> list[tuple[int, float]]:
    values = [(s, scale * math.exp(-s / 800) + 0.01 * math.sin(s / 7)) for s in range(STEPS)]
    if spike:
        values[SPIKE] = (SPIKE, 50.0)
    return values


@pytest.fixture(scope="module")
def api(mlflow_server) -> RunsApi:
    return RunsApi(TrackingClient(mlflow_server.uri, mlflow_server.admin))


@pytest.fixture(scope="module")
def service(mlflow_server, api, tmp_path_factory) -> RunService:
    store = CredentialStore(tmp_path_factory.mktemp("widgets") / "credentials.json")
    store.set(mlflow_server.uri, mlflow_server.admin)
    svc = RunService(
        TrackingService(store, tracking_uri=mlflow_server.uri),
        work_dir=tmp_path_factory.mktemp("widgets-work"),
    )
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def experiment(api) -> dict:
    """Seven runs: names, lr/rmse that vary, one RUNNING, one FAILED, one with a job tag."""
    exp_id = api.create_experiment(f"widgets-{time.time_ns()}")
    t0 = int(time.time() * 1000) - 3_600_000
    runs = {}
    specs = [
        ("alpha-1", 0.1, 0.9, "FINISHED"),
        ("alpha-2", 0.2, 0.4, "FINISHED"),
        ("beta-1", 0.3, 0.7, "FAILED"),
        ("beta-2", 0.4, 0.2, "FINISHED"),
        ("gamma-1", 0.5, 0.6, "FINISHED"),
        ("gamma-2", 0.6, 0.3, "FINISHED"),
        ("live", 0.7, 0.8, "RUNNING"),
    ]
    for i, (name, lr, rmse, status) in enumerate(specs):
        runs[name] = make_run(
            api,
            exp_id,
            name,
            params={"lr": lr, "dataset": "era5"},
            metrics={"rmse": [(0, rmse)]},
            status=status,
            tags={TAG_BACKEND: "local"} if name == "live" else None,
            start_time=t0 + i * 60_000,
        )
    return {"id": exp_id, "runs": runs}


def names(table: RunTable) -> list[str]:
    return [r["cells"]["name"] for r in table.view.rows]


def test_table_pages_from_mlflow_newest_first(api, service, experiment):
    table = RunTable(experiment["id"], page_size=3, refresh_interval=0, api=api, service=service)
    try:
        assert table.requests == 1
        assert names(table) == ["live", "gamma-2", "gamma-1"]
        assert table.has_next_page and table.prev_button.disabled
        assert table.next_page()
        assert names(table) == ["beta-2", "beta-1", "alpha-2"]
        assert table.next_page()
        assert names(table) == ["alpha-1"]
        assert not table.has_next_page and not table.next_page()
        assert table.previous_page() and names(table) == ["beta-2", "beta-1", "alpha-2"]
        assert table.page == 1 and table.requests == 4  # one request per page shown
        assert "4\u20136+" in table.page_label.value
        # Default columns: the param that varies (not the constant one), the metrics.
        keys = [c["key"] for c in table.view.columns]
        assert "params.lr" in keys and "params.dataset" not in keys
        assert "metrics.rmse" in keys and {"name", "state", "backend", "start"} <= set(keys)
        # Where widgets do not render (a converted notebook), the page as HTML and text.
        bundle = table._repr_mimebundle_()
        assert "application/vnd.jupyter.widget-view+json" in bundle
        assert "beta-2" in bundle["text/html"] and "beta-2" in bundle["text/plain"]
    finally:
        table.close()


def test_table_sorts_on_the_server_and_filters(api, service, experiment):
    table = RunTable(experiment["id"], page_size=4, refresh_interval=0, api=api, service=service)
    try:
        table.sort("metrics.rmse", desc=False)
        assert names(table) == ["beta-2", "gamma-2", "alpha-2", "gamma-1"]
        table.next_page()
        assert names(table) == ["beta-1", "live", "alpha-1"]
        table.sort("name", desc=True)
        assert names(table)[:2] == ["live", "gamma-2"] and table.page == 0
        table.sort("params.lr", desc=False)
        assert names(table) == ["alpha-1", "alpha-2", "beta-1", "beta-2"]

        table.set_filter(text="ALPHA")  # the run name, case-insensitive
        assert sorted(names(table)) == ["alpha-1", "alpha-2"]
        table.set_filter(text="metrics.rmse < 0.35")  # an MLflow filter as it is
        assert sorted(names(table)) == ["beta-2", "gamma-2"]
        table.set_filter(text="", state="active")
        assert names(table) == ["live"]
        assert table.view.rows[0]["active"] and table.view.rows[0]["state"] == "RUNNING"
        table.set_filter(state="FAILED")
        assert names(table) == ["beta-1"] and table.view.rows[0]["state"] == "FAILED"
        table.set_filter(text="nothing-like-this", state="all")
        assert names(table) == [] and table.view.message == "No runs match."
    finally:
        table.close()


def test_table_search_finds_names_with_underscores_and_percent(api, service):
    exp_id = api.create_experiment(f"widgets-like-{time.time_ns()}")
    for name in ("base_line_lr01", "100%_done", "other"):
        make_run(api, exp_id, name)
    table = RunTable(exp_id, refresh_interval=0, api=api, service=service)
    try:
        for text, found in (("base_line", ["base_line_lr01"]), ("100%", ["100%_done"])):
            table.set_filter(text=text)
            assert names(table) == found, text
    finally:
        table.close()


def test_frontend_sort_and_selection_run_in_the_background(api, service, experiment):
    table = RunTable(experiment["id"], page_size=10, refresh_interval=0, api=api, service=service)
    try:
        # What the browser does: set the traits; the table reloads off the kernel's loop.
        table.view.sort_key = "metrics.rmse"
        table.wait()
        assert names(table)[0] in {"beta-2", "live", "alpha-1"}
        table.view.sort_desc = False
        table.wait()
        assert names(table)[0] == "beta-2"
        table.view.selected = [experiment["runs"]["gamma-2"]]
        table.wait()
        assert "gamma-2" in table.details.value
    finally:
        table.close()


def test_selection_opens_details_with_actions(api, service, experiment):
    table = RunTable(
        experiment["id"],
        refresh_interval=0,
        api=api,
        service=service,
        base_url="/user/ada/",
    )
    try:
        assert table.details_box.layout.display == "none"
        rid = experiment["runs"]["beta-2"]
        table.select(rid)
        assert table.details_box.layout.display == "flex"
        details = table.details.value
        assert "beta-2" in details and rid in details
        assert "lr" in details and "0.4" in details and "era5" in details  # params
        assert "rmse" in details and "0.2" in details  # metrics
        assert "mlflow.runName" in details  # tags
        assert (
            f'href="/user/ada/mantik/mlflow/#/experiments/{experiment["id"]}/runs/{rid}"'
            in table.mlflow_link.value
        )
        assert table.cancel_button.disabled  # finished
        assert table.download_button.disabled  # no backend job
        assert table.log_tail.value == ""  # not a mantik job: no log

        live = experiment["runs"]["live"]
        table.select(live)
        assert not table.cancel_button.disabled

        table.select([rid, experiment["runs"]["alpha-2"]])
        assert "2 runs selected" in table.details.value
        comparison = table.compare_selected(metrics=["rmse"])
        assert isinstance(comparison, MetricComparison)
        assert table.comparison_box.children == (comparison,)
        assert set(comparison.run_ids) == {rid, experiment["runs"]["alpha-2"]}
        assert comparison.wait(60) and len(comparison.figure.data) == 2
    finally:
        table.close()


def test_download_button_says_how_it_went(api, service, tmp_path):
    project = copy_example(tmp_path)
    write_config(project, {"Local": {}, "Resources": {"Queue": "local"},
                           "Environment": {"Python": sys.prefix}})  # fmt: skip
    info = service.submit(
        project, params={"epochs": "1"}, experiment_name=f"widgets-dl-{time.time_ns()}"
    )
    wait_for(service, info.run_id, FINAL, timeout=60)
    (tmp_path / "afile").write_text("")
    table = RunTable(
        info.experiment_id,
        refresh_interval=0,
        api=api,
        service=service,
        download_dir=tmp_path / "afile" / "sub",
    )
    try:
        table.select(info.run_id)
        table.download_button.click()
        table.wait()
        # It said 'Downloading…' for ever; why it failed was in another line, above the table.
        assert "Cannot write the download to" in table.action_message.value
        table.download_dir = tmp_path / "got"
        table.download_button.click()
        table.wait()
        assert table.action_message.value.startswith("Downloaded to")
        log = tmp_path / "got" / f"mantik-run-{info.run_id[:8]}" / "mantik.log"
        assert log.is_file()
        # Again: into the same folder (a second one went inside the first), where
        # everything is already there.
        table.download_button.click()
        table.wait()
        assert "identical, left as they were" in table.action_message.value
        # The user's edit: refused, named; the button offers to overwrite that run.
        original = log.read_text()
        log.write_text("my notes on this run\n")
        table.download_button.click()
        table.wait()
        message = table.action_message.value
        assert "&#x27;mantik.log&#x27;" in message and "again with the Overwrite button" in message
        assert log.read_text() == "my notes on this run\n"
        assert table.download_button.description == "Overwrite"
        table.download_button.click()
        table.wait()
        assert "1 file replaced: &#x27;mantik.log&#x27;" in table.action_message.value
        assert log.read_text() == original and table.download_button.description == "Download"
    finally:
        table.close()


def test_active_runs_refresh_in_the_background(api, service, mlflow_server):
    exp_id = api.create_experiment(f"widgets-live-{time.time_ns()}")
    done = make_run(api, exp_id, "done", metrics={"loss": [(0, 1.0)]})
    live = make_run(api, exp_id, "running", metrics={"loss": [(0, 1.0)]}, status="RUNNING")
    table = RunTable(exp_id, refresh_interval=0.3, api=api, service=service)
    try:
        row = next(r for r in table.view.rows if r["run_id"] == live)
        assert row["cells"]["metrics.loss"] == "1" and row["state"] == "RUNNING"
        table.select(live)
        # The job logs a value and ends, outside the kernel.
        api.client.api(
            "POST",
            "runs/log-metric",
            run_id=live,
            key="loss",
            value=0.25,
            timestamp=int(time.time() * 1000),
            step=1,
        )
        api.update_run(live, status="FINISHED", end_time=int(time.time() * 1000))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = next(r for r in table.view.rows if r["run_id"] == live)
            if row["state"] == "FINISHED":
                break
            time.sleep(0.2)
        assert row["state"] == "FINISHED" and row["cells"]["metrics.loss"] == "0.25"
        assert "0.25" in table.details.value  # the open details pane follows
        # Finished runs are not asked for again: no active run left, no more requests.
        before = table.requests
        time.sleep(1.0)
        assert table.requests == before
        assert any(r["run_id"] == done for r in table.view.rows)
    finally:
        table.close()
    assert not table._thread.is_alive() or table._stop.is_set()


def test_refresh_asks_the_backend_for_mantik_jobs(api, service, monkeypatch):
    exp_id = api.create_experiment(f"widgets-sync-{time.time_ns()}")
    live = make_run(
        api,
        exp_id,
        "queued",
        status="RUNNING",
        tags={TAG_BACKEND: "local", TAG_JOB_ID: "123", TAG_STATE: "QUEUED"},
    )
    synced = []

    def backend_says_running(runs):
        # What RunService's sync does when the backend answers RUNNING (the job id is
        # made up: no backend knows it).
        synced.append([r["info"]["run_id"] for r in runs])
        api.set_tags(live, {TAG_STATE: "RUNNING"})
        return [RunInfo.from_run(api.get_run(live))]

    monkeypatch.setattr(service, "sync_found", backend_says_running)
    # The runs go to the sync as the table's search found them, not fetched one by one.
    monkeypatch.setattr(service, "sync", lambda run_ids=None: pytest.fail("fetched again"))
    table = RunTable(exp_id, refresh_interval=0, api=api, service=service)
    try:
        assert table.view.rows[0]["state"] == "QUEUED"
        before = table.requests
        assert table.refresh_active() == [live]
        assert synced == [[live]] and table.view.rows[0]["state"] == "RUNNING"
        assert table.requests == before + 2  # the search, and again after the change
    finally:
        table.close()


@pytest.fixture(scope="module")
def curves(api) -> dict:
    exp_id = api.create_experiment(f"widgets-curves-{time.time_ns()}")
    runs = {
        "small": make_run(
            api,
            exp_id,
            "small",
            params={"lr": 0.01, "layers": 2, "opt": "adam"},
            metrics={"loss": loss_curve(1.0, spike=True)},
        ),
        "big": make_run(
            api,
            exp_id,
            "big",
            params={"lr": 0.001, "layers": 8, "opt": "sgd"},
            metrics={"loss": loss_curve(2.0), "acc": [(s, s / 10) for s in range(10)]},
        ),
    }
    return {"id": exp_id, "runs": runs}


def test_comparison_downsamples_full_histories_with_lttb(api, service, curves):
    small, big = curves["runs"]["small"], curves["runs"]["big"]
    comp = MetricComparison(
        [small, big], metrics=["loss"], max_points=200, fetch="full", api=api, service=service
    )
    s = comp.series[(small, "loss")]
    assert s.total_points == STEPS and s.points == 200 and s.exact
    assert s.x[0] == 0 and s.x[-1] == STEPS - 1  # ends kept
    assert SPIKE in s.x and 50.0 in s.y  # the spike survives downsampling
    assert list(s.x) == sorted(s.x)
    assert comp.points_sent == 400
    traces = comp.figure.data
    assert len(traces) == 2 and {tr.name for tr in traces} == {"small", "big"}
    assert all(len(tr.x) == 200 for tr in traces)
    assert "400 of 6,000 points drawn" in comp.note.value
    # The browser gets the same figure as plotly's mimetype in an Output widget.
    (shown,) = comp.chart.outputs
    drawn = shown["data"]["application/vnd.plotly.v1+json"]["data"]
    assert [tr["name"] for tr in drawn] == [tr.name for tr in traces]
    assert "plotly chart: loss of 2 runs" in shown["data"]["text/plain"]

    # Summary: the best (lowest) final loss is highlighted.
    assert comp.summary.best["loss"] == small and comp.summary.goals["loss"] == "min"
    assert "mantik-best" in comp.summary_html.value
    # Three params vary: parallel coordinates over them and the final loss.
    par = comp.params_figure.data[0]
    assert par.type == "parcoords"
    assert [d.label for d in par.dimensions] == ["layers", "lr", "opt", "final loss"]

    # By time: same points, the x axis in wall-clock time; no new request.
    before = comp.requests
    comp.x_select.value = "relative"
    assert comp.requests == before
    assert comp.series[(big, "loss")].x[-1] == pytest.approx((STEPS - 1) * 0.01)


def test_comparison_small_multiples_and_server_sampling(api, service, curves):
    small, big = curves["runs"]["small"], curves["runs"]["big"]
    comp = MetricComparison([small, big], metrics=["loss"], api=api, service=service)
    s = comp.series[(small, "loss")]
    assert s.total_points == 2500 and not s.exact  # the server sampled to 2,500
    assert s.points == 2000 and s.x[0] == 0 and s.x[-1] == STEPS - 1
    # One request per metric for all runs, and those that find the runs: the experiments,
    # then a search per 100 of them (a whole test session makes more than 100).
    finding = 1 + math.ceil(len(list(api.search_experiments())) / 100)
    assert comp.requests <= finding + 1

    comp.metric_select.value = ("loss", "acc")
    assert len(comp.figure.data) == 3  # 'small' never logged acc
    layout = comp.figure.layout
    assert layout.xaxis2 is not None  # two subplots side by side
    assert [a.text for a in layout.annotations] == ["loss", "acc"]
    assert comp.summary.best["acc"] == big and comp.summary.goals["acc"] == "max"


def test_comparison_of_the_top_runs_of_an_experiment(api, service, experiment):
    comp = MetricComparison(experiment=experiment["id"], metric="rmse", top=3, api=api)
    assert [comp.infos[r].run_name for r in comp.run_ids] == ["beta-2", "gamma-2", "alpha-2"]
    assert comp.summary.best["rmse"] == experiment["runs"]["beta-2"]
    scatter = comp.params_figure.data[0]
    assert scatter.type == "scatter" and list(scatter.x) == [0.4, 0.6, 0.2]  # lr only varies


def test_a_widget_that_refuses_its_arguments_leaves_no_noise(service, monkeypatch):
    # `%mantik_runs --experiment nope` said "No experiment named 'nope'" and then the
    # garbage collector printed "Exception ignored in: Widget.__del__ ... AttributeError".
    unraisable: list = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(NotFound):
        RunTable("no-such-experiment-anywhere", service=service)
    with pytest.raises(ValueError):
        LogView()
    gc.collect()
    assert [str(u.exc_value) for u in unraisable] == []


def test_log_view_follows_a_source_and_keeps_the_tail():
    def chunks():
        for i in range(50):
            yield f"line {i}\n"
            time.sleep(0.005)

    view = LogView(source=chunks(), flush_interval=0.05, max_chars=60)
    assert view.wait(10)
    assert view.done and view.status == "The run ended."
    assert view.text.endswith("line 49\n") and len(view.text) <= 60


def test_log_view_follows_a_running_job(service, tmp_path, api):
    """A real job on the local backend: the view shows its output while it runs."""
    import sys

    from .runs_helpers import copy_example, write_config

    project = copy_example(tmp_path)
    write_config(
        project,
        {"Local": {}, "Resources": {"Queue": "local"}, "Environment": {"Python": sys.prefix}},
    )
    info = service.submit(project, entry_point="main", params={"epochs": "2"}, experiment_name="lv")
    view = LogView(info.run_id, service=service, poll_interval=0.3, flush_interval=0.1)
    assert view.wait(120), view.status
    assert view.status == "The run ended.", view.status
    assert "epoch" in view.text.lower(), view.text[-500:]


def test_compare_magic(
    ip, api, curves, experiment, mlflow_server, monkeypatch, tmp_path, capsys
):
    monkeypatch.setenv("MANTIK_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MANTIK_CREDENTIALS_FILE", raising=False)
    for key, value in mlflow_server.env(mlflow_server.admin).items():
        monkeypatch.setenv(key, value)
    shell = ip
    small, big = curves["runs"]["small"], curves["runs"]["big"]

    comp = shell.run_line_magic("mantik_compare", f"{small} {big} --metric loss --x relative")
    assert isinstance(comp, MetricComparison) and len(comp.figure.data) == 2
    assert comp.x_select.value == "relative"
    # What a terminal (and a notebook viewer without widgets) shows: a table of the runs,
    # not 'MetricComparison(children=(HBox(children=(SelectMultiple(...' cut at 110 characters.
    text = shell.display_formatter.format(comp)[0]["text/plain"].splitlines()
    assert text[0] == "Comparison of 2 runs, latest values:"
    assert text[1].split() == ["ID", "NAME", "STATE", "loss"] and len(text) == 4
    assert text[2].startswith(small[:8]) and text[3].startswith(big[:8])
    comp = shell.run_line_magic(
        "mantik_compare", f"--experiment {experiment['id']} --metric rmse --top 2"
    )
    assert [comp.infos[r].run_name for r in comp.run_ids] == ["beta-2", "gamma-2"]

    assert shell.run_line_magic("mantik_compare", f"--experiment {curves['id']}") is None
    assert "needs --metric" in capsys.readouterr().out
    # A run that logged nothing yet (queued, or failed at once): a message, no traceback.
    elsewhere = api.create_experiment(f"widgets-empty-{time.time_ns()}")
    empty = make_run(api, elsewhere, "nothing-yet", status="FAILED")
    assert shell.run_line_magic("mantik_compare", f"{empty} --metric loss") is None
    assert "logged no metric yet" in capsys.readouterr().out
    with pytest.raises(UsageError, match="not 1 or more"):
        shell.run_line_magic("mantik_compare", f"--experiment {curves['id']} --metric loss --top 0")
    doc = shell.find_line_magic("mantik_compare").__doc__
    assert "--experiment E --metric M --top K" in doc
