"""Landing a run's files on the user's disk without losing anything of theirs.

A download first goes into a hidden staging folder next to where it lands (the backend
writes there, whole or not at all); only then is it moved into place. A local file in
the way is left alone when it is identical to the run's, and is never replaced unless the
caller asked for it (``overwrite``): a folder that held an earlier run's results, or the
user's own edits of them, was overwritten without a word. A file where the download has a
folder (or the other way round) is never replaced. Where the clash can be seen from the
run's listing (another size, another kind), the download is refused before anything is
transferred; a file of the same size is compared byte for byte once it arrived.
"""

from __future__ import annotations

import filecmp
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Conflict
from .backends.base import FileEntry

SHOWN = 5  # clashing files named in a message; the rest are counted


@dataclass
class Downloaded:
    """Where a download landed, and what happened to the files already there."""

    path: Path
    written: int = 0  # files that were not there before
    identical: list[str] = field(default_factory=list)  # left as they were
    replaced: list[str] = field(default_factory=list)  # differed, replaced (overwrite)

    def summary(self) -> str:
        """One line for the faces: 'Downloaded to X', and what was left or replaced."""
        parts = [f"{_count(self.written, 'file')} written"]
        if self.identical:
            parts.append(
                f"{_count(len(self.identical), 'file')} already there and identical, left as "
                f"{'it was' if len(self.identical) == 1 else 'they were'}"
            )
        if self.replaced:
            parts.append(f"{_count(len(self.replaced), 'file')} replaced: {_shown(self.replaced)}")
        return f"Downloaded to {self.path} ({'; '.join(parts)})"


class DownloadClash(Conflict):
    """Local files in the way of a download. ``flag`` is how the caller allows replacing
    them; each face names its own (``--overwrite``, ``overwrite=True``). A ``Conflict``
    to every face (409, exit code 4)."""

    def __init__(
        self, final: Path, differ: list[str], kinds: list[str], flag: str = "overwrite=True"
    ) -> None:
        self.final, self.differ, self.kinds = final, differ, kinds
        super().__init__(self._say(flag))

    def with_flag(self, flag: str) -> DownloadClash:
        """The same refusal, naming the caller's way to allow replacing."""
        return DownloadClash(self.final, self.differ, self.kinds, flag)

    def _say(self, flag: str) -> str:
        where = f"in {self.final}" if self.final.is_dir() else f"at {self.final}"
        lines = []
        if self.differ:
            lines.append(
                f"{_count(len(self.differ), 'file')} of the download already "
                f"{'exists' if len(self.differ) == 1 else 'exist'} {where} and "
                f"{'differs' if len(self.differ) == 1 else 'differ'} from the run's: "
                f"{_shown(self.differ)}."
            )
        if self.kinds:
            lines.append(
                f"{_count(len(self.kinds), 'path')} {where} "
                f"{'is' if len(self.kinds) == 1 else 'are'} a folder where the run has a file, "
                f"or a file where it has a folder: {_shown(self.kinds)}; move "
                f"{'it' if len(self.kinds) == 1 else 'them'} away first (no flag replaces "
                "one kind with the other)."
            )
        allow = f"download again with {flag} to replace them, or " if not self.kinds else ""
        lines.append(f"Nothing was written: {allow}choose another destination.")
        return " ".join(lines)


def landing_spot(dest: Path, name: str) -> Path:
    """As cp does: into ``dest`` if it is a folder, else under the name ``dest``.

    A link to a folder at ``dest/<name>`` is refused: the name comes from the run, and
    such a link may be one an earlier download landed (a run's ``outputs/up -> ..``),
    through which the download, merged into the folder it points to, replaced files
    outside the one the user chose. A link the user names as ``dest`` is followed."""
    if not dest.is_dir():
        return dest
    spot = dest / name
    if spot.is_symlink() and spot.is_dir():
        raise Conflict(
            f"{spot} is a link to the folder {spot.resolve()}: a download does not write "
            f"through a link it did not name. Download to {spot.resolve()} itself, or move "
            "the link away first."
        )
    return spot


