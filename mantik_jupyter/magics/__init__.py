"""The ``%mantik_*`` magics: a thin face of the core for notebooks and IPython.

``%load_ext mantik_jupyter`` registers them. Every magic translates its arguments into
one call of the core (``RunService`` from ``mantik_jupyter.api.run_service``, the same
construction the ``mantik`` command uses) and shows the result; domain errors become
one line ``mantik: <what went wrong and what to do>``
(``%config MantikMagics.show_tracebacks = True`` shows the traceback instead).

RUN arguments are a run id, a unique prefix of one, a run name, or ``last`` (the run
submitted last from this kernel).
"""

from __future__ import annotations

import functools
import getpass
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from IPython.core.error import StdinNotImplementedError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import Bool, Float, Unicode

from .. import paths
from ..api import ENV_JOB_TRACKING_URI, run_service, tracking_service
from ..cli import interrupted, positive_int
from ..compute.run_download import DownloadClash
from ..compute.states import RunState
from ..errors import MantikError, NotFound, NotLoggedIn, ProjectError
from ..tracking.service import run_page_url
from .args import parse_line
from .dashboards import DashboardMagics, show_log_view, show_run_table
from .display import (
    PackagingProgress,
    Run,
    StatusLine,
    _show_runs,
    _stream_log,
    ask_soon,
    follow_in_background,
    in_kernel,
    notebook_sized,
    short,
    tail,
    watch,
)
from .notebook import (
    ExecutionLog,
    find_notebook,
    lab_base_url,
    start_dir,
    unsaved_work_warning,
)

if TYPE_CHECKING:
    from ..compute.run_record import RunInfo
    from ..compute.runs import RunService
    from ..tracking.service import TrackingService


NOT_SUBMITTED = (
    "Submission interrupted before its job was queued: nothing runs (a run it had "
    "created in MLflow is marked KILLED)."
)


def _guarded(func: Callable[..., Any]) -> Callable[..., Any]:
    """Domain errors as one line; Ctrl-C stops the magic, never the run."""

    @functools.wraps(func)
    def wrapper(self: MantikMagics, line: str = "", *args: Any, **kwargs: Any) -> Any:
        try:
            return func(self, line, *args, **kwargs)
        except (KeyboardInterrupt, Exception) as err:
            if self.show_tracebacks:
                raise
            if interrupted(err):
                keeps = "" if func.__name__ == "mantik_login" else "; a submitted run keeps running"
                print(f"\nmantik: interrupted{keeps}.", flush=True)
                return None
            if isinstance(err, MantikError):
                self._fail(err)
                return None
            raise

    return wrapper


