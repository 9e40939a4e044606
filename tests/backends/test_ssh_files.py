"""The run files of Slurm over SSH (ssh_files.py) on the loopback cluster: uploads that run
at the same time, files the job left unreadable."""

from __future__ import annotations

import posixpath
import threading
import time
import uuid

import pytest

from mantik_jupyter.compute.states import RunState
from mantik_jupyter.errors import NotFound, PermissionDenied

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
