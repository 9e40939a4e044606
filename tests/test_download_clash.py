"""A download never loses a local file: against a real MLflow server, with the local
backend and with Slurm over SSH on the loopback cluster.

Downloading a run's outputs into a folder that held an earlier run's results (or the
user's own edits of them) replaced them without a word.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mantik_jupyter.compute.run_download import DownloadClash
from mantik_jupyter.compute.runs import RunService
from mantik_jupyter.compute.states import RunState
from mantik_jupyter.errors import Conflict

from .runs_helpers import (
    FINAL,
    LOCAL_CONFIG,
    remote_run_dirs,
    script_project,
    slurm_config,
    wait_for,
)

MAKE_OUTPUTS = """\
import os
os.makedirs("outputs/many", exist_ok=True)
open("outputs/a.txt", "w").write("forecast a\\n")
open("outputs/b.txt", "w").write("forecast b\\n")
for i in range(8):
    open(f"outputs/many/f{i}.txt", "w").write(f"value {i}\\n")
with open("outputs/big.bin", "wb") as f:
    f.write(os.urandom(3_000_000))
"""


def outputs_project(tmp_path: Path, config: dict) -> Path:
    return script_project(tmp_path, "outputs", MAKE_OUTPUTS, config)


def finished_run(service: RunService, project: Path, experiment: str) -> str:
    info = service.submit(project, experiment_name=experiment)
    final = wait_for(service, info.run_id, FINAL, timeout=90)
    assert final.state == RunState.FINISHED, final.tags
    return info.run_id


def interrupt(done: int, total: int) -> None:
    if done > 0:
        raise KeyboardInterrupt  # as Ctrl-C does, half-way


def no_staging_left(folder: Path) -> None:
    assert not [p for p in folder.rglob(".mantik-download-*")]
    assert not [p for p in folder.rglob("*.part")]


def check_no_local_file_is_lost(service: RunService, run_id: str, tmp: Path) -> None:
    results = tmp / "results"
    tmp.mkdir()
    results.mkdir()
    first = service.download(run_id, "", results)
    top = first.path
    # Named after the run, as a UNICORE run's is (test_unicore).
    assert top == results / run_id and first.written >= 12, first
    assert not first.identical and not first.replaced
    outputs = top / "code" / "outputs"
    a, b = outputs / "a.txt", outputs / "b.txt"
    assert a.read_text() == "forecast a\n"

    # Again into the same folder: everything is already there; nothing is rewritten.
    stamp = a.stat().st_mtime_ns
    again = service.download(run_id, "", results)
    assert again.path == top and again.written == 0 and not again.replaced
    assert "code/outputs/a.txt" in again.identical
    assert "identical, left as they were" in again.summary(), again.summary()
    assert a.stat().st_mtime_ns == stamp

    # The user's edit (another size) and a file of their own: refused before anything
    # is transferred, naming the file and the flag.
    a.write_text("my corrected forecast\n")
    mine = outputs / "mine.txt"
    mine.write_text("my notes\n")
    moved: list[tuple[int, int]] = []
    with pytest.raises(DownloadClash) as clash:
        service.download(run_id, "", results, progress=lambda *p: moved.append(p))
    message = clash.value.message
    assert "1 file of the download already exists" in message, message
    assert "'code/outputs/a.txt'" in message and "overwrite=True" in message
    assert clash.value.status == 409 and clash.value.exit_code == 4
    assert moved == []
    assert a.read_text() == "my corrected forecast\n"

    # Same size, other bytes: found once it arrived, and still nothing changes.
    b.write_text("forecast B\n")
    with pytest.raises(DownloadClash) as clash:
        service.download(run_id, "code/outputs/b.txt", outputs, progress=lambda *p: moved.append(p))
    assert "'b.txt'" in clash.value.message and moved
    assert b.read_text() == "forecast B\n"
    no_staging_left(results)

    # Many: the first few, and how many more.
    for i in range(8):
        (outputs / "many" / f"f{i}.txt").write_text(f"edited {i}\n")
    with pytest.raises(DownloadClash) as clash:
        service.download(run_id, "code/outputs", top / "code")
    message = clash.value.message
    # b.txt and f0..f7 differ in size: refused before the transfer, b.txt not yet seen.
    assert "9 files of the download already exist" in message and "and 4 more" in message

    # An overwrite cut off half-way replaces nothing.
    with pytest.raises(KeyboardInterrupt):
        service.download(run_id, "", results, progress=interrupt, overwrite=True)
    assert a.read_text() == "my corrected forecast\n" and b.read_text() == "forecast B\n"
    no_staging_left(results)

    # Asked for: the differing files are replaced, the user's own file stays.
    done = service.download(run_id, "", results, overwrite=True)
    assert sorted(done.replaced) == [
        "code/outputs/a.txt",
        "code/outputs/b.txt",
        *(f"code/outputs/many/f{i}.txt" for i in range(8)),
    ]
    assert "10 files replaced" in done.summary()
    assert a.read_text() == "forecast a\n" and mine.read_text() == "my notes\n"

    # One file onto a file: the same rules.
    one = tmp / "a.txt"
    one.write_text("another station\n")
    with pytest.raises(DownloadClash):
        service.download(run_id, "code/outputs/a.txt", tmp)
    assert one.read_text() == "another station\n"
    one.write_text("forecast a\n")
    same = service.download(run_id, "code/outputs/a.txt", one)
    assert same.path == one and same.identical == ["a.txt"] and same.written == 0

    # A folder onto a file, a file onto a folder: never, not even with overwrite.
    afile = tmp / "afile"
    afile.write_text("keep me\n")
    with pytest.raises(DownloadClash) as clash:
        service.download(run_id, "code/outputs", afile, overwrite=True)
    assert "a folder where the run has a file, or a file where" in clash.value.message
    assert "--overwrite" not in clash.value.message and "overwrite=True" not in clash.value.message
    assert afile.read_text() == "keep me\n"
    (tmp / "x" / "a.txt").mkdir(parents=True)
    with pytest.raises(DownloadClash):
        service.download(run_id, "code/outputs/a.txt", tmp / "x", overwrite=True)
    assert (tmp / "x" / "a.txt").is_dir()

    # A download to folders it makes, cut off: none of them stays.
    with pytest.raises(KeyboardInterrupt):
        service.download(run_id, "code/outputs", tmp / "new" / "deep" / "out", progress=interrupt)
    assert not (tmp / "new").exists()
    no_staging_left(tmp)


def test_local_download_loses_no_local_file(service, tracking, tmp_path, experiment_name):
    config = {
        "Local": {},
        "Resources": {"Queue": "local"},
        "Environment": {"Python": sys.prefix},
    }
    run_id = finished_run(service, outputs_project(tmp_path, config), experiment_name)
    check_no_local_file_is_lost(service, run_id, tmp_path / "local")


@pytest.fixture(scope="module")
def remote_base(slurm_cluster):
    yield from remote_run_dirs(slurm_cluster, "clash")


@pytest.mark.slurm
def test_slurm_download_loses_no_local_file(
    service, slurm_cluster, remote_base, tmp_path, experiment_name
):
    project = outputs_project(tmp_path, slurm_config(slurm_cluster, remote_base))
    run_id = finished_run(service, project, experiment_name)
    check_no_local_file_is_lost(service, run_id, tmp_path / "ssh")


# A link the run itself holds (inside the run, so it is downloaded), and a folder of the
# same name elsewhere in the run.
LINK_THEN_FOLDER = """\
import os
os.makedirs("outputs", exist_ok=True)
os.symlink("..", "outputs/up")
os.makedirs("later/up", exist_ok=True)
open("later/up/notebook.ipynb", "w").write("from the run\\n")
"""


def check_no_write_through_a_landed_link(service: RunService, run_id: str, tmp: Path) -> None:
    dest = tmp / "dest"
    dest.mkdir(parents=True)
    mine = dest / "notebook.ipynb"
    mine.write_text("my notebook\n")
    first = service.download(run_id, "code/outputs", dest)
    link = first.path / "up"
    # A download keeps only links that point down (paths.link_points_down): this one is
    # put there as an older version, or the user, would have.
    assert not link.is_symlink()
    link.symlink_to("..")
    assert link.is_symlink() and link.resolve() == dest.resolve()
    # The name 'up' comes from the run, not from the user: the link it finds at
    # outputs/up (to dest itself) is not a folder to write into, not even to replace.
    for overwrite in (False, True):
        with pytest.raises(Conflict) as refused:
            service.download(run_id, "code/later/up", first.path, overwrite=overwrite)
        assert str(link) in refused.value.message and "link" in refused.value.message
        assert mine.read_text() == "my notebook\n"
    assert sorted(p.name for p in dest.iterdir()) == ["notebook.ipynb", "outputs"]
    no_staging_left(dest)
    # A destination the user names is theirs to be a link (a folder on a scratch disk).
    elsewhere = tmp / "scratch"
    elsewhere.mkdir()
    (dest / "scratch").symlink_to(elsewhere)
    done = service.download(run_id, "code/later/up", dest / "scratch", exact=True)
    assert (elsewhere / "notebook.ipynb").read_text() == "from the run\n", done
    # A link at the destination that leads nowhere is a local file in the way, named.
    gone = tmp / "gone"
    gone.mkdir()
    (gone / "notebook.ipynb").symlink_to(tmp / "nowhere")
    with pytest.raises(DownloadClash) as clash:
        service.download(run_id, "code/later/up/notebook.ipynb", gone)
    assert "'notebook.ipynb'" in clash.value.message, clash.value.message


def test_local_download_writes_not_through_a_landed_link(
    service, tracking, tmp_path, experiment_name
):
    config = LOCAL_CONFIG
    project = script_project(tmp_path, "links", LINK_THEN_FOLDER, config)
    run_id = finished_run(service, project, experiment_name)
    check_no_write_through_a_landed_link(service, run_id, tmp_path / "local")


@pytest.mark.slurm
def test_slurm_download_writes_not_through_a_landed_link(
    service, slurm_cluster, remote_base, tmp_path, experiment_name
):
    config = slurm_config(slurm_cluster, remote_base)
    project = script_project(tmp_path, "links", LINK_THEN_FOLDER, config)
    run_id = finished_run(service, project, experiment_name)
    check_no_write_through_a_landed_link(service, run_id, tmp_path / "ssh")
