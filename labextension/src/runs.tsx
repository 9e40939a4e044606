/**
 * The runs part of the sidebar: a filterable list that updates live, and the
 * details of the selected run (params, metrics, a following log, files, cancel).
 */
import { Button, refreshIcon } from '@jupyterlab/ui-components';
import React, {
  useCallback,
  useEffect,
  useId,
  useMemo,
  useRef,
  useState,
  useSyncExternalStore
} from 'react';

import { IFileEntry, IRun, MantikApi } from './api';
import {
  backendsOf,
  displayName,
  EMPTY_FILTER,
  emptyRunsText,
  experimentLabel,
  filterRuns,
  formatAge,
  formatBytes,
  IRunFilter,
  isActive,
  LogBuffer,
  MAX_RUNS,
  Poller,
  revealOffset,
  rowTimes,
  runDuration,
  RunsModel,
  MANTIK_FILES,
  splitRunFiles,
  STATE_OPTIONS,
  stateKind,
  terminalText
} from './state';

/** User-facing text of an error of any kind. */
export function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

export interface IRunsSectionProps {
  api: MantikApi;
  model: RunsModel;
  visible: boolean;
  onOpenMlflow: (run?: IRun) => void;
  onSubmit: () => void;
  /** Ask the user to confirm; resolves true to cancel. */
  confirmCancel: (run: IRun) => Promise<boolean>;
}

export function StateChip(props: { state: string }): JSX.Element {
  return (
    <span
      className={`mantik-chip mantik-chip-${stateKind(props.state)} mantik-run-state`}
      data-state={props.state}
    >
      {props.state}
    </span>
  );
}

/** Pixels of a run's details (header, facts, actions) brought into sight on selection. */
const DETAILS_REVEAL_PX = 220;

/** Seconds a request must be out before the panel says it is still waiting. */
const SLOW_SEARCH_SECONDS = 3;

/**
 * Whole seconds since `busy` became true, once that is at least SLOW_SEARCH_SECONDS;
 * null before and while not busy. A hung tracking server answers a search only after
 * the lab's 60 s timeout, and a submission of a large folder takes minutes: without a
 * word the panel looks idle or stuck all that time.
 */
export function useWaitingSeconds(busy: boolean): number | null {
  const [seconds, setSeconds] = useState<number | null>(null);
  useEffect(() => {
    setSeconds(null);
    if (!busy) {
      return;
    }
    const since = Date.now();
    const timer = window.setInterval(() => {
      const elapsed = Math.floor((Date.now() - since) / 1000);
      setSeconds(elapsed >= SLOW_SEARCH_SECONDS ? elapsed : null);
    }, 1000);
    return () => window.clearInterval(timer);
  }, [busy]);
  return seconds;
}

/** Re-render every `ms` so ages stay current. */
function useNow(ms: number, enabled: boolean): number {
  const [now, setNow] = useState(() => Date.now());
  useEffect(() => {
    if (!enabled) {
      return;
    }
    setNow(Date.now());
    const timer = window.setInterval(() => setNow(Date.now()), ms);
    return () => window.clearInterval(timer);
  }, [ms, enabled]);
  return now;
}

