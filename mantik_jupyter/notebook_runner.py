"""Run a notebook on a compute node: ``%mantik_submit --notebook``'s entry point.

    python notebook_runner.py NOTEBOOK [--param NAME=VALUE ...] [--output executed.ipynb]

Standalone on purpose: ``%mantik_submit --notebook`` copies this file into the code
package, so the compute node needs only nbclient, nbformat, ipykernel and (for the
artifact upload) mlflow, not mantik-jupyter itself. Keep its imports to those and the
standard library.

What it does, papermill's way:

* the parameters are injected as a new cell (tagged ``injected-parameters``) right after
  the cell tagged ``parameters`` (at the top when there is none); each value is converted
  to the type of that cell's default (``int``, ``float``, ``bool``, ``str``; a Python
  literal otherwise);
* the notebook runs in a fresh kernel with the notebook's folder as working directory;
  cell output is echoed to this process's stdout/stderr as it comes, so the job log can
  be followed live;
* the executed notebook is written to ``--output`` and, when ``MLFLOW_RUN_ID`` is set,
  uploaded as an artifact of that run (also after a failure);
* a failing cell prints its error and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
ARTIFACT_DIR = "notebook"
EXIT_CELL_FAILED = 1
EXIT_USAGE = 2
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def say(message: str) -> None:
    print(f"[mantik] {message}", flush=True)


def parameter_defaults(nb: Any) -> tuple[int | None, dict[str, Any]]:
    """Index of the cell tagged ``parameters`` and its ``name = value`` defaults.

    A default that is not a literal (``x = np.zeros(3)``) maps to ``Ellipsis``: the
    parameter exists, but its type is unknown.
    """
    for index, cell in enumerate(nb.cells):
        if cell.get("cell_type") != "code":
            continue
        if PARAMETERS_TAG not in (cell.get("metadata", {}).get("tags") or []):
            continue
        defaults: dict[str, Any] = {}
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:
            return index, defaults
        for node in tree.body:
            targets: list[ast.expr] = []
            value: ast.expr | None = None
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            for target in targets:
                if isinstance(target, ast.Name) and value is not None:
                    try:
                        defaults[target.id] = ast.literal_eval(value)
                    except (ValueError, SyntaxError, TypeError):
                        defaults[target.id] = ...
        return index, defaults
    return None, {}


def convert(value: str, default: Any) -> Any:
    """A parameter given as text, as the type of its default."""
    if isinstance(default, bool):
        word = value.strip().lower()
        if word in ("true", "1", "yes", "on"):
            return True
        if word in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{value!r} is not a boolean (true/false)")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if isinstance(default, str) or default is None:
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def inject(nb: Any, params: dict[str, str]) -> dict[str, Any]:
    """Insert the injected-parameters cell; returns the converted values."""
    import nbformat

    index, defaults = parameter_defaults(nb)
    values: dict[str, Any] = {}
    for name, text in params.items():
        if name not in defaults:
            known = ", ".join(defaults) or "(none: tag a cell 'parameters')"
            raise SystemExit(f"Unknown parameter {name!r}: the notebook's parameters are {known}")
        try:
            values[name] = convert(text, defaults[name])
        except ValueError as exc:
            raise SystemExit(f"Parameter {name!r}: {exc}") from None
    if not values:
        return values
    source = "# Parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source=source, metadata={"tags": [INJECTED_TAG]})
    nb.cells.insert(0 if index is None else index + 1, cell)
    return values


def _client_class() -> type:
    from nbclient import NotebookClient

    class EchoingClient(NotebookClient):
        """Echoes cell output to this process's streams as the kernel sends it."""

        def output(self, outs: list, msg: dict, display_id: str | None, cell_index: int) -> Any:
            content = msg.get("content", {})
            kind = msg.get("msg_type") or msg.get("header", {}).get("msg_type")
            if kind == "stream":
                stream = sys.stderr if content.get("name") == "stderr" else sys.stdout
                stream.write(content.get("text", ""))
                stream.flush()
            elif kind in ("execute_result", "display_data"):
                text = content.get("data", {}).get("text/plain")
                if text:
                    print(text, flush=True)
            return super().output(outs, msg, display_id, cell_index)

    return EchoingClient


def upload(path: Path) -> None:
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient().log_artifact(run_id, str(path), ARTIFACT_DIR)
        say(f"stored the executed notebook as artifact {ARTIFACT_DIR}/{path.name}")
    except Exception as exc:  # noqa: BLE001 - the notebook's own result matters more
        say(f"could not store the executed notebook: {type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute a notebook with parameters.")
    parser.add_argument("notebook")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--output", default=None, help="default: <notebook>.executed.ipynb")
    parser.add_argument("--kernel", default="python3", help="kernel name (default: python3)")
    parser.add_argument("--timeout", type=int, default=-1, help="seconds per cell (default: none)")
    args = parser.parse_args(argv)

    import nbformat
    from nbclient.exceptions import CellExecutionError

    path = Path(args.notebook).resolve()
    out = Path(args.output) if args.output else path.with_suffix(".executed.ipynb")
    params: dict[str, str] = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"--param {item!r}: use NAME=VALUE", file=sys.stderr)
            return EXIT_USAGE
        params[name.strip()] = value
    nb = nbformat.read(path, as_version=4)
    try:
        values = inject(nb, params)
    except SystemExit as exc:
        print(f"[mantik] {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    for name, value in values.items():
        say(f"parameter {name} = {value!r}")
    # A writable place for the kernel's connection file, whatever HOME is like on the node.
    os.environ.setdefault("JUPYTER_RUNTIME_DIR", tempfile.mkdtemp(prefix="mantik-kernel-"))
    cells = sum(1 for c in nb.cells if c.cell_type == "code")
    say(f"executing {path.name} ({cells} code cells) with kernel {args.kernel}")
    client = _client_class()(
        nb,
        kernel_name=args.kernel,
        timeout=None if args.timeout < 0 else args.timeout,
        resources={"metadata": {"path": str(path.parent)}},
        on_cell_execute=lambda cell, cell_index: say(f"cell {cell_index + 1}/{len(nb.cells)}"),
    )
    status = 0
    try:
        client.execute()
    except CellExecutionError as exc:
        say("a cell failed:")
        print(_ANSI.sub("", str(exc)), file=sys.stderr, flush=True)
        status = EXIT_CELL_FAILED
    finally:
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
        upload(out)
    say("notebook finished" if status == 0 else "notebook failed")
    return status


if __name__ == "__main__":
    sys.exit(main())
