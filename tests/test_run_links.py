"""The link to a run's page in the MLflow UI is the same from every face: through the lab's
MLflow proxy inside a lab (the browser opens it with the user's Jupyter login), the
tracking server's own UI outside one (only that one opens there)."""

from __future__ import annotations

import json
import re
import uuid

from mantik_jupyter.tracking.service import run_page_url

from . import test_cli, test_magics_kernel, test_magics_runs
from .test_magics_kernel import example_kernel

env = test_magics_runs.env  # the kernel's environment: the tracking server, the user's login
kernels = test_magics_kernel.kernels
mantik = test_cli.mantik  # the `mantik` command with a tracking user's credential
cli_project = test_cli.project


def test_the_link_goes_through_the_lab_in_a_lab_else_to_the_tracking_server():
    page = "#/experiments/3/runs/ab12"
    assert run_page_url("3", "ab12", "http://t:5000", "/user/ada") == (
        f"/user/ada/mantik/mlflow/{page}"
    )
    assert run_page_url("3", "ab12", "http://t:5000", "/") == f"/mantik/mlflow/{page}"
    assert run_page_url("3", "ab12", "https://t.example.org/mlflow/") == (
        f"https://t.example.org/mlflow/{page}"
    )
    # A password written into the tracking URI is never part of a link.
    assert run_page_url("3", "ab12", "https://ada:s3cret@t.example.org") == (
        f"https://t.example.org/{page}"
    )


def links_to(outputs: list[dict], experiment_id: str, run_id: str) -> set[str]:
    """Every link to the run's page in these cell outputs (text, HTML)."""
    text = json.dumps(outputs).replace("\\/", "/")
    fragment = re.escape(f"#/experiments/{experiment_id}/runs/{run_id}")
    return set(re.findall(r'(?:https?://[^\s"\'<>\\]*?|/[^\s"\'<>\\]*?)?' + fragment, text))


def test_a_kernel_outside_a_lab_links_every_face_to_the_tracking_server(
    jp_serverapp, env, kernels, mlflow_server, tmp_path
):
    # A lab runs on this machine (its server file is in JUPYTER_RUNTIME_DIR), but the
    # kernel is none of its (nbconvert, VS Code, jupyter console): %mantik_submit linked
    # to the tracking server and %mantik_runs' table to "/lab%40base/mantik/mlflow/...",
    # a path of that other lab that the kernel's frontend cannot open.
    assert jp_serverapp.base_url == "/lab%40base/"
    experiment = f"links-{uuid.uuid4().hex[:8]}"
    kernel = example_kernel(tmp_path, kernels)

    def run(code: str) -> list[dict]:
        outputs, _, _ = kernel.run(code)
        assert not [o for o in outputs if o["type"] == "error"], outputs
        return outputs

    run("%load_ext mantik_jupyter")
    submitted = run(f"run = %mantik_submit -P epochs=1 --experiment {experiment}\nrun.run_id")
    ids = run("print(run.info.experiment_id, run.run_id, run.url)")
    experiment_id, run_id, url = next(o for o in ids if o["type"] == "stream")["text"].split()
    listed = run(f"%mantik_runs --experiment {experiment}")
    table = run(f"from mantik_jupyter.widgets import RunTable\nRunTable({experiment!r})")
    expected = f"{mlflow_server.uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    assert url == expected
    for face, outputs in (("submit", submitted), ("runs", listed), ("RunTable", table)):
        assert links_to(outputs, experiment_id, run_id) == {expected}, (face, outputs)


def test_the_command_shows_the_link_to_the_tracking_server(mantik, cli_project, mlflow_server):
    experiment = f"links-cli-{uuid.uuid4().hex[:8]}"
    done = test_cli.ok(
        mantik(
            "runs", "submit", str(cli_project), "--experiment-name", experiment, "-P", "epochs=1"
        )
    )
    run_id = re.search(r"Submitted run (\w+)", done.stdout).group(1)
    info = test_cli.as_json(mantik("runs", "info", run_id, "--json"))
    expected = (
        f"{mlflow_server.uri.rstrip('/')}/#/experiments/{info['experiment_id']}/runs/{run_id}"
    )
    assert info["mlflow_url"] == expected
    assert f"\nMLflow: {expected}" in done.stdout, done.stdout
    status = test_cli.ok(mantik("runs", "status", run_id)).stdout
    assert f"MLflow:        {expected}\n" in status, status
    listed = test_cli.as_json(mantik("runs", "list", "--experiment-name", experiment, "--json"))
    assert [r["mlflow_url"] for r in listed["runs"]] == [expected]