@magics_class
class MantikMagics(Magics):
    show_tracebacks = Bool(
        False, config=True, help="Show full tracebacks of mantik errors (for debugging)."
    ).tag(config=True)
    tracking_uri = Unicode(
        None,
        allow_none=True,
        config=True,
        help="Tracking server (default: $MLFLOW_TRACKING_URI, else the lab's).",
    ).tag(config=True)
    poll_interval = Float(
        2.0, config=True, help="Seconds between state checks while waiting for a run."
    ).tag(config=True)
    follow_interval = Float(
        0.3, config=True, help="Seconds between log reads of %mantik_logs --follow."
    ).tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self._service: RunService | None = None
        self._service_key: tuple[str | None, ...] | None = None
        self.last_run_id: str | None = None
        self.executions = ExecutionLog()
        if shell is not None:
            # The cell running %load_ext counts as executed now.
            self.executions.record(_last_input(shell))
            shell.events.register("pre_run_cell", self._pre_run_cell)

    def _pre_run_cell(self, info: Any = None) -> None:
        self.executions.record(getattr(info, "raw_cell", "") or "")

    def _fail(self, err: MantikError) -> None:
        if self.show_tracebacks:
            raise err
        # One readable line: what went wrong and what to do.
        print(f"mantik: {' '.join(err.message.split())}")

    # ---- the core --------------------------------------------------------------------------

    def _runs(self) -> RunService:
        """One RunService per tracking configuration (its SSH connections are reused)."""
        key = (
            self.tracking_uri,
            os.environ.get("MLFLOW_TRACKING_URI"),
            os.environ.get("MANTIK_TRACKING_URI"),
            os.environ.get(ENV_JOB_TRACKING_URI),
            str(paths.data_dir()),
            str(paths.credentials_file()),
        )
        if self._service is None or key != self._service_key:
            if self._service is not None:
                self._service.close()
            self._service = run_service(self.tracking_uri)
            self._service_key = key
        return self._service

    def _ref(self, ref: str) -> str:
        ref = (ref or "").strip()
        if ref == "last":
            if self.last_run_id is None:
                raise NotFound(
                    "No run was submitted from this kernel yet, so 'last' means nothing: "
                    "give a run id, a unique prefix of one, or a run name (see %mantik_runs)."
                )
            return self.last_run_id
        return ref

    def _url(self, info: RunInfo, base_url: str | None = None) -> str:
        uri = self._runs().tracking.uri
        return run_page_url(info.experiment_id, info.run_id, uri, base_url)

    def _run(self, info: RunInfo, base_url: str | None = None) -> Run:
        return Run(self._runs(), info, self._url(info, base_url), poll=self.poll_interval)

    # ---- magics ------------------------------------------------------------------------------

    @magic_arguments()
    @argument("--username", "-u", help="User name on the tracking server.")
    @argument("--token", action="store_true", help="Log in with a token instead of a password.")
    @argument("--tracking-uri", help="The tracking server (default: the lab's).")
    @line_magic
    @_guarded
    def mantik_login(self, line: str) -> dict[str, Any] | None:
        """Log in to the tracking server. The password or token is asked for, never echoed."""
        # Guarded like the others: interrupting the kernel at the prompt is no traceback.
        args = parse_line(self.mantik_login, line)
        service = tracking_service(args.tracking_uri or self.tracking_uri)
        status = ask_and_login(service, args.username, token=args.token, asker="%mantik_login")
        message = f"Logged in to {status['tracking_uri']} as {status['username']}."
        if args.tracking_uri and args.tracking_uri != self.tracking_uri:
            # The server logged in to is the one the user means from now on: the magics
            # went on asking the default one ("No tracking server is configured").
            self.tracking_uri = status["tracking_uri"]
            message += " The %mantik_* magics of this kernel use it from now on."
        print(message)
        return status

    @magic_arguments()
    @argument(
        "--backend-config",
        metavar="FILE",
        help="Compute backend config (default: compute-backend-config.yaml|yml|json in the "
        "project folder); relative to the project folder or the working directory.",
    )
    @argument("--entry-point", "-e", default="main", help="MLproject entry point (default: main).")
    @argument(
        "-P",
        dest="param",
        action="append",
        metavar="KEY=VALUE",
        help="An entry-point parameter (with --notebook: a name assigned in the cell tagged "
        "'parameters'); repeat for more.",
    )
    @argument(
        "--experiment", metavar="NAME", help="MLflow experiment (default: the project's name)."
    )
    @argument("--run-name", metavar="R", help="MLflow run name (default: generated).")
    @argument("--wait", action="store_true", help="Show the run's state until it ended.")
    @argument(
        "--notebook",
        action="store_true",
        help="Run this notebook itself on the backend (executed with nbclient; parameters "
        "injected after the cell tagged 'parameters'; the executed notebook is stored as "
        "the artifact notebook/<name>.ipynb).",
    )
    @argument(
        "--path",
        metavar="PATH",
        help="The notebook or project folder to submit, when it cannot be found "
        "automatically (JPY_SESSION_NAME, the Jupyter sessions API).",
    )
    @line_magic
    @_guarded
    def mantik_submit(self, line: str) -> Run | None:
        """Submit the MLproject of this notebook's folder (or the notebook itself) as a run.

        The MLproject is the nearest folder at or above the notebook that holds an
        ``MLproject`` file. Returns a ``Run``: ``run.state``, ``run.logs()``, ``run.wait()``,
        ``run.cancel()``, ``run.download()``, ``run.metrics()``.
        """
        from ..compute.project import find_project_dir, parse_param_args

        args = parse_line(self.mantik_submit, line)
        params = parse_param_args(args.param or [])
        location = find_notebook(args.path)
        start = start_dir(location, args.path)
        notebook = location.path if location.path and location.path.suffix == ".ipynb" else None
        if notebook is not None:
            note = unsaved_work_warning(notebook, self.executions.before_current())
            if note:
                print(f"mantik warning: {note}", flush=True)
        service = self._runs()
        prepared = None
        if args.notebook:
            if notebook is None:
                raise ProjectError(
                    "--notebook: cannot tell which notebook this kernel runs "
                    f"(looked at JPY_SESSION_NAME and the Jupyter sessions API; {location.how}). "
                    "Pass it with --path NOTEBOOK.ipynb."
                )
            if args.entry_point != "main":
                raise ProjectError("--notebook runs the notebook; --entry-point does not apply.")
            config_path = self._notebook_config(notebook, args.backend_config)
            from ..compute.config import load_config
            from . import notebook_mode

            with warnings.catch_warnings(record=True) as caught:
                config = load_config(config_path)
            _print_warnings(caught)
            prepared = notebook_mode.prepare(notebook, config, params, service.work_dir)
            project_dir: Path = prepared.directory
            backend_config: str | Path | None = config_path
        else:
            try:
                project_dir = find_project_dir(start)
            except ProjectError:
                raise ProjectError(
                    f"No MLproject file in {start} or any folder above it. Either create an "
                    "MLproject file next to your code (see "
                    "https://mlflow.org/docs/latest/projects.html), or submit this notebook "
                    "itself with %mantik_submit --notebook."
                ) from None
            backend_config = args.backend_config
        line_out = StatusLine()
        try:
            with warnings.catch_warnings(record=True) as caught:
                try:
                    info = service.submit(
                        project_dir,
                        backend_config=backend_config,
                        entry_point=args.entry_point,
                        params=params,
                        experiment_name=args.experiment,
                        run_name=args.run_name,
                        source="notebook",
                        progress=PackagingProgress(line_out),
                    )
                except BaseException as err:
                    if not interrupted(err):
                        raise
                    # Stopped before its job was queued: the core marked a run it had
                    # made KILLED. "A submitted run keeps running" sent people looking
                    # for a run that never ran; the packaging line stayed at its 42%.
                    line_out.update(f"mantik: {NOT_SUBMITTED}", force=True)
                    return None
            _print_warnings(caught, skip=info.warnings)
            for note in info.warnings:
                print(f"mantik warning: {note}", flush=True)
            if prepared is not None and notebook is not None:  # one implies the other
                from ..compute.run_inputs import git_tags
                from ..tracking.runs_api import RunsApi

                RunsApi(service.tracking.client()).set_tags(
                    info.run_id, {**prepared.tags(), **git_tags(notebook.parent)}
                )
        finally:
            if prepared is not None:
                prepared.cleanup()
        self.last_run_id = info.run_id
        run = self._run(info, lab_base_url(location))
        if args.wait:
            run.followed_by(line_out)
            try:
                info = watch(service, run, line_out, poll=self.poll_interval)
                if info.state == RunState.FAILED:
                    _show_failure(service, info)
            except KeyboardInterrupt:
                # The run goes on: `run = %mantik_submit --wait` still gets it (it was
                # None), and its line follows it without blocking the kernel instead of
                # keeping the state it had when the wait stopped.
                if line_out.live:
                    follow_in_background(service, run, line_out, self.poll_interval)
                ref = short(run.run_id)
                print(
                    f"\nmantik: stopped waiting; run {ref} keeps running "
                    f"(%mantik_cancel {ref} cancels it).",
                    flush=True,
                )
        elif line_out.live:
            follow_in_background(service, run, line_out, self.poll_interval)
        else:
            line_out.update(
                f"Submitted: {run!r}".replace("\n", " · "), run._repr_html_(), force=True
            )
        return run

    def _notebook_config(self, notebook: Path, given: str | None) -> Path:
        from ..compute.config import CONFIG_FILENAMES, find_config
        from ..compute.project import find_project_dir
        from ..errors import ConfigError

        folder = notebook.parent
        if given:
            path = Path(given).expanduser()
            if not path.is_absolute():
                path = folder / path if (folder / path).exists() else Path.cwd() / path
            if not path.is_file():
                raise ConfigError(f"The compute backend config {path} does not exist.")
            return path.resolve()
        found = find_config(folder)
        if found is None:
            try:
                found = find_config(find_project_dir(folder))
            except ProjectError:
                found = None
        if found is None:
            raise ConfigError(
                f"No compute backend config found in {folder} (looked for "
                f"{', '.join(CONFIG_FILENAMES)}). Create one there or pass its path "
                "(--backend-config FILE)."
            )
        return found

    @magic_arguments()
    @argument("run", metavar="RUN", help="Run id, unique id prefix, run name, or 'last'.")
    @argument("--follow", "-f", action="store_true", help="Keep printing until the run ended.")
    @argument(
        "--tail",
        type=int,
        metavar="N",
        help="Only the last N lines (to start with). Default: all of it, in a notebook "
        "the last 1000 lines.",
    )
    @line_magic
    @_guarded
    def mantik_logs(self, line: str) -> None:
        """Print a run's log; with --follow, new lines as they are written until the run
        ended (interrupt the kernel to stop following; the run keeps running)."""
        args = parse_line(self.mantik_logs, line)
        service = self._runs()
        run_id = service.resolve(self._ref(args.run))
        so_far = service.all_logs(run_id)
        text = tail(so_far.text, args.tail)
        if args.tail is None and in_kernel():
            text = notebook_sized(text, args.run)
        print(text, end="", flush=True)
        if not args.follow:
            return
        try:
            chunks = service.follow_logs(
                run_id, poll_interval=self.follow_interval, offset=so_far.offset
            )
            if not show_log_view(chunks, follow_label=short(run_id)):
                _stream_log(chunks)
        except KeyboardInterrupt:
            print(f"\nmantik: stopped following run {short(run_id)}; it keeps running.", flush=True)

    @magic_arguments()
    @argument("--experiment", metavar="E", help="Only runs of this experiment (name).")
    @argument(
        "--state",
        metavar="S",
        help="SUBMITTING, QUEUED, RUNNING, FINISHED, FAILED, KILLED, UNKNOWN, active or final.",
    )
    @argument(
        "--limit", type=positive_int, default=20, metavar="N", help="At most N runs (default 20)."
    )
    @line_magic
    @_guarded
    def mantik_runs(self, line: str) -> None:
        """List runs, newest first, with their state and a link to MLflow."""
        args = parse_line(self.mantik_runs, line)
        service = self._runs()
        if show_run_table(service, args.experiment, args.state, args.limit):
            return
        if args.state:
            # As `mantik runs list --state`: the search matches the state last recorded,
            # so a run that ended while no one followed it was listed under --state
            # running as FINISHED. The user's active runs are brought up to date first.
            service.sync()
        runs, _ = service.list(
            experiment_name=args.experiment,
            state=args.state,
            max_results=args.limit,
            refresh=not args.state,
        )
        base_url = lab_base_url()
        _show_runs(runs, lambda info: self._url(info, base_url))

    @magic_arguments()
    @argument("run", metavar="RUN", help="Run id, unique id prefix, run name, or 'last'.")
    @line_magic
    @_guarded
    def mantik_status(self, line: str) -> Run | None:
        """The current state of a run (asks its backend), as a ``Run``."""
        args = parse_line(self.mantik_status, line)
        return self._run(self._runs().get(self._ref(args.run)), lab_base_url())

    @magic_arguments()
    @argument("run", metavar="RUN", help="Run id, unique id prefix, run name, or 'last'.")
    @line_magic
    @_guarded
    def mantik_cancel(self, line: str) -> None:
        """Cancel a run on its backend."""
        args = parse_line(self.mantik_cancel, line)
        info = self._runs().cancel(self._ref(args.run))
        ask_soon(info.run_id)
        print(f"Cancelled run {info.run_id} ({info.run_name}): {info.state}")

    @magic_arguments()
    @argument("run", metavar="RUN", help="Run id, unique id prefix, run name, or 'last'.")
    @argument("path", metavar="PATH", nargs="?", default="", help="File or folder (default: all).")
    @argument("--to", metavar="DIR", help="Where to put it (default: the working directory).")
    @argument(
        "--overwrite",
        action="store_true",
        help="Replace local files that differ from the run's (default: refuse, naming them).",
    )
    @line_magic
    @_guarded
    def mantik_download(self, line: str) -> Path | None:
        """Download a file or folder of a run's directory (default: all of it). Local
        files in the way are never replaced without --overwrite; identical ones are left."""
        args = parse_line(self.mantik_download, line)
        # Results can be GBs: the line shows how far the copy got.
        try:
            done = self._runs().download(
                self._ref(args.run),
                args.path,
                Path(args.to).expanduser() if args.to else None,
                progress=PackagingProgress(StatusLine()).download,
                overwrite=args.overwrite,
            )
        except DownloadClash as clash:
            raise clash.with_flag("--overwrite") from None
        print(done.summary())
        return None


