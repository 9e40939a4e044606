"""TEST INFRASTRUCTURE: fixtures for the UNICORE tests (the stand-in site on loopback)."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

from ..secret_audit import SECRETS
from .server import UnicoreStandin

USER = "alice"
PROJECT = "deepacf"

# Test doubles for the cluster's tools, on the stand-in's PATH: `module` accepts every
# load, `apptainer run [options] IMAGE bash -c CMD` runs CMD with this venv's Python
# (the "image" has mlflow and numpy).
FAKE_MODULE = """#!/bin/bash
echo "[fake-module] $*" >&2
exit 0
"""
FAKE_APPTAINER = f"""#!/bin/bash
echo "[fake-apptainer] $*" >&2
while [ $# -gt 0 ] && [ "$1" != "bash" ]; do shift; done
export PATH="{Path(sys.prefix) / "bin"}:$PATH"
exec "$@"
"""


def new_password() -> str:
    """A random password, registered with the session's secret audit."""
    password = secrets.token_urlsafe(18)
    SECRETS.add(password)
    return password


def start_site(base: Path, password: str) -> UnicoreStandin:
    """A stand-in site below ``base`` with user ``USER`` and the fake cluster tools."""
    tools = base / "bin"
    tools.mkdir()
    for name, text in (("module", FAKE_MODULE), ("apptainer", FAKE_APPTAINER)):
        (tools / name).write_text(text)
        (tools / name).chmod(0o755)
    return UnicoreStandin(
        base / "site",
        users={USER: password},
        queues=("batch", "devel"),
        projects=(PROJECT,),
        extra_path=[str(tools)],
        queue_delay=0.2,
        resubmit_delay=0.2,
    ).start()
