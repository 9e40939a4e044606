"""Path checks for paths users give: they stay inside the directory they belong to, and
are paths a file system can hold at all."""

from __future__ import annotations

import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath

from ...errors import Conflict, InvalidRequest, UnsafePath
from .. import layout

# Linux's NAME_MAX and PATH_MAX, in bytes: a longer path fails in the file system
# (ENAMETOOLONG), deep in whatever touches it first.
NAME_MAX = 255
PATH_MAX = 4096


def usable_path(path: str | PurePath, what: str) -> None:
    """Refuse a path no file system can hold, naming it (shortened)."""
    text = str(path)
    shown = text if len(text) <= 80 else text[:60] + "..." + text[-12:]
    if len(text.encode("utf-8", "surrogateescape")) > PATH_MAX:
        raise InvalidRequest(f"The {what} {shown!r} is longer than {PATH_MAX} bytes.")
    for part in text.replace("\\", "/").split("/"):
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise InvalidRequest(
                f"The {what} {shown!r} has a name longer than {NAME_MAX} bytes; shorten it."
            )


def safe_name(name: str, what: str) -> str:
    """``name`` if it is one usable path component (no ``/``, not ``.``/``..``)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UnsafePath(f"{name!r} is not a usable {what} (one path component expected)")
    return name


def clean_relative(path: str) -> str:
    """``path`` as a normalised relative path; refuses absolute paths and ``..``.

    A backslash is part of a name, as on the POSIX systems run directories live on
    (listings show such names, and they must open); to be safe it still counts as a
    separator when looking for an absolute path or a ``..``."""
    path = path or ""
    usable_path(path, "path")
    if path.startswith(("/", "\\", "~")) or "\0" in path:
        raise UnsafePath(f"{path!r} must be relative to the run directory")
    if ".." in path.replace("\\", "/").split("/"):
        raise UnsafePath(f"{path!r} leads outside the run directory ('..' is not allowed)")
    return "/".join(p for p in path.split("/") if p not in ("", "."))


# The warning for a link ``link_points_down`` refuses: its name, then where it points.
LINK_SKIPPED = "download: skipped %s (a link to %r: only links down into the folder are kept)"


def link_points_down(target: str) -> bool:
    """Whether a folder download keeps a symbolic link to ``target``: only one that points
    down into the folder (relative, no ``..``); the others are skipped. Where a link with
    ``..`` leads depends on how much of the run was downloaded (``outputs/x -> ../code``
    leaves a download of ``outputs``) and on the links it passes through: chains of links
    outwit a check of the resolved path (CVE-2025-4517). A link that only points down
    cannot lead out, however links chain, and lands the same from every backend."""
    return not target.startswith("/") and ".." not in target.split("/")


CREDENTIALS_SKIPPED = "download: skipped %s (mantik's credential file)"


def is_credentials(path: str) -> bool:
    """Whether a run's file is mantik's credential file (the job's tracking token, there
    until the job read it), which no download takes: the name is mantik's, so none of that
    name goes, at any depth (a link UNICORE follows, or a job's copy, puts one below)."""
    return posixpath.basename(path.rstrip("/")) == layout.CREDENTIALS_FILE


def not_folder(is_file: bool) -> str:
    """Why a path of a run cannot go as a folder's archive. The lab asks for one when the
    path would not open as a file: for a named pipe, "is not a folder" was all it said."""
    if is_file:
        return "is a file, not a folder: download it as it is"
    return "is neither a file nor a folder (a named pipe, socket or device): nothing to download"


def save_stream(
    chunks: Iterable[bytes],
    final: Path,
    size: int,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a downloaded file through a ``.part`` file, so ``final`` is whole or absent."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.part")
    done = 0
    try:
        with tmp.open("wb") as out:
            for chunk in chunks:
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, max(size, done))
        tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)
        # Now, not whenever the interrupted stream is collected: a remote file's stream
        # collected at interpreter exit, after the buffers it closes, printed tracebacks
        # under a Ctrl-C'd download.
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    if progress:
        progress(done, max(size, done))
    return final


@contextmanager
def staged_folder(final: Path, name: str) -> Iterator[Path]:
    """A folder download lands whole at ``final`` or not at all: the block fills the
    yielded hidden folder next to ``final`` with ``name``, which then becomes ``final``.
    An error or Ctrl-C half-way left a partial folder with truncated files that the
    next try refused as existing."""
    if final.exists():
        # Never delete or merge into a local folder the user may care about.
        raise Conflict(f"{final} exists already: remove it or download elsewhere")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".mantik-download-", dir=final.parent))
    try:
        yield staging
        (staging / name).replace(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
