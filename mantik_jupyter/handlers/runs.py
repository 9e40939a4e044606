"""``runs``: submit, list, follow, cancel and download runs through the RunService.

The handlers only translate: query strings and JSON bodies become arguments of
the core's calls (run in a thread, they block on MLflow and the cluster), and
its results become JSON. Paths in a request that name files of the lab
(``project_dir``, ``backend_config``) are relative to the Jupyter root and may
not leave it; paths inside a run (``path``) are confined by the backend.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequest, UnsafePath
from .base import MantikAPIHandler

if TYPE_CHECKING:
    from ..compute.runs import RunService

SOURCES = ("lab", "notebook", "cli")
MAX_RESULTS_LIMIT = 1000
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class RunsBaseHandler(MantikAPIHandler):
    @property
    def runs(self) -> RunService:
        return self.mantik.run_service

    # ---- query and body parsing -------------------------------------------------------

    def query_str(self, name: str) -> str | None:
        value = self.get_query_argument(name, None)
        return value if value else None

    def query_int(
        self, name: str, default: int, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        raw = self.get_query_argument(name, None)
        if raw in (None, ""):
            return default
        try:
            value = int(raw)
        except ValueError:
            raise InvalidRequest(
                f"Query parameter '{name}' must be an integer, not {raw!r}."
            ) from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise InvalidRequest(f"Query parameter '{name}' must be {bound}, not {value}.")
        return value

    def root_path(self, rel: str, field: str) -> Path:
        """A path of the request inside the Jupyter root; anything leading out is refused."""
        root = Path(self.settings["server_root_dir"]).expanduser().resolve()
        if not rel or "\x00" in rel:
            raise InvalidRequest(
                f"'{field}' must be a non-empty path relative to the Jupyter root."
            )
        candidate = Path(rel)
        if candidate.is_absolute():
            raise UnsafePath(
                f"'{field}' must be relative to the Jupyter root, not the absolute path {rel!r}."
            )
        # resolve() follows symlinks, so a link pointing out of the root is caught too.
        resolved = (root / candidate).resolve()
        if not resolved.is_relative_to(root):
            raise UnsafePath(f"'{field}' {rel!r} leads out of the Jupyter root.")
        return resolved


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    """``body[name]`` if absent or of one of ``kinds``; JSON true/false is never a number."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise InvalidRequest(f"'{name}' must be {what}, not {_json_type(value)}.")
    return value


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "an array", dict: "an object"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def _params(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidRequest(f"'params' must be an object of name: value, not {_json_type(raw)}.")
    out: dict[str, str] = {}
    for key, value in raw.items():
        # MLproject parameters are strings on the command line; JSON numbers are a convenience.
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise InvalidRequest(
                f"'params.{key}' must be a string or a number, not {_json_type(value)}."
            )
        out[key] = str(value)
    return out


class RunsHandler(RunsBaseHandler):
    async def get(self) -> None:
        raw_ids = self.get_query_arguments("experiment_id")
        # Repeated (?experiment_id=1&experiment_id=2) or comma-separated both work.
        experiment_ids = [i for raw in raw_ids for i in raw.split(",") if i] or None
        runs, token = await self.in_thread(
            self.runs.list,
            experiment_ids=experiment_ids,
            experiment_name=self.query_str("experiment_name"),
            state=self.query_str("state"),
            max_results=self.query_int("max_results", 50, minimum=1, maximum=MAX_RESULTS_LIMIT),
            page_token=self.query_str("page_token"),
        )
        self.write_json({"runs": [r.to_json() for r in runs], "next_page_token": token})

    async def post(self) -> None:
        body = self.json_body()
        project_rel = _field(body, "project_dir", (str,), "a path relative to the Jupyter root")
        if not project_rel:
            raise InvalidRequest(
                "'project_dir' is required: the MLproject folder, relative to the Jupyter root."
            )
        project_dir = self.root_path(project_rel, "project_dir")
        config_rel = _field(body, "backend_config", (str,), "a path relative to the Jupyter root")
        backend_config = self._config_path(config_rel, project_dir) if config_rel else None
        experiment_id = _field(body, "experiment_id", (str, int), "a string")
        experiment_name = _field(body, "experiment_name", (str,), "a string")
        if experiment_id is not None and experiment_name is not None:
            raise InvalidRequest("Give 'experiment_name' or 'experiment_id', not both.")
        source = _field(body, "source", (str,), "a string") or "lab"
        if source not in SOURCES:
            raise InvalidRequest(f"'source' must be one of {', '.join(SOURCES)}, not {source!r}.")
        info = await self.in_thread(
            self.runs.submit,
            project_dir,
            backend_config=backend_config,
            entry_point=_field(body, "entry_point", (str,), "a string") or "main",
            params=_params(body.get("params")),
            experiment_name=experiment_name,
            experiment_id=str(experiment_id) if experiment_id is not None else None,
            run_name=_field(body, "run_name", (str,), "a string") or None,
            source=source,
        )
        self.write_json(info.to_json(), status=201)

    def _config_path(self, rel: str, project_dir: Path) -> Path:
        # As in Mantik, a config name is first looked up in the project folder; a path
        # relative to the Jupyter root works as well.
        root = Path(self.settings["server_root_dir"]).expanduser().resolve()
        in_project = project_dir / rel
        if not Path(rel).is_absolute() and in_project.exists():
            return self.root_path(str(in_project.relative_to(root)), "backend_config")
        return self.root_path(rel, "backend_config")


class RunHandler(RunsBaseHandler):
    async def get(self, ref: str) -> None:
        info = await self.in_thread(self.runs.get, ref)
        self.write_json(info.to_json())


class RunLogsHandler(RunsBaseHandler):
    async def get(self, ref: str) -> None:
        chunk = await self.in_thread(self.runs.logs, ref, self.query_int("offset", 0))
        self.write_json({"text": chunk.text, "offset": chunk.offset, "final": chunk.final})


class RunCancelHandler(RunsBaseHandler):
    async def post(self, ref: str) -> None:
        info = await self.in_thread(self.runs.cancel, ref)
        self.write_json(info.to_json())


class RunFilesHandler(RunsBaseHandler):
    async def get(self, ref: str) -> None:
        entries = await self.in_thread(self.runs.files, ref, self.get_query_argument("path", ""))
        self.write_json({"files": [asdict(e) for e in entries]})


class RunDownloadHandler(RunsBaseHandler):
    async def get(self, ref: str) -> None:
        path = self.get_query_argument("path", "")
        run_id = await self.in_thread(self.runs.resolve, ref)
        # The first chunk is read before any header is sent, so a failure to open
        # still becomes a JSON error with its own status.
        first, chunks, filename = await self.in_thread(self._open, run_id, path)
        try:
            self.set_header("Content-Type", "application/octet-stream")
            self.set_header("Content-Disposition", f'attachment; filename="{filename}"')
            self.set_header("X-Content-Type-Options", "nosniff")
            chunk = first
            while chunk is not None:
                self.write(chunk)
                # Back-pressure: at most one chunk waits in memory for a slow client.
                await self.flush()
                chunk = await self.in_thread(next, chunks, None)
            self.finish()
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                await self.in_thread(close)

    def _open(self, run_id: str, path: str) -> tuple[bytes | None, Iterator[bytes], str]:
        """First chunk, the rest, and a file name: a file of the run, or a tar of a folder."""
        name = _safe_name(posixpath.basename(path.strip("/"))) or f"run-{run_id[:8]}"
        if path.strip("/"):
            try:
                chunks = iter(self.runs.open_file(run_id, path))
                return next(chunks, None), chunks, name
            except InvalidRequest:
                # Most likely a folder; anything else is re-raised below.
                if not self._is_folder(run_id, path):
                    raise
        # Only a core that can stream a folder as one tar (one round trip) is used
        # for folders: fetching file by file would be slow and inconsistent.
        open_tar = getattr(self.runs, "open_tar", None)
        if open_tar is None:
            what = f"'{path}'" if path.strip("/") else "the run directory"
            raise InvalidRequest(
                f"{what} of run {run_id} is a folder; pick a file inside it "
                f"(GET runs/{run_id}/files?path={path}) or download the folder with "
                f"`mantik runs download {run_id} --remote-path '{path}'`."
            )
        chunks = iter(open_tar(run_id, path))
        return next(chunks, None), chunks, f"{name}.tar"

    def _is_folder(self, run_id: str, path: str) -> bool:
        wanted = path.strip("/")
        parent = posixpath.dirname(wanted)
        return any(
            e.is_dir and e.path.strip("/") == wanted for e in self.runs.files(run_id, parent)
        )


def _safe_name(name: str) -> str:
    """A file name that cannot break the header or point anywhere when saved."""
    return _SAFE_NAME.sub("_", name).strip("._")[:200]


_ID = r"(?P<ref>[^/]+)"
handlers = [
    (r"mantik/api/runs", RunsHandler),
    (rf"mantik/api/runs/{_ID}", RunHandler),
    (rf"mantik/api/runs/{_ID}/logs", RunLogsHandler),
    (rf"mantik/api/runs/{_ID}/cancel", RunCancelHandler),
    (rf"mantik/api/runs/{_ID}/files", RunFilesHandler),
    (rf"mantik/api/runs/{_ID}/download", RunDownloadHandler),
]
