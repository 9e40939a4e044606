"""What a submission starts from, checked before anything is created: the project and
config paths (confined to the Jupyter root), the files packaged besides the project, the
project's git state, and whether the job can reach the tracking server."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import ConfigError, InvalidRequest, ProjectError, UnsafePath
from ..tracking.credentials import split_credential
from ..tracking.service import check_http_uri
from .backends.paths import usable_path
from .config import CONFIG_FILENAMES, ComputeConfig, find_config
from .project import find_project_dir
from .run_record import TAG_GIT_COMMIT, TAG_GIT_DIRTY

_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}


def resolve_project(project_dir: str | Path, root_dir: Path | None) -> Path:
    usable_path(project_dir, "project directory")
    path = Path(project_dir).expanduser()
    if root_dir is not None:
        if not path.is_absolute():
            path = root_dir / path
        if not path.resolve().is_relative_to(root_dir):
            raise UnsafePath(f"{project_dir} is not inside the Jupyter root {root_dir}")
    if not path.exists():
        raise ProjectError(f"The project directory {path} does not exist")
    return find_project_dir(path.resolve(), root=root_dir)


def resolve_config(project: Path, backend_config: str | Path | None, root_dir: Path | None) -> Path:
    if backend_config is None:
        found = find_config(project)
        if found is None:
            raise ConfigError(
                f"No compute backend config found in {project} (looked for "
                f"{', '.join(CONFIG_FILENAMES)}). Create one there or pass its path "
                "(--backend-config FILE)."
            )
        return found
    usable_path(backend_config, "compute backend config")
    path = Path(backend_config).expanduser()
    looked_in = ""
    if not path.is_absolute():
        in_project = project / path
        base = root_dir if root_dir is not None else Path.cwd()
        path = in_project if in_project.exists() else base / path
        # A name given relative is looked for in two places; the error named the second
        # only, and the user, who meant the project's, looked there in vain.
        looked_in = f" (nor does {in_project}, in the project folder)"
    if root_dir is not None and not path.resolve().is_relative_to(root_dir):
        raise UnsafePath(f"{backend_config} is not inside the Jupyter root {root_dir}")
    if path.is_dir():
        # A folder holding the config (a cluster's folder of configs): the one in it.
        found = find_config(path)
        if found is None:
            raise ConfigError(
                f"The compute backend config {path} is a folder without a config (looked for "
                f"{', '.join(CONFIG_FILENAMES)}). Name the config file itself."
            )
        return found
    if not path.is_file():
        raise ConfigError(
            f"The compute backend config {path} does not exist{looked_in}. Give the path of "
            "the config file, relative to the project folder or absolute."
        )
    return path


def check_tracking_uri(job_uri: str, spec: Mapping[str, Any]) -> list[str]:
    # Before anything is made: a job given 'localhost:5000' failed on the cluster, in
    # MLflow's words, after its run was created and queued.
    check_http_uri(
        job_uri,
        "--job-tracking-uri, $MANTIK_JOB_TRACKING_URI or c.MantikApp.job_tracking_uri, "
        "else the tracking URI",
        name="job tracking URI",
        unset="(jobs then use the tracking URI)",
    )
    if "@" in urlparse(job_uri).netloc:
        # The job script would carry it (a traceback and a FAILED run said so, late).
        raise InvalidRequest(
            f"The job tracking URI {split_credential(job_uri)[0]!r} carries a user name and "
            "password (user:password@). Give it without them: the job gets its tracking "
            "credential through a 0600 file, never in its script."
        )
    host = (urlparse(job_uri).hostname or "").lower()
    loopback = host in _LOOPBACK_HOSTS or host.startswith("127.")
    where = str(spec.get("Hostname", "")) if spec.get("kind") == "ssh" else ""
    if spec.get("kind") == "unicore":
        where = urlparse(str(spec.get("UnicoreApiUrl", ""))).hostname or ""
    remote = bool(where) and where.lower() not in (_LOOPBACK_HOSTS | {"127.0.0.1"})
    if loopback and remote:
        return [
            f"The job will report to the tracking server at {job_uri}, a loopback address, "
            f"but runs on {where}: it will not reach the server from there. "
            "Set the job tracking URI (an address the compute nodes can reach) or tunnel "
            "the port."
        ]
    return []


def extra_files(config: ComputeConfig, project_dir: Path) -> list[Path]:
    apptainer = config.environment.apptainer
    if apptainer is None or apptainer.type != "local":
        return []
    path = Path(apptainer.path).expanduser()
    if not path.is_absolute():
        path = project_dir / path
    if not path.is_file():
        raise ConfigError(
            f"{config.source}: Environment.Apptainer.Path {apptainer.path!r} is a local image "
            f"(Type: local), but {path} does not exist. Give the image's path, or set "
            "Type: remote for an image on the cluster."
        )
    return [path]


def git_tags(project_dir: Path) -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args],
                cwd=project_dir,
                capture_output=True,
                text=True,
                timeout=15,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    dirty = git("status", "--porcelain", "--untracked-files=normal", "--", ".")
    tags = {TAG_GIT_COMMIT: commit.strip(), "mlflow.source.git.commit": commit.strip()}
    if dirty is not None:
        tags[TAG_GIT_DIRTY] = "true" if dirty.strip() else "false"
    return tags
