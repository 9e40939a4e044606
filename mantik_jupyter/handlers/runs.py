"""``runs``: submit, list, follow, cancel and download runs through the RunService.

The handlers only translate: query strings and JSON bodies become arguments of
the core's calls (run in a thread: they block on MLflow and the cluster), and
its results become JSON. Paths naming files of the lab (``project_dir``,
``backend_config``) are relative to the Jupyter root; the RunService of the lab
is built with that root and refuses anything leading out of it (UnsafePath).
Paths inside a run (``path``) are confined to the run directory by the backend.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from jupyter_server.auth.decorator import authorized
from tornado import web
from tornado.iostream import StreamClosedError

from ..compute.backends.base import describe_error
from ..errors import InvalidRequest, MantikError
from ..tracking.service import run_page_url
from .base import MantikAPIHandler

if TYPE_CHECKING:
    from ..compute.run_record import RunInfo
    from ..compute.runs import RunService

MAX_RESULTS_LIMIT = 1000
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")
_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


class RunsBaseHandler(MantikAPIHandler):
    @property
    def runs(self) -> RunService:
        return self.mantik.run_service

    def run_json(self, info: RunInfo) -> dict[str, Any]:
        """A run as JSON, with ``mlflow_url`` (its page in the MLflow UI, through this lab)
        and ``not_followed``: why this installation does not follow it (the message its
        logs, files, downloads and cancel answer 403 with), else None. The sidebar greys
        out those actions up front; the run list's warnings say this only for active runs,
        and only after a sync."""
        out = info.to_json()
        out["not_followed"] = self.runs.not_followed(info)
        uri = self.runs.tracking.uri
        out["mlflow_url"] = run_page_url(info.experiment_id, info.run_id, uri, self.base_url)
        return out

    def query_str(self, name: str) -> str | None:
        return self.get_query_argument(name, None) or None

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

    def query_bool(self, name: str) -> bool:
        raw = (self.get_query_argument(name, "") or "").lower()
        if raw == "":
            return False
        if raw not in _BOOLS:
            raise InvalidRequest(
                f"Query parameter '{name}' must be true or false (or 1/0, yes/no), not {raw!r}."
            )
        return _BOOLS[raw]


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "an array", dict: "an object"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    """``body[name]`` when absent or of one of ``kinds``; JSON true/false is never a number."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise InvalidRequest(f"'{name}' must be {what}, not {_json_type(value)}.")
    return value


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
    @web.authenticated
    @authorized
    async def get(self) -> None:
        # Repeated (?experiment_id=1&experiment_id=2) and comma-separated ids both work.
        raw_ids = self.get_query_arguments("experiment_id")
        experiment_ids = [i for raw in raw_ids for i in raw.split(",") if i] or None
        runs, token = await self.in_thread(
            self.runs.list,
            experiment_ids=experiment_ids,
            experiment_name=self.query_str("experiment_name"),
            state=self.query_str("state"),
            max_results=self.query_int("max_results", 50, minimum=1, maximum=MAX_RESULTS_LIMIT),
            page_token=self.query_str("page_token"),
            # The lab syncs active runs in the background; ask for a sync only when needed.
            refresh=self.query_bool("refresh"),
        )
        # Checking a binding may read trusted key files: not on the event loop.
        listed = await self.in_thread(lambda: [self.run_json(r) for r in runs])
        self.write_json({"runs": listed, "next_page_token": token})

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.json_body()
        project_dir = _field(body, "project_dir", (str,), "a path relative to the Jupyter root")
        if not project_dir:
            raise InvalidRequest(
                "'project_dir' is required: the MLproject folder, relative to the Jupyter root."
            )
        experiment_id = _field(body, "experiment_id", (str, int), "a string")
        info = await self.in_thread(
            self.runs.submit,
            project_dir,
            backend_config=_field(body, "backend_config", (str,), "a path") or None,
            entry_point=_field(body, "entry_point", (str,), "a string") or "main",
            params=_params(body.get("params")),
            experiment_name=_field(body, "experiment_name", (str,), "a string") or None,
            experiment_id=str(experiment_id) if experiment_id is not None else None,
            run_name=_field(body, "run_name", (str,), "a string") or None,
            source=_field(body, "source", (str,), "a string") or "lab",
        )
        self.write_json(self.run_json(info), status=201)


