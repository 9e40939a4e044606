"""Latency of the MLflow proxy against MLflow itself, measured in one run.

Starts a real ``jupyter server`` with the mantik extension on the embedded
default, logs a run with 10,000 metric points, then times ``runs/search`` and
``metrics/get-history`` straight to MLflow and through ``<lab>/mantik/mlflow``
(``runs/search`` twice: on the experiment of that one run, and on one of 50 runs with
parameters, metrics and tags, as a runs table asks for it),
interleaved so that machine noise hits both alike. Prints p50/p95 and the
ratio proxy/direct (target: p50 ratio <= 1.15), plus MLflow's ``/health`` (no
work, so the row shows the proxy's fixed cost) and, for scale, the latency of
Jupyter's cheapest authenticated endpoint.

The proxied calls carry the lab's token, as MLflow's client with ``MLFLOW_TRACKING_TOKEN``
does, and so take the proxy's token route. A browser's calls (the MLflow UI: a login
cookie, an Origin) take the Jupyter route; the ``runs/search`` rounds time that too.

The same rounds also time the calls (but get-history) through the cheapest relay
the lab can hold (``bench/floor_relay.py``: a token comparison and the proxy's
upstream pool, none of Jupyter's handler machinery): the floor that the machine,
tornado and the extra hop set for any proxy in the lab.

    python bench/proxy.py [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._mlflow_seed import log_runs_table  # noqa: E402
from mantik_jupyter.tracking.embedded import free_port  # noqa: E402


def start_lab(tmp: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    port, token = free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MANTIK_DATA_DIR=str(tmp / "mantik"), JUPYTER_CONFIG_DIR=str(tmp / "cfg"))
    env["JUPYTER_TOKEN"] = token  # not on the command line, where `ps` would show it
    bench = str(Path(__file__).resolve().parent)  # floor_relay, loaded into this lab only
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [bench, env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_server",
            "--allow-root",
            "--no-browser",
            f"--port={port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.jpserver_extensions={'mantik_jupyter': True, 'floor_relay': True}",
            f"--ServerApp.root_dir={tmp}",
        ],  # fmt: skip
        env=env,
        stdout=open(tmp / "lab.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}/", token


def wait_ready(lab: str, token: str) -> dict:
    headers = {"Authorization": f"token {token}"}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            status = requests.get(f"{lab}mantik/api/auth/status", headers=headers, timeout=5).json()
            if status.get("ready"):
                return status
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit("the lab's embedded MLflow did not become ready")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def time_calls(
    method: str, path: str, kw: dict, sides: list[tuple[str, requests.Session, str]], count: int
) -> dict[str, list[float]]:
    """Latencies (ms) of one call on each side. Every relayed call follows a direct one, and
    the order turns each round, so machine noise and idle gaps hit all sides alike."""
    (_, direct, up), relays = sides[0], sides[1:]
    times: dict[str, list[float]] = {label: [] for label, _, _ in sides}
    for i in range(count + 10):
        for label, session, base in relays[:: -1 if i % 2 else 1]:
            for side, sess, url in (("direct", direct, up), (label, session, base)):
                t0 = time.perf_counter()
                resp = sess.request(method, url + path, timeout=60, **kw)
                elapsed = time.perf_counter() - t0
                resp.raise_for_status()
                if i >= 10:  # warm-up
                    times[side].append(elapsed * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        proc, lab, token = start_lab(tmp)
        try:
            status = wait_ready(lab, token)
            admin = json.loads((tmp / "mantik" / "tracking" / "secrets.json").read_text())
            direct = requests.Session()
            direct.auth = (admin["admin_username"], admin["admin_password"])
            proxied = requests.Session()
            proxied.headers["Authorization"] = f"token {token}"
            browser = requests.Session()  # logged in by a cookie, as the MLflow UI in the lab
            browser.get(f"{lab}api/status?token={token}", timeout=60).raise_for_status()
            browser.headers["Origin"] = lab.rstrip("/")
            up, via = status["tracking_uri"] + "/", lab + "mantik/mlflow/"

            api = "api/2.0/mlflow/"
            exp = direct.post(up + api + "experiments/create", json={"name": "bench"}).json()
            run = direct.post(
                up + api + "runs/create", json={"experiment_id": exp["experiment_id"]}
            )
            run_id = run.json()["run"]["info"]["run_id"]
            now = int(time.time() * 1000)
            for start in range(0, 10_000, 1000):
                metrics = [
                    {"key": "loss", "value": 1 / (i + 1), "timestamp": now + i, "step": i}
                    for i in range(start, start + 1000)
                ]
                direct.post(
                    up + api + "runs/log-batch", json={"run_id": run_id, "metrics": metrics}
                ).raise_for_status()

            # An experiment as a runs table shows it: 50 runs with parameters, metrics, tags.
            search_table = log_runs_table(direct, up)

            search = {"experiment_ids": [exp["experiment_id"]], "max_results": 50}
            history = {"run_id": run_id, "metric_key": "loss", "max_results": 25000}
            calls = {
                "health (no work: the fixed cost)": ("GET", "health", {}),
                "runs/search": ("POST", api + "runs/search", {"json": search}),
                "runs/search (50 runs)": ("POST", api + "runs/search", {"json": search_table}),
                "metrics/get-history (10k points)": (
                    "GET", api + "metrics/get-history", {"params": history},
                ),
            }  # fmt: skip
            sides = [("direct", direct, up), ("proxy", proxied, via)]
            floor = ("floor", proxied, lab + "bench-floor/")
            columns = "{:34} {:>9} {:>9} {:>6} {:>9} {:>6} {:>9} {:>9}"
            print(
                columns.format(
                    "call", "direct", "proxy", "ratio", "floor", "ratio", "direct", "proxy"
                )
            )
            print(columns.format("", "p50", "p50", "p50", "p50", "p50", "p95", "p95"))
            added: dict[str, list[float]] = {"proxy": [], "floor": []}
            for name, (method, path, kw) in calls.items():
                # get-history's 450 ms calls would double the run for a floor row.
                with_floor = sides + ([floor] if "get-history" not in name else [])
                if name == "runs/search":
                    with_floor.append(("browser", browser, via))
                times = time_calls(method, path, kw, with_floor, args.requests)
                if "browser" in times:
                    browser_p50 = statistics.median(times.pop("browser"))
                p50 = {side: statistics.median(t) for side, t in times.items()}
                if name == "runs/search":
                    search_direct = times["direct"]
                row = f"{name:34} {p50['direct']:7.2f}ms {p50['proxy']:7.2f}ms"
                row += f" {p50['proxy'] / p50['direct']:6.2f}"
                if "floor" in p50:
                    row += f" {p50['floor']:7.2f}ms {p50['floor'] / p50['direct']:6.2f}"
                    added["floor"].append(p50["floor"] - p50["direct"])
                else:
                    row += f" {'':>9} {'':>6}"
                d95, r95 = percentile(times["direct"], 95), percentile(times["proxy"], 95)
                print(f"{row} {d95:7.2f}ms {r95:7.2f}ms")
                added["proxy"].append(p50["proxy"] - p50["direct"])

            # What any request into Jupyter costs, for scale: the proxy cannot add less
            # than one authenticated Jupyter request.
            jupyter = []
            for i in range(args.requests + 10):
                t0 = time.perf_counter()
                proxied.get(lab + "api/status", timeout=60).raise_for_status()
                if i >= 10:
                    jupyter.append((time.perf_counter() - t0) * 1000)
            ms = {side: ", ".join(f"{o:.2f} ms" for o in v) for side, v in added.items()}
            direct_search = statistics.median(search_direct)
            print(
                f"runs/search by the Jupyter route (a browser's call): {browser_p50:.2f} ms, "
                f"ratio {browser_p50 / direct_search:.2f}."
            )
            print(
                f"added at p50 by the proxy: {ms['proxy']}; by the floor: {ms['floor']}. "
                f"One authenticated Jupyter request (api/status) takes "
                f"{statistics.median(jupyter):.2f} ms."
            )
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
