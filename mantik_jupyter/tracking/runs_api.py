"""MLflow queries the RunService needs, over MLflow's REST API with an explicit credential.

Everything goes through ``TrackingClient`` (per-call credential, domain errors), so the
lab never puts a tracking secret into its process environment. Artifacts are uploaded
through the tracking server's artifact proxy (``mlflow-artifacts:/`` URIs, what
``mlflow server --artifacts-destination`` and the embedded server use): the run's
artifact URI ``mlflow-artifacts:/<experiment_id>/<run_id>/artifacts`` maps to the proxy
path ``<experiment_id>/<run_id>/artifacts/<path>`` of
``/api/2.0/mlflow-artifacts/artifacts/``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from ..errors import InvalidRequest, NotFound
from .rest import TrackingClient

# MLflow's limits for one runs/log-batch call.
MAX_TAGS_PER_BATCH = 100
MAX_PARAMS_PER_BATCH = 100
ACTIVE_ONLY = "ACTIVE_ONLY"
# MLflow's limits for metric histories: one get-history page, and per run / runs per
# request of get-history-bulk-interval.
MAX_HISTORY_PAGE = 25000
MAX_SAMPLED_PER_RUN = 2500
MAX_RUNS_PER_BULK = 100
# Run ids per runs/search of ``runs_by_id``: MLflow sets no limit on an IN list, but its
# SQL stores bind one parameter per id (older SQLite allows 999 in a statement).
MAX_IDS_PER_SEARCH = 100
_RUN_ID = re.compile(r"[0-9a-f]{32}")


def now_ms() -> int:
    return int(time.time() * 1000)


def quote_filter_value(value: str) -> str:
    """A string literal for MLflow's search filter (single quotes, escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def tag_key(key: str) -> str:
    """``tags.`mantik.state``` — backticks let a key hold dots."""
    if "`" in key:
        raise ValueError(f"tag key {key!r} cannot be used in a filter")
    return f"tags.`{key}`"


