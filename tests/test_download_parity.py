"""A run's folder lands the same from every backend: against a real MLflow server, with
the local backend and with Slurm over SSH on the loopback cluster.

The local backend kept links that the SSH download skips: a download of ``outputs``
landed ``outputs/secret -> ../secret.txt``, a link leading out of what was downloaded
(to a file of the user's, wherever the folder landed), and it failed on a named pipe
and on a file that a running job removed while the folder was copied.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from mantik_jupyter.compute.runs import RunService
from mantik_jupyter.errors import NotFound

from .runs_helpers import (
    LOCAL_CONFIG,
    remote_run_dirs,
    script_project,
    slurm_config,
    unicore_config,
)
from .test_download_clash import finished_run, no_staging_left
from .unicore_standin import server

LINKS = """\
import os
os.makedirs("outputs/run 1", exist_ok=True)
open("outputs/run 1/data ü.txt", "w").write("forecast\\n")
open("secret.txt", "w").write("beside outputs, not in it\\n")
os.symlink("run 1/data ü.txt", "outputs/latest ü")
os.symlink("../secret.txt", "outputs/secret")
os.symlink(os.path.abspath("secret.txt"), "outputs/absolute")
os.symlink("../../..", "outputs/root")
os.symlink("../data ü.txt", "outputs/run 1/up")
os.mkfifo("outputs/pipe")
# mantik's name: never downloaded, wherever it is (a job's copy of its token).
open("outputs/run 1/.mantik-credentials", "w").write("MLFLOW_TRACKING_TOKEN=x")
"""


def check_only_links_down_land(
    service: RunService, run_id: str, tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tmp.mkdir()
    seen: list[tuple[int, int]] = []
    with caplog.at_level(logging.WARNING):
        got = service.download(run_id, "code/outputs", tmp, progress=lambda *p: seen.append(p)).path
    # Complete at the end, though the skipped links never came.
    assert seen[-1][0] == seen[-1][1] > 0, seen
    assert sorted(str(p.relative_to(got)) for p in got.rglob("*")) == [
        "latest ü",
        "run 1",
        "run 1/data ü.txt",
    ]
    assert os.readlink(got / "latest ü") == "run 1/data ü.txt"
    assert (got / "latest ü").read_text() == "forecast\n"
    said = caplog.text
    for name in ("secret", "absolute", "root", "run 1/up"):
        assert f"outputs/{name} (a link to" in said, said
    assert ".mantik-credentials (mantik's credential file)" in said, said
    # Nor is it listed or opened there.
    inner = "code/outputs/run 1"
    listed = [e.path for e in service.files(run_id, inner)]
    assert f"{inner}/data ü.txt" in listed and f"{inner}/.mantik-credentials" not in listed
    with pytest.raises(NotFound):
        service.open_file(run_id, f"{inner}/.mantik-credentials")
    # The whole run: the same rule, from the run directory down.
    whole = service.download(run_id, "", tmp / "whole").path
    outputs = whole / "code" / "outputs"
    assert (outputs / "latest ü").is_symlink() and not os.path.lexists(outputs / "secret")
    assert (whole / "code" / "secret.txt").is_file()
    assert not [p for p in whole.rglob(".mantik-credentials")]
    no_staging_left(tmp)


def test_a_local_folder_download_keeps_only_links_that_point_down(
    service, tracking, tmp_path, experiment_name, caplog
):
    project = script_project(tmp_path, "links", LINKS, LOCAL_CONFIG)
    run_id = finished_run(service, project, experiment_name)
    check_only_links_down_land(service, run_id, tmp_path / "local", caplog)


@pytest.fixture(scope="module")
def remote_base(slurm_cluster):
    yield from remote_run_dirs(slurm_cluster, "parity")


@pytest.mark.slurm
def test_a_slurm_folder_download_keeps_only_links_that_point_down(
    service, slurm_cluster, remote_base, tmp_path, experiment_name, caplog
):
    project = script_project(tmp_path, "links", LINKS, slurm_config(slurm_cluster, remote_base))
    run_id = finished_run(service, project, experiment_name)
    check_only_links_down_land(service, run_id, tmp_path / "ssh", caplog)


CHECKPOINTS = """\
import os
os.makedirs("outputs/epoch-2", exist_ok=True)
for name in ("ckpt-1.pt", "ckpt-2.pt", "ckpt-3.pt", "epoch-2/state.pt"):
    open(f"outputs/{name}", "w").write(name)
