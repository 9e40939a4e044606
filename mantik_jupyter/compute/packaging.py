"""The code snapshot of a project: a deterministic, streamed ``tar.gz``.

Which files go in: everything under the project directory except

* the defaults (``DEFAULT_EXCLUDES``, plus any directory holding a ``pyvenv.cfg``, i.e. a
  virtual environment whatever its name),
* the ``exclude`` globs of the backend config (Mantik's ``Exclude``),
* the patterns of a ``.mantikignore`` file at the project root,

all read as one gitignore-style list in that order, so a later ``!pattern`` re-includes what
an earlier one excluded (``!mlruns/`` in ``.mantikignore`` ships the ``mlruns`` directory).
As in git, a file inside an excluded directory cannot be re-included.

``extra_files`` are added even when excluded (e.g. a local Apptainer image that ``*.sif`` keeps
out of the walk): a file inside the project keeps its relative path, a file outside goes to
``images/<file name>``. ``package_place`` says where a file goes, by the same rule, for
whoever must find it in the unpacked package (the job script).

Symlinks whose target stays inside the project are archived as symlinks (an absolute target is
rewritten relative, so it still works once unpacked elsewhere); a symlink that leaves the
project is refused with UnsafePath. Sockets, FIFOs and devices are skipped.

Same files give the same bytes: entries are sorted, and mtime, owner and mode are normalised
(mode keeps only "executable or not"); the gzip header carries no name and mtime 0.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import tarfile
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pathspec

from ..errors import PackageTooLarge, ProjectError, UnsafePath

Progress = Callable[[int, int], None]

IGNORE_FILE = ".mantikignore"
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git",
    "__pycache__/",
    ".ipynb_checkpoints/",
    "mlruns/",
    "mlartifacts/",
    ".venv/",
    "venv/",
    "node_modules/",
    ".mantik/",
    "*.pyc",
)
DEFAULT_SIZE_LIMIT = 2 * 1024**3
# Level 1 is several times faster than 6 and costs a few percent of size on source code;
# the package is uploaded once and unpacked once, so speed wins (see bench/package_build.py).
COMPRESS_LEVEL = 1
# 1980-01-01: the oldest time zip can store; some tools treat 1970 (mtime 0) as "unset".
FIXED_MTIME = 315532800
IMAGES_DIR = "images"
_CHUNK = 1024 * 1024
# Compression blocks: fixed size, so the output does not depend on thread timing.
_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class PackageInfo:
    path: Path
    sha256: str
    size: int  # bytes of the tar.gz
    file_count: int  # regular files and symlinks
    files: list[str] = field(repr=False)  # their relative POSIX paths, in archive order
    input_size: int = 0  # bytes of file content before compression


@dataclass(frozen=True)
class _Entry:
    rel: str  # POSIX path inside the archive
    kind: str  # "dir", "file" or "link"
    source: str = ""  # absolute path to read (files)
    size: int = 0
    executable: bool = False
    link_target: str = ""

    @property
    def sort_key(self) -> tuple[str, ...]:
        # Component-wise order puts every directory before its contents.
        return tuple(self.rel.split("/"))


@dataclass(frozen=True)
class PackagePlan:
    """What ``build_package`` would archive, found without writing anything."""

    root: Path
    entries: list[_Entry] = field(repr=False)

    @property
    def files(self) -> list[str]:
        return [e.rel for e in self.entries if e.kind != "dir"]

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.entries)


# --- selecting files -------------------------------------------------------------------


def load_ignore_spec(project_dir: Path, exclude: Sequence[str] = ()) -> pathspec.PathSpec:
    """Defaults + ``exclude`` + ``.mantikignore``, one gitignore-style spec (last match wins)."""
    lines = list(DEFAULT_EXCLUDES) + [str(p) for p in exclude]
    ignore_file = Path(project_dir) / IGNORE_FILE
    if ignore_file.is_file():
        try:
            lines += ignore_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ProjectError(f"Cannot read {ignore_file}: {exc}") from exc
    try:
        return pathspec.GitIgnoreSpec.from_lines(lines)
    except (ValueError, TypeError) as exc:
        raise ProjectError(f"Invalid exclude pattern in 'Exclude' or {ignore_file}: {exc}") from exc


def plan_package(
    project_dir: Path,
    *,
    exclude: Sequence[str] = (),
    extra_files: Sequence[Path] = (),
    skip: Sequence[Path] = (),
) -> PackagePlan:
    """Walk ``project_dir`` and decide every entry of the package (``skip``: absolute paths)."""
    root = Path(project_dir).expanduser().resolve()
    if not root.is_dir():
        raise ProjectError(f"Project directory {project_dir} does not exist or is not a directory.")
    spec = load_ignore_spec(root, exclude)
    walker = _Walker(root, spec, {os.path.realpath(p) for p in skip})
    walker.walk(str(root), "")
    entries = _add_extra_files(root, walker.entries, extra_files)
    entries.sort(key=lambda e: e.sort_key)
    return PackagePlan(root=root, entries=entries)


class _Walker:
    def __init__(self, root: Path, spec: pathspec.PathSpec, skip: set[str]) -> None:
        self.root = str(root)
        self.spec = spec
        self.skip = skip
        self.entries: list[_Entry] = []

    def walk(self, directory: str, rel_dir: str) -> None:
        try:
            with os.scandir(directory) as it:
                children = sorted(it, key=lambda d: d.name)
        except OSError as exc:
            raise ProjectError(
                f"Cannot list {directory}: {exc.strerror}. Fix its permissions or exclude it "
                f"in {IGNORE_FILE}."
            ) from exc
        for child in children:
            rel = f"{rel_dir}{child.name}"
            if child.path in self.skip:
                continue
            if child.is_symlink():
                self._symlink(child, rel)
            elif child.is_dir(follow_symlinks=False):
                self._directory(child, rel)
            elif child.is_file(follow_symlinks=False):
                self._file(child, rel)
            # Sockets, FIFOs and devices cannot be shipped; reading a FIFO would hang.

    def _directory(self, child: os.DirEntry[str], rel: str) -> None:
        if self.spec.match_file(rel + "/"):
            return
        if os.path.exists(os.path.join(child.path, "pyvenv.cfg")):
            return  # a virtualenv: machine-specific, and its bin/ links leave the project
        self.entries.append(_Entry(rel=rel, kind="dir"))
        self.walk(child.path, rel + "/")

    def _file(self, child: os.DirEntry[str], rel: str) -> None:
        if self.spec.match_file(rel):
            return
        st = child.stat(follow_symlinks=False)
        self.entries.append(
            _Entry(
                rel=rel,
                kind="file",
                source=child.path,
                size=st.st_size,
                executable=bool(st.st_mode & 0o111),
            )
        )

    def _symlink(self, child: os.DirEntry[str], rel: str) -> None:
        if self.spec.match_file(rel) or self.spec.match_file(rel + "/"):
            return
        target = os.readlink(child.path)
        resolved = os.path.realpath(child.path)
        if not _inside(resolved, self.root):
            raise UnsafePath(
                f"Symlink {child.path} points to {target}, outside the project {self.root}. "
                f"Replace it with a copy, or exclude it in {IGNORE_FILE} or 'Exclude'."
            )
        if os.path.isabs(target):
            target = os.path.relpath(resolved, os.path.dirname(child.path))
        self.entries.append(_Entry(rel=rel, kind="link", link_target=target))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def package_place(project_dir: str | os.PathLike[str], file: str | os.PathLike[str]) -> str:
    """Where ``file``, given as an extra file, is stored in the package of ``project_dir``.

    ``file`` may be relative (to the project), absolute or start with ``~``; symlinks are
    followed. A file inside the project keeps its relative path, any other file goes to
    ``images/<name>``. The package is built by this same rule, so a path from here is the
    one that exists once the package is unpacked.
    """
    root = Path(project_dir).expanduser().resolve()
    return _place(root, _resolve_extra(root, file))


def _resolve_extra(root: Path, file: str | os.PathLike[str]) -> Path:
    # Relative to the project, not to the working directory of whoever builds the package:
    # that is how the config's paths are meant, and it must not change with the caller.
    return (root / Path(file).expanduser()).resolve()


def _place(root: Path, source: Path) -> str:
    if source.is_relative_to(root) and source != root:
        return source.relative_to(root).as_posix()
    return f"{IMAGES_DIR}/{source.name}"


def _add_extra_files(
    root: Path, entries: list[_Entry], extra_files: Sequence[Path]
) -> list[_Entry]:
    by_rel = {e.rel: e for e in entries}
    for extra in extra_files:
        source = _resolve_extra(root, extra)
        if not source.is_file():
            raise ProjectError(f"Extra file {extra} does not exist or is not a regular file.")
        rel = _place(root, source)
        existing = by_rel.get(rel)
        if existing is not None:
            if existing.source == str(source):
                continue  # already in the walk
            raise ProjectError(
                f"Extra file {extra} would be stored as {rel}, which the project already has. "
                "Rename one of them."
            )
        st = source.stat()
        by_rel[rel] = _Entry(
            rel=rel,
            kind="file",
            source=str(source),
            size=st.st_size,
            executable=bool(st.st_mode & 0o111),
        )
        _add_parents(by_rel, rel)
    return list(by_rel.values())


def _add_parents(by_rel: dict[str, _Entry], rel: str) -> None:
    parts = rel.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        parent = "/".join(parts[:i])
        by_rel.setdefault(parent, _Entry(rel=parent, kind="dir"))


# --- size limit ------------------------------------------------------------------------


def check_size(plan: PackagePlan, size_limit: int | None) -> None:
    total = plan.total_size
    if size_limit is None or total <= size_limit:
        return
    largest = sorted((e for e in plan.entries if e.kind == "file"), key=lambda e: -e.size)[:5]
    listing = "; ".join(f"{e.rel} ({human_size(e.size)})" for e in largest)
    raise PackageTooLarge(
        f"The code package of {plan.root} would hold {human_size(total)} of files, more than "
        f"the limit of {human_size(size_limit)}. Largest files: {listing}. Exclude data, "
        f"checkpoints and images with patterns in {plan.root / IGNORE_FILE} (gitignore syntax, "
        "e.g. 'data/' or '*.ckpt') or under 'Exclude' in the backend config, and read them "
        "from the cluster's file system instead."
    )


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


# --- writing ---------------------------------------------------------------------------


def build_package(
    project_dir: Path,
    dest: Path,
    *,
    exclude: Sequence[str] = (),
    extra_files: Sequence[Path] = (),
    size_limit: int | None = DEFAULT_SIZE_LIMIT,
    progress: Progress | None = None,
) -> PackageInfo:
    """Write the project's code snapshot to ``dest`` (a ``.tar.gz`` file) and describe it.

    The archive is written to a temporary name next to ``dest`` and renamed at the end, so
    ``dest`` is either complete or absent. ``dest`` may lie inside the project (it is skipped).
    """
    dest = Path(dest).expanduser().absolute()
    tmp = dest.with_name(f".{dest.name}.partial")
    plan = plan_package(project_dir, exclude=exclude, extra_files=extra_files, skip=(dest, tmp))
    _check_mlproject_kept(plan)
    check_size(plan, size_limit)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        digest, size = _write_archive(plan, tmp, progress)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    files = plan.files
    return PackageInfo(
        path=dest,
        sha256=digest,
        size=size,
        file_count=len(files),
        files=files,
        input_size=plan.total_size,
    )


def _check_mlproject_kept(plan: PackagePlan) -> None:
    on_disk = [p.name for p in plan.root.iterdir() if p.name.lower() == "mlproject"]
    kept = {e.rel for e in plan.entries}
    for name in on_disk:
        if name not in kept:
            raise ProjectError(
                f"{plan.root / name} is excluded from the code package by 'Exclude' or "
                f"{IGNORE_FILE}; the job cannot run without it. Remove the pattern that "
                "matches it."
            )


class _HashingWriter:
    """A write-only file that hashes what passes through, so the archive is read zero times."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


