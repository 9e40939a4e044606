"""``projects``: what the "Submit to HPC" form needs to know about an MLproject.

``GET mantik/api/projects?path=<file or folder relative to the Jupyter root>`` finds the
nearest MLproject at or above ``path`` (never above the root), and answers with its entry
points and declared parameters, the compute backend config files of its folder (each
checked by the core's config loader, so the form can show a config error before submitting)
and the config the RunService would pick by default.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import yaml
from jupyter_server.auth.decorator import authorized
from tornado import web

from ..compute.backends.paths import usable_path
from ..compute.config import find_config, load_config
from ..compute.project import find_project_dir, load_project
from ..errors import InvalidRequest, MantikError, NotFound, UnsafePath
from .base import MantikAPIHandler

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# Top-level keys of which at least one makes a YAML/JSON file look like a compute config.
CONFIG_MARKERS = frozenset({"UnicoreApiUrl", "SSH", "Firecrest", "Local", "Resources"})
# Larger files are data, not configs: never parsed.
MAX_CONFIG_BYTES = 256 * 1024


def _looks_like_config(path: Path) -> bool:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            return False
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and bool(CONFIG_MARKERS.intersection(map(str, data)))


def _check_config(path: Path) -> dict[str, Any]:
    """The core's verdict on one config file: its backend, or the error and warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = load_config(path)
        except MantikError as exc:
            return {"ok": False, "error": exc.message, "warnings": []}
    notes = [str(w.message) for w in caught]
    return {"ok": True, "backend": config.backend, "error": None, "warnings": notes}


def describe_project(root: Path, path: str) -> dict[str, Any]:
    """Describe the MLproject that ``path`` (relative to ``root``) belongs to."""
    root = root.expanduser().resolve()
    usable_path(path, "project path")
    relative = Path(path or ".")
    if relative.is_absolute():
        raise UnsafePath(f"{path} must be relative to the Jupyter root, not absolute.")
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise UnsafePath(f"{path} is not inside the Jupyter root.")
    if not target.exists():
        raise NotFound(f"{path} does not exist in the Jupyter root.")
    project_dir = find_project_dir(target, root=root)
    project = load_project(project_dir).describe()
    default = find_config(project_dir)
    # The default config is listed whatever its keys: a submission uses it, and one whose
    # top-level keys are all misspelled ('Locl', 'Resource') is what the check is for.
    configs = sorted(
        p.name
        for p in project_dir.iterdir()
        if p.is_file()
        and p.suffix.lower() in CONFIG_SUFFIXES
        and (p == default or _looks_like_config(p))
    )
    return {
        "project_dir": project_dir.relative_to(root).as_posix() or ".",
        "name": project["name"] or project_dir.name,
        "entry_points": {
            ep["name"]: {"command": ep["command"], "parameters": ep["parameters"]}
            for ep in project["entry_points"]
        },
        "config_files": configs,
        "config_checks": {name: _check_config(project_dir / name) for name in configs},
        "default_config": default.name if default is not None else None,
    }


class ProjectHandler(MantikAPIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        path = self.get_query_argument("path", None)
        if path is None:
            raise InvalidRequest(
                "Query parameter 'path' is required: a file or folder relative to the Jupyter root."
            )
        root = Path(self.serverapp.root_dir)
        self.write_json(await self.in_thread(describe_project, root, path))


handlers = [(r"mantik/api/projects", ProjectHandler)]
