"""The backends of a ``RunService``: one per backend spec (the ``mantik.backend_spec``
tag, no secrets), shared by the runs that use it, so its connection is reused."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import ConfigError, Conflict, NotFound
from ..tracking.runs_api import run_tags
from ..tracking.service import TrackingService
from .backends.base import Backend, Capabilities
from .backends.local import LocalBackend
from .backends.ssh_slurm import SshSlurmBackend
from .backends.unicore import UnicoreBackend
from .config import ENV_SSH_PASSWORD, ENV_SSH_PRIVATE_KEY, ENV_SSH_USERNAME, ComputeConfig
from .run_record import TAG_BACKEND_SPEC, TAG_JOB_ID, TAG_RUN_DIR


def backend_kinds() -> list[dict]:
    """For ``RunService.backends``: each kind's capabilities and its config key."""

    def entry(caps: Capabilities, key: str, supported: bool = True) -> dict:
        return {**asdict(caps), "config_key": key, "supported": supported}

    return [
        entry(SshSlurmBackend.capabilities, "SSH"),
        entry(LocalBackend.capabilities, "Local"),
        entry(UnicoreBackend.capabilities, "UnicoreApiUrl"),
        entry(
            Capabilities(name="firecrest", description="FirecREST sites (coming soon)"),
            "Firecrest",
            False,
        ),
    ]


class BackendPool:
    """Backends by spec, made on first use. ``local_dir``: where the local backend runs
    jobs when the config names no directory; ``tracking`` holds the credentials stored
    for UNICORE sites."""

    def __init__(self, tracking: TrackingService, *, local_dir: Path) -> None:
        self.tracking = tracking
        self.local_dir = local_dir
        self._backends: dict[str, Backend] = {}
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            for backend in self._backends.values():
                backend.close()
            self._backends.clear()

    def spec_for(self, config: ComputeConfig) -> dict[str, Any]:
        if config.backend == "ssh":
            assert config.ssh is not None
            return {"kind": "ssh", **config.ssh.to_dict()}
        if config.backend == "local":
            directory = config.local.directory if config.local else None
            if directory:
                path = Path(directory).expanduser()
                if not path.is_absolute():
                    path = config.source.parent / path
            else:
                path = self.local_dir
            return {"kind": "local", "Directory": str(path.absolute())}
        if config.backend == "unicore":
            assert config.unicore is not None
            return {"kind": "unicore", "UnicoreApiUrl": config.unicore.api_url}
        raise ConfigError(
            f"{config.source}: the {config.backend} backend (config key 'Firecrest') is not "
            "supported yet; it is coming in a later release. Use 'UnicoreApiUrl', an 'SSH' "
            "section (Slurm over SSH) or 'Local' for now."
        )

    def for_config(self, config: ComputeConfig) -> tuple[dict[str, Any], Backend]:
        """A config's backend spec and its backend."""
        spec = self.spec_for(config)
        return spec, self.get(spec, config)

    def get(self, spec: Mapping[str, Any], config: ComputeConfig | None = None) -> Backend:
        key = json.dumps(spec, sort_keys=True)
        with self._lock:
            backend = self._backends.get(key)
            if backend is None:
                backend = self._make(spec, config)
                self._backends[key] = backend
            return backend

    def _make(self, spec: Mapping[str, Any], config: ComputeConfig | None) -> Backend:
        kind = spec.get("kind")
        if kind == "local":
            return LocalBackend(spec["Directory"])
        if kind == "unicore":
            # A credential stored for the site's URL (as for a tracking server), else the
            # backend reads MANTIK_UNICORE_TOKEN or MANTIK_UNICORE_USERNAME/PASSWORD.
            stored = self.tracking.store.get(spec["UnicoreApiUrl"])
            return UnicoreBackend(
                spec["UnicoreApiUrl"],
                username=stored.username if stored else None,
                password=stored.password if stored else None,
                token=stored.token if stored else None,
            )
        if kind == "ssh":
            ssh = config.ssh if config is not None else None
            identity = spec.get("IdentityFile")
            return SshSlurmBackend(
                hostname=spec["Hostname"],
                port=int(spec.get("Port", 22)),
                username=spec.get("Username") or os.environ.get(ENV_SSH_USERNAME) or None,
                key_filename=str(Path(identity).expanduser()) if identity else None,
                private_key=(ssh.private_key if ssh else None)
                or os.environ.get(ENV_SSH_PRIVATE_KEY)
                or None,
                password=(ssh.password if ssh else None)
                or os.environ.get(ENV_SSH_PASSWORD)
                or None,
                known_hosts=spec.get("KnownHostsFile"),
                remote_dir=spec.get("RemoteDirectory") or "mantik-runs",
            )
        raise ConfigError(f"Unknown backend kind {kind!r} recorded on the run")

    def of_run(self, run: Mapping[str, Any]) -> tuple[Backend, str]:
        tags = run_tags(run)
        run_id = run["info"]["run_id"]
        job_id = tags.get(TAG_JOB_ID)
        if not job_id:
            raise Conflict(f"Run {run_id} has no backend job (it was never submitted)")
        try:
            spec = json.loads(tags[TAG_BACKEND_SPEC])
        except (KeyError, ValueError):
            raise NotFound(
                f"Run {run_id} carries no backend description (tag {TAG_BACKEND_SPEC}); "
                "it was not submitted by mantik"
            ) from None
        backend = self.get(spec)
        run_dir = tags.get(TAG_RUN_DIR)
        if run_dir:
            backend.attach(job_id, run_dir)
        return backend, job_id