class _ParallelGzipWriter:
    """A gzip stream compressed in fixed-size blocks on several threads (as pigz does).

    Compression is most of the packaging time and zlib releases the GIL, so blocks are
    deflated in parallel while the main thread reads files. Each block ends with a sync
    flush, so their concatenation is one ordinary deflate stream that any gunzip reads.
    The header has no name and mtime 0, so equal input gives equal bytes.
    """

    _HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, mtime 0

    def __init__(self, out: _HashingWriter, level: int) -> None:
        self.out = out
        self.level = level
        workers = max(1, min(4, os.cpu_count() or 1))
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="mantik-gzip")
        # Bounded look-ahead keeps memory at a few blocks per worker.
        self.max_pending = 2 * workers
        self.pending: deque[Future[bytes]] = deque()
        self.buffer = bytearray()
        self.crc = 0
        self.length = 0
        out.write(self._HEADER)

    def write(self, data: bytes) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.length += len(data)
        self.buffer += data
        while len(self.buffer) >= _BLOCK:
            self._submit(bytes(self.buffer[:_BLOCK]))
            del self.buffer[:_BLOCK]
        return len(data)

    def tell(self) -> int:
        return self.length

    def _submit(self, block: bytes) -> None:
        self.pending.append(self.pool.submit(_deflate_block, block, self.level))
        while len(self.pending) > self.max_pending:
            self.out.write(self.pending.popleft().result())

    def close(self) -> None:
        if self.buffer:
            self._submit(bytes(self.buffer))
            self.buffer.clear()
        while self.pending:
            self.out.write(self.pending.popleft().result())
        self.out.write(zlib.compressobj(self.level, zlib.DEFLATED, -15).flush())  # final block
        self.out.write(struct.pack("<II", self.crc, self.length & 0xFFFFFFFF))
        self.pool.shutdown()

    def __enter__(self) -> _ParallelGzipWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.pool.shutdown(cancel_futures=True)


