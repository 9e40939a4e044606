"""Full garbage collections in the embedded tracking server, against MLflow's own app.

Starts two embedded servers, one with the app mantik runs (``tracking/mlflow_app.py``:
MLflow's basic-auth app with its start-up objects frozen) and one with MLflow's
``basic-auth`` app as it comes, gives each the same experiment of 50 runs with parameters,
metrics and tags, and times ``runs/search`` on it as a runs table asks for it, interleaved.
Prints p50, p95, p99 and how many calls took over 80 ms, and the p99 ratio
mantik/MLflow (target: below 0.5: the full collections that held one call in 16 or so
for some 0.2 s are gone).

    python bench/tracking_gc.py [--requests 400]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._mlflow_seed import log_runs_table  # noqa: E402
from mantik_jupyter.tracking import embedded  # noqa: E402

SLOW_MS = 80.0


def serve(directory: Path, app: str) -> embedded.EmbeddedTrackingServer:
    embedded._app_name = lambda: app  # type: ignore[assignment]  # read when it starts
    server = embedded.EmbeddedTrackingServer(directory)
    server.start()
    server.wait_ready(180)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    name = embedded._app_name()
    if name == "basic-auth":
        raise SystemExit("install the package (pip install .): its MLflow app plugin is missing")
    with tempfile.TemporaryDirectory() as tmp:
        servers = {"mantik": serve(Path(tmp) / "mantik", name)}
        servers["mlflow"] = serve(Path(tmp) / "mlflow", "basic-auth")
        try:
            sides = {}
            for side, server in servers.items():
                session = requests.Session()
                credential = server.credential()
                session.auth = (credential.username, credential.password or "")
                sides[side] = (session, server.uri, log_runs_table(session, server.uri))
            times: dict[str, list[float]] = {side: [] for side in sides}
            order = list(sides)
            for i in range(args.requests + 20):
                for side in order[:: -1 if i % 2 else 1]:
                    session, uri, body = sides[side]
                    t0 = time.perf_counter()
                    session.post(f"{uri}/api/2.0/mlflow/runs/search", json=body, timeout=60)
                    if i >= 20:  # warm-up
                        times[side].append((time.perf_counter() - t0) * 1000)
            print(f"{'app':8} {'p50':>9} {'p95':>9} {'p99':>9} {'> 80 ms':>8}")
            p99 = {}
            for side, t in times.items():
                q = statistics.quantiles(t, n=100)
                p99[side] = q[98]
                slow = sum(1 for x in t if x > SLOW_MS)
                print(
                    f"{side:8} {statistics.median(t):7.2f}ms {q[94]:7.2f}ms {q[98]:7.2f}ms "
                    f"{slow:8d}"
                )
            print(f"p99 ratio mantik/mlflow: {p99['mantik'] / p99['mlflow']:.2f}")
        finally:
            for server in servers.values():
                server.stop()


if __name__ == "__main__":
    main()
