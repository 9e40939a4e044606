"""A folder of a run (or the whole run) as one zip archive, made while it is sent.

The lab's browser saves one file per download, so a folder travels as an archive. Zip,
not tar.gz: Windows' Explorer, macOS' Finder and Linux file managers all open it with a
double click (Explorer opens a .tar.gz only since Windows 11 23H2), and a reader takes
one forecast file out of a checkpoint-heavy archive without reading the rest.

The archive is written as it streams (sizes and checksums after each file's data, in
data descriptors, and Zip64 where a file or the archive passes 4 GiB): nothing of it is
held but the chunk being sent, so a folder of gigabytes never sits in the lab's memory.

The backends give the folder's entries (``Backend.folder_members``); the rules of every
download are applied here once more, whatever the backend: only clean relative names,
links only where they point down (``link_points_down``), never mantik's credential file.
A file that goes between the listing and its read (a running job replacing its
checkpoint) is left out with a warning; one that grows is archived as long as it was.
"""

from __future__ import annotations

import logging
import posixpath
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from ..errors import NotFound, PermissionDenied
from . import layout
from .backends.base import FolderMember
from .backends.paths import CREDENTIALS_SKIPPED, LINK_SKIPPED, is_credentials, link_points_down

log = logging.getLogger(__name__)

# Suffixes of files whose data is compressed already: stored as they are, since deflating
# them again costs the lab's CPU and gains nothing.
_COMPRESSED = frozenset(
    ".gz .tgz .bz2 .xz .zst .zip .7z .npz .pt .pth .ckpt .safetensors .png .jpg .jpeg "
    ".gif .webp .mp4 .grib2 .grb2 .parquet .h5 .hdf5 .nc4".split()
)
# Deflate's fastest level: on model outputs (float arrays) it saves as much as the default
# level 6 at three times the speed (about 70 MB/s against 22 on one core).
_LEVEL = 1
_DIR_MODE = 0o40755
_LINK_MODE = 0o120777


@dataclass
class Archive:
    """A zip archive being made: the file name the browser saves it under, and its bytes."""

    filename: str
    chunks: Iterator[bytes]


class _Sink:
    """Where the zip writer puts its bytes until the next chunk is sent. Not seekable,
    so zipfile writes data descriptors instead of going back to fill in sizes."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        self.size = 0
        return data


def zip_stream(
    top: str, members: Iterable[FolderMember], *, folder: str = "", whole_run: bool = False
) -> Iterator[bytes]:
    """The zip archive of ``members`` below the folder ``top`` (its entries' first name),
    in chunks of about ``layout.CHUNK`` bytes. ``folder``: where the members are in the
    run directory, for the warnings; ``whole_run``: they are the run directory's (where
    the run's credential file lives)."""
    sink = _Sink()
    walk = iter(members)
    try:
        with zipfile.ZipFile(sink, "w", allowZip64=True) as archive:  # type: ignore[call-overload]
            archive.writestr(_info(top + "/", time.time(), _DIR_MODE), b"")
            for member in walk:
                if folder:
                    member = replace(member, path=f"{folder}/{member.path}")
                if not _allowed(member, whole_run):
                    continue
                name = f"{top}/{member.path[len(folder) :].lstrip('/')}"
                if member.kind == "dir":
                    archive.writestr(_info(name + "/", member.mtime, _DIR_MODE), b"")
                elif member.kind == "link":
                    archive.writestr(_info(name, member.mtime, _LINK_MODE), member.target)
                else:
                    yield from _file(archive, sink, name, member)
                if sink.size >= layout.CHUNK:
                    yield sink.take()
        yield sink.take()
    finally:
        # Now, not when collected: a stream stopped half-way (the browser went) holds
        # an SSH channel or an HTTP response of the site.
        close = getattr(walk, "close", None)
        if close is not None:
            close()


def _file(
    archive: zipfile.ZipFile, sink: _Sink, name: str, member: FolderMember
) -> Iterator[bytes]:
    assert member.open is not None
    try:
        # Opened before its entry is written: a file gone since the listing leaves no trace.
        size, chunks = member.open()
    except (FileNotFoundError, NotFound):
        log.warning("download: skipped %s (removed while it was downloaded)", member.path)
        return
    except (PermissionError, PermissionDenied) as exc:
        log.warning("download: skipped %s (%s)", member.path, exc)
        return
    info = _info(name, member.mtime, 0o100000 | (member.mode & 0o777 or 0o644))
    # The size read at opening: zipfile takes it to decide on Zip64 before any data.
    info.file_size = size
    suffix = posixpath.splitext(name)[1].lower()
    if suffix in _COMPRESSED:
        info.compress_type = zipfile.ZIP_STORED
    else:
        info.compress_type = zipfile.ZIP_DEFLATED
        info._compresslevel = _LEVEL  # type: ignore[attr-defined]  # what open(info) takes
    left = size
    try:
        with archive.open(info, "w") as out:
            for chunk in chunks:
                # A file still growing (a log) is archived as long as it was when opened.
                piece = chunk[:left]
                left -= len(piece)
                out.write(piece)
                if sink.size >= layout.CHUNK:
                    yield sink.take()
                if left <= 0:
                    break
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _allowed(member: FolderMember, whole_run: bool) -> bool:
    """The rules of every download, whatever the backend gave."""
    parts = member.path.split("/")
    if not member.path or member.path.startswith("/") or any(
        p in ("", ".", "..") for p in parts
    ):
        log.warning("download: skipped %r (not a name inside the folder)", member.path)
        return False
    if is_credentials(member.path):
        if not whole_run or len(parts) > 1:
            log.warning(CREDENTIALS_SKIPPED, member.path)
        return False
    if member.kind == "link" and not link_points_down(member.target):
        log.warning(LINK_SKIPPED, member.path, member.target)
        return False
    return member.kind in ("dir", "link", "file")


def _info(name: str, mtime: float, mode: int) -> zipfile.ZipInfo:
    # Zip's dates start in 1980 and end in 2107.
    stamp = time.localtime(min(max(mtime, 315532800.0), 4354819199.0))
    info = zipfile.ZipInfo(name, date_time=stamp[:6])
    info.create_system = 3  # Unix: the mode (and a link's kind) in the upper 16 bits
    info.external_attr = mode << 16
    if mode & 0o170000 == 0o040000:
        info.external_attr |= 0x10  # MS-DOS directory flag, for Windows' readers
    return info


def archive_name(label: str, folder: str) -> str:
    """``<run>-<folder>.zip`` (``<run>.zip`` for the whole run)."""
    return f"{label}-{folder}.zip" if folder else f"{label}.zip"
