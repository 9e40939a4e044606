"""Toy temperature forecast: an autoregressive model fitted by gradient descent.

Generates a synthetic daily temperature series for a station (seasonal cycle + noise),
fits  T[t] = a * T[t-1] + b * sin(season) + c * cos(season) + d  by full-batch gradient descent,
and logs parameters, per-epoch loss/rmse and a forecast CSV to MLflow. When started by
mantik, MLFLOW_RUN_ID in the environment makes ``mlflow.start_run()`` resume the run that
was created at submission.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path

import mlflow
import numpy as np

DAYS = 3 * 365
HORIZON = 14


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--station", default="Juelich")
    parser.add_argument(
        "--epoch-seconds",
        type=float,
        default=0.3,
        help="pause per epoch so the log can be followed live",
    )
    parser.add_argument("--fail", action="store_true", help="exit with code 3 (for tests)")
    parser.add_argument(
        "--sleep",
        type=float,
        default=None,
        metavar="SECONDS",
        help="only sleep (for cancellation tests)",
    )
    return parser.parse_args(argv)


def say(message: str) -> None:
    # Flushed at once: the job log is followed live while the job runs.
    print(message, flush=True)


def synthetic_series(station: str) -> np.ndarray:
    # A stable seed per station (hash() is salted per process) keeps runs comparable.
    rng = np.random.default_rng(zlib.crc32(station.encode()))
    day = np.arange(DAYS)
    mean = rng.uniform(5.0, 15.0)
    amplitude = rng.uniform(6.0, 12.0)
    seasonal = mean - amplitude * np.cos(2 * np.pi * day / 365.25)
    weather = np.zeros(DAYS)
    for t in range(1, DAYS):
        weather[t] = 0.7 * weather[t - 1] + rng.normal(0.0, 2.0)
    return seasonal + weather


def features(series: np.ndarray, start: int) -> np.ndarray:
    day = np.arange(start, start + len(series))
    season = 2 * np.pi * day / 365.25
    # Scaled to order 1 so a single learning rate suits every weight.
    return np.column_stack([series / 20.0, np.sin(season), np.cos(season), np.ones(len(series))])


def train(series: np.ndarray, epochs: int, learning_rate: float, pause: float) -> np.ndarray:
    x = features(series[:-1], 0)
    y = series[1:] / 20.0
    weights = np.zeros(x.shape[1])
    for epoch in range(1, epochs + 1):
        # Many small steps per epoch: an "epoch" is one pass over the series in mini-batches.
        for batch in np.array_split(np.arange(len(y)), 20):
            error = x[batch] @ weights - y[batch]
            weights -= learning_rate * 2 * x[batch].T @ error / len(batch)
        residual = x @ weights - y
        loss = float(np.mean(residual**2))
        rmse = float(np.sqrt(loss)) * 20.0
        mlflow.log_metrics({"loss": loss, "rmse": rmse}, step=epoch)
        say(f"epoch {epoch}/{epochs}  loss={loss:.5f}  rmse={rmse:.3f} degC")
        time.sleep(pause)
    return weights


def forecast(series: np.ndarray, weights: np.ndarray) -> np.ndarray:
    values = [series[-1]]
    for step in range(HORIZON):
        x = features(np.array([values[-1]]), len(series) + step)
        values.append(float((x @ weights)[0]) * 20.0)
    return np.array(values[1:])


def write_forecast(path: Path, station: str, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["station,day_ahead,temperature_degC"]
    lines += [f"{station},{i + 1},{v:.2f}" for i, v in enumerate(values)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fail:
        say("ERROR: this entry point fails on purpose (exit code 3)")
        print("ERROR: simulated failure", file=sys.stderr, flush=True)
        return 3
    if args.sleep is not None:
        say(f"sleeping {args.sleep:g} s")
        time.sleep(args.sleep)
        say("done sleeping")
        return 0
    if args.epochs < 1:
        say(f"ERROR: --epochs must be at least 1, got {args.epochs}")
        return 2
    with mlflow.start_run() as run:
        # A resumed run (MLFLOW_RUN_ID) already has its params, logged by the submitter as
        # given (e.g. "1e-2"); logging them again in another spelling would be refused.
        params = {
            "epochs": args.epochs,
            "learning_rate": args.learning_rate,
            "station": args.station,
        }
        mlflow.log_params({k: v for k, v in params.items() if k not in run.data.params})
        say(f"station {args.station}: {DAYS} days of synthetic temperatures")
        series = synthetic_series(args.station)
        weights = train(series, args.epochs, args.learning_rate, args.epoch_seconds)
        values = forecast(series, weights)
        out = Path("outputs") / "forecast.csv"
        write_forecast(out, args.station, values)
        mlflow.log_artifact(str(out))
        say(f"wrote {out}: next {HORIZON} days {values.min():.1f}..{values.max():.1f} degC")
    return 0


if __name__ == "__main__":
    sys.exit(main())
