"""The example project to FINISHED on the UNICORE stand-in from each face: the CLI, a magic
and the REST API the sidebar calls. The stand-in is test infrastructure that speaks UNICORE's
REST API (tests/unicore_standin); nothing in the product knows it is not a real site."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from .lab_fixtures import api_json, login_as
from .runs_helpers import copy_example, unicore_config, write_config

REPO = Path(__file__).resolve().parent.parent


def unicore_project(dest: Path, site) -> Path:
    project = copy_example(dest)
    write_config(project, unicore_config(site, Resources={"Queue": "batch", "Runtime": "10m"}))
    return project


def test_cli(tmp_path, unicore_site, unicore_login, mlflow_server):
    project = unicore_project(tmp_path, unicore_site)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(mlflow_server.env(mlflow_server.create_user()))
    env["MANTIK_DATA_DIR"] = str(tmp_path / "data")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "mantik_jupyter.cli", "--json", "runs", "submit", str(project),
         "--backend-config", "compute-backend-config.yaml", "-P", "epochs=2", "--wait",
         "--experiment-name", "unicore-faces-cli"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    assert run["state"] == "FINISHED" and run["backend"] == "unicore", run


def test_magic(ip, tmp_path, unicore_site, unicore_login, mlflow_server, monkeypatch, capsys):
    project = unicore_project(tmp_path, unicore_site)
    for key, value in mlflow_server.env(mlflow_server.create_user()).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MANTIK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("MANTIK_TRACKING_URI", raising=False)
    notebook = project / "weather-forecast.ipynb"
    run = ip.run_line_magic(
        "mantik_submit", f"--wait -P epochs=2 --experiment unicore-faces-magic --path {notebook}"
    )
    out = capsys.readouterr().out
    assert run is not None, out
    assert run.state == "FINISHED", (out, run.logs())
    assert run.info.backend == "unicore"


async def test_rest_api_of_the_sidebar(
    jp_fetch, jp_root_dir, unicore_site, unicore_login, mlflow_server
):
    unicore_project(Path(jp_root_dir), unicore_site)
    await login_as(jp_fetch, mlflow_server.create_user())
    code, run = await api_json(
        jp_fetch, "runs", method="POST",
        body={"project_dir": "weather-forecast", "params": {"epochs": "2"},
              "experiment_name": "unicore-faces-rest"},
    )  # fmt: skip
    assert code == 201, run
    for _ in range(240):
        code, run = await api_json(jp_fetch, "runs", run["run_id"])
        if run["state"] in ("FINISHED", "FAILED", "KILLED"):
            break
        await asyncio.sleep(1)
    assert run["state"] == "FINISHED" and run["backend"] == "unicore", run