export function RunsSection(props: IRunsSectionProps): JSX.Element {
  const { api, model, visible, onOpenMlflow, onSubmit, confirmCancel } = props;
  const snapshot = useSyncExternalStore(
    useCallback(listener => model.subscribe(listener), [model]),
    () => model.snapshot
  );
  const [filter, setFilter] = useState<IRunFilter>(EMPTY_FILTER);
  const [selectedId, setSelectedId] = useState<string | null>(null);
  const now = useNow(10_000, visible);
  const waiting = useWaitingSeconds(snapshot.busy);
  const id = useId();
  const listRef = useRef<HTMLUListElement>(null);

  const runs = filterRuns(snapshot.runs, filter);
  // Nothing could be read (not logged in, server down): the error says why the list is
  // empty, and "No runs yet" would be wrong.
  const unread = snapshot.error !== null && snapshot.runs.length === 0;
  const backends = backendsOf(snapshot.runs);
  const selected = snapshot.runs.find(r => r.run_id === selectedId) ?? null;
  const experimentName = (experimentId: string) =>
    experimentLabel(snapshot.experiments, experimentId);
  // The chosen experiment stays an option while its name is not known (not read yet,
  // or deleted since: the server then says so).
  const experimentOptions = snapshot.experiments.some(
    e => e.experiment_id === snapshot.experiment
  )
    ? snapshot.experiments
    : snapshot.experiment
      ? [
          ...snapshot.experiments,
          { experiment_id: snapshot.experiment, name: experimentName(snapshot.experiment) }
        ]
      : snapshot.experiments;

  // The row to focus once it is rendered and shown: after an action removed the control
  // that had the focus (the submit dialog, a run's Cancel button) the focus would fall to
  // the page, and a keyboard user would start over from the lab's menu bar.
  const pendingFocus = useRef<string | null>(null);
  const focusRow = (runId: string) => {
    pendingFocus.current = runId;
    setFocusedId(runId);
  };
  useEffect(() => {
    const runId = pendingFocus.current;
    if (runId === null) {
      return;
    }
    if (!runs.some(r => r.run_id === runId)) {
      // Filtered out (a cancelled run under "Active"): not focused later by surprise.
      pendingFocus.current = null;
      return;
    }
    // A frame later: the lab shows the panel (activateById) after the submission is
    // added, and a hidden element cannot take the focus.
    const frame = window.requestAnimationFrame(() => {
      const row = listRef.current?.querySelector<HTMLButtonElement>(
        `.mantik-run-row[data-run-id="${CSS.escape(runId)}"]`
      );
      if (row && row.offsetParent !== null && pendingFocus.current === runId) {
        pendingFocus.current = null;
        row.focus();
      }
    });
    return () => window.cancelAnimationFrame(frame);
  });

  // A run's details open below the list, at a laptop's height below the panel's fold:
  // a click on a row seemed to do nothing. Scroll them into sight (their header, facts
  // and actions), no further than needed, so the list stays in view where it can.
  const detailsRef = useRef<HTMLElement>(null);
  useEffect(() => {
    if (selectedId === null) {
      return;
    }
    const frame = window.requestAnimationFrame(() => {
      const details = detailsRef.current;
      const scroller = details?.closest<HTMLElement>('.mantik-Panel');
      if (!details || !scroller) {
        return;
      }
      const offset = revealOffset(
        scroller.getBoundingClientRect(),
        details.getBoundingClientRect(),
        DETAILS_REVEAL_PX
      );
      if (offset > 0) {
        scroller.scrollBy({ top: offset });
      }
    });
    return () => window.cancelAnimationFrame(frame);
  }, [selectedId]);

  // A new submission becomes the selection, and its row takes the focus.
  const selectSeq = snapshot.select?.seq;
  useEffect(() => {
    if (snapshot.select) {
      setSelectedId(snapshot.select.runId);
      setFilter(EMPTY_FILTER);
      focusRow(snapshot.select.runId);
    }
  }, [selectSeq]);

  // One Tab stop for the whole list (the row focused last, else the selected or the
  // first): with hundreds of runs, Tab would otherwise walk every row to reach the
  // details. The arrows, Home and End move between rows.
  const [focusedId, setFocusedId] = useState<string | null>(null);
  const inList = (runId: string | null) => runs.some(r => r.run_id === runId);
  const tabStop = inList(focusedId)
    ? focusedId
    : inList(selectedId)
      ? selectedId
      : (runs[0]?.run_id ?? null);

  // Closing the details removes the button that had the focus: give it to the run's row.
  const closeDetails = (runId: string) => {
    setSelectedId(null);
    focusRow(runId);
  };

  const onListKeyDown = (event: React.KeyboardEvent<HTMLUListElement>) => {
    const moves: Record<string, (index: number, last: number) => number> = {
      ArrowDown: (i, last) => Math.min(last, i + 1),
      ArrowUp: i => Math.max(0, i - 1),
      Home: () => 0,
      End: (_, last) => last
    };
    const move = moves[event.key];
    if (!move) {
      return;
    }
    const buttons = Array.from(
      listRef.current?.querySelectorAll<HTMLButtonElement>('.mantik-run-row') ?? []
    );
    const index = buttons.findIndex(b => b === document.activeElement);
    buttons[move(index, buttons.length - 1)]?.focus();
    event.preventDefault();
  };

  return (
    <>
      <section
        className="mantik-Section mantik-runs"
        data-testid="mantik-runs"
        aria-labelledby={`${id}-runs-heading`}
        aria-busy={snapshot.busy}
      >
        <div className="mantik-Section-header">
          <h3 id={`${id}-runs-heading`} className="mantik-Section-title">
            Runs
          </h3>
          <Button
            small
            className="jp-mod-styled jp-mod-accept mantik-submit-open"
            data-testid="mantik-submit-open"
            title="Submit the project of the file in focus to a compute backend"
            onClick={onSubmit}
          >
            Submit…
          </Button>
          <Button
            minimal
            small
            className="mantik-runs-refresh"
            title="Refresh runs"
            aria-label="Refresh runs"
            onClick={() => void model.refresh()}
          >
            <refreshIcon.react tag="span" />
          </Button>
        </div>
        <div className="mantik-filters" role="group" aria-label="Filter runs">
          <select
            className="jp-mod-styled mantik-filter-experiment"
            aria-label="Filter runs by experiment"
            value={snapshot.experiment}
            onChange={e => void model.setExperiment(e.target.value)}
          >
            <option value="">All experiments</option>
            {experimentOptions.map(e => (
              <option key={e.experiment_id} value={e.experiment_id}>
                {e.name}
              </option>
            ))}
          </select>
          <input
            type="search"
            className="jp-mod-styled mantik-filter-text"
            placeholder="Filter by name or id"
            aria-label="Filter runs by name or id"
            value={filter.text}
            onChange={e => setFilter({ ...filter, text: e.target.value })}
          />
          <select
            className="jp-mod-styled mantik-filter-state"
            aria-label="Filter runs by state"
            value={filter.state}
            onChange={e => setFilter({ ...filter, state: e.target.value })}
          >
            {STATE_OPTIONS.map(([value, label]) => (
              <option key={value} value={value}>
                {label}
              </option>
            ))}
          </select>
          <select
            className="jp-mod-styled mantik-filter-backend"
            aria-label="Filter runs by backend"
            value={filter.backend}
            onChange={e => setFilter({ ...filter, backend: e.target.value })}
          >
            <option value="">All backends</option>
            {backends.map(b => (
              <option key={b} value={b}>
                {b}
              </option>
            ))}
          </select>
        </div>
        <p className="mantik-muted mantik-runs-waiting" role="status">
          {waiting !== null
            ? `Waiting for the tracking server: no answer for ${waiting} s. The list below ` +
              'may be out of date.'
            : ''}
        </p>
        {snapshot.error !== null ? (
          <p className="mantik-error mantik-runs-error" role="alert">
            {snapshot.error}
          </p>
        ) : null}
        {!snapshot.loaded ? (
          <p className="mantik-muted">Loading runs…</p>
        ) : unread ? null : runs.length === 0 ? (
          <p className="mantik-muted mantik-runs-empty">
            {emptyRunsText({
              filter,
              experiment: snapshot.experiment ? experimentName(snapshot.experiment) : null,
              loaded: snapshot.runs.length,
              more: snapshot.more
            })}
          </p>
        ) : (
          <ul
            className="mantik-RunList"
            data-testid="mantik-run-list"
            aria-label="Runs, newest first"
            ref={listRef}
            onKeyDown={onListKeyDown}
          >
            {runs.map(run => (
              <li key={run.run_id}>
                <button
                  type="button"
                  className={`mantik-run-row${
                    run.run_id === selectedId ? ' mantik-mod-selected' : ''
                  }`}
                  data-run-id={run.run_id}
                  tabIndex={run.run_id === tabStop ? 0 : -1}
                  onFocus={() => setFocusedId(run.run_id)}
                  aria-pressed={run.run_id === selectedId}
                  aria-label={`${displayName(run)}, ${run.state}, ${experimentName(
                    run.experiment_id
                  )}, ${run.backend ?? 'unknown backend'}, ${rowTimes(run, now)}${
                    run.not_followed !== null ? ', not followed here' : ''
                  }`}
                  onClick={() =>
                    setSelectedId(run.run_id === selectedId ? null : run.run_id)
                  }
                >
                  <span
                    className="mantik-run-name"
                    title={run.run_name ? `${run.run_name}\n${run.run_id}` : run.run_id}
                  >
                    {displayName(run)}
                  </span>
                  <StateChip state={run.state} />
                  <span className="mantik-run-where">
                    <span
                      className="mantik-run-experiment"
                      title={`Experiment: ${experimentName(run.experiment_id)}`}
                    >
                      {experimentName(run.experiment_id)}
                    </span>
                    {' · '}
                    <span className="mantik-run-backend">{run.backend ?? '—'}</span>
                  </span>
                  <span className="mantik-run-age" title={rowTimes(run, now)}>
                    {formatAge(run.start_time, now)}
                  </span>
                </button>
              </li>
            ))}
          </ul>
        )}
        {snapshot.loaded && snapshot.more && snapshot.runs.length > 0 ? (
          <p className="mantik-muted mantik-runs-more" data-testid="mantik-runs-more">
            The {snapshot.runs.length} newest runs are shown.{' '}
            {snapshot.limit < MAX_RUNS ? (
              <button
                type="button"
                className="mantik-linkbutton"
                onClick={() => void model.showMore()}
              >
                Load older runs
              </button>
            ) : (
              'Older runs are in MLflow.'
            )}
          </p>
        ) : null}
      </section>
      {selected !== null ? (
        <RunDetails
          key={selected.run_id}
          sectionRef={detailsRef}
          api={api}
          run={selected}
          experiment={experimentName(selected.experiment_id)}
          visible={visible}
          now={now}
          onClose={() => closeDetails(selected.run_id)}
          onOpenMlflow={() => onOpenMlflow(selected)}
          onCancelled={run => {
            model.upsert(run);
            // The Cancel button is gone with the active state; the row says the new one.
            focusRow(run.run_id);
          }}
          confirmCancel={confirmCancel}
        />
      ) : null}
    </>
  );
}

