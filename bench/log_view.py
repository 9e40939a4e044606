"""LogView following a long log: bytes sent to the browser per update, against the
LogView that sent its whole tail as ``text`` at each flush (the baseline, a subclass
with the old ``_append``), measured in the same run over a real kernel's comm messages.

    PYTHONPATH=. python bench/log_view.py [--lines 20000] [--max-chars 200000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from tests.log_view_comms import WHOLE_TEXT, LogKernel, follow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20_000, help="log lines (~110 chars)")
    parser.add_argument("--max-chars", type=int, default=200_000, help="the tail kept")
    parser.add_argument("--flush", type=float, default=0.25, help="flush interval, seconds")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        kernel = LogKernel(Path(tmp))
        try:
            kernel.run(WHOLE_TEXT)
            for widget in ("WholeTextLogView", "LogView"):
                _, length, traffic = follow(
                    kernel,
                    lines=args.lines,
                    flush=args.flush,
                    max_chars=args.max_chars,
                    widget=widget,
                )
                in_kernel = kernel.run("print(view.text, end='')")
                view = traffic.frontend()
                assert view.text == in_kernel and length == len(in_kernel), widget
                results[widget] = traffic.updates()
        finally:
            kernel.close()
    for widget, sizes in results.items():
        print(
            f"{widget}: {len(sizes)} updates, {statistics.mean(sizes) / 1024:.1f} KiB each "
            f"on average, {max(sizes) / 1024:.1f} KiB at most, {sum(sizes) / 2**20:.2f} MiB "
            "in all"
        )
    base, ours = results["WholeTextLogView"], results["LogView"]
    print(
        f"ratio: {statistics.mean(base) / statistics.mean(ours):.1f}x fewer bytes per update, "
        f"{sum(base) / sum(ours):.1f}x fewer in all (the browser's text equal to the "
        "kernel's in both)"
    )


if __name__ == "__main__":
    main()
