"""The widget faces of the magics: ``%mantik_compare``, and the RunTable / LogView that
``%mantik_runs`` and ``%mantik_logs --follow`` show in a Jupyter kernel (text elsewhere)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from ..cli import positive_int
from ..errors import InvalidRequest, MantikError
from .args import parse_line
from .display import execution_count, in_kernel

if TYPE_CHECKING:
    from ..compute.runs import RunService

# States the RunTable filters by (MLflow statuses); other --state values keep the HTML table.
TABLE_STATES = {"all", "active", "finished", "failed", "killed"}


def widgets_available() -> bool:
    """Widgets need a kernel with a frontend, ipywidgets and anywidget."""
    if not in_kernel():
        return False
    try:
        import anywidget  # noqa: F401
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def show_run_table(
    service: RunService, experiment: str | None, state: str | None, limit: int
) -> bool:
    """Display a RunTable for ``%mantik_runs``; False when the text/HTML table should do."""
    if not widgets_available() or (state and state.lower() not in TABLE_STATES):
        return False
    from IPython.display import display

    from ..widgets import RunTable

    word = (state or "all").lower()
    table = RunTable(
        experiment,
        state=word if word in ("all", "active") else word.upper(),
        page_size=limit,
        mantik_only=True,
        service=service,
    )
    cell = _cell_id()
    if cell is not None:
        # The cell ran again: its tables left the page with its output, but kept their
        # refresh threads, which asked the tracking server and the cluster every 10 s for
        # good; one thread more each time the cell ran.
        count = execution_count()
        shown = _TABLES_BY_CELL.setdefault(cell, [])
        for _, old in [t for t in shown if t[0] != count]:
            old.close()
        shown[:] = [t for t in shown if t[0] == count] + [(count, table)]
    display(table)
    return True


# The RunTables each notebook cell showed in its last run (by JupyterLab's cell id), with
# that run's execution count.
_TABLES_BY_CELL: dict[str, list[tuple[int | None, Any]]] = {}


def _cell_id() -> str | None:
    """The id of the notebook cell that runs now, when the frontend sends it (JupyterLab
    does, in the execute request's metadata)."""
    from IPython import get_ipython

    kernel = getattr(get_ipython(), "kernel", None)
    try:
        parent = kernel.get_parent() if kernel is not None else None
    except Exception:  # noqa: BLE001 - an ipykernel before 6 has no get_parent
        return None
    cell = ((parent or {}).get("metadata") or {}).get("cellId")
    return cell if isinstance(cell, str) and cell else None


def show_log_view(chunks: Iterable[str], follow_label: str | None = None) -> bool:
    """Follow a log in a LogView for ``%mantik_logs --follow`` until the run ended;
    False for plain text.

    The cell runs as long as the log is followed, as in a terminal: a view that followed
    in the background let "Run All" (nbconvert, papermill) go on to the next cell while
    the run was still running, and interrupting the kernel did not stop it. Once it is
    done, the view's output is shown again with the text it followed, for places
    without widgets (a converted or exported notebook)."""
    if not widgets_available():
        return False
    from IPython.display import display

    from ..widgets import LogView

    view = LogView(source=chunks, label=follow_label)
    handle = display(view, display_id=True)
    try:
        while not view.wait(0.5):
            pass
    except KeyboardInterrupt:
        view.stop()
        raise
    finally:
        if handle is not None:
            handle.update(view)
    return True


@magics_class
class DashboardMagics(Magics):
    def _service(self) -> RunService:
        mantik = self.shell.magics_manager.registry.get("MantikMagics") if self.shell else None
        if mantik is not None:
            return mantik._runs()
        from ..widgets._core import default_service

        return default_service()

    @magic_arguments()
    @argument("runs", nargs="*", metavar="RUN", help="Run ids, id prefixes, names or 'last'.")
    @argument("--metric", "-m", action="append", metavar="M", help="Metric to plot (repeat).")
    @argument("--experiment", "-e", metavar="E", help="Compare the best runs of experiment E.")
    @argument(
        "--top", type=positive_int, default=5, metavar="K", help="With --experiment: K runs."
    )
    @argument("--x", default="step", choices=["step", "time", "relative"], help="x axis.")
    @argument("--full", action="store_true", help="Read every value (slower) before LTTB.")
    @line_magic
    def mantik_compare(self, line: str) -> Any:
        """Compare runs: metric histories (downsampled), params vs final metric, summary.

        %mantik_compare RUN RUN ... [--metric M]
        %mantik_compare --experiment E --metric M --top K
        """
        from ..widgets import MetricComparison

        try:
            args = parse_line(self.mantik_compare, line)
            if args.experiment:
                if not args.metric:
                    raise InvalidRequest("--experiment needs --metric M to rank the runs by.")
                if args.runs:
                    raise InvalidRequest("Give runs or --experiment, not both.")
                return MetricComparison(
                    experiment=args.experiment,
                    metric=args.metric[0],
                    metrics=args.metric,
                    top=args.top,
                    x_axis=args.x,
                    fetch="full" if args.full else "sampled",
                    service=self._service(),
                    background=in_kernel(),
                )
            if not args.runs:
                raise InvalidRequest("Give the runs to compare, or --experiment E --metric M.")
            mantik = self.shell.magics_manager.registry.get("MantikMagics") if self.shell else None
            refs = [mantik._ref(r) for r in args.runs] if mantik is not None else args.runs
            return MetricComparison(
                refs,
                metrics=args.metric,
                x_axis=args.x,
                fetch="full" if args.full else "sampled",
                service=self._service(),
                background=in_kernel(),
            )
        except MantikError as err:
            print(f"mantik: {' '.join(err.message.split())}")
            return None
