"""The Jupyter server extension: configuration, handlers, the embedded tracking lifecycle."""

from __future__ import annotations

import os
from pathlib import Path

from jupyter_server.extension.application import ExtensionApp
from traitlets import Float, Unicode, default

from . import paths
from .handlers import auth, mlflow_proxy
from .tracking.credentials import CredentialStore
from .tracking.embedded import EmbeddedTrackingServer
from .tracking.service import TrackingService


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

    @default("tracking_uri")
    def _tracking_uri_default(self) -> str | None:
        return os.environ.get("MLFLOW_TRACKING_URI") or None

    @default("data_dir")
    def _data_dir_default(self) -> str:
        return str(paths.data_dir())

    @default("credentials_path")
    def _credentials_path_default(self) -> str:
        return str(Path(self.data_dir) / "credentials.json")

    def initialize_settings(self) -> None:
        store = CredentialStore(Path(self.credentials_path))
        self.embedded: EmbeddedTrackingServer | None = None
        if self.tracking_uri:
            self.tracking = TrackingService(store, tracking_uri=self.tracking_uri)
            self.log.info("mantik: using the tracking server %s", self.tracking_uri)
        else:
            self.embedded = EmbeddedTrackingServer(
                Path(self.data_dir) / "tracking", startup_timeout=self.embedded_startup_timeout
            )
            # Spawned, not awaited: the lab starts while MLflow boots; requests wait for it.
            self.embedded.start()
            self.tracking = TrackingService(store, embedded=self.embedded)

    def initialize_handlers(self) -> None:
        self.handlers.extend(auth.handlers + mlflow_proxy.handlers)

    async def stop_extension(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