class RunsApi:
    """Thin, typed wrappers of the MLflow REST calls for experiments, runs and artifacts."""

    def __init__(self, client: TrackingClient) -> None:
        self.client = client

    # ---- experiments ------------------------------------------------------------------

    def get_experiment(self, experiment_id: str) -> dict[str, Any]:
        try:
            return self.client.api("GET", "experiments/get", experiment_id=str(experiment_id))[
                "experiment"
            ]
        except NotFound:
            raise NotFound(
                f"No experiment with id {experiment_id!r} on {self.client.uri}"
            ) from None

    def get_experiment_by_name(self, name: str) -> dict[str, Any] | None:
        try:
            return self.client.api("GET", "experiments/get-by-name", experiment_name=name)[
                "experiment"
            ]
        except NotFound:
            return None

    def create_experiment(self, name: str) -> str:
        return str(self.client.api("POST", "experiments/create", name=name)["experiment_id"])

    def get_or_create_experiment(self, name: str) -> tuple[str, bool]:
        """The id of the experiment ``name`` (created when missing) and whether it was new."""
        found = self.get_experiment_by_name(name)
        if found is not None:
            if found.get("lifecycle_stage") == "deleted":
                raise InvalidRequest(
                    f"The experiment {name!r} is deleted on {self.client.uri}: restore it in "
                    "the MLflow UI or choose another experiment name."
                )
            return str(found["experiment_id"]), False
        try:
            return self.create_experiment(name), True
        except InvalidRequest:
            # Created by someone else in between (RESOURCE_ALREADY_EXISTS).
            again = self.get_experiment_by_name(name)
            if again is None:
                raise
            return str(again["experiment_id"]), False

    def search_experiments(self, max_results: int = 1000) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            body: dict[str, Any] = {"max_results": max_results, "view_type": ACTIVE_ONLY}
            if token:
                body["page_token"] = token
            answer = self.client.api("POST", "experiments/search", **body)
            yield from answer.get("experiments", [])
            token = answer.get("next_page_token")
            if not token:
                return

    # ---- runs -------------------------------------------------------------------------

    def create_run(
        self,
        experiment_id: str,
        *,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        start_time: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "experiment_id": str(experiment_id),
            "start_time": start_time if start_time is not None else now_ms(),
            "tags": [{"key": k, "value": str(v)} for k, v in (tags or {}).items()],
        }
        if run_name:
            body["run_name"] = run_name
        return self.client.api("POST", "runs/create", **body)["run"]

    def get_run(self, run_id: str) -> dict[str, Any]:
        try:
            return self.client.api("GET", "runs/get", run_id=run_id)["run"]
        except NotFound:
            raise NotFound(f"No run {run_id!r} on the tracking server {self.client.uri}") from None
        except InvalidRequest as exc:
            # MLflow answers a malformed id with INVALID_PARAMETER_VALUE.
            raise NotFound(f"No run {run_id!r} on {self.client.uri} ({exc.message})") from None

    def update_run(
        self, run_id: str, *, status: str | None = None, end_time: int | None = None
    ) -> None:
        body: dict[str, Any] = {"run_id": run_id}
        if status is not None:
            body["status"] = status
        if end_time is not None:
            body["end_time"] = end_time
        self.client.api("POST", "runs/update", **body)

    def log_batch(
        self,
        run_id: str,
        *,
        tags: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> None:
        tag_items = [{"key": k, "value": str(v)} for k, v in (tags or {}).items()]
        param_items = [{"key": k, "value": str(v)} for k, v in (params or {}).items()]
        while tag_items or param_items:
            body: dict[str, Any] = {"run_id": run_id}
            if tag_items:
                body["tags"], tag_items = (
                    tag_items[:MAX_TAGS_PER_BATCH],
                    tag_items[MAX_TAGS_PER_BATCH:],
                )
            if param_items:
                body["params"], param_items = (
                    param_items[:MAX_PARAMS_PER_BATCH],
                    param_items[MAX_PARAMS_PER_BATCH:],
                )
            self.client.api("POST", "runs/log-batch", **body)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        if tags:
            self.log_batch(run_id, tags=tags)

    def delete_tag(self, run_id: str, key: str) -> None:
        try:
            self.client.api("POST", "runs/delete-tag", run_id=run_id, key=key)
        except NotFound:
            pass

    def search_runs(
        self,
        experiment_ids: Iterable[str],
        *,
        filter_string: str = "",
        max_results: int = 100,
        page_token: str | None = None,
        order_by: Iterable[str] = ("attributes.start_time DESC",),
    ) -> tuple[list[dict[str, Any]], str | None]:
        ids = [str(i) for i in experiment_ids]
        if not ids:
            return [], None
        body: dict[str, Any] = {
            "experiment_ids": ids,
            "filter": filter_string,
            "max_results": max_results,
            "run_view_type": ACTIVE_ONLY,
            "order_by": list(order_by),
        }
        if page_token:
            body["page_token"] = page_token
        answer = self.client.api("POST", "runs/search", **body)
        return answer.get("runs", []), answer.get("next_page_token") or None

    def iter_runs(
        self, experiment_ids: Iterable[str], *, filter_string: str = "", page_size: int = 1000
    ) -> Iterator[dict[str, Any]]:
        ids = [str(i) for i in experiment_ids]
        # Keep requests small even for users with very many experiments.
        for start in range(0, len(ids), 100):
            token: str | None = None
            while True:
                runs, token = self.search_runs(
                    ids[start : start + 100],
                    filter_string=filter_string,
                    max_results=page_size,
                    page_token=token,
                )
                yield from runs
                if not token:
                    break

    def runs_by_id(
        self, run_ids: Iterable[str], experiment_ids: Iterable[str]
    ) -> dict[str, dict[str, Any]]:
        """The active runs among ``run_ids`` that are in ``experiment_ids``, by id: one
        ``runs/search`` per ``MAX_IDS_PER_SEARCH`` ids (``attributes.run_id IN (...)``), and
        per 100 experiments, instead of a ``runs/get`` per run. Ids that are not 32 hex
        digits, deleted runs and runs the user may not read are not in the answer."""
        ids = list(dict.fromkeys(i for i in run_ids if _RUN_ID.fullmatch(i)))
        experiments = list(dict.fromkeys(str(e) for e in experiment_ids))
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), MAX_IDS_PER_SEARCH):
            chunk = ids[start : start + MAX_IDS_PER_SEARCH]
            listed = ", ".join(quote_filter_value(i) for i in chunk)
            # One more than can match: MLflow hands out a next page token when a page is
            # full, and following it would cost a request that finds nothing.
            for run in self.iter_runs(
                experiments,
                filter_string=f"attributes.run_id IN ({listed})",
                page_size=len(chunk) + 1,
            ):
                found[run["info"]["run_id"]] = run
        return found

    # ---- metric histories -------------------------------------------------------------

    def metric_history(
        self, run_id: str, key: str, *, page_size: int = MAX_HISTORY_PAGE
    ) -> list[dict[str, Any]]:
        """Every logged value of metric ``key`` of a run (``metrics/get-history``, paged)."""
        out: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            body: dict[str, Any] = {"run_id": run_id, "metric_key": key, "max_results": page_size}
            if token:
                body["page_token"] = token
            answer = self.client.api("GET", "metrics/get-history", **body)
            out += answer.get("metrics", [])
            token = answer.get("next_page_token")
            if not token:
                return out

    def metric_history_sampled(
        self, run_ids: Iterable[str], key: str, *, max_results: int = MAX_SAMPLED_PER_RUN
    ) -> dict[str, list[dict[str, Any]]] | None:
        """Up to ``max_results`` values of ``key`` per run, sampled evenly by the server
        (``metrics/get-history-bulk-interval``: first and last point always kept), at most
        100 runs per request. A run with fewer values gets all of them. ``None`` when the
        server does not offer the endpoint (older MLflow, other servers)."""
        ids = list(dict.fromkeys(str(i) for i in run_ids))
        result: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        for start in range(0, len(ids), MAX_RUNS_PER_BULK):
            params: dict[str, Any] = {
                "run_ids": ids[start : start + MAX_RUNS_PER_BULK],
                "metric_key": key,
                "max_results": max(1, min(max_results, MAX_SAMPLED_PER_RUN)),
            }
            try:
                resp = self.client.request(
                    "GET", "ajax-api/2.0/mlflow/metrics/get-history-bulk-interval", params=params
                )
            except NotFound:
                return None
            for metric in (resp.json() if resp.content else {}).get("metrics", []):
                result.setdefault(metric.get("run_id", ""), []).append(metric)
        return result

    # ---- artifacts --------------------------------------------------------------------

    def artifact_proxy_path(self, run: Mapping[str, Any], path: str) -> str:
        """The proxy path of a run artifact; only ``mlflow-artifacts:`` URIs are supported."""
        uri = run["info"]["artifact_uri"]
        parsed = urlparse(uri)
        if parsed.scheme != "mlflow-artifacts":
            raise InvalidRequest(
                f"The run's artifact location {uri} is not served by the tracking server "
                "(mlflow-artifacts:/...). Start the tracking server with "
                "--artifacts-destination (or --serve-artifacts) so that runs can store "
                "artifacts through it."
            )
        base = parsed.path.strip("/")
        return f"{base}/{path.strip('/')}" if path.strip("/") else base

    def upload_artifact(
        self, run: Mapping[str, Any], path: str, data: BinaryIO | bytes | Path
    ) -> None:
        """Store ``data`` as the artifact ``path`` (e.g. ``mantik/mantik.log``) of ``run``."""
        target = self.artifact_proxy_path(run, path)
        if isinstance(data, Path):
            with data.open("rb") as fh:
                self.client.upload_artifact(target, fh)
        else:
            self.client.upload_artifact(target, data)

    def download_artifact(self, run: Mapping[str, Any], path: str) -> Iterator[bytes]:
        return self.client.download_artifact(self.artifact_proxy_path(run, path))

    def list_artifacts(self, run_id: str, path: str = "") -> list[dict[str, Any]]:
        """Entries ``{path, is_dir, file_size}`` directly below ``path`` of the run."""
        body: dict[str, Any] = {"run_id": run_id}
        if path:
            body["path"] = path
        files: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            if token:
                body["page_token"] = token
            answer = self.client.api("GET", "artifacts/list", **body)
            files += answer.get("files", [])
            token = answer.get("next_page_token")
            if not token:
                return files


def run_tags(run: Mapping[str, Any]) -> dict[str, str]:
    return {t["key"]: t.get("value", "") for t in run.get("data", {}).get("tags", [])}


def run_params(run: Mapping[str, Any]) -> dict[str, str]:
    return {p["key"]: p.get("value", "") for p in run.get("data", {}).get("params", [])}


def run_metrics(run: Mapping[str, Any]) -> dict[str, float]:
    return {m["key"]: float(m.get("value", 0.0)) for m in run.get("data", {}).get("metrics", [])}