"""


def test_a_local_folder_download_skips_what_the_job_removes_meanwhile(
    service, tracking, tmp_path, experiment_name, caplog
):
    # A run still training replaces its checkpoints: a file listed but gone before it was
    # copied failed the whole download, as a destination that could not be written.
    project = script_project(tmp_path, "ckpt", CHECKPOINTS, LOCAL_CONFIG)
    run_id = finished_run(service, project, experiment_name)
    outputs = Path(service.get(run_id).tags["mantik.run_dir"]) / "code" / "outputs"

    def job_goes_on(done: int, total: int) -> None:
        # After the first file (ckpt-1.pt) arrived, as the job would between two reads.
        for gone in (outputs / "ckpt-2.pt", outputs / "epoch-2" / "state.pt"):
            gone.unlink(missing_ok=True)
        if (outputs / "epoch-2").exists():
            (outputs / "epoch-2").rmdir()

    with caplog.at_level(logging.WARNING):
        got = service.download(run_id, "code/outputs", tmp_path, progress=job_goes_on).path
    assert sorted(p.name for p in got.iterdir()) == ["ckpt-1.pt", "ckpt-3.pt"]
    assert "ckpt-2.pt (removed while it was downloaded)" in caplog.text, caplog.text
    no_staging_left(tmp_path)


LINKS_BACK_UP = """\
import os
os.makedirs("outputs/plots", exist_ok=True)
open("outputs/plots/t2m.png", "w").write("a plot\\n")
os.symlink("..", "outputs/up")
os.symlink("../../..", "outputs/plots/run")
open("outputs/plots/.mantik-credentials", "w").write("MLFLOW_TRACKING_TOKEN=x")
"""


def test_a_unicore_folder_download_with_links_back_up_ends(
    service, unicore_site, unicore_login, tmp_path, experiment_name, caplog
):
    # UNICORE lists a link to a folder as the folder: the walk went round outputs/up/
    # outputs/up/... until the path was longer than 4096 bytes, and the download failed.
    project = script_project(tmp_path, "loops", LINKS_BACK_UP, unicore_config(unicore_site))
    run_id = finished_run(service, project, experiment_name)
    with caplog.at_level(logging.WARNING):
        got = service.download(run_id, "code/outputs", tmp_path).path
    assert (got / "plots" / "t2m.png").read_text() == "a plot\n"
    # What the links lead to arrives once, as a copy, never as a link.
    assert (got / "up" / "main.py").is_file() and not (got / "up").is_symlink()
    assert not (got / "up" / "outputs").exists()
    # mantik's credential file of that name goes nowhere (through plots/run: the run's own).
    assert not [p for p in got.rglob(".mantik-credentials")]
    assert "outputs/up/outputs (listed as a folder above it is" in caplog.text, caplog.text
    whole = service.download(run_id, "", tmp_path / "whole").path
    assert (whole / "code" / "outputs" / "plots" / "t2m.png").is_file()
    assert not (whole / "code" / "outputs" / "up").exists()
    assert not (whole / "code" / "outputs" / "plots" / "run").exists()
    assert not [p for p in whole.rglob(".mantik-credentials")]


URL_NAMES = ["report #1.csv", "why?.txt", "%41.txt", "A.txt", "run #3/x 1.txt", "ü/ß.txt"]
URL_NAMES_MADE = f"""\
import os
for name in {URL_NAMES!r}:
    os.makedirs(os.path.dirname(f"out/{{name}}") or "out", exist_ok=True)
    open(f"out/{{name}}", "w").write(name)
"""


def test_unicore_files_with_url_characters_in_their_names_download(
    service, unicore_site, unicore_login, tmp_path, experiment_name
):
    # pyunicore puts names into URLs as they are: '#' and '?' cut the path short (a
    # folder holding 'run #3' failed to download), and '%41.txt' came back as 'A.txt'.
    project = script_project(tmp_path, "names", URL_NAMES_MADE, unicore_config(unicore_site))
    run_id = finished_run(service, project, experiment_name)
    listed = {e.path for e in service.files(run_id, "code/out/run #3")}
    assert listed == {"code/out/run #3/x 1.txt"}
    got = service.download(run_id, "code/out", tmp_path).path
    for name in URL_NAMES:
        assert (got / name).read_text() == name
        one = service.download(run_id, f"code/out/{name}", tmp_path / "one" / "x").path
        assert one.read_text() == name, name
        one.unlink()


CHECKPOINT_FOLDERS = """\
import os
for step in (500, 1000):
    os.makedirs(f"outputs/checkpoint-{step}", exist_ok=True)
    open(f"outputs/checkpoint-{step}/model.pt", "w").write(str(step))
"""


def test_a_unicore_folder_download_skips_a_folder_the_job_removes_meanwhile(
    service, unicore_site, unicore_login, tmp_path, experiment_name, monkeypatch, caplog
):
    # A trainer keeping only its last checkpoints removes checkpoint-500 once it wrote
    # checkpoint-1000: listed, then gone, it failed the whole download ("There is no ...").
    project = script_project(tmp_path, "ckpt", CHECKPOINT_FOLDERS, unicore_config(unicore_site))
    run_id = finished_run(service, project, experiment_name)
    answer = server._Handler._get_file
    listings: list[str] = []

    def job_goes_on(handler, target: Path, rel: str) -> None:
        answer(handler, target, rel)
        if rel.endswith("code/outputs"):
            listings.append(rel)
            if len(listings) == 2:  # looked at, then listed for the walk: the job goes on
                shutil.rmtree(target / "checkpoint-500")

    monkeypatch.setattr(server._Handler, "_get_file", job_goes_on)
    with caplog.at_level(logging.WARNING):
        got = service.download(run_id, "code/outputs", tmp_path).path
    assert [p.name for p in got.iterdir()] == ["checkpoint-1000"]
    assert (got / "checkpoint-1000" / "model.pt").read_text() == "1000"
    assert "checkpoint-500 (removed while it was downloaded)" in caplog.text, caplog.text
