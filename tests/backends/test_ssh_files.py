"""The run files of Slurm over SSH (ssh_files.py) on the loopback cluster: uploads that run
at the same time, files the job left unreadable, file systems that are full."""

from __future__ import annotations

import errno
import io
import logging
import os
import posixpath
import pwd
import shutil
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mantik_jupyter.compute.backends.base import PreparedJob
from mantik_jupyter.compute.backends.ssh_files import _untar_stream
from mantik_jupyter.compute.backends.ssh_slurm import SshSlurmBackend
from mantik_jupyter.compute.runs import RunService
from mantik_jupyter.compute.states import RunState
from mantik_jupyter.errors import BackendRejected, InvalidRequest, NotFound, PermissionDenied

from ..runs_helpers import copy_example, slurm_config, write_config
from .test_ssh_slurm import FINAL, _backend, make_job, wait_for

pytestmark = pytest.mark.slurm


def test_runs_submitted_at_once_into_a_new_remote_directory_all_start(slurm_cluster, tmp_path):
    # A sweep submitted at once into an SSH.RemoteDirectory that does not exist yet: each
    # upload found it missing and made it, every mkdir but the first failed ("Failure"),
    # that counted as a lost connection, and dropping it broke the other uploads too.
    top = f"{slurm_cluster.remote_dir}/at-once-{uuid.uuid4().hex[:8]}"
    b = _backend(slurm_cluster, f"{top}/a/b/c/d/e")
    jobs = [make_job(tmp_path, "true", sbatch="#SBATCH --hold\n") for _ in range(8)]
    b.remote_base()  # as check_credentials does before the submissions
    barrier = threading.Barrier(len(jobs))
    results: dict[int, object] = {}

    def submit(index: int) -> None:
        barrier.wait()
        try:
            results[index] = b.submit(jobs[index])
        except Exception as exc:  # noqa: BLE001 - the test looks at what came out
            results[index] = exc

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(jobs))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        failed = {i: r for i, r in results.items() if not isinstance(r, str)}
        assert len(results) == len(jobs) and not failed, failed
        answer = b.states([str(r) for r in results.values()])
        assert {s.state for s in answer.values()} == {RunState.QUEUED}, answer
    finally:
        ids = [r for r in results.values() if isinstance(r, str)]
        if ids:
            b._run("scancel " + " ".join(ids), "cleaning up")
        b._run(f"rm -rf {top}", "cleaning up")
        b.close()


def test_a_file_the_job_made_unreadable_is_permission_denied(slurm_cluster, tmp_path):
    # It came out as Python's bare PermissionError ("[Errno 13] Permission denied", no file,
    # no host): a 500 in the lab, a traceback in the CLI.
    top = f"{slurm_cluster.remote_dir}/unreadable-{uuid.uuid4().hex[:8]}"
    b = _backend(slurm_cluster, top)
    try:
        job_id = b.submit(make_job(tmp_path, "echo private > locked && chmod 000 locked"))
        assert wait_for(b, job_id, FINAL).state == RunState.FINISHED
        target = f"{b.run_dir_of(job_id)}/locked"
        with pytest.raises(PermissionDenied) as caught:
            list(b.open_file(job_id, "locked"))
        assert target in caught.value.message and slurm_cluster.host in caught.value.message
        with pytest.raises(PermissionDenied):
            b.download(job_id, "locked", tmp_path)
        assert not (tmp_path / "locked").exists()
        assert not list(tmp_path.glob(".locked*"))  # no partial file left behind
    finally:
        b._run(f"rm -rf {top}", "cleaning up")
        b.close()


def test_a_stream_given_up_half_way_ends_at_once(slurm_cluster, monkeypatch):
    # Stopping a file stream early (Ctrl-C, a browser that cancels) closed the file
    # politely while paramiko's prefetch had requests for the whole file in flight: 5-9 s,
    # or a hang; and its thread then printed "OSError: Socket is closed".
    top = f"{slurm_cluster.remote_dir}/given-up-{uuid.uuid4().hex[:8]}"
    b = _backend(slurm_cluster, top)
    died: list[object] = []
    monkeypatch.setattr(threading, "excepthook", died.append)
    try:
        # Sparse: seconds to read over SSH, no disk on the cluster.
        b._run(f"mkdir -p {top} && truncate -s 4G {top}/big.bin", "making a big file")
        stream = b.files.open(top, "big.bin")
        assert len(next(stream)) > 0 and len(next(stream)) > 0
        started = time.monotonic()
        stream.close()
        assert time.monotonic() - started < 1
        # The shared connection serves the next command.
        assert [e.path for e in b.files.list(top)] == ["big.bin"]
        time.sleep(0.5)  # a thread dying of the closed channel would have by now
        assert not died
    finally:
        b._run(f"rm -rf {top}", "cleaning up")
        b.close()


