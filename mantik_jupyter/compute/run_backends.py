"""The backends of a ``RunService``: one per backend spec (the ``mantik.backend_spec``
tag, no secrets), shared by the runs that use it, so its connection is reused.

Trust: everything needed to reach a run's job is on its MLflow tags, which anyone with
EDIT on the experiment can rewrite, and the backend is reached with the *current*
user's credentials. Connecting to whatever a tag names would hand a UNICORE token or an
SSH password to a URL or host of a colleague's choosing (with no click: the run list
syncs active runs), and would overwrite the states of honest colleagues' runs with what
our account knows of their job ids. So the submitting installation signs the run's
binding to its job (``RunKeys``: run id, backend spec, job id, run directory, per-run
user) with a key of its own, and ``BackendPool.of_run`` connects only to runs whose
signature verifies. An HMAC with a local key rather than, say, a tracking user check:
the tags and the user name are exactly what a colleague with EDIT can write, while the
key never leaves this machine (``paths.run_key_file``, 0600, never logged).

The same holds for the run's per-run tracking user (``mantik.run_user``), which the lab
deletes with the embedded server's admin credential: a run naming the user of another
run would cut that run's job off from the tracking server. So a run is signed twice in
the same format: as soon as it is created (no job id nor run directory yet; that
signature names its user), and again with its job's tags. A user is deleted only where
such a signature names it for that run (``RunSync.delete_run_user``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import paths
from ..errors import ConfigError, Conflict, LocalStateInvalid, NotFound, PermissionDenied
from ..tracking.runs_api import run_tags
from ..tracking.secrets import create_private_json, read_private_json
from ..tracking.service import TrackingService
from .backends.base import Backend, Capabilities
from .backends.local import LocalBackend
from .backends.ssh_slurm import SshSlurmBackend
from .backends.unicore import UnicoreBackend
from .config import ENV_SSH_PASSWORD, ENV_SSH_PRIVATE_KEY, ENV_SSH_USERNAME, ComputeConfig
from .run_record import (
    TAG_BACKEND,
    TAG_BACKEND_SPEC,
    TAG_BINDING,
    TAG_JOB_ID,
    TAG_RUN_DIR,
    TAG_RUN_USER,
)

# The tags a signature covers (with the run id): all ``of_run`` and the end of a run
# act on. Changing any of them, or copying them onto another run, breaks it.
SIGNED_TAGS = (TAG_BACKEND_SPEC, TAG_JOB_ID, TAG_RUN_DIR, TAG_RUN_USER)
_BINDING_VERSION = "v1"
_KEY_NAME = "The run signing key"
_HEX_KEY = re.compile(r"[0-9a-f]{64}")


class RunKeys:
    """Signs and verifies the binding of runs to their jobs (see the module's docstring).

    ``key_file``: this installation's key (JSON ``{"key": "<64 hex digits>"}``, 0600,
    made on first use); ``trusted_dir``: other installations' key files, copied there by
    a user who submits from several machines. The signature names its key by a digest
    (``key id``), so runs of either stay verifiable after such a copy. Default paths
    are read at first use, from the data dir of that moment.
    """

    def __init__(self, key_file: Path | None = None, trusted_dir: Path | None = None) -> None:
        self._key_file = key_file
        self._trusted_dir = trusted_dir
        self._own: bytes | None = None
        self._lock = threading.Lock()

    @property
    def key_file(self) -> Path:
        return self._key_file or paths.run_key_file()

    @property
    def trusted_dir(self) -> Path:
        return self._trusted_dir or paths.trusted_run_keys_dir()

    def _own_key(self) -> bytes:
        with self._lock:
            if self._own is None:
                path = self.key_file
                key = self._load(path)
                if key is None:
                    # Two processes (lab, CLI) making it at once both end up with the first.
                    create_private_json(path, {"key": secrets.token_hex(32)})
                    key = self._load(path)
                if key is None:
                    raise LocalStateInvalid(f"{_KEY_NAME} {path} could not be made.")
                self._own = key
            return self._own

    @staticmethod
    def _load(path: Path) -> bytes | None:
        fix = (
            "Move it away: a new key is made, and the runs signed with the old one are no "
            "longer followed here."
        )
        data = read_private_json(path, _KEY_NAME, fix)
        if data is None:
            return None
        key = data.get("key") if isinstance(data, dict) else None
        if not isinstance(key, str) or not _HEX_KEY.fullmatch(key):
            raise LocalStateInvalid(f"{_KEY_NAME} {path} has no 'key' of 64 hex digits. {fix}")
        return bytes.fromhex(key)

    def _key(self, key_id: str) -> bytes | None:
        """The key a signature names: this installation's, else a trusted one (those are
        read each time they are needed, so a copy takes effect without a restart; the
        runs of this installation, which sync checks every interval, need no file)."""
        own = self._own_key()
        if _key_id(own) == key_id:
            return own
        keys: dict[str, bytes] = {}
        try:
            others = sorted(self.trusted_dir.glob("*.json"))
        except OSError:
            others = []
        for path in others:
            try:
                key = self._load(path)
            except LocalStateInvalid as exc:
                # One bad copy must not stop the runs of this installation.
                log.warning("ignoring a trusted run key: %s", exc.message)
                continue
            if key is not None:
                keys.setdefault(_key_id(key), key)
        return keys.get(key_id)

    def sign(self, run_id: str, tags: Mapping[str, str]) -> str:
        """The value of ``mantik.binding`` for a run with these tags."""
        key = self._own_key()
        return f"{_BINDING_VERSION}:{_key_id(key)}:{_mac(key, run_id, tags)}"

    def problem(self, run: Mapping[str, Any]) -> str | None:
        """None if the run's binding verifies, else why not (for a message)."""
        tags = run_tags(run)
        value = tags.get(TAG_BINDING)
        if not value:
            return (
                f"it has no {TAG_BINDING} tag (runs submitted with mantik before it signed "
                "them have none, and are not followed either)"
            )
        version, _, rest = value.partition(":")
        key_id, _, mac = rest.partition(":")
        key = self._key(key_id)
        if version != _BINDING_VERSION or key is None:
            return f"its {TAG_BINDING} tag was not made with a key this installation knows"
        if not hmac.compare_digest(mac, _mac(key, run["info"]["run_id"], tags)):
            return (
                f"its {TAG_BINDING} tag does not match its tags: "
                f"{', '.join(SIGNED_TAGS)} were changed after it was submitted"
            )
        return None

    def untrusted(self, run: Mapping[str, Any], problem: str) -> PermissionDenied:
        run_id = run["info"]["run_id"]
        kind = run_tags(run).get(TAG_BACKEND) or "its"
        return PermissionDenied(
            f"Run {run_id} was submitted from another mantik installation or by someone "
            f"else: {problem}. mantik follows a run (its state, log, files, cancel) only "
            "where it was submitted, with the credentials it was submitted with, so it "
            f"does not connect to the {kind} backend this run names. Its recorded state "
            "and stored artifacts stay readable in MLflow. If you submitted it yourself on "
            f"another machine, copy {self.key_file.name} from that machine's mantik data "
            f"dir into {self.trusted_dir}/ here under any name ending in .json (mode "
            f"0600); your runs from there are then followed here."
        )


