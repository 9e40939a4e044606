"""The files of runs on a login node, over the backend's SSH connection: the upload of a
prepared run, and listing, reading and downloading what a run left (SFTP; a folder as
one tar stream of an SSH command).

Small operations (a listing, a log read) share one SFTP session, one thread at a time,
opened again when its connection or channel went; a long transfer (upload, file stream)
gets a session of its own so that it never holds the shared one.

File access is confined to the run directory: no ``..``, no absolute paths, no symlinks
leading out (the server resolves the path, and the result must lie inside).
"""

from __future__ import annotations

import io
import logging
import posixpath
import shlex
import stat
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paramiko

from ...errors import (
    BackendRejected,
    BackendUnavailable,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    UnsafePath,
)
from .. import layout
from .base import FileEntry, FileOpener, FolderMember, Progress, describe_error
from .paths import (
    CREDENTIALS_SKIPPED,
    LINK_SKIPPED,
    clean_relative,
    is_credentials,
    link_points_down,
    not_folder,
    save_stream,
    staged_folder,
)
from .ssh_connection import CONNECTION_ERRORS, SshConnection, read_line, rest_of_stderr

log = logging.getLogger(__name__)


class SshRunFiles:
    """Run files on the login node that ``ssh`` reaches."""

    def __init__(self, ssh: SshConnection) -> None:
        self.ssh = ssh
        # The shared session, the connection it belongs to, and the lock of both: the one
        # thread holding it may use the session. Taken before the connection's lock.
        self._sftp: paramiko.SFTPClient | None = None
        self._sftp_client: paramiko.SSHClient | None = None
        self._sftp_lock = threading.Lock()

    # ---- sessions -------------------------------------------------------------------------

    @contextmanager
    def shared(self) -> Iterator[paramiko.SFTPClient]:
        """The shared SFTP session for small operations, one thread at a time."""
        with self._sftp_lock:
            yield self._shared_session()

    def _shared_session(self) -> paramiko.SFTPClient:
        """The shared session (use it through ``shared``), opened anew when it belongs to
        a connection that is no longer the current one or its channel closed. Opened
        without the connection's lock: a login node slow to start sftp must not stall
        status polls."""
        client = self.ssh.client()
        sftp = self._sftp
        channel = sftp.get_channel() if sftp is not None else None
        if self._sftp_client is client and channel is not None and not channel.closed:
            assert sftp is not None
            return sftp
        # Not closed: its link went with it; a frozen one would stall the close.
        self._sftp = self._sftp_client = None
        self._sftp = self.open_session(client)
        self._sftp_client = client
        return self._sftp

    def open_session(self, client: paramiko.SSHClient) -> paramiko.SFTPClient:
        """A new SFTP session whose every read and write gives up after ``io_timeout``."""
        channel = self.ssh.open_channel(client)
        try:
            self.ssh.request(channel, lambda: channel.invoke_subsystem("sftp"))
            return paramiko.SFTPClient(channel)
        except BaseException:
            channel.close()
            raise

    # ---- upload ---------------------------------------------------------------------------

    def upload(
        self,
        run_dir: str,
        local_dir: Path,
        names: list[str],
        progress: Progress | None,
        config: str,
    ) -> None:
        """The files ``names`` of ``local_dir`` into ``run_dir`` (made, mode 0700).
        ``config``: the config file that chose ``run_dir``, as an error names it."""
        self.ssh.with_connection(
            lambda: self._upload(run_dir, local_dir, names, progress, config),
            "uploading the run",
        )

    def _upload(
        self,
        run_dir: str,
        local_dir: Path,
        names: list[str],
        progress: Progress | None,
        config: str,
    ) -> None:
        total = sum((local_dir / n).stat().st_size for n in names)
        done = 0
        sftp = self.open_session(self.ssh.client())
        target = run_dir  # what is being written, for the error
        written: list[str] = []
        try:
            _sftp_makedirs(sftp, run_dir)
            for name in names:
                local = local_dir / name
                mode = stat.S_IMODE(local.stat().st_mode)
                target = posixpath.join(run_dir, name)
                with local.open("rb") as src, sftp.open(target, "wb") as dst:
                    written.append(target)
                    # Mode first, data second: a secret is never readable by others remotely.
                    dst.chmod(mode)
                    dst.set_pipelined(True)
                    size = 0
                    while chunk := src.read(layout.CHUNK):
                        dst.write(chunk)
                        size += len(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
                    _check_arrived(dst, size)
        except _ShortWrite as short:
            raise self._write_refused(sftp, target, run_dir, written, str(short), config) from None
        except PermissionError as exc:
            target = exc.filename or target
            raise self._write_denied(sftp, target, run_dir, written, config) from None
        except OSError as exc:
            if not _refused(sftp, exc):
                raise
            said = f"the SFTP server answered {str(exc).strip() or 'nothing'!r}"
            raise self._write_refused(sftp, target, run_dir, written, said, config) from None
        finally:
            sftp.close()
        if progress:
            progress(total, total)

    def _write_refused(
        self,
        sftp: paramiko.SFTPClient,
        target: str,
        run_dir: str,
        written: list[str],
        said: str,
        config: str,
    ) -> BackendRejected:
        """The error of a write the server refused on a live link. OpenSSH answers a full
        disk, an exceeded quota and a read-only file system alike, with a bare "Failure":
        this was told as a lost connection, and users looked for network trouble."""
        left = self._take_back(sftp, run_dir, written)
        return BackendRejected(
            f"The file system of {target} on {self.ssh.hostname} refused the write "
            f"({said}): is it full or over quota? Free space there, or choose another "
            f"SSH.RemoteDirectory (one on a file system with room, e.g. $SCRATCH) in {config}. "
            f"{left}"
        )

    def _write_denied(
        self,
        sftp: paramiko.SFTPClient,
        target: str,
        run_dir: str,
        written: list[str],
        config: str,
    ) -> PermissionDenied:
        """SFTP's permission error names no path ("[Errno 13] Permission denied"): this
        one names the path and the setting that chose it."""
        left = self._take_back(sftp, run_dir, written)
        user = self.ssh.username or "the SSH user"
        return PermissionDenied(
            f"{self.ssh.hostname} denied {user} the right to write {target} while uploading "
            f"the run: choose an SSH.RemoteDirectory that this user may write to in {config}, "
            f"or change the permissions there. {left}"
        )

    @staticmethod
    def _take_back(sftp: paramiko.SFTPClient, run_dir: str, written: list[str]) -> str:
        """Removes what an upload that failed half-way wrote (a partial package fills a
        full disk further; the credential file must not stay); says what is left."""
        cleaned = True
        for path in [*written, run_dir]:
            try:
                if path == run_dir:
                    sftp.rmdir(path)
                else:
                    sftp.remove(path)
            except FileNotFoundError:
                pass
            except Exception:  # noqa: BLE001 - best effort; the failure is what matters
                cleaned = False
        if cleaned:
            return "Nothing of the run was left there."
        return f"Remove what is left of {run_dir} there."

    # ---- small operations on the shared session ------------------------------------------

    def read_from(self, path: str, offset: int, most: int, what: str) -> tuple[bytes, int]:
        """At most ``most`` bytes of ``path`` from ``offset``, and the offset after them;
        nothing from a file that does not exist (yet)."""

        def read() -> tuple[bytes, int]:
            with self.shared() as sftp:
                try:
                    with sftp.open(path, "rb") as f:
                        end = min(f.stat().st_size or 0, offset + most)
                        if end <= offset:
                            return b"", offset
                        f.seek(offset)
                        # Pipelined requests: one 32 KiB request at a time took a round
                        # trip each, so a follower fell behind a chatty job.
                        f.prefetch(end)
                        data = f.read(end - offset)
                except FileNotFoundError:
                    return b"", offset  # not started yet: no log so far
            return data, offset + len(data)

        return self.ssh.with_connection(read, what)

    def remove(self, path: str, what: str) -> None:
        """Delete ``path``; one that is gone already is fine."""

        def remove() -> None:
            with self.shared() as sftp:
                try:
                    sftp.remove(path)
                except FileNotFoundError:
                    pass  # the job started and deleted it itself

        self.ssh.with_connection(remove, what)

    def list(self, run_dir: str, path: str = "") -> list[FileEntry]:
        """The entries of one directory of the run (not recursive), directories first."""
        rel = clean_relative(path)

        def listing() -> list[FileEntry]:
            with self.shared() as sftp:
                target, st = self._stat_confined(sftp, run_dir, rel)
                if not stat.S_ISDIR(st.st_mode or 0):
                    raise InvalidRequest(f"{path!r} of run directory {run_dir} is not a folder")
                attrs = sftp.listdir_attr(target)
            entries = [
                FileEntry(
                    path=posixpath.join(rel, a.filename) if rel else a.filename,
                    size=a.st_size or 0,
                    is_dir=stat.S_ISDIR(a.st_mode or 0),
                )
                for a in attrs
            ]
            return sorted(entries, key=lambda e: (not e.is_dir, e.path))

        return self.ssh.with_connection(listing, "listing files")

    # ---- reading and downloading --------------------------------------------------------

    def open(self, run_dir: str, path: str) -> Iterator[bytes]:
        """One file of the run, in chunks."""
        rel = clean_relative(path)
        sftp, handle, target = self.ssh.with_connection(
            lambda: self._open_confined_file(run_dir, rel, path), "opening a file"
        )
        return self._stream_file(sftp, handle, target)

    def _open_confined_file(
        self, run_dir: str, rel: str, path: str
    ) -> tuple[paramiko.SFTPClient, paramiko.SFTPFile, str]:
        # A session of its own: a long stream must not hold the shared one.
        sftp = self.open_session(self.ssh.client())
        try:
            target, st = self._stat_confined(sftp, run_dir, rel)
            if not stat.S_ISREG(st.st_mode or 0):
                raise InvalidRequest(f"{path!r} of run directory {run_dir} is not a file")
            # Opened here, not when the stream is first read: a file the job left
            # unreadable came out of the stream as a bare PermissionError.
            try:
                handle = sftp.open(target, "rb")
            except PermissionError:
                raise PermissionDenied(
                    f"{self.ssh.hostname} denied reading {target}: its permissions do not "
                    f"let {self.ssh.username or 'the SSH user'} read it. Make it readable "
                    "on the cluster (chmod u+r) and try again."
                ) from None
        except BaseException:
            sftp.close()
            raise
        return sftp, handle, target

    def _stream_file(
        self, sftp: paramiko.SFTPClient, handle: paramiko.SFTPFile, target: str
    ) -> Iterator[bytes]:
        try:
            yield from _read_ahead(handle)
            handle.close()  # nothing in flight any more: a polite close is quick
        except (TimeoutError, paramiko.SSHException, EOFError, ConnectionError) as exc:
            raise BackendUnavailable(
                f"Lost the SSH connection to {self.ssh.hostname}:{self.ssh.port} while reading "
                f"{target}: {describe_error(exc)}"
            ) from None
        finally:
            # The session's own channel, not the file: after Ctrl-C or a reader that
            # stopped early, closing the file first waited for every read request in
            # flight (seconds, or for ever with the channel mid-packet). The connection
            # stays open for the next command; the server closes the file with the channel.
            _let_requests_go_out()
            sftp.close()
            # Marked closed without a request: else paramiko's __del__ sends one later,
            # on the closed channel, and prints a traceback.
            paramiko.file.BufferedFile.close(handle)

    def download(
        self, run_dir: str, path: str, dest: Path, progress: Progress | None = None
    ) -> Path:
        """A file lands at ``dest`` (or inside it, if ``dest`` is a folder) and replaces
        an older copy. A folder travels as one tar stream and lands as ``dest/<name>``
        (or at ``dest`` if that does not exist yet); an existing one is a ``Conflict``."""
        rel = clean_relative(path)
        dest = Path(dest)

        def inspect() -> tuple[str, bool, int]:
            with self.shared() as sftp:
                target, st = self._stat_confined(sftp, run_dir, rel)
            return target, stat.S_ISDIR(st.st_mode or 0), st.st_size or 0

        target, is_dir, size = self.ssh.with_connection(inspect, "inspecting a file")
        name = posixpath.basename(rel) or posixpath.basename(run_dir)
        final = dest / name if dest.is_dir() else dest
        if is_dir:
            return self._download_folder(target, final, progress, whole_run=not rel)
        return save_stream(self.open(run_dir, rel), final, size, progress)

    def _download_folder(
        self, target: str, final: Path, progress: Progress | None, *, whole_run: bool = False
    ) -> Path:
        parent, name = posixpath.split(target)
        # The archive's size first (for progress), then the archive, on one channel.
        command = f"cd {shlex.quote(parent)} && {_tar_size(name)} && {_tar(name, whole_run)}"

        def open_stream() -> tuple[paramiko.SSHClient, paramiko.Channel]:
            client = self.ssh.client()
            return client, self.ssh.open_stream(command, client)

        with staged_folder(final, name) as staging:
            client, channel = self.ssh.with_connection(open_stream, "downloading")
            try:
                _untar_stream(channel, staging, progress)
                status = self.ssh.exit_status(channel)
                if status == -1 and _cut_off(channel):
                    # The stream ended between two members, which tar reads as the end
                    # of the archive; no exit status came: the link went, not tar.
                    raise EOFError(_CUT_OFF)
                err = rest_of_stderr(channel).decode(errors="replace").strip()
            except _LocalWriteFailed as failed:
                # The caller's own OSError (RunService.download names the destination
                # and what to do), for the folder asked for, not the hidden staging one.
                local = failed.error
                raise OSError(local.errno, local.strerror or str(local), str(final)) from None
            except CONNECTION_ERRORS as exc:
                raise self._lost(client, target, exc, "Nothing was kept of the folder. ") from None
            finally:
                channel.close()
            self._check_tar(status, err, target)
        return final

    def _lost(
        self, client: paramiko.SSHClient, target: str, exc: BaseException, note: str = ""
    ) -> BackendUnavailable:
        # Only the link this stream used: another thread may have replaced it with a
        # fresh one meanwhile, which must stay open.
        self.ssh.drop(client)
        return BackendUnavailable(
            f"Lost the SSH connection to {self.ssh.hostname}:{self.ssh.port} while "
            f"downloading {target}: {describe_error(exc)}. {note}Try the download again."
        )

    def _check_tar(self, status: int, err: str, target: str) -> None:
        if status == 1:
            # GNU tar's "some files differ": a file changed or went while it was read,
            # as those of a run still running do (its log grows). Each file arrived as
            # it was when read; failing the download left nothing to look at.
            log.warning("download: %s changed while it was read: %s", target, err)
        elif status != 0:
            raise BackendRejected(f"tar of {target} on {self.ssh.hostname} failed: {err}")

    def folder_members(self, run_dir: str, path: str) -> Iterator[FolderMember]:
        """A folder's entries, read from one tar stream of it (``tar -cf -`` on the login
        node, as for a folder download): one round trip, whatever the number of files.
        Each file's data is read from the stream before the next entry comes."""
        rel = clean_relative(path)

        def inspect() -> tuple[str, int]:
            with self.shared() as sftp:
                target, st = self._stat_confined(sftp, run_dir, rel)
            return target, st.st_mode or 0

        target, mode = self.ssh.with_connection(inspect, "inspecting a folder")
        if not stat.S_ISDIR(mode):
            why = not_folder(stat.S_ISREG(mode))
            raise InvalidRequest(f"{path!r} of run directory {run_dir} {why}")
        parent, name = posixpath.split(target)
        # --hard-dereference: a file's second hard link comes with its data, not as a
        # reference to an earlier member that a streamed archive cannot go back to.
        command = f"cd {shlex.quote(parent)} && {_tar(name, not rel, '--hard-dereference ')}"

        def open_stream() -> tuple[paramiko.SSHClient, paramiko.Channel]:
            client = self.ssh.client()
            return client, self.ssh.open_stream(command, client)

        client, channel = self.ssh.with_connection(open_stream, "downloading")
        return self._tar_members(client, channel, target, name)

    def _tar_members(
        self, client: paramiko.SSHClient, channel: paramiko.Channel, target: str, name: str
    ) -> Iterator[FolderMember]:
        raw = _CountingReader(channel, 0, None)
        reader = io.BufferedReader(raw, layout.CHUNK)
        try:
            try:
                with tarfile.open(fileobj=reader, mode="r|") as archive:
                    for member in archive:
                        rel = member.name.removeprefix(name).lstrip("/")
                        if not rel or member.name.split("/")[0] != name:
                            continue
                        if member.isdir():
                            yield FolderMember(rel, "dir", member.mtime, member.mode)
                        elif member.issym():
                            yield FolderMember(rel, "link", member.mtime, target=member.linkname)
                        elif member.isreg():
                            yield FolderMember(
                                rel, "file", member.mtime, member.mode,
                                open=_member_data(archive, member),
                            )  # fmt: skip
                        else:
                            log.warning("download: skipped %s (not a file, folder or link)", rel)
                status = self.ssh.exit_status(channel)
                if status == -1 and _cut_off(channel):
                    raise EOFError(_CUT_OFF)
                err = rest_of_stderr(channel).decode(errors="replace").strip()
            except tarfile.TarError as exc:
                if _cut_off(channel):
                    raise EOFError(_CUT_OFF) from None
                raise BackendRejected(
                    f"The folder {target} arrived as a broken tar stream: {exc}"
                ) from None
        except CONNECTION_ERRORS as exc:
            raise self._lost(client, target, exc) from None
        finally:
            channel.close()
        self._check_tar(status, err, target)

    def _confined(self, sftp: paramiko.SFTPClient, run_dir: str, rel: str) -> str:
        """The real remote path of ``rel``; refuses anything resolving outside the run."""
        try:
            real_root = sftp.normalize(run_dir)
        except FileNotFoundError:
            raise NotFound(
                f"The run directory {run_dir} does not exist on {self.ssh.hostname}"
            ) from None
        candidate = posixpath.join(run_dir, rel) if rel else run_dir
        try:
            # The server's realpath resolves symlinks, so a link leading out is caught.
            real = sftp.normalize(candidate)
        except FileNotFoundError:
            raise self._missing(run_dir, rel) from None
        if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
            raise UnsafePath(f"{rel!r} leads outside the run directory {run_dir}")
        return real

    def _stat_confined(
        self, sftp: paramiko.SFTPClient, run_dir: str, rel: str
    ) -> tuple[str, paramiko.SFTPAttributes]:
        """``_confined``, and what the server says of the path. OpenSSH resolves a
        missing last name too: only the stat finds it missing, and that came out as a
        bare "[Errno 2] No such file" naming nothing."""
        target = self._confined(sftp, run_dir, rel)
        try:
            return target, sftp.stat(target)
        except FileNotFoundError:
            raise self._missing(run_dir, rel) from None

    def _missing(self, run_dir: str, rel: str) -> NotFound:
        # The run directory is named after its run (SshSlurmBackend.submit).
        folder = posixpath.dirname(rel)
        look = f"mantik runs files {posixpath.basename(run_dir)}"
        look += f" {shlex.quote(folder)}" if folder else ""
        return NotFound(
            f"There is no {rel!r} in the run directory {run_dir} on {self.ssh.hostname}; "
            f"'{look}' lists what is there."
        )


# ---- the folder's tar stream (no connection of its own) ---------------------------------


class _LocalWriteFailed(Exception):
    """Extracting a folder failed on the local side, not on the link: ``error``."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _CountingReader(io.RawIOBase):
    """A channel as a file for tarfile, reporting bytes read against an announced total."""

    def __init__(self, channel: paramiko.Channel, total: int, progress: Progress | None) -> None:
        self.channel = channel
        self.total = total
        self.done = 0
        self.progress = progress
        self._last = 0.0
        # What reading the channel raised: the link's trouble, unlike the local disk's.
        self.link_error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self.channel.recv(len(buffer))
        except BaseException as exc:
            self.link_error = exc
            raise
        buffer[: len(data)] = data
        self.done += len(data)
        now = time.monotonic()
        if self.progress and (now - self._last > 0.2 or not data):
            self._last = now
            self.progress(min(self.done, self.total), self.total)
        return len(data)


def _member_data(archive: tarfile.TarFile, member: tarfile.TarInfo) -> FileOpener:
    def open_now() -> tuple[int, Iterator[bytes]]:
        data = archive.extractfile(member)
        assert data is not None  # a regular file

        def chunks() -> Iterator[bytes]:
            while chunk := data.read(layout.CHUNK):
                yield chunk

        return member.size, chunks()

    return open_now


def _skip_unsafe_members(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's "data" filter (no absolute names, no "..", no devices, no links leading
    out), but skipping such a member instead of failing the download: run directories
    often hold venvs whose links point to the cluster's own interpreters. A symbolic link
    must also point down (``link_points_down``), and so must every name and a hard link's
    target: the filter's own check of where a path leads can be outwitted (CVE-2025-4517,
    fixed in Python 3.11.13 and 3.12.11) by a link's '..' or, through links to '.', by a
    name's. tar sends no '..' of a folder it read: a stream with one was made to get out."""
    if not link_points_down(member.name):
        log.warning("download: skipped %s (not a name inside the folder)", member.name)
        return None
    if is_credentials(member.name):  # the run's own stays on the cluster (``_tar``)
        log.warning(CREDENTIALS_SKIPPED, member.name)
        return None
    if (member.issym() or member.islnk()) and not link_points_down(member.linkname):
        log.warning(LINK_SKIPPED, member.name, member.linkname)
        return None
    try:
        return tarfile.data_filter(member, dest)
    except tarfile.FilterError as exc:
        log.warning("download: skipped %s (%s)", member.name, exc)
        return None


_CUT_OFF = "the SSH channel closed before the end of the folder's tar stream"


def _cut_off(channel: paramiko.Channel) -> bool:
    """Whether the channel's stream ended without the remote end saying so: the remote
    side sends EOF when its command's output ends (also when tar fails or is killed);
    a channel closed here, or with its connection, has none."""
    transport = channel.get_transport()
    link_gone = transport is None or not transport.is_active()
    return not channel.eof_received and (channel.closed or link_gone)


# What ``tar -cf`` of a folder writes, worked out from ``find``: a 512-byte header for
# each entry (and GNU's long-name entry before one whose path is over 100 bytes), file
# data padded to 512 bytes, two empty blocks, all padded to a 10240-byte record. The
# file sizes alone (du) missed the headers: a folder of many small files showed the
# download complete at a tenth of it. A line not starting with a kind and a size is
# the rest of a name holding a newline.
_TAR_SIZE_AWK = """\
$1 ~ /^[a-z]$/ && $2 ~ /^[0-9]+$/ {
  n += 512
  l = length($0) - length($1) - length($2) - 4
  if (l > 100) n += 512 + int((l + 512) / 512) * 512
  if ($1 == "f") n += int(($2 + 511) / 512) * 512
}
END { n += 1024; print int((n + 10239) / 10240) * 10240 }"""


def _tar(name: str, whole_run: bool, options: str = "") -> str:
    """``tar`` writing the folder ``name`` to stdout; the whole run's credential file stays
    on the cluster (a pending job has not read it)."""
    q = shlex.quote
    exclude = f"--exclude={q(f'{name}/{layout.CREDENTIALS_FILE}')} " if whole_run else ""
    return f"tar -cf - {options}{exclude}-- {q(name)}"


def _tar_size(name: str) -> str:
    """A shell command printing about how many bytes ``tar -cf - name`` will write.
    ``./name``: find takes a name starting with '-' for an option."""
    return f"find ./{shlex.quote(name)} -printf '%y %s %p\\n' | awk {shlex.quote(_TAR_SIZE_AWK)}"


def _untar_stream(channel: paramiko.Channel, dest: Path, progress: Progress | None) -> None:
    size_line = read_line(channel).strip()
    # An estimate (links' long targets, for one, are not counted): progress is capped.
    total = int(size_line) if size_line.isdigit() else 0
    raw = _CountingReader(channel, total, progress)
    reader = io.BufferedReader(raw, layout.CHUNK)
    try:
        with tarfile.open(fileobj=reader, mode="r|") as archive:
            archive.extractall(dest, filter=_skip_unsafe_members)  # noqa: S202 - filtered
    except tarfile.TarError as exc:
        if _cut_off(channel):
            # A channel closed under the stream (the connection dropped, or another
            # thread closed it) reads as a short stream: that is a lost link, to be
            # tried again, not a tar that failed on the cluster.
            raise EOFError(_CUT_OFF) from None
        raise BackendRejected(f"The folder arrived as a broken tar stream: {exc}") from None
    except OSError as exc:
        if exc is raw.link_error:
            raise
        # Writing here failed (a full disk, a quota): taken for a lost link, it dropped
        # the connection and told the user to look for network trouble.
        raise _LocalWriteFailed(exc) from None
    if progress:
        progress(total, total)


# Read requests sent at once by _read_ahead: enough to keep a long link busy, few enough
# that paramiko's thread sending them is done in an instant.
READ_AHEAD = 32 * layout.CHUNK


def _read_ahead(handle: paramiko.SFTPFile) -> Iterator[bytes]:
    """A file's data in chunks, pipelined one batch of requests at a time (a request
    each took a round trip). Not ``prefetch()``: its thread sends requests for the whole
    file, blocks on a full channel, and once the channel closes under it (Ctrl-C) dies
    with a traceback on stderr."""
    size = handle.stat().st_size or 0
    offset = 0
    while offset < size:
        end = min(size, offset + READ_AHEAD)
        chunks = [(o, min(layout.CHUNK, end - o)) for o in range(offset, end, layout.CHUNK)]
        for chunk in handle.readv(chunks):
            yield chunk
        offset = end
    # Whatever the file grew by since (a log being written), read plainly.
    handle.seek(offset)
    while chunk := handle.read(layout.CHUNK):
        yield chunk


def _let_requests_go_out(most: float = 1.0) -> None:
    """Wait (a moment at most) for paramiko's threads sending a batch of read requests:
    one still sending when its channel closes dies with a traceback on stderr. A batch
    is sent in milliseconds; other streams' threads finish as soon."""
    deadline = time.monotonic() + most
    for thread in threading.enumerate():
        if thread.name.endswith("(_prefetch_thread)"):
            thread.join(max(0.0, deadline - time.monotonic()))


def _sftp_makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    missing = []
    while path not in ("", "/"):
        try:
            sftp.stat(path)
            break
        except FileNotFoundError:
            missing.append(path)
            path = posixpath.dirname(path)
    for directory in reversed(missing):
        try:
            # 0700: the run directory holds the tracking credential.
            sftp.mkdir(directory, mode=0o700)
        except OSError as exc:
            # Runs submitted at once all find a new remote directory missing; all but
            # one mkdir fail, with SFTP's bare "Failure" (a plain OSError) for EEXIST.
            # Taken for a lost link, that failed the upload and dropped the connection
            # under the others. A timeout or a lost link is a subclass: not looked at.
            if isinstance(exc, PermissionError):
                raise PermissionError(exc.errno, exc.strerror, directory) from None
            if type(exc) is not OSError or not _is_dir(sftp, directory):
                raise


class _ShortWrite(Exception):
    """Less of a file arrived than was written: the server refused some of the writes."""


def _check_arrived(dst: paramiko.SFTPFile, size: int) -> None:
    """Refuse a remote file shorter than the ``size`` bytes written to it. paramiko drops
    the server's answers to pipelined writes unless over 100 are in flight, so a
    "Failure" (a full disk) went unseen: the upload succeeded with a truncated package
    or credential file. The server answers requests in order, so the file's size after
    the writes shows whether all of them took."""
    dst.flush()
    arrived = dst.stat().st_size or 0
    if arrived != size:
        raise _ShortWrite(f"only {arrived} of its {size} bytes arrived")


def _refused(sftp: paramiko.SFTPClient, exc: OSError) -> bool:
    """Whether ``exc`` is the SFTP server refusing an operation on a live link. paramiko
    raises a bare OSError (no errno) both for the status "Failure" (a full disk, an
    exceeded quota) and for a request on a closed channel ("Socket is closed"): only
    the session's channel and connection, both still open, tell the two apart."""
    if type(exc) is not OSError or exc.errno is not None:
        return False
    channel = sftp.get_channel()
    transport = channel.get_transport() if channel is not None else None
    return (
        channel is not None
        and not channel.closed
        and transport is not None
        and transport.is_active()
    )


def _is_dir(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        return stat.S_ISDIR(sftp.stat(path).st_mode or 0)
    except FileNotFoundError:
        return False
