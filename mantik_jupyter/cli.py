"""The ``mantik`` command: log in to tracking, submit and follow runs from a terminal.

A thin face over the same core the lab uses: ``TrackingService`` for the
credential and ``RunService`` for runs, so a run submitted here shows up in the
lab's sidebar and in MLflow, and the other way round. Domain errors become
``error: <message>`` on stderr and the exit code ``errors.py`` assigns to them.
"""

from __future__ import annotations

import argparse
import getpass
import io
import json
import logging
import os
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from . import __version__, json_out
from .cli_format import (
    SHORT_ID,
    STATE_MESSAGE_TAG,
    ProgressBar,
    files_table,
    run_details,
    runs_table,
)
from .errors import (
    BackendUnavailable,
    InvalidRequest,
    MantikError,
    TrackingUnavailable,
    exit_code_table,
)

if TYPE_CHECKING:
    from .compute.run_record import RunInfo
    from .compute.runs import RunService
    from .tracking.service import TrackingService

EXIT_OK = 0
EXIT_RUN_UNSUCCESSFUL = 7
EXIT_INTERRUPTED = 130
RUN_HELP = (
    "the run: its MLflow run id, a unique prefix of it, its run name, or 'last' (the newest "
    "run you submitted)"
)


class Context:
    """What every command needs: its arguments, the core services, and the output mode."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json: bool = getattr(args, "json", False)
        # The core's warnings (a deprecated config key, ...) as said so far, one line each.
        self.warned: set[str] = set()
        # The command shows why a run's state is UNKNOWN itself (list, status, info): the
        # sync's log line saying so on the way would repeat it.
        self.shows_unknown = False
        self.python_showwarning = warnings.showwarning

    def show_warning(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        """``warnings.showwarning`` while a command runs: the core's warnings as
        ``warning: <text>``. Python's own format printed the mantik source file and line
        that raised it ('.../run_submit.py:129: MantikDeprecationWarning: ...' and the code
        line under it)."""
        if not category.__module__.startswith("mantik_jupyter"):
            self.python_showwarning(message, category, filename, lineno, file, line)
            return
        self.warn(str(message))

    def warn(self, text: str) -> None:
        text = " ".join(text.split())
        if text not in self.warned:  # the run's notes repeat what was warned on the way
            self.warned.add(text)
            print(f"warning: {text}", file=sys.stderr, flush=True)

    @cached_property
    def tracking(self) -> TrackingService:
        from .api import tracking_service

        return tracking_service(getattr(self.args, "tracking_uri", None))

    @cached_property
    def runs(self) -> RunService:
        from .api import run_service

        return run_service(
            getattr(self.args, "tracking_uri", None),
            job_tracking_uri=getattr(self.args, "job_tracking_uri", None) or None,
        )

    def run_json(self, run: RunInfo) -> dict[str, Any]:
        """A run as the command shows it, with ``mlflow_url``: the link to its page in the
        MLflow UI, the tracking server's own (no lab around a command)."""
        from .tracking.service import run_page_url

        url = run_page_url(run.experiment_id, run.run_id, self.runs.tracking.uri)
        return {**run.to_json(), "mlflow_url": url}

    def emit(self, data: Any, human: str | Callable[[], str]) -> None:
        """JSON for scripts (``--json``), text for people; both on stdout."""
        # Flushed: the process may still wait a while after answering (a local job started
        # by an older version, without a supervisor that stops it, has its grace run out in
        # a thread of this process), and a pipe must have the answer at once.
        if self.json:
            print(json_out.dumps(data, indent=2), flush=True)
        else:
            print(human() if callable(human) else human, flush=True)