FAILURE_LOG_LINES = 20


def _show_failure(service: RunService, info: RunInfo) -> None:
    """The end of a failed run's log under its line: 'FAILED (exit code 1)' alone sent
    everyone to a second cell for the traceback."""
    ref = short(info.run_id)
    try:
        text = tail(service.all_logs(info.run_id).text, FAILURE_LOG_LINES)
    except MantikError as err:
        text = f"(its log cannot be read: {' '.join(err.message.split())})\n"
    if not text.strip():
        # No job ran (refused by the site, its login-node commands failed): the reason on
        # its line says why, and an empty "last lines" sent people looking for a log.
        print(f"mantik: run {ref} failed and wrote no log: {info.reason or 'no reason given'}")
        return
    if not text.endswith("\n"):
        text += "\n"
    print(
        f"mantik: run {ref} failed. The last lines of its log:\n{text}"
        f"(all of it: %mantik_logs {ref})",
        flush=True,
    )


def ask_and_login(
    service: TrackingService, username: str | None, *, token: bool, asker: str
) -> dict[str, Any]:
    """Log in with a password (or token) asked for without echo, never typed into a cell
    (where it stays in the notebook and the kernel's history)."""
    try:
        if token:
            return service.login(token=getpass.getpass("Token: "))
        username = username or input("Username: ")
        return service.login(username=username, password=getpass.getpass("Password: "))
    except StdinNotImplementedError:
        # nbconvert --execute, papermill: no prompt can be shown (it was a traceback).
        raise NotLoggedIn(
            f"{asker} cannot ask for the {'token' if token else 'password'} for "
            f"{service.uri} here: this frontend runs the notebook without input prompts "
            "(nbconvert, papermill). Log in once beforehand (the Mantik panel, `mantik "
            "login` in a terminal, or %mantik_login in JupyterLab); the login is stored and "
            "used here. Or set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_TOKEN) in the kernel's environment."
        ) from None


