"""MetricComparison with 20 runs x 100,000 steps: time to build the figure and points sent
to the browser, against a figure that sends every point, measured in the same run.

Three parts:
1. In memory (no network): LTTB + small-multiples figure from the full histories, against
   the same figure with all 2,000,000 points.
2. End to end against a real ``mlflow server`` whose sqlite store holds the histories
   (bench/_mlflow_seed.py): ``fetch="sampled"`` (server sampling + LTTB, the default) and,
   unless --skip-full, ``fetch="full"`` (every value through get-history, paged).
3. Unless --skip-kernel, in a real kernel: the bytes of the messages that displaying one
   comparison (2 runs x 2 metrics) sends to the browser, of its next update, and of the
   notebook nbconvert executes with it, against the comparison of before (two plotly
   FigureWidgets, each model carrying plotly's widget bundle) measured in the same run.

    PYTHONPATH=. python bench/metric_comparison.py [--runs 20] [--steps 100000]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from bench._mlflow_seed import insert_runs, open_store
from mantik_jupyter.tracking import metrics as m
from mantik_jupyter.tracking.rest import TrackingClient
from mantik_jupyter.tracking.runs_api import RunsApi
from tests.mlflow_fixtures import start_mlflow_server, stop_mlflow_server


def curves(runs: int, steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    x = np.arange(steps, dtype=float)
    out = []
    for i in range(runs):
        y = (1 + i / runs) * np.exp(-x / (steps / 5)) + 0.05 * rng.standard_normal(steps)
        y[rng.integers(0, steps, 5)] += 3  # a few spikes
        out.append((x, y))
    return out


def in_memory(data, max_points: int) -> None:
    from mantik_jupyter.widgets.metric_comparison import COLORS, build_figure

    ids = [f"run{i:02d}" for i in range(len(data))]
    names = {r: r for r in ids}
    colors = {r: COLORS[i % len(COLORS)] for i, r in enumerate(ids)}

    # Once per kernel: plotly loads its validators on the first figure. Reported apart;
    # both builds below run after it.
    started = time.perf_counter()
    go.Figure(go.Scatter(x=[0], y=[0]))
    first = time.perf_counter() - started

    started = time.perf_counter()
    series = {
        (rid, "loss"): m.build_series(rid, "loss", xy, max_points=max_points)
        for rid, xy in zip(ids, data, strict=True)
    }
    fig = build_figure(series, ["loss"], ids, names, colors)
    ours = time.perf_counter() - started
    ours_points = sum(len(tr.x) for tr in fig.data)
    ours_bytes = len(fig.to_json())

    started = time.perf_counter()
    full = {
        (rid, "loss"): m.Series(rid, "loss", xy[0], xy[1], len(xy[0]))
        for rid, xy in zip(ids, data, strict=True)
    }
    base_fig = build_figure(full, ["loss"], ids, names, colors)
    base = time.perf_counter() - started
    base_points = sum(len(tr.x) for tr in base_fig.data)
    base_bytes = len(base_fig.to_json())
    print(f"in memory, {len(data)} runs x {len(data[0][0]):,} steps:")
    print(f"  (once per kernel: the first figure takes {first:.2f} s)")
    print(
        f"  LTTB + figure: {ours:.2f} s, {ours_points:,} points, "
        f"{ours_bytes / 2**20:.1f} MiB of figure JSON (target < 2 s)"
    )
    print(
        f"  baseline, every point: {base:.2f} s, {base_points:,} points, "
        f"{base_bytes / 2**20:.1f} MiB"
    )
    print(
        f"  ratio: {base_points / ours_points:.0f}x fewer points, "
        f"{base_bytes / ours_bytes:.0f}x fewer bytes to the browser; LTTB costs "
        f"{ours - base:+.2f} s in Python"
    )


def seed(directory: Path, data) -> tuple[str, list[str]]:
    store = open_store(directory)
    exp_id = store.create_experiment("bench-comparison")
    t0 = int(time.time() * 1000)
    runs = [
        {
            "name": f"run{i:02d}",
            "start_time": t0,
            "end_time": t0 + len(x) * 100,
            "params": {"lr": 10 ** -(1 + i % 4), "layers": 2 + i % 5},
            "history": {
                "loss": list(
                    zip(
                        x.astype(int).tolist(),
                        (t0 + 100 * x).astype(int).tolist(),
                        y.tolist(),
                        strict=True,
                    )
                )
            },
        }  # fmt: skip
        for i, (x, y) in enumerate(data)
    ]
    ids = insert_runs(store, exp_id, runs)
    store.engine.dispose()
    return exp_id, ids


def end_to_end(data, max_points: int, skip_full: bool) -> None:
    from mantik_jupyter.widgets import MetricComparison

    with tempfile.TemporaryDirectory(prefix="bench-comparison-") as tmp:
        directory = Path(tmp) / "mlflow"
        started = time.perf_counter()
        _, ids = seed(directory, data)
        total = sum(len(x) for x, _ in data)
        print(
            f"seeded {total:,} metric values into sqlite in {time.perf_counter() - started:.1f} s"
        )
        server = start_mlflow_server(directory)
        try:
            api = RunsApi(TrackingClient(server.uri, server.admin))
            next(api.search_experiments(max_results=1), None)
            started = time.perf_counter()
            api.metric_history_sampled(ids, "loss")
            print(
                f"  one get-history-bulk-interval request for {len(ids)} runs: "
                f"{time.perf_counter() - started:.2f} s"
            )
            modes = ["sampled"] if skip_full else ["sampled", "full"]
            for mode in modes:
                started = time.perf_counter()
                comp = MetricComparison(
                    ids, metrics=["loss"], fetch=mode, max_points=max_points, api=api
                )
                elapsed = time.perf_counter() - started
                print(
                    f"  end to end, fetch={mode!r}: {elapsed:.2f} s, {comp.requests} "
                    f"requests, {comp.points_sent:,} points sent of {total:,} logged"
                )
                comp.close()
        finally:
            stop_mlflow_server(server.proc)


def in_a_kernel() -> None:
    from tests.comparison_comms import measure, tracking_env

    with tracking_env() as env:
        base = measure(env, "FigureWidgetComparison")
        ours = measure(env)
    print("in a kernel, one comparison of 2 runs x 2 metrics x 2,000 steps:")
    for name, cost in (("two FigureWidgets (before)", base), ("plotly mimetype (now)", ours)):
        print(
            f"  {name}: displayed {cost.shown / 1e6:.2f} MB, next update "
            f"{cost.updated / 1e6:.2f} MB, largest message {cost.largest / 1e6:.2f} MB, "
            f"nbconvert-executed notebook {cost.notebook / 1e6:.2f} MB"
        )
    print(
        f"  ratio: {base.shown / ours.shown:.0f}x fewer bytes to display a comparison, "
        f"{base.notebook / ours.notebook:.0f}x smaller notebook, "
        f"an update {ours.updated / base.updated:.2f}x the bytes of before (the whole figure "
        "as base64 in JSON, where a FigureWidget sent binary changes)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--max-points", type=int, default=m.DEFAULT_MAX_POINTS)
    parser.add_argument("--skip-full", action="store_true", help="skip fetch='full'")
    parser.add_argument("--skip-server", action="store_true", help="skip the mlflow part")
    parser.add_argument("--skip-kernel", action="store_true", help="skip the kernel part")
    args = parser.parse_args()
    data = curves(args.runs, args.steps)
    in_memory(data, args.max_points)
    if not args.skip_server:
        end_to_end(data, args.max_points, args.skip_full)
    if not args.skip_kernel:
        in_a_kernel()
    assert math.isfinite(data[0][1][0])


if __name__ == "__main__":
    main()
