"""RunTable over 10,000 runs: time to the first page and memory, against loading every
run with MLflow's own client (``mlflow.search_runs``), measured in the same run.

The runs go straight into a fresh sqlite store (bench/_mlflow_seed.py); a real
``mlflow server --app-name basic-auth`` then serves them.

    PYTHONPATH=. python bench/run_table.py [--runs 10000]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import tracemalloc
from pathlib import Path

from bench._mlflow_seed import insert_runs, open_store
from mantik_jupyter.tracking.rest import TrackingClient
from mantik_jupyter.tracking.runs_api import RunsApi
from tests.mlflow_fixtures import start_mlflow_server, stop_mlflow_server


def seed(directory: Path, count: int) -> str:
    store = open_store(directory)
    exp_id = store.create_experiment("bench-run-table")
    t0 = int(time.time() * 1000) - count * 60_000
    rng = random.Random(7)
    statuses = ["FINISHED"] * 8 + ["FAILED", "RUNNING"]
    runs = (
        {
            "name": f"run-{i:05d}",
            "status": rng.choice(statuses),
            "start_time": t0 + i * 60_000,
            "end_time": t0 + i * 60_000 + 3_000_000,
            "params": {
                "lr": rng.choice([1e-2, 1e-3, 1e-4]),
                "layers": rng.randint(2, 12),
                "dataset": "era5",
                "batch": 64,
            },
            "metrics": {"rmse": rng.random(), "loss": rng.random(), "acc": rng.random()},
            "tags": {"mantik.backend": "ssh-slurm", "mantik.state": "FINISHED"},
        }  # fmt: skip
        for i in range(count)
    )
    insert_runs(store, exp_id, runs)
    store.engine.dispose()
    return exp_id


def measure(fn):
    tracemalloc.start()
    started = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-run-table-") as tmp:
        directory = Path(tmp) / "mlflow"
        t = time.perf_counter()
        exp_id = seed(directory, args.runs)
        print(f"seeded {args.runs} runs into sqlite in {time.perf_counter() - t:.1f} s")
        server = start_mlflow_server(directory)
        try:
            api = RunsApi(TrackingClient(server.uri, server.admin))
            api.search_runs([exp_id], max_results=1)  # warm the server up

            from mantik_jupyter.widgets import RunTable

            table, ours, ours_mem = measure(
                lambda: RunTable(exp_id, page_size=50, refresh_interval=0, api=api)
            )
            assert len(table.view.rows) == 50 and table.requests == 1
            _, sort_s, _ = measure(lambda: table.sort("metrics.rmse", desc=False))
            _, next_s, _ = measure(table.next_page)
            table.close()

            os.environ.update(server.env(server.admin))
            import mlflow

            everything, base, base_mem = measure(
                lambda: mlflow.search_runs(experiment_ids=[exp_id], max_results=args.runs)
            )
            assert len(everything) == args.runs
        finally:
            stop_mlflow_server(server.proc)
    print(
        f"RunTable first page (50 of {args.runs} runs): {ours:.2f} s, "
        f"peak Python memory {ours_mem / 2**20:.1f} MiB (target < 2 s)"
    )
    print(f"  then sort by metrics.rmse on the server: {sort_s:.2f} s, next page: {next_s:.2f} s")
    print(
        f"baseline mlflow.search_runs of all {args.runs} runs: {base:.2f} s, "
        f"peak {base_mem / 2**20:.1f} MiB"
    )
    print(
        f"ratio: {base / ours:.1f}x faster to the first page, "
        f"{base_mem / max(ours_mem, 1):.1f}x less memory"
    )


if __name__ == "__main__":
    main()