def _last_input(shell: Any) -> str:
    try:
        return shell.history_manager.input_hist_raw[-1]
    except (AttributeError, IndexError):
        return ""


def _print_warnings(caught: list[warnings.WarningMessage], skip: list[str] | None = None) -> None:
    for w in caught:
        if not (w.category.__module__ or "").startswith("mantik_jupyter"):
            # Not ours (a library's deprecation): shown the way Python shows it.
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            continue
        text = " ".join(str(w.message).split())
        if skip and any(" ".join(s.split()) == text for s in skip):
            continue
        print(f"mantik warning: {text}", flush=True)


def _show_mantik_error(
    shell: Any, etype: type[BaseException], value: BaseException, tb: Any, tb_offset: Any = None
) -> list[str]:
    """A mantik error raised in a cell (``run.download("../x")``, ``RunTable(...)``):
    its message, not forty lines of traceback through the core. The cell still fails,
    so "Run All" and nbconvert stop there."""
    magics = shell.magics_manager.registry.get("MantikMagics")
    if magics is not None and magics.show_tracebacks:
        stb = shell.InteractiveTB.structured_traceback(etype, value, tb, tb_offset=tb_offset)
    else:
        message = " ".join(getattr(value, "message", str(value)).split())
        stb = [
            f"{etype.__name__}: {message}",
            "(%config MantikMagics.show_tracebacks = True shows where it was raised)",
        ]
    shell._showtraceback(etype, value, stb)
    return stb


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(MantikMagics)
    ipython.register_magics(DashboardMagics)
    if not getattr(ipython, "custom_exceptions", ()):  # never replace the user's handler
        ipython.set_custom_exc((MantikError,), _show_mantik_error)