interface IRunDetailsProps {
  api: MantikApi;
  run: IRun;
  /** The name of the run's experiment. */
  experiment: string;
  visible: boolean;
  now: number;
  onClose: () => void;
  onOpenMlflow: () => void;
  onCancelled: (run: IRun) => void;
  confirmCancel: (run: IRun) => Promise<boolean>;
  sectionRef?: React.Ref<HTMLElement>;
}

function RunDetails(props: IRunDetailsProps): JSX.Element {
  const { api, run, experiment, visible, now, onClose, onOpenMlflow, onCancelled } = props;
  const { confirmCancel } = props;
  const id = useId();
  const [cancelling, setCancelling] = useState(false);
  const [actionError, setActionError] = useState<string | null>(null);
  const active = isActive(run);
  // Submitted elsewhere: the server answers 403 to its cancel, files, downloads and (while
  // it is active) its log. Those actions stay on screen, greyed out and focusable, with
  // the server's reason as their description; MLflow and an ended run's stored log stay.
  const notFollowed = run.not_followed;
  const notFollowedId = `${id}-not-followed`;
  const blocked: IBlocked | null =
    notFollowed !== null ? { reason: notFollowed, describedBy: notFollowedId } : null;
  // The server's own "not followed" warning says the same as its reason, shown below.
  const warnings =
    blocked !== null ? run.warnings.filter(w => !w.startsWith('Not followed here')) : run.warnings;

  const cancel = async () => {
    if (blocked !== null) {
      return;
    }
    setActionError(null);
    if (!(await confirmCancel(run))) {
      return;
    }
    setCancelling(true);
    try {
      onCancelled(await api.cancelRun(run.run_id));
    } catch (error) {
      setActionError(errorText(error));
    } finally {
      setCancelling(false);
    }
  };

  const params = Object.entries(run.params).sort(([a], [b]) => a.localeCompare(b));
  const metrics = Object.entries(run.metrics).sort(([a], [b]) => a.localeCompare(b));

  return (
    <section
      ref={props.sectionRef}
      className="mantik-Section mantik-RunDetails"
      data-testid="mantik-run-details"
      data-run-id={run.run_id}
      aria-labelledby={`${id}-title`}
    >
      <div className="mantik-Section-header">
        <h3 id={`${id}-title`} className="mantik-Section-title mantik-details-title">
          {displayName(run)}
        </h3>
        <StateChip state={run.state} />
        <Button
          minimal
          small
          className="mantik-details-close"
          aria-label="Close run details"
          title="Close run details"
          onClick={onClose}
        >
          ×
        </Button>
      </div>
      <dl className="mantik-StatusList mantik-run-facts">
        <dt>Run id</dt>
        <dd className="mantik-mono">{run.run_id}</dd>
        <dt>Experiment</dt>
        <dd className="mantik-run-experiment-name">{experiment}</dd>
        <dt>Backend</dt>
        <dd>
          {run.backend ?? '—'}
          {run.job_id ? <span className="mantik-muted"> (job {run.job_id})</span> : null}
        </dd>
        <dt>Entry point</dt>
        <dd>{run.entry_point ?? '—'}</dd>
        <dt>Duration</dt>
        <dd className="mantik-run-duration">{runDuration(run, now)}</dd>
        {run.reason ? (
          <>
            <dt>Reason</dt>
            <dd className="mantik-run-reason">{run.reason}</dd>
          </>
        ) : null}
      </dl>
      {warnings.map(w => (
        <p key={w} className="mantik-warning">
          {w}
        </p>
      ))}
      {blocked !== null ? (
        <p id={notFollowedId} className="mantik-warning mantik-not-followed">
          {blocked.reason}
        </p>
      ) : null}
      <div className="mantik-actions">
        <Button
          small
          className="jp-mod-styled mantik-open-run-mlflow"
          data-testid="mantik-open-run-mlflow"
          onClick={onOpenMlflow}
          title="Open this run in the MLflow UI"
        >
          Open in MLflow
        </Button>
        {active ? (
          <Button
            small
            className="jp-mod-styled jp-mod-warn mantik-cancel-run"
            data-testid="mantik-cancel-run"
            onClick={() => void cancel()}
            disabled={cancelling}
            {...blockedProps(blocked)}
          >
            {cancelling ? 'Cancelling…' : 'Cancel run'}
          </Button>
        ) : null}
      </div>
      {actionError !== null ? (
        <p className="mantik-error" role="alert">
          {actionError}
        </p>
      ) : null}

      <details className="mantik-params" open={params.length > 0 && params.length <= 8}>
        <summary>Parameters ({params.length})</summary>
        <KeyValueTable rows={params} label="Parameters" />
      </details>
      <details className="mantik-metrics" open={metrics.length > 0}>
        <summary>Latest metrics ({metrics.length})</summary>
        <KeyValueTable
          rows={metrics.map(([k, v]) => [k, Number.isInteger(v) ? String(v) : v.toPrecision(5)])}
          label="Latest metrics"
        />
      </details>
      <LogView
        api={api}
        run={run}
        visible={visible}
        blocked={active ? blocked : null}
      />
      <FilesView api={api} run={run} blocked={blocked} />
    </section>
  );
}