def _deflate_block(block: bytes, level: int) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    return compressor.compress(block) + compressor.flush(zlib.Z_SYNC_FLUSH)


class _ProgressReader:
    """Wraps a source file so tarfile's streaming copy reports progress per chunk."""

    def __init__(self, f: BinaryIO, tick: Callable[[int], None]) -> None:
        self.f = f
        self.tick = tick

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.tick(len(data))
        return data


def _write_archive(plan: PackagePlan, tmp: Path, progress: Progress | None) -> tuple[str, int]:
    total = plan.total_size
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None and n:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    with open(tmp, "wb") as raw:
        hashing = _HashingWriter(raw)
        with _ParallelGzipWriter(hashing, COMPRESS_LEVEL) as gz:
            with tarfile.TarFile(
                fileobj=gz,  # type: ignore[arg-type]
                mode="w",
                format=tarfile.PAX_FORMAT,
                copybufsize=_CHUNK,
            ) as tar:
                for entry in plan.entries:
                    _add_entry(tar, entry, tick)
    if progress is not None and done != total:
        progress(total, total)
    return hashing.hash.hexdigest(), hashing.size


def _tarinfo(entry: _Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.rel)
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.kind == "dir":
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    elif entry.kind == "link":
        info.type = tarfile.SYMTYPE
        info.mode = 0o777
        info.linkname = entry.link_target
    else:
        info.type = tarfile.REGTYPE
        info.mode = 0o755 if entry.executable else 0o644
        info.size = entry.size
    return info


def _add_entry(tar: tarfile.TarFile, entry: _Entry, tick: Callable[[int], None]) -> None:
    info = _tarinfo(entry)
    if entry.kind != "file":
        tar.addfile(info)
        return
    try:
        with open(entry.source, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise OSError(f"{entry.source} is no longer a regular file")
            tar.addfile(info, _ProgressReader(f, tick))
    except OSError as exc:
        # tarfile raises OSError("unexpected end of data") when a file shrinks mid-copy.
        raise ProjectError(
            f"Cannot read {entry.source} while packaging: {exc}. If it is being written "
            f"(e.g. a checkpoint), wait or exclude it in {IGNORE_FILE}."
        ) from exc