class ExperimentsHandler(RunsBaseHandler):
    """The experiments the user may read, by name: the sidebar names a run's experiment
    (a run carries only its id) and filters the list by one (``GET runs?experiment_id``)."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.write_json({"experiments": await self.in_thread(self.runs.experiments)})


class RunHandler(RunsBaseHandler):
    @web.authenticated
    @authorized
    async def get(self, ref: str) -> None:
        info = await self.in_thread(self.runs.get, ref)
        self.write_json(self.run_json(info))


class RunLogsHandler(RunsBaseHandler):
    @web.authenticated
    @authorized
    async def get(self, ref: str) -> None:
        chunk = await self.in_thread(self.runs.logs, ref, self.query_int("offset", 0))
        self.write_json({"text": chunk.text, "offset": chunk.offset, "final": chunk.final})


class RunCancelHandler(RunsBaseHandler):
    @web.authenticated
    @authorized
    async def post(self, ref: str) -> None:
        info = await self.in_thread(self.runs.cancel, ref)
        self.write_json(self.run_json(info))


class RunFilesHandler(RunsBaseHandler):
    @web.authenticated
    @authorized
    async def get(self, ref: str) -> None:
        entries = await self.in_thread(self.runs.files, ref, self.get_query_argument("path", ""))
        self.write_json({"files": [asdict(e) for e in entries]})


class RunDownloadHandler(RunsBaseHandler):
    """A file of the run as it is; a folder (``path`` empty: the whole run directory) as
    one zip archive made while it streams (``RunService.open_archive``)."""

    @web.authenticated
    @authorized
    async def get(self, ref: str) -> None:
        path = self.get_query_argument("path", "")
        run_id = await self.in_thread(self.runs.resolve, ref)
        # The first chunk is read before any header is sent, so a failure to open
        # still becomes a JSON error with its own status.
        first, chunks, filename, kind = await self.in_thread(self._open, run_id, path)
        try:
            self.set_header("Content-Type", kind)
            self.set_header("Content-Disposition", _disposition(filename))
            self.set_header("X-Content-Type-Options", "nosniff")
            chunk = first
            while chunk is not None:
                self.write(chunk)
                # Back-pressure: at most one chunk waits in memory for a slow client.
                await self.flush()
                chunk = await self.in_thread(next, chunks, None)
            self.finish()
        except StreamClosedError:
            # The browser went away (the user cancelled the download): nothing to answer,
            # and not an error of the server's.
            self.log.info("Download of %r from run %s stopped by the client.", path, run_id)
        except Exception as exc:
            # The status and the first bytes went out: an error answer can no longer be
            # sent, and finishing the response would have the browser keep a cut-off file
            # as complete. The connection is dropped instead, so the browser says the
            # download failed.
            said = exc.message if isinstance(exc, MantikError) else describe_error(exc)
            self.log.warning("Download of %r from run %s failed half-way: %s", path, run_id, said)
            if not isinstance(exc, MantikError):
                self.log.debug("The failed download's traceback:", exc_info=True)
            self.request.connection.close()  # type: ignore[union-attr]
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                await self.in_thread(close)

    def _open(self, run_id: str, path: str) -> tuple[bytes | None, Iterator[bytes], str, str]:
        """First chunk, the rest, the file name and the content type."""
        wanted = path.strip("/")
        if wanted:
            try:
                chunks = iter(self.runs.open_file(run_id, path))
                return next(chunks, None), chunks, posixpath.basename(wanted), _OCTETS
            except InvalidRequest:
                # A folder, most likely: the archive's own check says what else it is.
                pass
        archive = self.runs.open_archive(run_id, path)
        return next(archive.chunks, None), archive.chunks, archive.filename, "application/zip"


_OCTETS = "application/octet-stream"


def _safe_filename(name: str) -> str:
    """A name that cannot break the header or point anywhere when the browser saves it."""
    return _UNSAFE_FILENAME.sub("_", name).strip("._")[:200]


def _disposition(name: str) -> str:
    """``attachment`` with an ASCII file name, and the name itself (RFC 6266 ``filename*``)
    when the ASCII one had to replace letters: ``Jülich.csv`` is saved as ``Jülich.csv``,
    not ``J_lich.csv``. Browsers drop path separators from either."""
    fallback = _safe_filename(name) or "download"
    header = f'attachment; filename="{fallback}"'
    exact = "".join(c for c in name if c.isprintable()).strip().lstrip(".")[:200]
    if exact and exact != fallback:
        header += f"; filename*=UTF-8''{quote(exact, safe='')}"
    return header


_REF = r"(?P<ref>[^/]+)"
handlers = [
    (r"mantik/api/runs", RunsHandler),
    (r"mantik/api/experiments", ExperimentsHandler),
    (rf"mantik/api/runs/{_REF}", RunHandler),
    (rf"mantik/api/runs/{_REF}/logs", RunLogsHandler),
    (rf"mantik/api/runs/{_REF}/cancel", RunCancelHandler),
    (rf"mantik/api/runs/{_REF}/files", RunFilesHandler),
    (rf"mantik/api/runs/{_REF}/download", RunDownloadHandler),
]
