"""A run's folder as one zip archive made while it streams (RunService.open_archive, what
the lab's browser download of a folder gets): against a real MLflow server, with the local
backend, Slurm over SSH on the loopback cluster and the UNICORE stand-in.

The lab's download refused a folder and sent the user to `mantik runs download`.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import stat
import subprocess
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from mantik_jupyter.compute.layout import CREDENTIALS_FILE
from mantik_jupyter.compute.run_archive import zip_stream
from mantik_jupyter.compute.runs import RunService
from mantik_jupyter.compute.states import RunState
from mantik_jupyter.errors import BackendRejected, NotFound

from .runs_helpers import (
    LOCAL_CONFIG,
    remote_run_dirs,
    script_project,
    slurm_config,
    unicore_config,
    wait_for,
)
from .test_download_clash import finished_run
from .test_download_parity import LINKS, LINKS_BACK_UP

# A job that keeps a copy of its credential file among its outputs, as one copying its
# run directory would: mantik's secret goes nowhere, wherever it lies.
LINKS_AND_SECRET = LINKS + 'open("outputs/' + CREDENTIALS_FILE + '", "w").write("TOKEN=x\\n")\n'


def archive_of(service: RunService, run_id: str, path: str = "") -> tuple[str, zipfile.ZipFile]:
    archive = service.open_archive(run_id, path)
    data = b"".join(archive.chunks)
    zipped = zipfile.ZipFile(io.BytesIO(data))
    assert zipped.testzip() is None
    return archive.filename, zipped


def entries(zipped: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    return {i.filename: i for i in zipped.infolist()}


def is_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def plant_credentials(run_dir: Path) -> None:
    """A credential file in the run directory, as a job still waiting has it, owned as the
    run directory is (a Slurm job's user reads it)."""
    secret = run_dir / CREDENTIALS_FILE
    secret.write_text("MLFLOW_TRACKING_PASSWORD=do-not-serve\n")
    owner = run_dir.stat()
    os.chown(secret, owner.st_uid, owner.st_gid)
    secret.chmod(0o600)


def check_archive(
    service: RunService, run_id: str, run_dir: Path, tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        name, zipped = archive_of(service, run_id, "code/outputs")
    label = service.get(run_id).run_name or run_id
    assert name == f"{label}-outputs.zip", name
    found = entries(zipped)
    assert sorted(found) == [
        "outputs/",
        "outputs/latest ü",
        "outputs/run 1/",
        "outputs/run 1/data ü.txt",
    ], sorted(found)
    assert zipped.read("outputs/run 1/data ü.txt") == b"forecast\n"
    assert is_link(found["outputs/latest ü"])
    assert zipped.read("outputs/latest ü") == b"run 1/data \xc3\xbc.txt"
    said = caplog.text
    for link in ("secret", "absolute", "root", "run 1/up"):
        assert f"{link} (a link to" in said, said
    assert f"{CREDENTIALS_FILE} (mantik's credential file)" in said, said
    # Unzip (Info-ZIP, as Linux and macOS users have it) lands the link as a link.
    (tmp / "archive.zip").write_bytes(b"".join(service.open_archive(run_id, "code/outputs").chunks))
    subprocess.run(["unzip", "-q", str(tmp / "archive.zip"), "-d", str(tmp / "x")], check=True)
    assert os.readlink(tmp / "x" / "outputs" / "latest ü") == "run 1/data ü.txt"
    assert (tmp / "x" / "outputs" / "latest ü").read_text() == "forecast\n"

    # The whole run: below the run's id, as `mantik runs download` lands it, and without
    # the credential file a job that has not started yet would still have.
    plant_credentials(run_dir)
    name, zipped = archive_of(service, run_id)
    assert name == f"{label}.zip", name
    found = entries(zipped)
    assert f"{run_id}/code/outputs/run 1/data ü.txt" in found, sorted(found)
    assert f"{run_id}/code/secret.txt" in found
    assert not [n for n in found if CREDENTIALS_FILE in n], sorted(found)
    assert b"do-not-serve" not in b"".join(service.open_archive(run_id).chunks)

    # What cannot be archived is said before any byte: a folder that is not there, a file.
    with pytest.raises(NotFound, match="There is no 'code/nothing'"):
        service.open_archive(run_id, "code/nothing")
    with pytest.raises(NotFound):
        service.open_archive(run_id, CREDENTIALS_FILE)


def test_a_local_folder_streams_as_a_zip(service, tracking, tmp_path, experiment_name, caplog):
    project = script_project(tmp_path, "links", LINKS_AND_SECRET, LOCAL_CONFIG)
    run_id = finished_run(service, project, experiment_name)
    run_dir = Path(service.get(run_id).tags["mantik.run_dir"])
    check_archive(service, run_id, run_dir, tmp_path, caplog)


@pytest.fixture(scope="module")
def remote_base(slurm_cluster):
    yield from remote_run_dirs(slurm_cluster, "archive")


@pytest.mark.slurm
def test_a_slurm_folder_streams_as_a_zip(
    service, slurm_cluster, remote_base, tmp_path, experiment_name, caplog
):
    config = slurm_config(slurm_cluster, remote_base)
    project = script_project(tmp_path, "links", LINKS_AND_SECRET, config)
    run_id = finished_run(service, project, experiment_name)
    # The loopback cluster's run directories are on this machine.
    run_dir = Path(service.get(run_id).tags["mantik.run_dir"])
    check_archive(service, run_id, run_dir, tmp_path, caplog)


GROWING = """\
import os, time
os.makedirs("outputs/ckpt", exist_ok=True)
open("outputs/static.txt", "w").write("steady\\n")
open("outputs/started", "w").write("yes\\n")
step = 0
end = time.time() + 120
with open("outputs/growing.log", "a") as log:
    while time.time() < end and not os.path.exists("stop"):
        log.write(f"line {step} " + "x" * 4000 + "\\n")
        log.flush()
        # A trainer keeping only its last checkpoint.
        open(f"outputs/ckpt/step-{step}.pt", "w").write(str(step))
        if os.path.exists(f"outputs/ckpt/step-{step - 1}.pt"):
            os.remove(f"outputs/ckpt/step-{step - 1}.pt")
        step += 1
        time.sleep(0.001)
"""


def check_running(service: RunService, run_id: str, run_dir: Path) -> None:
    """Archives of a folder the job writes into meanwhile are whole zips: a growing log
    comes as long as it was, a checkpoint removed between listing and read is left out."""
    deadline = time.monotonic() + 90
    while not (run_dir / "code" / "outputs" / "started").exists():
        assert time.monotonic() < deadline, "the job did not start writing"
        time.sleep(0.2)
    time.sleep(1)
    try:
        for _ in range(5):
            _name, zipped = archive_of(service, run_id, "code/outputs")
            found = entries(zipped)
            assert zipped.read("outputs/static.txt") == b"steady\n"
            log = zipped.read("outputs/growing.log").decode()
            # Whole lines, up to where the file was when read.
            assert log.startswith("line 0 ") and len(log) > 4000, len(log)
            ckpts = [n for n in found if n.startswith("outputs/ckpt/step-")]
            assert len(ckpts) <= 2, ckpts
            assert service.get(run_id).state == RunState.RUNNING
    finally:
        (run_dir / "code" / "stop").touch()


def test_a_local_folder_of_a_running_job_streams(service, tracking, tmp_path, experiment_name):
    project = script_project(tmp_path, "growing", GROWING, LOCAL_CONFIG)
    run_id = service.submit(project, experiment_name=experiment_name).run_id
    run_dir = Path(wait_for(service, run_id, {RunState.RUNNING}).tags["mantik.run_dir"])
    check_running(service, run_id, run_dir)
    assert wait_for(service, run_id, {RunState.FINISHED}).state == RunState.FINISHED


@pytest.mark.slurm
def test_a_slurm_folder_of_a_running_job_streams(
    service, slurm_cluster, remote_base, tmp_path, experiment_name, caplog
):
    config = slurm_config(slurm_cluster, remote_base)
    project = script_project(tmp_path, "growing", GROWING, config)
    run_id = service.submit(project, experiment_name=experiment_name).run_id
    run_dir = Path(wait_for(service, run_id, {RunState.RUNNING}).tags["mantik.run_dir"])
    with caplog.at_level(logging.WARNING):
        check_running(service, run_id, run_dir)
    assert wait_for(service, run_id, {RunState.FINISHED}).state == RunState.FINISHED


CHECKPOINTS = """\
import os
os.makedirs("outputs/epoch-2", exist_ok=True)
open("outputs/a-first.bin", "wb").write(os.urandom(1024 * 1024))
for name in ("ckpt-1.pt", "ckpt-2.pt", "epoch-2/state.pt"):
    open(f"outputs/{name}", "w").write(name)
"""


def test_a_local_file_removed_between_listing_and_read_is_left_out(
    service, tracking, tmp_path, experiment_name, caplog
):
    project = script_project(tmp_path, "ckpt", CHECKPOINTS, LOCAL_CONFIG)
    run_id = finished_run(service, project, experiment_name)
    outputs = Path(service.get(run_id).tags["mantik.run_dir"]) / "code" / "outputs"
    chunks = service.open_archive(run_id, "code/outputs").chunks
    with caplog.at_level(logging.WARNING):
        data = [next(chunks)]  # a chunk of a-first.bin: the folder is being read
        # The job goes on: ckpt-2.pt listed already, then removed; epoch-2 replaced.
        (outputs / "ckpt-2.pt").unlink()
        shutil.rmtree(outputs / "epoch-2")
        data += list(chunks)
    zipped = zipfile.ZipFile(io.BytesIO(b"".join(data)))
    assert zipped.testzip() is None
    assert sorted(entries(zipped)) == ["outputs/", "outputs/a-first.bin", "outputs/ckpt-1.pt"]
    assert "ckpt-2.pt (removed while it was downloaded)" in caplog.text, caplog.text


def test_a_unicore_folder_streams_as_a_zip(
    service, unicore_site, unicore_login, tmp_path, experiment_name, caplog
):
    # UNICORE lists a link as what it leads to: a link to a file or folder below arrives
    # as a copy (as with a folder download); a folder listed as one above it, in the
    # folder or in the run directory above, is a link up and left out.
    project = script_project(tmp_path, "loops", LINKS_BACK_UP, unicore_config(unicore_site))
    run_id = finished_run(service, project, experiment_name)
    with caplog.at_level(logging.WARNING):
        name, zipped = archive_of(service, run_id, "code/outputs")
    assert name == f"{service.get(run_id).run_name or run_id}-outputs.zip", name
    found = entries(zipped)
    assert zipped.read("outputs/plots/t2m.png") == b"a plot\n"
    assert sorted(found) == ["outputs/", "outputs/plots/", "outputs/plots/t2m.png"], sorted(found)
    assert "outputs/plots/run (listed as a folder above it is" in caplog.text, caplog.text
    job = unicore_site.jobs[service.get(run_id).job_id]
    plant_credentials(Path(job.workdir))
    (Path(job.workdir) / "code" / "outputs" / CREDENTIALS_FILE).write_text("TOKEN=x\n")
    name, zipped = archive_of(service, run_id)
    found = entries(zipped)
    assert f"{run_id}/code/outputs/plots/t2m.png" in found, sorted(found)
    assert not [n for n in found if CREDENTIALS_FILE in n], sorted(found)
    with pytest.raises(NotFound, match="There is no 'code/nothing'"):
        service.open_archive(run_id, "code/nothing")


def test_a_file_over_4_gib_streams_as_zip64(tmp_path):
    # Sizes of 4 GiB and more need Zip64's fields; a stored (already compressed) file,
    # sparse here, so the test reads no disk.
    from mantik_jupyter.compute.backends.local import _walk_members

    folder = tmp_path / "outputs"
    folder.mkdir()
    with (folder / "era5.nc.gz").open("wb") as f:
        f.truncate(4 * 1024**3 + 12345)
    (folder / "small.csv").write_text("t2m\n280.1\n")
    out = tmp_path / "outputs.zip"
    tracemalloc.start()
    try:
        with out.open("wb") as f:
            for chunk in zip_stream("outputs", _walk_members(folder, ""), whole_run=False):
                f.write(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024**2, peak  # streamed, not held
    listed = subprocess.run(["unzip", "-tq", str(out)], capture_output=True, text=True)
    assert listed.returncode == 0 and "No errors" in listed.stdout, listed
    with zipfile.ZipFile(out) as zipped:
        assert zipped.getinfo("outputs/era5.nc.gz").file_size == 4 * 1024**3 + 12345
        assert zipped.read("outputs/small.csv") == b"t2m\n280.1\n"


LOCKED = """\
import os
os.makedirs("outputs/locked", exist_ok=True)
open("outputs/locked/a.txt", "w").write("a")
open("outputs/z.txt", "w").write("z")
os.chmod("outputs/locked", 0)
"""


@pytest.mark.slurm
def test_a_slurm_folder_tar_cannot_read_fails_the_archive(
    service, slurm_cluster, remote_base, tmp_path, experiment_name
):
    # tar on the login node cannot read a folder of the run (its job made it unreadable):
    # the archive fails at its end, so the lab drops the connection and the browser says
    # the download failed, instead of a complete-looking archive without that folder.
    config = slurm_config(slurm_cluster, remote_base)
    project = script_project(tmp_path, "locked", LOCKED, config)
    run_id = finished_run(service, project, experiment_name)
    chunks = service.open_archive(run_id, "code/outputs").chunks
    with pytest.raises(BackendRejected, match="Permission denied"):
        b"".join(chunks)
    run_dir = Path(service.get(run_id).tags["mantik.run_dir"])
    (run_dir / "code" / "outputs" / "locked").chmod(0o700)  # for the clean-up
