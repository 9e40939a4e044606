"""Benchmark: build_package against ``zip -qr`` with the same excludes, same run, best of 3.

Creates a ~200 MB project of 5,000 files (many small text files, a few large random and
partly compressible binaries) plus excluded content (.git, __pycache__, mlruns, .venv) in a
temporary directory. Prints both times and the ratio build_package / zip (target <= 1.0).

    python bench/package_build.py [--files 5000] [--megabytes 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mantik_jupyter.compute.packaging import build_package  # noqa: E402

# zip -x patterns equivalent to the default excludes that the generated tree exercises.
ZIP_EXCLUDES = [
    ".git/*",
    "*/__pycache__/*",
    "__pycache__/*",
    "mlruns/*",
    ".venv/*",
    "*.pyc",
]

WORDS = (
    "temperature pressure humidity wind forecast station ensemble lead_time model "
    "epoch loss rmse gradient latitude longitude grid era5 cosmo icon precipitation"
).split()


def _text(rng: random.Random, size: int) -> bytes:
    lines: list[str] = []
    n = 0
    while n < size:
        if rng.random() < 0.5:
            line = f"{rng.choice(WORDS)} = {rng.uniform(-40, 40):.4f}  # {rng.choice(WORDS)}"
        else:
            line = ",".join(f"{rng.gauss(10, 8):.3f}" for _ in range(8))
        lines.append(line)
        n += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


def _write_binary(path: Path, size: int, compressible_fraction: float, rng: random.Random) -> None:
    chunk = 1024 * 1024
    with open(path, "wb") as f:
        written = 0
        while written < size:
            n = min(chunk, size - written)
            if rng.random() < compressible_fraction:
                f.write(
                    bytes(rng.randrange(16) for _ in range(256)) * (n // 256) + b"\0" * (n % 256)
                )
            else:
                f.write(os.urandom(n))
            written += n


def make_project(root: Path, files: int, megabytes: int, seed: int = 7) -> tuple[int, int]:
    """Create the tree; returns (included files, included bytes)."""
    rng = random.Random(seed)
    total = megabytes * 1024 * 1024
    (root / "MLproject").write_text(
        "name: bench\nentry_points:\n  main:\n    command: python train.py\n"
    )
    big = [
        ("data/era5_subset.bin", 40, 0.0),
        ("data/stations.npy", 35, 0.0),
        ("checkpoints/model_a.pt", 30, 0.5),
        ("checkpoints/model_b.pt", 25, 0.7),
    ]
    big_bytes = sum(mb for _, mb, _ in big) * 1024 * 1024
    for rel, mb, frac in big:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_binary(path, mb * 1024 * 1024, frac, rng)
    small_count = files - len(big) - 1
    per_file = max(1, (total - big_bytes) // small_count)
    for i in range(small_count):
        sub = root / f"pkg{i % 40:02d}" / f"mod{i % 7}"
        sub.mkdir(parents=True, exist_ok=True)
        ext = ".py" if i % 3 else ".csv"
        size = int(per_file * rng.uniform(0.2, 1.8))
        (sub / f"file{i:05d}{ext}").write_bytes(_text(rng, size))
    _make_excluded(root, rng)
    count = bytes_ = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel.split(os.sep)[0] in {".git", "mlruns", ".venv"} or "__pycache__" in rel:
            continue
        count += len(filenames)
        bytes_ += sum(os.path.getsize(os.path.join(dirpath, f)) for f in filenames)
    return count, bytes_


def _make_excluded(root: Path, rng: random.Random) -> None:
    for rel, size in (
        (".git/objects/pack/pack-1.pack", 20 * 1024 * 1024),
        ("mlruns/0/meta.yaml", 1000),
        (".venv/lib/site.py", 100_000),
    ):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    (root / ".venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    for i in range(200):
        cache = root / f"pkg{i % 40:02d}" / "__pycache__"
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"file{i:05d}.cpython-311.pyc").write_bytes(os.urandom(20_000))


def time_ours(project: Path, out: Path) -> tuple[float, int]:
    start = time.perf_counter()
    info = build_package(project, out, size_limit=None)
    return time.perf_counter() - start, info.size


def time_zip(project: Path, out: Path) -> tuple[float, int]:
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run(["zip", "-qr", str(out), ".", "-x", *ZIP_EXCLUDES], cwd=project, check=True)
    return time.perf_counter() - start, out.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("zip") is None:
        print("zip is missing: apt-get install -y --no-install-recommends zip", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mantik-bench-") as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        count, size = make_project(project, args.files, args.megabytes)
        print(f"project: {count} files, {size / 1024**2:.1f} MiB included (+ excluded dirs)")
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(args.rounds):
            t, ours_size = time_ours(project, Path(tmp) / "ours.tar.gz")
            ours.append(t)
            t, zip_size = time_zip(project, Path(tmp) / "theirs.zip")
            theirs.append(t)
        best_ours, best_zip = min(ours), min(theirs)
        print(f"build_package: {best_ours:.2f} s  ({ours_size / 1024**2:.1f} MiB)  runs {ours}")
        print(f"zip -qr:       {best_zip:.2f} s  ({zip_size / 1024**2:.1f} MiB)  runs {theirs}")
        ratio = best_ours / best_zip
        print(f"ratio build_package / zip = {ratio:.2f} (target <= 1.0)")
        return 0 if ratio <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