/** Why an action of a run is not available here, and the id of the text saying so. */
interface IBlocked {
  reason: string;
  describedBy: string;
}

/**
 * Props of a control that is greyed out because the run is not followed here. Not
 * `disabled`: a disabled control drops out of the Tab order, and a keyboard or screen
 * reader user would never learn why it is missing; `aria-disabled` keeps it reachable and
 * named, and its description says why and what to do. Its handler must do nothing.
 */
function blockedProps(
  blocked: IBlocked | null
): Pick<React.HTMLAttributes<HTMLElement>, 'aria-disabled' | 'aria-describedby' | 'title'> {
  return blocked === null
    ? {}
    : { 'aria-disabled': true, 'aria-describedby': blocked.describedBy, title: blocked.reason };
}

function KeyValueTable(props: {
  rows: Array<[string, string]>;
  label: string;
}): JSX.Element {
  if (props.rows.length === 0) {
    return <p className="mantik-muted">None</p>;
  }
  return (
    <table className="mantik-kv" aria-label={props.label}>
      <tbody>
        {props.rows.map(([k, v]) => (
          <tr key={k}>
            <th scope="row">{k}</th>
            <td>{v}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

/**
 * The run's log, following while the run is active and the panel visible. `blocked`: the
 * server does not give it (a run followed elsewhere, still active): nothing is read.
 */
function LogView(props: {
  api: MantikApi;
  run: IRun;
  visible: boolean;
  blocked: IBlocked | null;
}): JSX.Element {
  const { api, run, visible, blocked } = props;
  const isBlocked = blocked !== null;
  const [buffer] = useState(() => new LogBuffer());
  const [, setVersion] = useState(0);
  const [error, setError] = useState<string | null>(null);
  const [follow, setFollow] = useState(true);
  const pre = useRef<HTMLPreElement>(null);
  const poller = useRef<Poller | null>(null);
  const runId = run.run_id;

  useEffect(() => {
    if (isBlocked) {
      poller.current = null;
      return;
    }
    const p = new Poller({
      interval: 1500,
      maxInterval: 10_000,
      factor: 1.6,
      paused: !visible,
      task: async () => {
        try {
          const chunk = await api.runLogs(runId, buffer.offset);
          const grew = buffer.append(chunk);
          setError(null);
          if (grew || chunk.final) {
            setVersion(v => v + 1);
          }
          if (chunk.final) {
            p.dispose();
          }
          return grew ? 'active' : 'idle';
        } catch (e) {
          setError(errorText(e));
          return 'error';
        }
      }
    });
    poller.current = p;
    p.start();
    return () => p.dispose();
    // Once the run ends elsewhere, its stored log becomes readable: start then.
  }, [api, runId, buffer, isBlocked]);

  useEffect(() => {
    poller.current?.[visible ? 'resume' : 'pause']();
  }, [visible]);

  // The run's state changed (e.g. it ended): read the rest of the log now.
  useEffect(() => {
    if (!buffer.final && poller.current && !poller.current.isDisposed) {
      void poller.current.refresh();
    }
  }, [run.state]);

  useEffect(() => {
    if (follow && pre.current) {
      pre.current.scrollTop = pre.current.scrollHeight;
    }
  });

  const shown = useMemo(() => terminalText(buffer.text), [buffer.text]);

  const onScroll = () => {
    const el = pre.current;
    if (el) {
      setFollow(el.scrollHeight - el.scrollTop - el.clientHeight < 24);
    }
  };

  return (
    <div className="mantik-LogView">
      <div className="mantik-Section-header">
        <h4 className="mantik-Subsection-title">Log</h4>
        <span className="mantik-muted mantik-log-state" aria-live="polite">
          {isBlocked
            ? 'not followed here'
            : buffer.final
              ? 'complete'
              : follow
                ? 'following'
                : 'paused (scrolled up)'}
        </span>
      </div>
      {error !== null ? (
        <p className="mantik-error mantik-log-error" role="alert">
          {error}
        </p>
      ) : null}
      <pre
        ref={pre}
        className="mantik-log"
        data-testid="mantik-log"
        role="log"
        aria-label={`Log of run ${displayName(run)}`}
        aria-describedby={blocked?.describedBy}
        tabIndex={0}
        onScroll={onScroll}
      >
        {isBlocked
          ? '(not followed here: the log of an active run is read only where it was submitted)'
          : null}
        {!isBlocked && buffer.truncated ? '[… earlier output dropped …]\n' : ''}
        {isBlocked ? null : shown || (buffer.final ? '(empty log)' : 'Waiting for output…')}
      </pre>
    </div>
  );
}

/**
 * One folder of the run directory, with downloads. `blocked`: the server does not give
 * them (a run followed elsewhere): the section does not open.
 */
function FilesView(props: { api: MantikApi; run: IRun; blocked: IBlocked | null }): JSX.Element {
  const { api, run, blocked } = props;
  const [open, setOpen] = useState(false);
  const [path, setPath] = useState('');
  const [entries, setEntries] = useState<IFileEntry[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [loading, setLoading] = useState(false);
  // Only the folder asked for last is shown: two quick clicks (or a click and the
  // reload when the run ends) can be answered in either order.
  const latest = useRef(0);

  const load = useCallback(
    async (folder: string) => {
      const ticket = ++latest.current;
      setLoading(true);
      setError(null);
      try {
        const found = await api.runFiles(run.run_id, folder);
        if (ticket === latest.current) {
          setEntries(found);
          setPath(folder);
        }
      } catch (e) {
        if (ticket === latest.current) {
          setError(errorText(e));
        }
      } finally {
        if (ticket === latest.current) {
          setLoading(false);
        }
      }
    },
    [api, run.run_id]
  );

  useEffect(() => {
    if (open) {
      void load(path);
    }
    // Reload when the run ends: its outputs are complete then.
  }, [open, run.is_final]);

  // The browser's own download of an error answer fails without a word (file gone, cluster
  // unreachable): ask first and show the server's message, then let the browser download.
  const download = async (event: React.MouseEvent<HTMLAnchorElement>, file: string) => {
    if (event.defaultPrevented || event.button !== 0) {
      return;
    }
    const link = event.currentTarget;
    if (link.dataset.checked === 'true') {
      delete link.dataset.checked;
      return;
    }
    event.preventDefault();
    setError(null);
    const problem = await api.downloadProblem(run.run_id, file);
    if (problem !== null) {
      setError(`Cannot download ${name(file) || 'the run'}: ${problem.message}`);
      return;
    }
    link.dataset.checked = 'true';
    link.click();
  };

  const parent = path.includes('/') ? path.slice(0, path.lastIndexOf('/')) : '';
  const name = (p: string) => p.slice(p.lastIndexOf('/') + 1);
  const split = splitRunFiles(entries ?? [], path);

  // A folder downloads as one zip archive that the server names (`<run>-<folder>.zip`).
  const folderDownload = (folder: string, label: string, text: string) => (
    <a
      href={api.downloadUrl(run.run_id, folder)}
      download=""
      className="mantik-folder-download"
      aria-label={label}
      title={label}
      onClick={event => void download(event, folder)}
    >
      {text}
    </a>
  );

  const fileItem = (entry: IFileEntry, purpose?: string) => (
    <li key={entry.path}>
      {entry.is_dir ? (
        <>
          <button
            type="button"
            className="mantik-linkbutton"
            aria-label={`Open folder ${name(entry.path)}`}
            onClick={() => void load(entry.path)}
          >
            {name(entry.path)}/
          </button>{' '}
          {folderDownload(entry.path, `Download folder ${name(entry.path)} as zip`, '.zip')}
        </>
      ) : (
        <a
          href={api.downloadUrl(run.run_id, entry.path)}
          download={name(entry.path)}
          aria-label={`Download ${name(entry.path)} (${formatBytes(entry.size)})`}
          title={purpose}
          onClick={event => void download(event, entry.path)}
        >
          {name(entry.path)}
        </a>
      )}
      {entry.is_dir ? null : <span className="mantik-muted"> {formatBytes(entry.size)}</span>}
      {purpose ? <span className="mantik-muted mantik-file-purpose"> {purpose}</span> : null}
    </li>
  );

  if (blocked !== null) {
    return (
      <details className="mantik-files mantik-mod-blocked" open={false}>
        {/* A click or Enter/Space would open it: kept closed, the reason says why. */}
        <summary {...blockedProps(blocked)} onClick={e => e.preventDefault()}>
          Files
        </summary>
      </details>
    );
  }

  return (
    <details
      className="mantik-files"
      onToggle={e => setOpen((e.target as HTMLDetailsElement).open)}
    >
      <summary>Files</summary>
      {loading ? <p className="mantik-muted">Loading…</p> : null}
      {error !== null ? (
        <p className="mantik-error" role="alert">
          {error}
        </p>
      ) : null}
      {entries !== null ? (
        <>
          <p className="mantik-files-archive">
            {path
              ? folderDownload(
                  path,
                  `Download folder ${name(path)} as zip`,
                  `Download ${name(path)}/ as .zip`
                )
              : folderDownload(
                  '',
                  'Download the whole run as zip',
                  'Download the whole run as .zip'
                )}
          </p>
          <ul className="mantik-FileList" aria-label={`Files in ${path || 'the run directory'}`}>
            {path ? (
              <li>
                <button
                  type="button"
                  className="mantik-linkbutton"
                  onClick={() => void load(parent)}
                >
                  ../
                </button>
              </li>
            ) : null}
            {entries.length === 0 ? <li className="mantik-muted">Empty</li> : null}
            {entries.length > 0 && split.yours.length === 0 ? (
              <li className="mantik-muted">Only mantik's files so far.</li>
            ) : null}
            {split.yours.map(entry => fileItem(entry))}
          </ul>
          {split.mantik.length > 0 ? (
            <details className="mantik-files-internal" data-testid="mantik-files-internal">
              <summary>mantik files ({split.mantik.length})</summary>
              <p className="mantik-muted">
                Written by mantik to run the job. The job script and the package are what
                ran: keep them to reproduce the run.
              </p>
              <ul className="mantik-FileList" aria-label="Files mantik wrote to run the job">
                {split.mantik.map(entry => fileItem(entry, MANTIK_FILES[name(entry.path)]))}
              </ul>
            </details>
          ) : null}
        </>
      ) : null}
    </details>
  );
}
