"""Code packaging: selection, determinism, symlinks, size limit, progress."""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import time
from pathlib import Path

import pytest

from mantik_jupyter.compute.packaging import (
    FIXED_MTIME,
    build_package,
    package_place,
    plan_package,
)
from mantik_jupyter.errors import PackageTooLarge, ProjectError, UnsafePath


def write(path: Path, content: str | bytes = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    write(root / "MLproject", "name: p\nentry_points:\n  main:\n    command: python train.py\n")
    write(root / "train.py", "print('hi')\n")
    write(root / "src" / "model.py", "W = 1\n")
    write(root / "data" / "stations.csv", "id,name\n1,Juelich\n")
    return root


def members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return {m.name: m for m in tar.getmembers()}


def names(archive: Path) -> set[str]:
    return {n for n, m in members(archive).items() if not m.isdir()}


# --- content and format ----------------------------------------------------------------


def test_builds_archive_with_project_files(project: Path, tmp_path: Path) -> None:
    info = build_package(project, tmp_path / "out" / "code.tar.gz")
    assert info.path == tmp_path / "out" / "code.tar.gz"
    assert info.files == ["MLproject", "data/stations.csv", "src/model.py", "train.py"]
    assert info.file_count == 4
    assert info.size == info.path.stat().st_size
    assert info.sha256 == hashlib.sha256(info.path.read_bytes()).hexdigest()
    with tarfile.open(info.path) as tar:
        assert tar.extractfile("src/model.py").read() == b"W = 1\n"  # type: ignore[union-attr]
    assert not list((tmp_path / "out").glob(".*partial"))


def test_metadata_is_normalised(project: Path, tmp_path: Path) -> None:
    os.chmod(project / "train.py", 0o700)
    os.chmod(project / "src" / "model.py", 0o600)
    (project / "empty").mkdir()
    info = build_package(project, tmp_path / "code.tar.gz")
    found = members(info.path)
    assert found["train.py"].mode == 0o755
    assert found["src/model.py"].mode == 0o644
    assert found["empty"].isdir()
    for m in found.values():
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (FIXED_MTIME, 0, 0, "", "")
    raw = info.path.read_bytes()
    assert raw[4:8] == b"\0\0\0\0"  # gzip header mtime
    assert gzip.decompress(raw)  # a valid gzip stream


def test_same_files_give_same_sha256(project: Path, tmp_path: Path) -> None:
    first = build_package(project, tmp_path / "a.tar.gz")
    second = build_package(project, tmp_path / "b.tar.gz")
    assert first.sha256 == second.sha256
    later = time.time() + 3600
    for path in project.rglob("*"):
        os.utime(path, (later, later))
    os.chmod(project / "src" / "model.py", 0o664)
    touched = build_package(project, tmp_path / "c.tar.gz")
    assert touched.sha256 == first.sha256
    write(project / "src" / "model.py", "W = 2\n")
    assert build_package(project, tmp_path / "d.tar.gz").sha256 != first.sha256


def test_same_tree_elsewhere_gives_same_sha256(project: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    for path in sorted(project.rglob("*")):
        target = copy / path.relative_to(project)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            write(target, path.read_bytes())
    a = build_package(project, tmp_path / "a.tar.gz")
    b = build_package(copy, tmp_path / "b.tar.gz")
    assert a.sha256 == b.sha256


# --- selection -------------------------------------------------------------------------


def test_default_excludes(project: Path, tmp_path: Path) -> None:
    excluded = [
        ".git/HEAD",
        "sub/.git",
        "src/__pycache__/model.cpython-311.pyc",
        ".ipynb_checkpoints/nb-checkpoint.ipynb",
        "mlruns/0/meta.yaml",
        "mlartifacts/1/a.bin",
        ".venv/lib/site.py",
        "venv/lib/site.py",
        "env/pyvenv.cfg",
        "env/lib/x.py",
        "otherenv/pyvenv.cfg",
        "web/node_modules/pkg/index.js",
        ".mantik/runs/x",
        "stray.pyc",
    ]
    for rel in excluded:
        write(project / rel)
    write(project / "envs" / "setup.py")  # no pyvenv.cfg: a normal directory
    info = build_package(project, tmp_path / "code.tar.gz")
    assert info.files == [
        "MLproject",
        "data/stations.csv",
        "envs/setup.py",
        "src/model.py",
        "train.py",
    ]


def test_exclude_globs_and_mantikignore(project: Path, tmp_path: Path) -> None:
    write(project / "ckpt" / "model.ckpt", b"0" * 100)
    write(project / "notes.tmp")
    write(project / "results" / "keep.txt")
    write(project / "results" / "drop.txt")
    write(project / "mlruns" / "0" / "meta.yaml")
    write(project / ".mantikignore", "results/*\n!results/keep.txt\n!mlruns/\n# comment\n")
    info = build_package(project, tmp_path / "code.tar.gz", exclude=["*.tmp", "ckpt/", "data"])
    assert info.files == [
        ".mantikignore",
        "MLproject",
        "mlruns/0/meta.yaml",
        "results/keep.txt",
        "src/model.py",
        "train.py",
    ]


def test_excluding_the_mlproject_is_an_error(project: Path, tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match="MLproject is excluded"):
        build_package(project, tmp_path / "code.tar.gz", exclude=["MLproject"])


def test_dest_inside_project_is_not_archived(project: Path) -> None:
    dest = project / "code.tar.gz"
    build_package(project, dest)
    info = build_package(project, dest)
    assert "code.tar.gz" not in info.files
    assert not any("partial" in f for f in info.files)


def test_plan_lists_files_without_writing(project: Path) -> None:
    plan = plan_package(project, exclude=["data/"])
    assert plan.files == ["MLproject", "src/model.py", "train.py"]
    assert plan.total_size == sum(
        (project / f).stat().st_size for f in ("MLproject", "src/model.py", "train.py")
    )


# --- symlinks --------------------------------------------------------------------------


def test_symlinks_inside_are_kept_as_relative_links(project: Path, tmp_path: Path) -> None:
    os.symlink("../data/stations.csv", project / "src" / "stations.csv")
    os.symlink(project / "src", project / "code")  # absolute, but inside
    info = build_package(project, tmp_path / "code.tar.gz")
    found = members(info.path)
    assert found["src/stations.csv"].issym()
    assert found["src/stations.csv"].linkname == "../data/stations.csv"
    assert found["code"].issym() and found["code"].linkname == "src"
    out = tmp_path / "unpacked"
    with tarfile.open(info.path) as tar:
        tar.extractall(out, filter="data")
    assert (out / "code" / "stations.csv").read_text() == "id,name\n1,Juelich\n"


def test_symlink_leaving_the_project_is_refused(project: Path, tmp_path: Path) -> None:
    secret = write(tmp_path / "secret.txt", "s3cr3t")
    os.symlink(secret, project / "src" / "leak.txt")
    with pytest.raises(UnsafePath) as err:
        build_package(project, tmp_path / "code.tar.gz")
    assert str(project / "src" / "leak.txt") in err.value.message
    assert str(secret) in err.value.message
    assert not (tmp_path / "code.tar.gz").exists()


def test_relative_symlink_climbing_out_is_refused(project: Path, tmp_path: Path) -> None:
    os.symlink("../../..", project / "src" / "up")
    with pytest.raises(UnsafePath, match="../../.."):
        build_package(project, tmp_path / "code.tar.gz")


def test_symlink_out_in_excluded_dir_is_fine(project: Path, tmp_path: Path) -> None:
    write(project / ".venv" / "pyvenv.cfg")
    os.symlink("/usr/bin/python3", project / ".venv" / "python")
    os.symlink("/etc", project / "cluster-data")
    write(project / ".mantikignore", "cluster-data\n")
    info = build_package(project, tmp_path / "code.tar.gz")
    assert "cluster-data" not in info.files


# --- extra files -----------------------------------------------------------------------


def test_extra_files(project: Path, tmp_path: Path) -> None:
    outside = write(tmp_path / "images" / "torch.sif", b"SIF" * 10)
    inside = write(project / "containers" / "local.sif", b"LOCAL")
    info = build_package(
        project, tmp_path / "code.tar.gz", exclude=["*.sif"], extra_files=[outside, inside]
    )
    assert "images/torch.sif" in info.files
    assert "containers/local.sif" in info.files
    with tarfile.open(info.path) as tar:
        assert tar.extractfile("images/torch.sif").read() == b"SIF" * 10  # type: ignore[union-attr]


def test_package_place_is_where_the_extra_file_is_stored(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job script finds a local image through package_place: it must name the entry
    # the package has, however the path is written.
    monkeypatch.setenv("HOME", str(tmp_path))
    inside = write(project / "containers" / "a.sif", b"A")
    outside = write(tmp_path / "shared" / "b.sif", b"B")
    os.symlink(outside, project / "link.sif")
    alias = tmp_path / "alias"
    os.symlink(project, alias)
    spellings = [
        "containers/a.sif",
        str(inside),
        "~/project/containers/a.sif",
        str(alias / "containers" / "a.sif"),
        "../shared/b.sif",
        str(outside),
        "~/shared/b.sif",
        "link.sif",
    ]
    monkeypatch.chdir(tmp_path / "shared")  # relative means relative to the project
    for spelling in spellings:
        for root in (project, alias):
            place = package_place(root, spelling)
            info = build_package(
                root, tmp_path / "code.tar.gz", exclude=["*.sif"], extra_files=[Path(spelling)]
            )
            assert place in info.files, (spelling, root)
            expected = b"A" if "a.sif" in spelling else b"B"
            with tarfile.open(info.path) as tar:
                assert tar.extractfile(place).read() == expected  # type: ignore[union-attr]
    assert package_place(project, "containers/a.sif") == "containers/a.sif"
    assert package_place(project, str(inside)) == "containers/a.sif"
    assert package_place(project, "link.sif") == "images/b.sif"


def test_missing_extra_file(project: Path, tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match="nope.sif does not exist"):
        build_package(project, tmp_path / "code.tar.gz", extra_files=[tmp_path / "nope.sif"])


def test_extra_file_clashing_with_project_file(project: Path, tmp_path: Path) -> None:
    write(project / "images" / "a.sif", b"1")
    other = write(tmp_path / "a.sif", b"2")
    with pytest.raises(ProjectError, match="images/a.sif"):
        build_package(project, tmp_path / "code.tar.gz", extra_files=[other])


# --- size limit and progress -----------------------------------------------------------


def test_size_limit_names_the_largest_files(project: Path, tmp_path: Path) -> None:
    for i in range(7):
        write(project / "data" / f"big{i}.bin", b"0" * (1000 * (i + 1)))
    dest = tmp_path / "code.tar.gz"
    with pytest.raises(PackageTooLarge) as err:
        build_package(project, dest, size_limit=5000)
    msg = err.value.message
    listing = (
        "data/big6.bin (6.8 KiB); data/big5.bin (5.9 KiB); data/big4.bin (4.9 KiB); "
        "data/big3.bin (3.9 KiB); data/big2.bin (2.9 KiB)"
    )
    assert f"Largest files: {listing}." in msg
    assert "would hold 27.4 KiB" in msg
    assert "big0.bin" not in msg and "big1.bin" not in msg
    assert ".mantikignore" in msg and "Exclude" in msg
    assert "limit of 4.9 KiB" in msg
    assert err.value.status == 413
    assert not dest.exists()
    assert build_package(project, dest, size_limit=None).file_count == 11


def test_progress_is_monotone_and_ends_at_total(project: Path, tmp_path: Path) -> None:
    write(project / "data" / "big.bin", os.urandom(3 * 1024 * 1024 + 17))
    calls: list[tuple[int, int]] = []
    info = build_package(
        project, tmp_path / "code.tar.gz", progress=lambda d, t: calls.append((d, t))
    )
    total = info.input_size
    assert calls[0] == (0, total)
    assert calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done)
    assert len(calls) > 4  # the big file reports per chunk, not once


def test_multi_block_archive_is_valid_and_deterministic(project: Path, tmp_path: Path) -> None:
    # Several compression blocks: compressed on threads, the bytes must not depend on timing.
    payload = os.urandom(2 * 1024 * 1024) + b"abc" * 1_000_000
    write(project / "data" / "big.bin", payload)
    a = build_package(project, tmp_path / "a.tar.gz")
    b = build_package(project, tmp_path / "b.tar.gz")
    assert a.sha256 == b.sha256
    with tarfile.open(a.path) as tar:
        assert tar.extractfile("data/big.bin").read() == payload  # type: ignore[union-attr]