class _LogAsWarnings(logging.Handler):
    """Log records while a command runs (no handler is set up otherwise, and Python then
    prints them bare): the core's warnings as ``warning: <text>``; a library's own account
    of a failure (paramiko logs a login node that resets the connection as a traceback) is
    left out, as mantik reports the failure itself, as an error that says what to do."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(logging.WARNING)
        self.ctx = ctx

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] != __package__:
            return
        if self.ctx.shows_unknown and str(record.msg).startswith("run %s: state unknown"):
            return
        self.ctx.warn(record.getMessage())


# ---- auth ------------------------------------------------------------------------------


def cmd_login(ctx: Context) -> int:
    args = ctx.args
    tracking = ctx.tracking
    if args.token_stdin:
        token = sys.stdin.readline().strip()
        if not token:
            raise InvalidRequest("--token-stdin: no token on standard input.")
        status = tracking.login(token=token)
    else:
        username = args.username or os.environ.get("MLFLOW_TRACKING_USERNAME")
        if not username:
            if not sys.stdin.isatty():
                raise InvalidRequest("Give --username (standard input is not a terminal).")
            username = input(f"Username for {tracking.uri}: ").strip()
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            no_terminal = InvalidRequest(
                f"No password for {username} at {tracking.uri}: there is no terminal to "
                "ask on. Pipe it in with --password-stdin, or set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead of logging in."
            )
            if not _has_terminal():
                # A script, cron, a CI job: getpass would fall back to reading stdin and
                # print Python's GetPassWarning (with its source line) and 'Password input
                # may be echoed' above the prompt, before this same error.
                raise no_terminal
            # getpass never echoes; the password is never an argument (shell history, ps).
            try:
                password = getpass.getpass(f"Password for {username} at {tracking.uri}: ")
            except EOFError:
                raise no_terminal from None
        if not password:
            raise InvalidRequest("No password given.")
        status = tracking.login(username=username, password=password)
    ctx.emit(status, f"Logged in to {status['tracking_uri']} as {status['username']}.")
    return EXIT_OK


def _has_terminal() -> bool:
    """Whether getpass has a terminal to ask on: stdin, else the process's ``/dev/tty``
    (``cat list | mantik login`` still asks there)."""
    if sys.stdin is not None and sys.stdin.isatty():
        return True
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def cmd_logout(ctx: Context) -> int:
    from .tracking.service import logout_message

    status = ctx.tracking.logout()
    ctx.emit(status, logout_message(status))
    return EXIT_OK


def cmd_status(ctx: Context) -> int:
    status = ctx.tracking.status()

    def human() -> str:
        from .tracking.service import SOURCES

        who = f"logged in as {status['username']}" if status["logged_in"] else "not logged in"
        if status.get("credential_source") not in (None, "login"):
            who += f" ({SOURCES[status['credential_source']]})"
        kind = "embedded" if status["embedded"] else "remote"
        text = f"Tracking server: {status['tracking_uri']} ({kind})\nUser: {who}"
        return text + (f"\n{status['message']}" if status.get("message") else "")

    ctx.emit(status, human)
    return EXIT_OK


# ---- runs ------------------------------------------------------------------------------


def cmd_submit(ctx: Context) -> int:
    from .compute.project import parse_param_args

    args = ctx.args
    project = Path(args.path).resolve()
    params = parse_param_args(args.param or [])
    experiment_id = args.experiment_id
    experiment_name = args.experiment_name
    if experiment_id is None and experiment_name is None:
        # MLflow's own variables, so a shell set up for `mlflow run` works here too.
        experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID") or None
        experiment_name = None if experiment_id else os.environ.get("MLFLOW_EXPERIMENT_NAME")
    bar = ProgressBar()
    try:
        run = ctx.runs.submit(
            project,
            # Relative to the project folder, else to the current one: as Mantik reads it.
            backend_config=args.backend_config or None,
            entry_point=args.entry_point,
            params=params,
            experiment_name=experiment_name,
            experiment_id=experiment_id,
            run_name=args.run_name,
            source="cli",
            progress=bar,
        )
    finally:
        bar.close()
    for warning in run.warnings:
        ctx.warn(warning)
    if not args.wait:
        data = ctx.run_json(run)
        ctx.emit(
            data,
            f"Submitted run {run.run_id} ({run.run_name}) to {run.backend}, "
            f"job {run.job_id}: {run.state}\nMLflow: {data['mlflow_url']}",
        )
        return EXIT_OK
    if not ctx.json:
        print(f"Submitted run {run.run_id} ({run.run_name}); following its log.", file=sys.stderr)
        _follow(ctx, run.run_id, 0)
    with _following(run.run_id):
        final = _wait(ctx, run.run_id)
    data = ctx.run_json(final)
    ctx.emit(data, lambda: run_details(data, full=False))
    return EXIT_OK if final.state == "FINISHED" else EXIT_RUN_UNSUCCESSFUL


def _wait(ctx: Context, run_id: str) -> Any:
    import time

    from .compute.run_pace import FIRST_STATE_ASK, StatePace, asks_a_cluster

    run = ctx.runs.get(run_id)
    pace = StatePace(FIRST_STATE_ASK, run.state, backs_off=asks_a_cluster(run))
    wait = pace.every
    while not run.state.is_final:
        time.sleep(wait)
        run = ctx.runs.get(run_id)
        wait = pace.after(run.state)
    return run


def _follow(ctx: Context, ref: str, offset: int) -> None:
    with _following(ref):
        for text in ctx.runs.follow_logs(ref, offset=offset):
            sys.stdout.write(text)
            # Flushed per chunk: the user is watching, and a pipe must see lines as they come.
            sys.stdout.flush()


@contextmanager
def _following(ref: str) -> Iterator[None]:
    """A lost contact ends following a run (``--follow``, ``submit --wait``), not the
    run: the error says so and how to go on, else it reads as if the run had failed.
    So does Ctrl-C, which many expect to stop the run, as it stops ``srun``."""
    again = f"`mantik runs logs {shlex.quote(ref)} --follow` follows it again"
    try:
        yield
    except (TrackingUnavailable, BackendUnavailable) as err:
        err.message += f" Following stopped; the run itself is not affected: {again}."
        raise
    except BaseException as exc:
        stop = _interrupt_in(exc)
        if stop is not None:
            stop.add_note(
                f"Stopped following run {ref}; the run keeps running: {again}, "
                f"`mantik runs cancel {shlex.quote(ref)}` stops it."
            )
        raise


def cmd_list(ctx: Context) -> int:
    args = ctx.args
    ctx.shows_unknown = True
    if args.state:
        # The filter reads the states recorded on the runs, which no lab may be keeping
        # fresh: a run that had ended since was listed under `--state RUNNING` (shown as
        # FINISHED) and missing under `--state FINISHED`. The user's active runs are
        # brought up to date before the search too.
        ctx.runs.sync()
    runs, token = ctx.runs.list(
        experiment_ids=[args.experiment_id] if args.experiment_id else None,
        experiment_name=args.experiment_name,
        state=args.state,
        max_results=args.limit,
        page_token=args.page_token,
        # No lab may be running to keep states fresh: ask the backends now. This also
        # gives a run this installation does not follow its warning.
        refresh=True,
    )
    data = [ctx.run_json(r) for r in runs]
    ctx.emit(
        {"runs": data, "next_page_token": token},
        lambda: runs_table(data, columns=_terminal_columns()),
    )
    _warn_of_runs(ctx, data, unknown=True)
    if token and not ctx.json:
        print(f"(more runs: --page-token {token})", file=sys.stderr)
    return EXIT_OK


def _warn_of_runs(ctx: Context, runs: Sequence[dict[str, Any]], unknown: bool = False) -> None:
    """The runs' warnings on stderr, once per text: they were in --json only, so a run
    another installation submitted showed its last recorded state (QUEUED for hours)
    as if it were current. ``unknown``: why a run's state is UNKNOWN too (a table has
    no room for it)."""
    ids: dict[str, list[str]] = {}
    for run in runs:
        texts = list(run.get("warnings") or ())
        why = (run.get("tags") or {}).get(STATE_MESSAGE_TAG)
        if unknown and why:
            texts.append(f"state unknown: {why}")
        for text in texts:
            ids.setdefault(text, []).append(str(run["run_id"])[:SHORT_ID])
    for text, named in ids.items():
        ctx.warn(f"run{'s' if len(named) > 1 else ''} {', '.join(named)}: {text}")


def _terminal_columns() -> int | None:
    """The width to fit a table to: ``$COLUMNS`` when set, else the terminal's; None for
    a file or a pipe (a script reads the names whole)."""
    given = os.environ.get("COLUMNS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else None
    except (OSError, ValueError):
        return None


def cmd_status_run(ctx: Context) -> int:
    ctx.shows_unknown = True
    run = ctx.run_json(ctx.runs.get(ctx.args.run))
    ctx.emit(run, lambda: run_details(run, full=False))
    _warn_of_runs(ctx, [run])
    return EXIT_OK


def cmd_info(ctx: Context) -> int:
    ctx.shows_unknown = True
    run = ctx.run_json(ctx.runs.get(ctx.args.run))
    ctx.emit(run, lambda: run_details(run, full=True))
    _warn_of_runs(ctx, [run])
    return EXIT_OK


def cmd_logs(ctx: Context) -> int:
    args = ctx.args
    if args.follow:
        if ctx.json:
            # One JSON object per line, so a script can read the log as it grows.
            with _following(args.run):
                for text in ctx.runs.follow_logs(args.run, offset=args.offset):
                    print(json.dumps({"text": text}), flush=True)
        else:
            run = ctx.runs.get(args.run)
            if run.state in ("SUBMITTING", "QUEUED"):
                # A job waits hours in a cluster's queue, and the terminal stayed silent
                # meanwhile, as if the command hung.
                why = f"\n  {run.reason}" if run.reason else ""
                print(
                    f"Run {run.run_id} ({run.run_name}) is {run.state}: its log follows "
                    f"once the job starts.{why}",
                    file=sys.stderr,
                    flush=True,
                )
            _follow(ctx, run.run_id, args.offset)
        return EXIT_OK
    chunk = ctx.runs.all_logs(args.run, offset=args.offset)
    if ctx.json:
        ctx.emit({"text": chunk.text, "offset": chunk.offset, "final": chunk.final}, "")
    else:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    return EXIT_OK


def cmd_cancel(ctx: Context) -> int:
    run = ctx.runs.cancel(ctx.args.run)
    ctx.emit(ctx.run_json(run), f"Cancelled run {run.run_id} ({run.run_name}): {run.state}")
    return EXIT_OK


def cmd_files(ctx: Context) -> int:
    args = ctx.args
    entries = ctx.runs.files(args.run, args.path)
    data = [{"path": e.path, "size": e.size, "is_dir": e.is_dir} for e in entries]
    ctx.emit({"files": data}, lambda: files_table(data))
    return EXIT_OK


def cmd_download(ctx: Context) -> int:
    from .compute.run_download import DownloadClash

    args = ctx.args
    bar = ProgressBar(label="download")
    try:
        done = ctx.runs.download(
            args.run,
            args.remote_path or "",
            dest=Path(args.local_path) if args.local_path else None,
            progress=bar.bytes,
            overwrite=args.overwrite,
        )
    except DownloadClash as clash:
        raise clash.with_flag("--overwrite") from None
    finally:
        bar.close()
    data = {
        "path": str(done.path),
        "written": done.written,
        "identical": done.identical,
        "replaced": done.replaced,
    }
    ctx.emit(data, done.summary())
    return EXIT_OK


# ---- parser ----------------------------------------------------------------------------


def _epilog() -> str:
    extra = {1: "unexpected error", 2: "wrong command-line usage"}
    lines = ["exit codes:", f"  {EXIT_OK:>3}  success"]
    for code, reasons in exit_code_table():
        note = f"; {extra[code]}" if code in extra else ""
        lines.append(f"  {code:>3}  {reasons}{note}")
    lines += [
        f"  {EXIT_RUN_UNSUCCESSFUL:>3}  runs submit --wait: the run ended FAILED or KILLED",
        f"  {EXIT_INTERRUPTED:>3}  interrupted (Ctrl-C); a submitted run keeps running",
        "  143  stopped by SIGTERM (129: SIGHUP); likewise",
        "",
        "Runs are named by their MLflow run id, a unique prefix of it, or the run name.",
        "Tracking: --tracking-uri, else $MLFLOW_TRACKING_URI, else the embedded server of",
        "a running JupyterLab. Credentials: `mantik login`, else $MLFLOW_TRACKING_USERNAME",
        "and $MLFLOW_TRACKING_PASSWORD, or $MLFLOW_TRACKING_TOKEN.",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS keeps a subcommand from resetting an option given before it
    # (`mantik --json runs list` and `mantik runs list --json` both work).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help='output JSON for scripts; an error too, on stderr: {"error": {"message", "reason"}}',
    )
    common.add_argument(
        "--tracking-uri",
        default=argparse.SUPPRESS,
        metavar="URI",
        help="tracking server (default: $MLFLOW_TRACKING_URI or the lab's embedded one)",
    )
    parser = argparse.ArgumentParser(
        prog="mantik",
        description="Submit MLprojects to HPC clusters and follow them, tracked in MLflow.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"mantik-jupyter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        group: Any, name: str, func: Callable[[Context], int], help: str
    ) -> argparse.ArgumentParser:
        p = group.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=func)
        return p

    p = command(sub, "login", cmd_login, "log in to the tracking server (verified, then stored)")
    p.add_argument("--username", help="default: $MLFLOW_TRACKING_USERNAME, else asked")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--token-stdin", action="store_true", help="read a token from stdin")
    how.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin (scripts)"
    )
    command(sub, "logout", cmd_logout, "forget the stored credential for the tracking server")
    command(sub, "status", cmd_status, "show the tracking server and who is logged in")

    runs = sub.add_parser("runs", help="submit and manage runs", parents=[common])
    rsub = runs.add_subparsers(dest="runs_command", metavar="COMMAND", required=True)

    p = command(rsub, "submit", cmd_submit, "submit an MLproject folder as a run")
    p.add_argument("path", metavar="PATH", help="the MLproject folder")
    p.add_argument(
        "--backend-config",
        metavar="FILE",
        help="compute backend config (.yaml/.yml/.json), relative to PATH or the current folder",
    )
    p.add_argument("--entry-point", "-e", default="main", help="entry point (default: main)")
    p.add_argument(
        "-P",
        "--parameter",
        dest="param",
        action="append",
        metavar="KEY=VALUE",
        help="an entry-point parameter; repeat for more",
    )
    exp = p.add_mutually_exclusive_group()
    exp.add_argument("--experiment-name", help="default: $MLFLOW_EXPERIMENT_NAME")
    exp.add_argument("--experiment-id", help="default: $MLFLOW_EXPERIMENT_ID")
    p.add_argument("--run-name", help="MLflow run name (default: generated)")
    p.add_argument(
        "--job-tracking-uri",
        default=os.environ.get("MANTIK_JOB_TRACKING_URI"),
        metavar="URI",
        help="tracking address the compute nodes use, if not the one given here "
        "(default: $MANTIK_JOB_TRACKING_URI)",
    )
    p.add_argument("--wait", action="store_true", help="follow the log until the run ends")

    p = command(rsub, "list", cmd_list, "list runs (newest first)")
    exp = p.add_mutually_exclusive_group()
    exp.add_argument("--experiment-name")
    exp.add_argument("--experiment-id")
    p.add_argument(
        "--state",
        help="SUBMITTING, QUEUED, RUNNING, FINISHED, FAILED, KILLED or UNKNOWN; "
        "active or final for a group of them",
    )
    p.add_argument("--limit", type=positive_int, default=50, help="at most N runs (default 50)")
    p.add_argument("--page-token", help="continue a listing (printed when there are more)")

    for name, func, text in (
        ("status", cmd_status_run, "state of a run"),
        ("info", cmd_info, "details of a run: params, metrics, tags, reason"),
        ("cancel", cmd_cancel, "cancel a run"),
    ):
        command(rsub, name, func, text).add_argument("run", metavar="ID", help=RUN_HELP)

    p = command(rsub, "logs", cmd_logs, "print a run's log")
    p.add_argument("run", metavar="ID", help=RUN_HELP)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the run ends")
    p.add_argument("--offset", type=_non_negative_int, default=0, help="start at this byte")

    # What to give --remote-path: the errors of a download ask the user to look.
    p = command(rsub, "files", cmd_files, "list a folder of a run's directory")
    p.add_argument("run", metavar="ID", help=RUN_HELP)
    p.add_argument("path", nargs="?", default="", help="folder in the run (default: its top)")

    p = command(rsub, "download", cmd_download, "download a run's files")
    p.add_argument("run", metavar="ID", help=RUN_HELP)
    p.add_argument("--remote-path", default="", help="file or folder in the run (default: all)")
    p.add_argument(
        "--local-path",
        help="where to put it, as cp does: into a folder that exists, else under this name "
        "(default: the current folder; a whole run goes into a folder named by its id)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace local files that differ from the run's (default: refuse, naming "
        "them; files already there and identical are left as they are)",
    )
    return parser


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count of runs). The magics
    use it too."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not 1 or more")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not 0 or more")
    return value


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised while handling, a Ctrl-C. A transfer cut by
    Ctrl-C can fail again while it is cleaned up (an SFTP channel left mid-packet says
    'Garbage packet received'); that failure is the interrupt, not an error to report.
    The magics use it too."""
    return _interrupt_in(exc) is not None


