"""The Jupyter server extension: configuration, handlers, the embedded tracking lifecycle."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from jupyter_server.extension.application import ExtensionApp
from traitlets import Float, TraitError, Unicode, default, validate

from . import paths
from .compute.run_pace import SyncPace
from .compute.run_sync import RETRY_PAUSE
from .compute.runs import RunService
from .errors import InvalidRequest, MantikError
from .handlers import auth, backends, mlflow_proxy, projects, runs, token_proxy
from .tracking.credentials import CredentialStore
from .tracking.embedded import EmbeddedTrackingServer
from .tracking.service import TrackingService, check_http_uri


class MantikApp(ExtensionApp):
    name = "mantik_jupyter"
    description = "Run MLprojects on HPC from JupyterLab, tracked in MLflow"
    load_other_extensions = True

    tracking_uri = Unicode(
        None,
        allow_none=True,
        config=True,
        help="URI of a team's MLflow tracking server. Default: $MLFLOW_TRACKING_URI, "
        "else an embedded server started with the lab.",
    )
    data_dir = Unicode(
        config=True,
        help="Where mantik keeps the embedded tracking data and stored credentials.",
    )
    credentials_path = Unicode(
        config=True, help="The 0600 file holding tracking credentials, one per tracking URI."
    )
    embedded_startup_timeout = Float(
        90.0, config=True, help="Seconds the embedded MLflow server may take to become healthy."
    )
    embedded_hang_grace = Float(
        30.0,
        config=True,
        help="Seconds the running embedded MLflow server may leave /health unanswered, once "
        "a request to it went unanswered, before the lab starts it again.",
    )
    job_tracking_uri = Unicode(
        "",
        config=True,
        help="The address compute nodes use to reach the tracking server, when it differs "
        "from the lab's (e.g. a login node's name instead of 127.0.0.1). Default: the lab's.",
    )
    sync_interval = Float(
        10.0,
        config=True,
        help="Seconds between background refreshes of active runs' states (0: none); while "
        "every active run waits in the queue unchanged, up to 30 s.",
    )
    upload_stall_timeout = Float(
        60.0,
        config=True,
        help="Seconds an upload through the MLflow proxy may wait for the tracking server to "
        "read more of it (between two reads, not for the whole upload) before it is given up "
        "with a 504. Raise it for a tracking server whose artifact store pauses long.",
    )

    @validate("upload_stall_timeout")
    def _positive_stall_timeout(self, proposal: dict) -> float:
        value = float(proposal["value"])
        if value <= 0:
            raise TraitError(
                f"c.MantikApp.upload_stall_timeout must be a number of seconds above 0, got "
                f"{value:g}: an upload would be given up before the tracking server could read."
            )
        return value

    @default("tracking_uri")
    def _tracking_uri_default(self) -> str | None:
        return os.environ.get("MLFLOW_TRACKING_URI") or None

    @default("data_dir")
    def _data_dir_default(self) -> str:
        return str(paths.data_dir())

    @default("credentials_path")
    def _credentials_path_default(self) -> str:
        return str(Path(self.data_dir) / "credentials.json")

    def _check_tracking_uri(self, uri: str) -> None:
        """A URI that is no http(s) address ('localhost:5000', './mlruns') left the panel
        saying 'not logged in' and every call failing deep in the HTTP client. Jupyter goes
        on without an extension that fails to load: the reason is logged first, plainly."""
        configured = "tracking_uri" in self.config.get(self.__class__.__name__, {})
        source = "c.MantikApp.tracking_uri" if configured else "$MLFLOW_TRACKING_URI"
        try:
            check_http_uri(uri, source)
        except InvalidRequest as exc:
            self.log.error(
                "mantik: %s The Mantik panel, proxy and run endpoints are off until it is fixed.",
                exc.message,
            )
            raise

    def initialize_settings(self) -> None:
        if self.tracking_uri:
            self._check_tracking_uri(self.tracking_uri)
        store = CredentialStore(Path(self.credentials_path))
        # Kernels, terminals and the `mantik` command started from the lab find the same
        # tracking server and credential store (paths and URIs only, never a secret).
        os.environ["MANTIK_DATA_DIR"] = self.data_dir
        os.environ["MANTIK_CREDENTIALS_FILE"] = self.credentials_path
        if self.tracking_uri:
            os.environ["MANTIK_TRACKING_URI"] = self.tracking_uri
        if self.job_tracking_uri:
            os.environ["MANTIK_JOB_TRACKING_URI"] = self.job_tracking_uri
        self.embedded: EmbeddedTrackingServer | None = None
        if self.tracking_uri:
            self.tracking = TrackingService(store, tracking_uri=self.tracking_uri)
            self.log.info("mantik: using the tracking server %s", self.tracking.uri)
        else:
            self.embedded = EmbeddedTrackingServer(
                Path(self.data_dir) / "tracking",
                startup_timeout=self.embedded_startup_timeout,
                hang_grace=self.embedded_hang_grace,
            )
            # Spawned, not awaited: the lab starts while MLflow boots; requests wait for it.
            self.embedded.start()
            self.tracking = TrackingService(store, embedded=self.embedded)
        self.run_service = RunService(
            self.tracking,
            work_dir=Path(self.data_dir) / "runs",
            job_tracking_uri=self.job_tracking_uri or None,
            root_dir=Path(self.serverapp.root_dir),  # type: ignore[union-attr]  # set before
            retry_pause=RETRY_PAUSE,  # it syncs unasked: every interval, every refresh
        )
        self._sync_task: asyncio.Task[None] | None = None

    def initialize_handlers(self) -> None:
        # Before the proxy's Jupyter route, which Jupyter adds from ``self.handlers`` next.
        token_proxy.add_token_route(self.serverapp, self)  # type: ignore[arg-type]
        self.handlers.extend(
            auth.handlers + runs.handlers + projects.handlers + backends.handlers
            + mlflow_proxy.handlers
        )

    async def _start_jupyter_server_extension(self, serverapp: object) -> None:
        # Runs once the event loop is up; runs keep their states fresh while nobody polls.
        if self.sync_interval > 0:
            self._sync_task = asyncio.create_task(self._sync_loop())

    async def _sync_loop(self) -> None:
        last_error = ""
        pace = SyncPace(self.sync_interval)
        while True:
            await asyncio.sleep(pace.delay)
            try:
                runs = await asyncio.get_running_loop().run_in_executor(
                    None, self.run_service.sync
                )
                pace.after(runs)
                last_error = ""
            except asyncio.CancelledError:
                raise
            except MantikError as exc:
                # Not logged in, cluster down: worth one line, not one every interval.
                if exc.message != last_error:
                    self.log.warning("mantik: refreshing run states: %s", exc.message)
                last_error = exc.message
            except Exception:
                self.log.exception("mantik: refreshing run states failed")

    async def stop_extension(self) -> None:
        if getattr(self, "run_service", None) is None:
            return  # never set up: the configuration was refused at start
        if self._sync_task is not None:
            self._sync_task.cancel()
        # SSH connections to clusters; jobs keep running and are found again on restart.
        self.run_service.close()
        if self.embedded is not None:
            self.embedded.stop()