def test_a_missing_path_is_named_with_what_to_do(slurm_cluster, tmp_path):
    # OpenSSH resolves a missing last name, so the stat after it failed with Python's
    # bare FileNotFoundError: "Not found on 127.0.0.1 while inspecting a file: [Errno 2]
    # No such file", naming neither the path nor what to do.
    top = f"{slurm_cluster.remote_dir}/missing-{uuid.uuid4().hex[:8]}"
    run_id = posixpath.basename(top)
    b = _backend(slurm_cluster, top)
    try:
        b._run(f"mkdir -p {top}/sub", "making a run directory")
        attempts = {
            "download": lambda rel: b.files.download(top, rel, tmp_path),
            "list": lambda rel: b.files.list(top, rel),
            "open": lambda rel: list(b.files.open(top, rel)),
        }
        for what, attempt in attempts.items():
            for rel, look in [("gone.txt", ""), ("sub/gone.txt", " sub")]:
                with pytest.raises(NotFound) as caught:
                    attempt(rel)
                message = caught.value.message
                assert f"There is no {rel!r} in the run directory {top}" in message, what
                assert f"'mantik runs files {run_id}{look}' lists what is there" in message
        assert not list(tmp_path.iterdir())
    finally:
        b._run(f"rm -rf {top}", "cleaning up")
        b.close()