def check_listing(
    final: Path,
    entry: FileEntry,
    listing: Callable[[str], list[FileEntry]],
    overwrite: bool,
) -> None:
    """Refuse, before anything is transferred, what the run's listing shows would clash:
    ``entry`` (the file or folder to download) against ``final``. Only folders that exist
    on both sides are listed (one call each). Files of the same size are left for
    ``land`` to compare once they arrived."""
    differ: list[str] = []
    kinds: list[str] = []

    def walk(remote: FileEntry, local: Path, shown: str) -> None:
        if not os.path.lexists(local):
            return
        local_dir = local.is_dir() and (not local.is_symlink() or shown == "")
        if remote.is_dir != local_dir:
            kinds.append(shown or str(local))
        elif not remote.is_dir:
            # lstat, as the listing does: a link that leads nowhere is a file in the
            # way, not a "No such file" about the destination.
            if not overwrite and local.lstat().st_size != remote.size:
                differ.append(shown or local.name)
        else:
            for child in listing(remote.path):
                name = posixpath.basename(child.path)
                walk(child, local / name, f"{shown}/{name}" if shown else name)

    walk(entry, final, "")
    if differ or kinds:
        raise DownloadClash(final, differ, kinds)


@dataclass
class _Plan:
    new: list[tuple[Path, Path]] = field(default_factory=list)
    identical: list[str] = field(default_factory=list)
    differ: list[tuple[Path, Path, str]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)


def _plan(src: Path, final: Path) -> _Plan:
    """What moving the downloaded ``src`` to ``final`` would do to each file."""
    plan = _Plan()

    def one(s: Path, d: Path, shown: str) -> None:
        if not os.path.lexists(d):
            plan.new.append((s, d))
        elif d.is_dir() and not d.is_symlink():
            plan.kinds.append(shown)
        elif _same(s, d):
            plan.identical.append(shown)
        else:
            plan.differ.append((s, d, shown))

    if src.is_symlink() or not src.is_dir():
        one(src, final, final.name)
        return plan
    if os.path.lexists(final) and not final.is_dir():
        plan.kinds.append(str(final))
        return plan

    def walk(s_dir: Path, d_dir: Path, prefix: str) -> None:
        for s in sorted(s_dir.iterdir()):
            d, shown = d_dir / s.name, f"{prefix}{s.name}"
            if s.is_dir() and not s.is_symlink():
                if not os.path.lexists(d):
                    plan.new.append((s, d))  # a whole folder that is not there yet
                elif d.is_dir() and not d.is_symlink():
                    walk(s, d, f"{shown}/")
                else:
                    plan.kinds.append(shown)
            else:
                one(s, d, shown)

    if os.path.lexists(final):
        walk(src, final, "")
    else:
        plan.new.append((src, final))
    return plan


def _same(a: Path, b: Path) -> bool:
    if a.is_symlink() or b.is_symlink():
        return a.is_symlink() and b.is_symlink() and os.readlink(a) == os.readlink(b)
    return filecmp.cmp(a, b, shallow=False)


def _files_in(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return 1
    return sum(len(files) for _, _, files in os.walk(path))


def land(src: Path, final: Path, overwrite: bool) -> Downloaded:
    """Move the downloaded ``src`` (in staging) to ``final``. Every file is checked
    before the first one moves, so a refusal leaves the destination as it was."""
    plan = _plan(src, final)
    differ = [shown for _, _, shown in plan.differ]
    if plan.kinds or (differ and not overwrite):
        raise DownloadClash(final, differ, plan.kinds)
    done = Downloaded(final, identical=plan.identical, replaced=differ)
    for s, d in plan.new:
        # Looked at again: a file the user put there since the plan stays theirs (a
        # rename would replace it without a word).
        if os.path.lexists(d):
            raise DownloadClash(final, [str(d.relative_to(final.parent))], [])
        d.parent.mkdir(parents=True, exist_ok=True)
        done.written += _files_in(s)
        s.rename(d)
    for s, d, _ in plan.differ:
        os.replace(s, d)
    return done


@contextmanager
def staging_beside(final: Path) -> Iterator[Path]:
    """A hidden empty folder next to ``final`` (same file system: moving is renaming),
    removed afterwards, with the folders made for it when nothing landed in them."""
    made: list[Path] = []
    parent = final.parent
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".mantik-download-", dir=final.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:  # deepest first; a folder that got something stays
            try:
                folder.rmdir()
            except OSError:
                break


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _shown(names: list[str]) -> str:
    """The first few names, and how many more."""
    listed = ", ".join(repr(n) for n in names[:SHOWN])
    return listed + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