def _interrupt_in(exc: BaseException) -> KeyboardInterrupt | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a CI job's time limit, ``timeout``, a closed terminal), raised
    like Ctrl-C so that what was begun is cleaned up: a submission killed outright left
    its run SUBMITTING for ever."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signum)


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = Context(args)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, _raise_stopped)
    try:
        return _run(ctx)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(ctx: Context) -> int:
    warnings.showwarning = ctx.show_warning
    log_handler = _LogAsWarnings(ctx)
    logging.getLogger().addHandler(log_handler)
    try:
        return int(ctx.args.func(ctx))
    except (KeyboardInterrupt, Exception) as err:
        stop = _interrupt_in(err)
        if stop is not None:
            # Only this command stops: a submitted run keeps running on its backend.
            print("", file=sys.stderr)
            for note in getattr(stop, "__notes__", ()):
                print(note, file=sys.stderr)
            return 128 + stop.signum if isinstance(stop, Stopped) else EXIT_INTERRUPTED
        if isinstance(err, MantikError):
            if ctx.json:
                # Its reason too: one exit code stands for several (4: no such run, a
                # prefix of several, a run that already ended), a script may tell them apart.
                print(json_out.dumps({"error": err.to_json()}), file=sys.stderr)
            else:
                print(f"error: {err.message}", file=sys.stderr)
            return err.exit_code
        if isinstance(err, BrokenPipeError):
            # `mantik runs logs X | head`: the reader left; not an error.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_OK
        raise
    finally:
        warnings.showwarning = ctx.python_showwarning
        logging.getLogger().removeHandler(log_handler)


def main(argv: Sequence[str] | None = None) -> None:
    for stream in (sys.stdout, sys.stderr):
        # An output whose encoding cannot spell a run's name or log (PYTHONIOENCODING=ascii,
        # a Latin-1 locale on a login node) ended the command in a UnicodeEncodeError
        # traceback; such characters are written as escapes instead.
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
