"""Where mantik keeps its files on the lab's machine."""

from __future__ import annotations

import os
from pathlib import Path

from jupyter_core.paths import jupyter_data_dir


def data_dir() -> Path:
    """The root of mantik's own files: ``$MANTIK_DATA_DIR`` or ``<jupyter data dir>/mantik``."""
    env = os.environ.get("MANTIK_DATA_DIR")
    return Path(env) if env else Path(jupyter_data_dir()) / "mantik"


def credentials_file() -> Path:
    env = os.environ.get("MANTIK_CREDENTIALS_FILE")
    return Path(env) if env else data_dir() / "credentials.json"


def embedded_dir() -> Path:
    return data_dir() / "tracking"


def run_key_file() -> Path:
    """This installation's key that signs the backend binding of the runs it submits."""
    return data_dir() / "run-key.json"


def trusted_run_keys_dir() -> Path:
    """Keys of other installations of the same user (their ``run-key.json`` copied
    here): their runs are followed here too."""
    return data_dir() / "trusted-run-keys"
