"""``GET mantik/api/projects``: what the "Submit to HPC" form is built from.

Same server setup as ``test_rest_runs.py``: the real MLflow server, authentication required,
a non-root base URL. The example project is copied into the Jupyter root.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from traitlets.config import Config

from .lab_fixtures import lab_config
from .mlflow_fixtures import MlflowServer

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "weather-forecast"


@pytest.fixture
def jp_base_url() -> str:
    return "/lab/base/"


@pytest.fixture
def jp_server_config(mlflow_server: MlflowServer, tmp_path: Path) -> Config:
    return lab_config(tmp_path / "mantik-data", mlflow_server.uri, sync_interval=0)


@pytest.fixture
def project(jp_root_dir: Path) -> Path:
    target = jp_root_dir / "work" / "weather-forecast"
    shutil.copytree(EXAMPLE, target)
    (target / "notebooks").mkdir()
    (target / "notebooks" / "explore.ipynb").write_text("{}")
    return target


async def describe(jp_fetch: Any, path: str | None) -> tuple[int, Any]:
    params = {"path": path} if path is not None else {}
    resp = await jp_fetch("mantik", "api", "projects", params=params, raise_error=False)
    return resp.code, json.loads(resp.body) if resp.body else None


async def test_describes_the_project_of_a_folder(jp_fetch: Any, project: Path) -> None:
    code, data = await describe(jp_fetch, "work/weather-forecast")
    assert code == 200, data
    assert data["project_dir"] == "work/weather-forecast"
    assert data["name"] == "weather-forecast"
    assert set(data["entry_points"]) == {"main", "fail", "sleep"}
    params = {p["name"]: p for p in data["entry_points"]["main"]["parameters"]}
    assert params["epochs"] == {"name": "epochs", "type": "int", "default": "5", "required": False}
    assert params["learning_rate"]["type"] == "float"
    assert params["station"]["default"] == "Juelich"
    assert data["entry_points"]["fail"]["parameters"] == []
    assert data["config_files"] == ["compute-backend-config.yaml"]
    assert data["default_config"] == "compute-backend-config.yaml"
    check = data["config_checks"]["compute-backend-config.yaml"]
    assert check["ok"] is True and check["backend"] == "local" and check["error"] is None


async def test_a_file_inside_finds_its_project(jp_fetch: Any, project: Path) -> None:
    inside = ("notebooks/explore.ipynb", "MLproject")
    for path in (f"work/weather-forecast/{name}" for name in inside):
        code, data = await describe(jp_fetch, path)
        assert code == 200, (path, data)
        assert data["project_dir"] == "work/weather-forecast"


async def test_lists_configs_and_reports_their_errors(jp_fetch: Any, project: Path) -> None:
    (project / "juwels.yml").write_text(
        "SSH:\n  Hostname: login.example.org\nResources:\n  Queue: batch\n  Nodez: 2\n"
    )
    (project / "unicore.json").write_text(json.dumps({"UnicoreApiUrl": "https://u/x"}))
    # Data and settings files are not configs.
    (project / "data.json").write_text(json.dumps([1, 2, 3]))
    (project / "settings.yaml").write_text("learning: {rate: 1}\n")
    (project / "broken.yaml").write_text("a: [\n")
    code, data = await describe(jp_fetch, "work/weather-forecast")
    assert code == 200, data
    assert data["config_files"] == ["compute-backend-config.yaml", "juwels.yml", "unicore.json"]
    juwels = data["config_checks"]["juwels.yml"]
    assert juwels["ok"] is False
    # The core names the unknown key and suggests the close one.
    assert "Nodez" in juwels["error"] and "Nodes" in juwels["error"]
    assert data["config_checks"]["unicore.json"]["ok"] is False  # no Resources.Queue


async def test_a_default_config_with_misspelled_keys_is_listed(
    jp_fetch: Any, project: Path
) -> None:
    """The config a submission would use is listed with its errors, even when none of its
    top-level keys is one that marks a config (else the form said to add the file)."""
    (project / "compute-backend-config.yaml").write_text("Locl: {}\nResource:\n  Queue: local\n")
    code, data = await describe(jp_fetch, "work/weather-forecast")
    assert code == 200, data
    assert data["default_config"] == "compute-backend-config.yaml"
    assert data["config_files"] == ["compute-backend-config.yaml"]
    check = data["config_checks"]["compute-backend-config.yaml"]
    assert check["ok"] is False
    assert "did you mean 'Local'" in check["error"], check


async def test_no_default_config(jp_fetch: Any, project: Path) -> None:
    (project / "compute-backend-config.yaml").rename(project / "local.yaml")
    code, data = await describe(jp_fetch, "work/weather-forecast")
    assert code == 200, data
    assert data["default_config"] is None
    assert data["config_files"] == ["local.yaml"]


async def test_errors(jp_fetch: Any, project: Path, jp_root_dir: Path) -> None:
    (jp_root_dir / "elsewhere").mkdir()
    code, err = await describe(jp_fetch, "elsewhere")
    assert code == 400 and err["reason"] == "invalid_project", err
    assert "MLproject" in err["message"]

    code, err = await describe(jp_fetch, "does/not/exist")
    assert code == 404 and err["reason"] == "not_found", err

    for unsafe in ("../", "work/../../etc", "/etc"):
        code, err = await describe(jp_fetch, unsafe)
        assert code == 400 and err["reason"] == "unsafe_path", (unsafe, err)
        assert "Traceback" not in json.dumps(err)

    code, err = await describe(jp_fetch, None)
    assert code == 400 and err["reason"] == "invalid_request", err

    (project / "MLproject").write_text("entry_points: [1, 2]\n")
    code, err = await describe(jp_fetch, "work/weather-forecast")
    assert code == 400 and err["reason"] == "invalid_project", err
    assert "MLproject" in err["message"]


async def test_needs_authentication(http_server_client: Any, jp_base_url: str) -> None:
    resp = await http_server_client.fetch(
        f"{jp_base_url}mantik/api/projects?path=.", raise_error=False
    )
    assert resp.code == 403
