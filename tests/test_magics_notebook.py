"""How the magics find the kernel's notebook and its lab, and notice unsaved work."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import nbformat

from mantik_jupyter.magics import notebook as nbmod
from mantik_jupyter.tracking.service import run_page_url


def write_notebook(path: Path, *sources: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, path)
    return path


def test_session_name_absolute_or_relative_to_the_root(tmp_path, monkeypatch):
    notebook = write_notebook(tmp_path / "root" / "a" / "b" / "nb.ipynb", "x = 1")
    monkeypatch.chdir(notebook.parent)  # Jupyter starts kernels in the notebook's folder
    for value in (str(notebook), "a/b/nb.ipynb"):
        monkeypatch.setenv("JPY_SESSION_NAME", value)
        location = nbmod.find_notebook()
        assert location.path == notebook.resolve() and location.how == "JPY_SESSION_NAME"
    # A notebook renamed after the kernel started: not found this way (no server here).
    monkeypatch.setenv("JPY_SESSION_NAME", "a/b/old-name.ipynb")
    monkeypatch.setattr(nbmod, "kernel_id", lambda: None)
    assert nbmod.find_notebook().path is None
    # --path wins; a folder is where the MLproject search starts.
    location = nbmod.find_notebook(str(notebook.parent))
    assert location.path is None and nbmod.start_dir(location, str(notebook.parent)) == (
        notebook.parent.resolve()
    )


async def test_the_sessions_api_finds_the_notebook_by_kernel_id(
    jp_fetch: Any, jp_serverapp: Any, jp_root_dir: Path, jp_base_url: str, monkeypatch: Any
) -> None:
    notebook = write_notebook(jp_root_dir / "sub dir" / "study.ipynb", "x = 1")
    body = {"path": "sub dir/study.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
    resp = await jp_fetch("api", "sessions", method="POST", body=json.dumps(body))
    session = json.loads(resp.body)
    try:
        server = nbmod.ServerInfo(
            url=jp_serverapp.connection_url,
            base_url=jp_serverapp.base_url,
            token=jp_serverapp.identity_provider.token,
            root_dir=Path(jp_serverapp.root_dir),
        )
        monkeypatch.setattr(nbmod, "running_servers", lambda: [server])
        monkeypatch.setattr(nbmod, "kernel_id", lambda: session["kernel"]["id"])
        monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
        # Blocking HTTP: off the event loop that serves it.
        location = await asyncio.to_thread(nbmod.find_notebook)
        assert location.how == "sessions API"
        assert location.path == notebook.resolve()
        assert nbmod.lab_base_url(location) == jp_base_url
        url = run_page_url("7", "ab12", "http://x", nbmod.lab_base_url(location))
        assert url == f"{jp_base_url}mantik/mlflow/#/experiments/7/runs/ab12"
        # A kernel no server knows: no notebook, and the link goes to the tracking server.
        monkeypatch.setattr(nbmod, "kernel_id", lambda: "0000-unknown-kernel")
        assert (await asyncio.to_thread(nbmod.find_notebook)).path is None
        outside = await asyncio.to_thread(nbmod.lab_base_url)
        assert outside is None
        assert run_page_url("7", "ab12", "http://t:5000/", outside) == (
            "http://t:5000/#/experiments/7/runs/ab12"
        )
    finally:
        await jp_fetch("api", "sessions", session["id"], method="DELETE")


def test_unsaved_work_is_noticed_cheaply(tmp_path):
    notebook = write_notebook(tmp_path / "nb.ipynb", "x = 1", "y = x + 1")
    saved = notebook.stat().st_mtime
    log = nbmod.ExecutionLog()
    log.record("x = 1", saved - 10)
    log.record("%mantik_submit", saved + 5)  # the cell running now
    assert nbmod.unsaved_work_warning(notebook, log.before_current()) is None
    # Ran after the save, but the saved file holds the same code: outputs only.
    log.cells.insert(-1, (saved + 2, "y = x + 1\n"))
    assert nbmod.unsaved_work_warning(notebook, log.before_current()) is None
    # A cell edited (or added) after the last save.
    log.cells.insert(-1, (saved + 3, "y = x + 2"))
    note = nbmod.unsaved_work_warning(notebook, log.before_current())
    assert note and "nb.ipynb" in note and "save" in note.lower()
    # Saved again: fine.
    now = time.time() + 10
    os.utime(notebook, (now, now))
    assert nbmod.unsaved_work_warning(notebook, log.before_current()) is None