@contextmanager
def small_file_system(path: Path, size: str, owner: str | None = None) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (made; its parent must exist), owned by
    ``owner``: a disk or quota that fills up. Unmounted and removed afterwards."""
    path.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if mounted.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
        try:
            if owner:
                user = pwd.getpwnam(owner)
                os.chown(path, user.pw_uid, user.pw_gid)
            yield path
        finally:
            _unmount(path)
    finally:
        path.rmdir()


def big_package(job: PreparedJob, size: int, *, zeros: bool = False) -> None:
    """Make the job's package a real one holding ``size`` bytes: random ones, which do
    not compress, or ``zeros``, which compress to a few KiB."""
    with tarfile.open(job.local_dir / "package.tar.gz", "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("data.bin")
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(size) if zeros else os.urandom(size)))


def _unmount(path: Path) -> None:
    # A server process of a session just closed may still be inside for a moment.
    for _ in range(20):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "--lazy", str(path)], check=True, capture_output=True)


@contextmanager
def full_remote_base(cluster, prefix: str) -> Iterator[tuple[Path, SshSlurmBackend]]:
    """A remote base directory on a 1 MiB file system of the SSH user's, and a backend
    using it (closed before the unmount: a session's SFTP server may still be inside)."""
    top = Path(f"{cluster.remote_dir}/{prefix}-{uuid.uuid4().hex[:8]}")
    b = _backend(cluster, str(top))
    try:
        # Made as the SSH user: root must not own a parent the tests share.
        b._run(f"mkdir -p {cluster.remote_dir}", "making the remote directory")
        with small_file_system(top, "1m", owner=cluster.username):
            try:
                yield top, b
            finally:
                b.close()
    finally:
        b.close()


def test_a_full_remote_file_system_is_named_not_a_lost_connection(slurm_cluster, tmp_path):
    # A home or project space over quota answers writes with SFTP's bare "Failure": that
    # counted as a lost link ("Lost the SSH connection ... while uploading the run", after
    # uploading it all a second time), and users looked for network trouble.
    job = make_job(tmp_path, "true")
    # Sorted first, the credential file is written before the package fills the disk.
    big_package(job, 2 * 1024 * 1024)
    with full_remote_base(slurm_cluster, "full") as (top, b):
        link = b.ssh.client()
        with pytest.raises(BackendRejected) as caught:
            b.submit(job)
        message = caught.value.message
        target = f"{top}/{job.run_id}/package.tar.gz"
        assert f"The file system of {target} on {slurm_cluster.host} refused" in message
        assert "full or over quota" in message and "SSH.RemoteDirectory" in message
        assert "Lost" not in message
        # Nothing stays: no credential file, no partial package filling the disk.
        assert list(top.iterdir()) == []
        assert b.ssh._client is link and link.get_transport().is_active()


def test_a_run_whose_upload_fills_the_remote_disk_fails_with_that_reason(
    service: RunService, slurm_cluster, tmp_path
):
    # The run ended FAILED with "submission failed: Lost the SSH connection ...".
    project = copy_example(tmp_path)
    (project / "data.bin").write_bytes(os.urandom(2 * 1024 * 1024))  # does not compress
    experiment = f"full-disk-{uuid.uuid4().hex[:8]}"
    with full_remote_base(slurm_cluster, "full-run") as (top, _):
        write_config(project, slurm_config(slurm_cluster, str(top)))
        with pytest.raises(BackendRejected, match="refused the write"):
            service.submit(project, experiment_name=experiment)
        service.close()  # its SSH sessions, before the unmount
        assert list(top.iterdir()) == []  # no credential file, no partial package
    runs, _ = service.list(experiment_name=experiment)
    assert len(runs) == 1 and runs[0].state == RunState.FAILED, runs
    reason = runs[0].reason or ""
    assert reason.startswith("submission failed: The file system of ") and "Lost" not in reason
    assert "full or over quota" in reason and slurm_cluster.host in reason


def test_code_that_does_not_fit_when_unpacked_is_named_not_an_sbatch_refusal(
    slurm_cluster, tmp_path
):
    # The package fits, its contents do not: tar's "No space left on device" on the login
    # node came as "sbatch on 127.0.0.1 refused the job", as if Slurm were at fault.
    job = make_job(tmp_path, "true")
    big_package(job, 3 * 1024 * 1024, zeros=True)
    with full_remote_base(slurm_cluster, "unpack-full") as (top, b):
        with pytest.raises(BackendRejected) as caught:
            b.submit(job)
        message = caught.value.message
        code = f"{top}/{job.run_id}/code"
        assert f"Unpacking the code of run {job.run_id} into {code} on " in message
        # tar's words ("Cannot write: No space left on device" or "Wrote only ..."),
        # and what to do.
        assert "was submitted: tar: " in message and "full or over quota" in message
        assert "SSH.RemoteDirectory" in message and "sbatch" not in message
        # No credential file, no partial code: only the package and the job script.
        assert sorted(os.listdir(top / job.run_id)) == ["mantik-job.sh", "package.tar.gz"]


def test_a_link_lost_during_an_upload_is_still_a_lost_link(slurm_cluster, tmp_path):
    # paramiko raises the same bare OSError for a write on a closed channel ("Socket is
    # closed") as for the server's "Failure": a dropped link must still be tried again.
    top = f"{slurm_cluster.remote_dir}/dropped-{uuid.uuid4().hex[:8]}"
    b = _backend(slurm_cluster, top)
    job = make_job(tmp_path, "true", sbatch="#SBATCH --hold\n")
    big_package(job, 4 * 1024 * 1024)
    dropped: list[int] = []

    def progress(done: int, total: int) -> None:
        if not dropped:
            dropped.append(done)
            b.ssh.drop()

    job_id = ""
    try:
        job_id = b.submit(job, progress=progress)
        assert dropped and b.states([job_id])[job_id].state == RunState.QUEUED
        with b.files.shared() as sftp:
            size = sftp.stat(f"{b.run_dir_of(job_id)}/package.tar.gz").st_size
        assert size == (job.local_dir / "package.tar.gz").stat().st_size
    finally:
        if job_id:
            b._run(f"scancel {job_id}", "cleaning up")
        b._run(f"rm -rf {top}", "cleaning up")
        b.close()


def test_a_folder_download_into_a_full_local_disk_is_a_local_error(slurm_cluster, tmp_path):
    # Extracting the folder's tar stream failed with ENOSPC on the lab's disk, which was
    # told as "Lost the SSH connection ... Try the download again", and the link dropped.
    top = f"{slurm_cluster.remote_dir}/local-full-{uuid.uuid4().hex[:8]}"
    b = _backend(slurm_cluster, top)
    try:
        b._run(
            f"mkdir -p {top}/out && head -c 3000000 /dev/urandom > {top}/out/blob",
            "making a big folder",
        )
        link = b.ssh.client()
        with small_file_system(tmp_path / "small", "1m") as small:
            with pytest.raises(OSError) as caught:
                b.files.download(top, "out", small)
            assert caught.value.errno == errno.ENOSPC, caught.value
            assert caught.value.filename == str(small / "out")
            assert list(small.iterdir()) == []  # no partial folder
        assert b.ssh._client is link and link.get_transport().is_active()
    finally:
        b._run(f"rm -rf {top}", "cleaning up")
        b.close()


def test_an_upload_into_a_directory_the_user_may_not_write_names_it(slurm_cluster, tmp_path):
    # Said "denied access while uploading the run: [Errno 13] Permission denied", with no
    # path: users could not tell which directory, or which setting chose it.
    top = f"{slurm_cluster.remote_dir}/read-only-{uuid.uuid4().hex[:8]}"
    b = _backend(slurm_cluster, top)
    job = make_job(tmp_path, "true")
    try:
        b._run(f"mkdir -p {top} && chmod 0555 {top}", "making a read-only directory")
        with pytest.raises(PermissionDenied) as caught:
            b.submit(job)
        message = caught.value.message
        assert f"write {top}/{job.run_id} while uploading" in message, message
        assert slurm_cluster.username in message and "SSH.RemoteDirectory" in message
        assert "Nothing of the run was left there." in message
        assert "Errno" not in message
    finally:
        b._run(f"chmod 0755 {top}; rm -rf {top}", "cleaning up")
        b.close()


def test_a_folder_download_keeps_only_links_that_point_down(slurm_cluster, tmp_path):
    # tarfile's "data" filter finds where a link leads by resolving the folder extracted so
    # far, which a chain of links with long names can outwit (CVE-2025-4517; this Python
    # may predate the fix): a link pointing up was kept when it stayed inside.
    top = f"{slurm_cluster.remote_dir}/links-{uuid.uuid4().hex[:8]}"
    b = _backend(slurm_cluster, top)
    try:
        b._run(
            f"mkdir -p {top}/out/sub && echo hi > {top}/out/data.txt"
            f" && ln -s data.txt {top}/out/latest && ln -s ../data.txt {top}/out/sub/up"
            f" && ln -s sub {top}/out/down",
            "making a folder with links",
        )
        got = b.files.download(top, "out", tmp_path / "dest")
        assert (got / "latest").is_symlink() and (got / "latest").read_text() == "hi\n"
        assert (got / "down").is_symlink() and (got / "down").resolve() == (got / "sub").resolve()
        assert not (got / "sub" / "up").exists() and not (got / "sub" / "up").is_symlink()
    finally:
        b._run(f"rm -rf {top}", "cleaning up")
        b.close()


def _stream_out_through_dot_dot_names(prefix: str, escape: str) -> bytes:
    """A folder's tar stream with links that all point down (into deep folders of long
    names, and one to '.') and a file whose name passes back up through them, more times
    than the folders are deep: resolving the name as tarfile's "data" filter does gives
    up past PATH_MAX and counts the '..' against the names, which keeps it inside."""
    deep = "d" * 254
    steps = "abcdefghijklmnop"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:

        def add(name: str, kind: bytes, linkname: str = "", data: bytes | None = None) -> None:
            member = tarfile.TarInfo(posixpath.join(prefix, name) if name else prefix)
            member.type, member.linkname = kind, linkname
            member.size = len(data or b"")
            tar.addfile(member, io.BytesIO(data) if data is not None else None)

        add("", tarfile.DIRTYPE)
        path = ""
        for step in steps:
            add(posixpath.join(path, deep), tarfile.DIRTYPE)
            add(posixpath.join(path, step), tarfile.SYMTYPE, deep)
            path = posixpath.join(path, step)
        add(posixpath.join(path, "here"), tarfile.SYMTYPE, ".")
        up = len(steps) + 2  # the deep folders, the folder itself, the destination
        name = posixpath.join(path, *["here"] * up, *[".."] * up, escape)
        add(name, tarfile.REGTYPE, data=b"written outside the download\n")
    return out.getvalue()


def test_a_folder_stream_cannot_write_outside_through_names_with_dot_dot(slurm_cluster, tmp_path):
    # A folder arrives as what the cluster's tar sends (a job can put another tar in the
    # PATH there). Only links pointing down were kept, but a name with '..' was left to
    # tarfile's "data" filter, which long names outwit (CVE-2025-4517, before Python
    # 3.11.13): such a stream wrote a file beside the download's destination.
    top = f"{slurm_cluster.remote_dir}/dotdot-{uuid.uuid4().hex[:8]}"
    b = _backend(slurm_cluster, top)
    local = tmp_path / "stream.tar"
    local.write_bytes(_stream_out_through_dot_dot_names("out", "escaped.txt"))
    dest = tmp_path / "downloads" / "staging"
    dest.mkdir(parents=True)
    try:
        b._run(f"mkdir -p {top}", "making a folder")
        with b.files.shared() as sftp:
            sftp.put(str(local), f"{top}/stream.tar")
        client = b.ssh.client()
        # What _download_folder's command sends: the size line, then the archive.
        channel = b.ssh.open_stream(f"echo 0 && cat {top}/stream.tar", client)
        try:
            _untar_stream(channel, dest, None)
        finally:
            channel.close()
        # The name climbs from the deepest folder to just above the destination.
        assert not (dest.parent / "escaped.txt").exists()
        assert (dest / "out" / "a").is_symlink()  # the rest of the folder arrived
    finally:
        shutil.rmtree(dest)  # paths past PATH_MAX, which a walk of tmp_path trips on
        b._run(f"rm -rf {top}", "cleaning up")
        b.close()


def test_a_path_that_cannot_go_as_a_folder_archive_says_what_it_is(slurm_cluster):
    # The lab asks for a folder's archive when a path does not open as a file: for a named
    # pipe that said "is not a folder", as if a file had been asked for.
    top = f"{slurm_cluster.remote_dir}/nofolder-{uuid.uuid4().hex[:8]}"
    b = _backend(slurm_cluster, top)
    try:
        b._run(f"mkdir -p {top} && mkfifo {top}/pipe && echo x > {top}/a.txt", "making files")
        for rel, said in [("pipe", "is neither a file nor a folder"), ("a.txt", "is a file")]:
            with pytest.raises(InvalidRequest) as caught:
                b.files.folder_members(top, rel)
            assert f"{rel!r} of run directory {top} {said}" in caught.value.message
    finally:
        b._run(f"rm -rf {top}", "cleaning up")
        b.close()


def test_a_folder_download_of_files_still_being_written_arrives(slurm_cluster, tmp_path, caplog):
    # A run still running writes as it is downloaded: tar says "file changed as we read it"
    # and exits with 1, and the download failed with "tar ... failed", leaving nothing.
    top = f"{slurm_cluster.remote_dir}/growing-{uuid.uuid4().hex[:8]}"
    b = _backend(slurm_cluster, top)
    try:
        b._run(
            f"mkdir -p {top}/out && head -c 20000000 /dev/zero > {top}/out/big.bin && cd {top}"
            " && (nohup sh -c 'while [ ! -e stop ]; do echo x >> out/big.bin; done'"
            " >/dev/null 2>&1 &)",
            "starting a writer",
        )
        with caplog.at_level(logging.WARNING):
            got = b.files.download(top, "out", tmp_path / "dest")
        assert (got / "big.bin").stat().st_size >= 20_000_000
        assert "changed while it was read" in caplog.text, caplog.text
    finally:
        b._run(f"touch {top}/stop; sleep 0.5; rm -rf {top}", "cleaning up")
        b.close()


def test_a_folder_download_of_many_small_files_counts_what_tar_sends(slurm_cluster, tmp_path):
    # Progress was counted against the files' sizes (du), but tar sends a 512-byte header
    # and padding with each: a folder of 2000 small outputs showed the download complete
    # at a tenth of it, and stayed at 100% for the rest.
    top = f"{slurm_cluster.remote_dir}/many-{uuid.uuid4().hex[:8]}"
    long = "station-" + "x" * 120  # GNU tar sends names over 100 bytes in headers of their own
    b = _backend(slurm_cluster, top)
    try:
        b._run(
            f"mkdir -p {top}/out/{long} && cd {top}/out && for i in $(seq 1 2000); do "
            f"printf '%0100d' $i > t2m-$i.csv; done && echo 1 > {long}/a && ln -s a {long}/b",
            "making many small files",
        )
        sent = b._run(f"cd {top} && tar -cf - out | wc -c", "measuring the archive")
        seen: list[tuple[int, int]] = []
        got = b.files.download(top, "out", tmp_path / "dest", progress=lambda *p: seen.append(p))
        assert len(list(got.iterdir())) == 2001
        assert {total for _, total in seen} == {int(sent.stdout)}, seen
    finally:
        b._run(f"rm -rf {top}", "cleaning up")
        b.close()