def _key_id(key: bytes) -> str:
    """Names a key in signatures without revealing anything about it."""
    return hashlib.sha256(b"mantik run key id\0" + key).hexdigest()[:16]


def _mac(key: bytes, run_id: str, tags: Mapping[str, str]) -> str:
    signed = {"run_id": run_id, **{name: tags.get(name, "") for name in SIGNED_TAGS}}
    message = json.dumps(signed, sort_keys=True).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


log = logging.getLogger(__name__)


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

    def __init__(
        self, tracking: TrackingService, *, local_dir: Path, keys: RunKeys | None = None
    ) -> None:
        self.tracking = tracking
        self.local_dir = local_dir
        self.keys = keys or RunKeys()
        self._backends: dict[str, Backend] = {}
        self._lock = threading.RLock()
        # Key files that could not be read, logged once each: a sync meets them for every
        # run, every interval.
        self._reported: set[str] = set()

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

    def binding_problem(self, run: Mapping[str, Any]) -> str | None:
        """None if this installation (or a trusted key) signed the run as it is, else
        why not; a key file that cannot be read is such a why."""
        try:
            return self.keys.problem(run)
        except LocalStateInvalid as exc:
            # Quiet in the run list (each run says why), but it stops every run being
            # followed: whoever reads the lab's log must learn of it.
            with self._lock:
                first = exc.message not in self._reported
                self._reported.add(exc.message)
            if first:
                log.warning("runs are not followed until this is fixed: %s", exc.message)
            return exc.message

    def not_followed(self, run: Mapping[str, Any]) -> str | None:
        """Why this installation does not follow the run (the message its logs, files,
        downloads and cancel answer 403 with), else None; None too for a run with no job,
        whose actions answer that there is none."""
        if not run_tags(run).get(TAG_JOB_ID):
            return None
        problem = self.binding_problem(run)
        return self.keys.untrusted(run, problem).message if problem else None

    def of_run(self, run: Mapping[str, Any]) -> tuple[Backend, str]:
        """The run's backend (attached to its run directory) and job id; only for a run
        this installation submitted (PermissionDenied otherwise: see the module)."""
        tags = run_tags(run)
        run_id = run["info"]["run_id"]
        job_id = tags.get(TAG_JOB_ID)
        if not job_id:
            raise Conflict(f"Run {run_id} has no backend job (it was never submitted)")
        problem = self.keys.problem(run)
        if problem:
            raise self.keys.untrusted(run, problem)
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
