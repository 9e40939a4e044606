"""Where the kernel's notebook is, which Jupyter server runs it, and whether it is saved."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ProjectError

_KERNEL_ID = re.compile(r"kernel-([0-9a-fA-F-]{8,})\.json$")
SESSIONS_TIMEOUT = 3.0


@dataclass(frozen=True)
class ServerInfo:
    url: str
    base_url: str
    token: str
    root_dir: Path | None


@dataclass(frozen=True)
class NotebookLocation:
    path: Path | None  # the notebook file, when there is one
    how: str  # "JPY_SESSION_NAME", "sessions API", "--path", "working directory"
    server: ServerInfo | None = None


def kernel_id() -> str | None:
    """The id of this kernel: its connection file is named ``kernel-<id>.json``."""
    try:
        from ipykernel.connect import get_connection_file

        name = Path(get_connection_file()).name
    except Exception:  # noqa: BLE001 - not a kernel (plain IPython)
        return None
    match = _KERNEL_ID.search(name)
    return match.group(1) if match else None


def running_servers() -> list[ServerInfo]:
    try:
        from jupyter_server.serverapp import list_running_servers
    except ImportError:
        return []
    out = []
    try:
        for info in list_running_servers():
            root = info.get("root_dir") or info.get("notebook_dir")
            out.append(
                ServerInfo(
                    url=info.get("url", ""),
                    base_url=info.get("base_url", "/"),
                    token=info.get("token", ""),
                    root_dir=Path(root) if root else None,
                )
            )
    except (OSError, ValueError):
        return []
    return out


def _sessions(server: ServerInfo) -> list[dict[str, Any]]:
    import requests

    headers = {"Authorization": f"token {server.token}"} if server.token else {}
    try:
        resp = requests.get(
            server.url.rstrip("/") + "/api/sessions", headers=headers, timeout=SESSIONS_TIMEOUT
        )
    except requests.RequestException:
        return []
    if resp.status_code != 200:
        return []
    try:
        data = resp.json()
    except ValueError:
        return []
    return data if isinstance(data, list) else []


def find_via_sessions(kid: str | None) -> tuple[Path | None, ServerInfo | None]:
    """Ask each running Jupyter server which session owns this kernel."""
    if not kid:
        return None, None
    for server in running_servers():
        for session in _sessions(server):
            if (session.get("kernel") or {}).get("id") != kid:
                continue
            rel = session.get("path") or ""
            if server.root_dir is not None and rel:
                return (server.root_dir / rel).resolve(), server
            return None, server
    return None, None


def _from_session_name(value: str) -> Path | None:
    """``JPY_SESSION_NAME``: an absolute path, or one relative to the server's root.

    The kernel runs in the notebook's folder, so the root is the working directory
    with the relative path's folders taken off its end.
    """
    path = Path(value)
    if path.is_absolute():
        return path if path.is_file() else None
    cwd = Path.cwd()
    parents = path.parent.parts
    candidates = [cwd / path.name, cwd / path]
    if parents and cwd.parts[-len(parents) :] == parents:
        candidates.insert(0, cwd.parents[len(parents) - 1] / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    return None


def find_notebook(explicit: str | None = None) -> NotebookLocation:
    """The notebook (or folder) to submit from: ``--path``, else ``JPY_SESSION_NAME``, else
    the Jupyter sessions API by kernel id, else the working directory (plain IPython)."""
    if explicit:
        path = Path(explicit).expanduser().resolve()
        if not path.exists():
            raise ProjectError(f"--path {explicit}: no such notebook or folder ({path}).")
        return NotebookLocation(path if path.is_file() else None, "--path")
    name = os.environ.get("JPY_SESSION_NAME")
    if name:
        found = _from_session_name(name)
        if found is not None:
            return NotebookLocation(found, "JPY_SESSION_NAME")
    found, server = find_via_sessions(kernel_id())
    if found is not None:
        return NotebookLocation(found, "sessions API", server)
    return NotebookLocation(None, "working directory", server)


def start_dir(location: NotebookLocation, explicit: str | None) -> Path:
    """Where the search for the MLproject starts."""
    if location.path is not None:
        return location.path.parent
    if explicit:
        return Path(explicit).expanduser().resolve()
    return Path.cwd()


_BASE_URLS: dict[str, str | None] = {}


def lab_base_url(location: NotebookLocation | None = None) -> str | None:
    """The base URL of the lab this kernel belongs to (``/`` or ``/user/x/``), or None
    without one (plain IPython, a kernel no running Jupyter server knows)."""
    if location is not None and location.server is not None:
        return location.server.base_url
    kid = kernel_id()
    if kid is None:
        return None
    if kid not in _BASE_URLS:
        _, server = find_via_sessions(kid)
        prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX")
        if server is not None:
            _BASE_URLS[kid] = server.base_url
        elif prefix:
            _BASE_URLS[kid] = prefix if prefix.endswith("/") else prefix + "/"
        else:
            _BASE_URLS[kid] = None
    return _BASE_URLS[kid]


# ---- unsaved work ---------------------------------------------------------------------------


class ExecutionLog:
    """Start times and sources of the cells this kernel ran (fed by ``pre_run_cell``)."""

    def __init__(self, limit: int = 50) -> None:
        self.limit = limit
        self.cells: list[tuple[float, str]] = []

    def record(self, source: str, when: float | None = None) -> None:
        self.cells.append((time.time() if when is None else when, source or ""))
        del self.cells[: -self.limit]

    def before_current(self) -> list[tuple[float, str]]:
        """Every recorded cell except the one running now (the last)."""
        return self.cells[:-1]


def _normalise(source: str) -> str:
    return "\n".join(line.rstrip() for line in source.strip().splitlines())


def unsaved_work_warning(notebook: Path, executed: list[tuple[float, str]]) -> str | None:
    """A warning when cells ran after the notebook was last saved and the saved file
    does not contain them (edited or new cells): the submission would not include them.

    Cheap: one ``stat`` and, only when the file is older than the last execution, one read.
    """
    if not executed:
        return None
    try:
        mtime = notebook.stat().st_mtime
    except OSError:
        return None
    last = max(t for t, _ in executed)
    if mtime >= last - 1.0:
        return None
    try:
        data = json.loads(notebook.read_text(encoding="utf-8"))
        saved = {
            _normalise(
                "".join(c.get("source", ""))
                if isinstance(c.get("source"), list)
                else c.get("source", "")
            )
            for c in data.get("cells", [])
            if c.get("cell_type") == "code"
        }
    except (OSError, ValueError, AttributeError):
        return None
    missing = [
        src
        for t, src in executed
        if t > mtime
        and _normalise(src)
        and _normalise(src) not in saved
        and not src.lstrip().startswith(("%mantik", "get_ipython().run_line_magic('mantik"))
    ]
    if not missing:
        return None
    saved_at = time.strftime("%H:%M:%S", time.localtime(mtime))
    return (
        f"{notebook.name} on disk (saved {saved_at}) does not contain {len(missing)} cell(s) "
        "you ran since: save the notebook (Ctrl+S) so the submitted code matches what you ran."
    )
