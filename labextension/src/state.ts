/**
 * UI state logic of the sidebar, free of React and the DOM so it can be unit-tested:
 * a poller with backoff that pauses while the panel is hidden, a log follower,
 * and the pure helpers of the runs list (filters, merge, ages, chips).
 */
import { FINAL_STATES, IExperiment, IFileEntry, ILogChunk, IRun } from './api';

// --------------------------------------------------------------------------- polling

/** What one poll found, which decides the next delay. */
export type PollOutcome = 'active' | 'idle' | 'error';

export interface IBackoff {
  /** Delay after a poll that found something changing (ms). */
  interval: number;
  /** Upper bound of the delay (ms). */
  maxInterval: number;
  /** Factor the delay grows by after an idle poll or an error. */
  factor: number;
}

/**
 * The delay before the next poll: back to `interval` while something is active,
 * growing by `factor` (up to `maxInterval`) while idle or failing.
 */
export function nextDelay(
  previous: number,
  outcome: PollOutcome,
  backoff: IBackoff
): number {
  const base = Math.max(1, backoff.interval);
  const max = Math.max(base, backoff.maxInterval);
  if (outcome === 'active') {
    return base;
  }
  const grown = Math.max(base, previous) * Math.max(1, backoff.factor);
  return Math.min(max, Math.round(grown));
}

/** Timer functions, replaceable in tests. */
export interface ITimers {
  setTimeout: (fn: () => void, ms: number) => unknown;
  clearTimeout: (handle: unknown) => void;
}

const defaultTimers: ITimers = {
  setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: handle =>
    globalThis.clearTimeout(handle as ReturnType<typeof setTimeout>)
};

export interface IPollerOptions extends IBackoff {
  /** One poll; its outcome sets the next delay. A throw counts as 'error'. */
  task: () => Promise<PollOutcome>;
  /** Start paused (e.g. while the panel is hidden). */
  paused?: boolean;
  timers?: ITimers;
}

/**
 * Calls `task` repeatedly, one call at a time, with backoff.
 *
 * - While paused no poll is scheduled; `resume()` polls at once.
 * - `refresh()` polls at once and resets the backoff (after a user action).
 * - `interval === 0` (settings) stops polling; explicit refreshes still work.
 */
export class Poller {
  constructor(options: IPollerOptions) {
    this._task = options.task;
    this._backoff = {
      interval: options.interval,
      maxInterval: options.maxInterval,
      factor: options.factor
    };
    this._paused = options.paused ?? false;
    this._timers = options.timers ?? defaultTimers;
    this._delay = options.interval;
  }

  /** Delay (ms) before the next scheduled poll. */
  get delay(): number {
    return this._delay;
  }

  get isPaused(): boolean {
    return this._paused;
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  /** Whether a poll is scheduled (a timer is pending). */
  get isScheduled(): boolean {
    return this._timer !== null;
  }

  /** Number of polls started so far. */
  get polls(): number {
    return this._polls;
  }

  /** Start polling (at once). */
  start(): void {
    if (!this._paused) {
      this._schedule(0);
    }
  }

  /** Change the backoff; the next delay starts from the new interval. */
  configure(backoff: Partial<IBackoff>): void {
    this._backoff = { ...this._backoff, ...backoff };
    this._delay = this._backoff.interval;
    if (!this._paused && !this._running) {
      this._schedule(this._enabled ? this._delay : -1);
    }
  }

  pause(): void {
    this._paused = true;
    this._clear();
  }

  resume(): void {
    if (!this._paused || this._disposed) {
      return;
    }
    this._paused = false;
    if (this._running) {
      // A poll from before the pause is still out: look again when it is back, not
      // beside it (two log reads from one offset would add the same text twice).
      this._again = true;
      return;
    }
    // Whatever happened while hidden: look now.
    this._schedule(0);
  }

  /** Poll now and reset the backoff. Resolves when that poll is done. */
  refresh(): Promise<void> {
    this._delay = this._backoff.interval;
    if (this._running) {
      // Poll again right after the current one.
      this._again = true;
      return this._current ?? Promise.resolve();
    }
    this._clear();
    return this._tick();
  }

  dispose(): void {
    this._disposed = true;
    this._clear();
  }

  private get _enabled(): boolean {
    return this._backoff.interval > 0;
  }

  /** ms < 0: nothing scheduled. */
  private _schedule(ms: number): void {
    this._clear();
    if (this._disposed || this._paused || ms < 0) {
      return;
    }
    this._timer = this._timers.setTimeout(() => {
      this._timer = null;
      void this._tick();
    }, ms);
  }

  private _clear(): void {
    if (this._timer !== null) {
      this._timers.clearTimeout(this._timer);
      this._timer = null;
    }
  }

  private _tick(): Promise<void> {
    if (this._disposed) {
      return Promise.resolve();
    }
    this._running = true;
    this._polls++;
    const run = async () => {
      let outcome: PollOutcome;
      try {
        outcome = await this._task();
      } catch {
        outcome = 'error';
      }
      this._running = false;
      this._current = null;
      this._delay = nextDelay(this._delay, outcome, this._backoff);
      if (this._again) {
        this._again = false;
        this._delay = this._backoff.interval;
        this._schedule(0);
      } else {
        this._schedule(this._enabled ? this._delay : -1);
      }
    };
    this._current = run();
    return this._current;
  }

  private _task: () => Promise<PollOutcome>;
  private _backoff: IBackoff;
  private _paused: boolean;
  private _timers: ITimers;
  private _delay: number;
  private _timer: unknown = null;
  private _running = false;
  private _again = false;
  private _current: Promise<void> | null = null;
  private _disposed = false;
  private _polls = 0;
}

// --------------------------------------------------------------------------- logs

/** Most characters of a log kept in the browser; older text is dropped. */
export const MAX_LOG_CHARS = 1_000_000;

/** Accumulates a run's log from offset-based chunks. */
export class LogBuffer {
  text = '';
  offset = 0;
  final = false;
  truncated = false;

  /** Append one chunk; returns whether anything new arrived. */
  append(chunk: ILogChunk): boolean {
    const grew = chunk.text.length > 0;
    if (grew) {
      this.text += chunk.text;
      if (this.text.length > MAX_LOG_CHARS) {
        this.text = this.text.slice(this.text.length - MAX_LOG_CHARS);
        this.truncated = true;
      }
    }
    this.offset = Math.max(this.offset, chunk.offset);
    this.final = chunk.final;
    return grew;
  }
}

// Escape sequences of terminals (colours, cursor moves, window titles): CSI, OSC and
// two-character ones.
const ANSI_ESCAPE =
  /\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]/g;

/**
 * A job's output as a terminal shows it: a carriage return goes back to the start of
 * the line and what follows overwrites it (progress bars such as tqdm's print one line
 * per update this way), and colour codes are dropped instead of shown as boxes.
 */
export function terminalText(text: string): string {
  const plain = text.replace(ANSI_ESCAPE, '');
  if (!plain.includes('\r')) {
    return plain;
  }
  return plain
    .replace(/\r\n/g, '\n')
    .split('\n')
    .map(line => {
      if (!line.includes('\r')) {
        return line;
      }
      let shown = '';
      for (const part of line.split('\r')) {
        shown = part + shown.slice(part.length);
      }
      return shown;
    })
    .join('\n');
}

// --------------------------------------------------------------------------- runs list

export function isActive(run: Pick<IRun, 'state' | 'is_final'>): boolean {
  return !run.is_final && !FINAL_STATES.has(run.state);
}

export function hasActiveRuns(runs: readonly IRun[]): boolean {
  return runs.some(isActive);
}

/** Filters of the runs list. */
export interface IRunFilter {
  /** Matched case-insensitively against name, id, entry point and backend. */
  text: string;
  /** 'all', 'active', or one state. */
  state: string;
  /** '' for every backend. */
  backend: string;
}

export const EMPTY_FILTER: IRunFilter = { text: '', state: 'all', backend: '' };

/** The state filter's choices: value and label. */
export const STATE_OPTIONS: ReadonlyArray<readonly [string, string]> = [
  ['all', 'All states'],
  ['active', 'Active'],
  ['QUEUED', 'Queued'],
  ['RUNNING', 'Running'],
  ['FINISHED', 'Finished'],
  ['FAILED', 'Failed'],
  ['KILLED', 'Killed']
];

/** An experiment's name as the list shows it; its id while the name is not known. */
export function experimentLabel(
  experiments: readonly IExperiment[],
  experimentId: string
): string {
  const found = experiments.find(e => e.experiment_id === experimentId);
  return found ? found.name : `experiment ${experimentId}`;
}

/**
 * What the runs list says when it shows no run, naming the filters that are on: with an
 * experiment chosen, "No run matches the filters." left the user guessing which one hid
 * their runs.
 */
export function emptyRunsText(options: {
  filter: IRunFilter;
  /** The experiment the list is narrowed to (its name), null for every experiment. */
  experiment: string | null;
  /** How many runs the server answered (before the filters of the page). */
  loaded: number;
  /** Older runs exist beyond those loaded. */
  more: boolean;
}): string {
  const { filter, experiment, loaded, more } = options;
  if (loaded === 0) {
    return experiment === null
      ? 'No runs yet. Use "Submit…" or right-click an MLproject folder.'
      : `No runs in experiment "${experiment}". Choose "All experiments" to see the others.`;
  }
  const active: string[] = [];
  if (experiment !== null) {
    active.push(`experiment "${experiment}"`);
  }
  if (filter.state !== 'all') {
    const label = STATE_OPTIONS.find(([value]) => value === filter.state)?.[1];
    active.push(`state "${label ?? filter.state}"`);
  }
  if (filter.backend) {
    active.push(`backend "${filter.backend}"`);
  }
  if (filter.text.trim()) {
    active.push(`text "${filter.text.trim()}"`);
  }
  const among = more ? ` among the ${loaded} newest` : '';
  return `No run${among} matches the filters: ${active.join(', ')}.`;
}

export function matchesFilter(run: IRun, filter: IRunFilter): boolean {
  if (filter.state === 'active' && !isActive(run)) {
    return false;
  }
  if (
    filter.state !== 'all' &&
    filter.state !== 'active' &&
    run.state !== filter.state
  ) {
    return false;
  }
  if (filter.backend && run.backend !== filter.backend) {
    return false;
  }
  const text = filter.text.trim().toLowerCase();
  if (!text) {
    return true;
  }
  return [run.run_name, run.run_id, run.entry_point, run.backend].some(
    field => (field ?? '').toLowerCase().includes(text)
  );
}

export function filterRuns(runs: readonly IRun[], filter: IRunFilter): IRun[] {
  return runs.filter(run => matchesFilter(run, filter));
}

/** Backends that occur in the list, for the filter's options. */
export function backendsOf(runs: readonly IRun[]): string[] {
  return [...new Set(runs.map(r => r.backend).filter((b): b is string => !!b))].sort();
}

/**
 * The list after a poll, keeping runs the server did not (yet) return, e.g. one just
 * submitted while MLflow's search lags: newest first, no duplicates.
 */
export function mergeRuns(
  fetched: readonly IRun[],
  pinned: readonly IRun[]
): IRun[] {
  const ids = new Set(fetched.map(r => r.run_id));
  const extra = pinned.filter(r => !ids.has(r.run_id));
  return sortRuns([...extra, ...fetched]);
}

/** Put one run (new or updated) into the list. */
export function upsertRun(runs: readonly IRun[], run: IRun): IRun[] {
  const others = runs.filter(r => r.run_id !== run.run_id);
  return sortRuns([run, ...others]);
}

/** Newest first; runs without a start time (just submitted) on top. Stable. */
export function sortRuns(runs: readonly IRun[]): IRun[] {
  return runs
    .map((run, index) => ({ run, index }))
    .sort((a, b) => {
      const ta = a.run.start_time ?? Number.MAX_SAFE_INTEGER;
      const tb = b.run.start_time ?? Number.MAX_SAFE_INTEGER;
      return tb - ta || a.index - b.index;
    })
    .map(x => x.run);
}

/** "just now", "42 s", "5 min", "3 h", "2 d". */
export function formatAge(startMs: number | null, nowMs: number): string {
  if (startMs === null) {
    return '—';
  }
  const seconds = Math.max(0, Math.floor((nowMs - startMs) / 1000));
  if (seconds < 5) {
    return 'just now';
  }
  if (seconds < 60) {
    return `${seconds} s`;
  }
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) {
    return `${minutes} min`;
  }
  const hours = Math.floor(minutes / 60);
  if (hours < 48) {
    return `${hours} h`;
  }
  return `${Math.floor(hours / 24)} d`;
}

/** States in which a run waits for its job to start (its start time is its submission). */
const WAITING_STATES = new Set(['SUBMITTING', 'QUEUED']);

/**
 * When a run started, as a screen reader says it: "started 5 min ago", "not started yet".
 * A run still waiting (`state` QUEUED or SUBMITTING) was "submitted" then: it has not
 * started.
 */
export function startedPhrase(
  startMs: number | null,
  nowMs: number,
  state?: string,
  runningSince: number | null = null
): string {
  const age = formatAge(startMs, nowMs);
  if (startMs === null) {
    return 'not started yet';
  }
  // Known start of running: `startMs` is only the submission.
  const submitted = (state !== undefined && WAITING_STATES.has(state)) || runningSince !== null;
  const verb = submitted ? 'submitted' : 'started';
  return age === 'just now' ? `${verb} just now` : `${verb} ${age} ago`;
}

/** Duration of a run, e.g. "1 min 12 s". */
export function formatDuration(
  startMs: number | null,
  endMs: number | null,
  nowMs: number
): string {
  if (startMs === null) {
    return '—';
  }
  const total = Math.max(0, Math.round(((endMs ?? nowMs) - startMs) / 1000));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  if (h > 0) {
    return `${h} h ${m} min`;
  }
  return m > 0 ? `${m} min ${s} s` : `${s} s`;
}

/**
 * The duration shown in a run's details. `start_time` is the submission: while the run
 * waits, the time since is queued time ("queued for 3 min 5 s"). Once its job runs the
 * server records when (`running_since`, the latest attempt's): "queued 2 h 1 min,
 * running for 3 min 5 s", "queued 2 h 1 min, ran 40 min 2 s". Runs recorded before the
 * server kept it show the time since submission.
 */
export function runDuration(
  run: Pick<IRun, 'state' | 'start_time' | 'end_time'> &
    Partial<Pick<IRun, 'running_since'>>,
  nowMs: number
): string {
  const ranSince = run.running_since ?? null;
  if (run.start_time !== null && ranSince !== null) {
    // Clocks of cluster and server may differ a little: formatDuration keeps it >= 0.
    const queued = formatDuration(run.start_time, ranSince, nowMs);
    const ran = formatDuration(ranSince, run.end_time, nowMs);
    return run.end_time === null
      ? `queued ${queued}, running for ${ran}`
      : `queued ${queued}, ran ${ran}`;
  }
  const since = formatDuration(run.start_time, run.end_time, nowMs);
  if (run.start_time === null || run.end_time !== null || !WAITING_STATES.has(run.state)) {
    return since;
  }
  return `${run.state === 'QUEUED' ? 'queued' : 'submitting'} for ${since}`;
}

/**
 * A run row's times, for its screen-reader label and tooltip (the row itself has room
 * for the age only): "submitted 2 h ago, queued 1 h 58 min, ran 3 min 5 s" once the
 * server knows when the job ran, else the started phrase alone.
 */
export function rowTimes(
  run: Pick<IRun, 'state' | 'start_time' | 'end_time'> &
    Partial<Pick<IRun, 'running_since'>>,
  nowMs: number
): string {
  const ranSince = run.running_since ?? null;
  const started = startedPhrase(run.start_time, nowMs, run.state, ranSince);
  return ranSince === null || run.start_time === null
    ? started
    : `${started}, ${runDuration(run, nowMs)}`;
}

/** CSS modifier of a state chip. */
export function stateKind(state: string): 'ok' | 'error' | 'warn' | 'pending' | 'active' {
  switch (state) {
    case 'FINISHED':
      return 'ok';
    case 'FAILED':
      return 'error';
    case 'KILLED':
    case 'UNKNOWN':
      return 'warn';
    case 'RUNNING':
      return 'active';
    default:
      return 'pending';
  }
}

export function displayName(run: Pick<IRun, 'run_name' | 'run_id'>): string {
  return run.run_name || run.run_id.slice(0, 8);
}

/**
 * The files mantik itself writes into the top folder of a run directory
 * (`compute/layout.py` and the local backend's bookkeeping), with what each is for. The
 * job's log (`mantik.log`), the login node commands' output (`mantik-login.log`) and
 * `code/` (the project, where the job writes its outputs) are the user's.
 */
export const MANTIK_FILES: Readonly<Record<string, string>> = {
  'mantik-job.sh': 'The job script that ran: to run it again by hand.',
  'package.tar.gz': 'The project as it was submitted.',
  '.mantik-credentials': 'The tracking credential, until the job reads it.',
  'mantik.exitcode': "The job's exit status.",
  'mantik.jobid': 'Bookkeeping of the local backend.',
  'mantik.jobmarker': 'Bookkeeping of the local backend.',
  'mantik.supervisor': 'Bookkeeping of the local backend.',
  'mantik.ended': 'Bookkeeping of the local backend.',
  'mantik.stop': 'Bookkeeping of the local backend.',
  'mantik.cancelled': 'Bookkeeping of the local backend.'
};

/**
 * A folder of a run directory, the user's entries first: in the top folder, the files
 * mantik wrote to run the job are set apart (they outnumbered the user's outputs and
 * looked like them), never dropped.
 */
export function splitRunFiles(
  entries: readonly IFileEntry[],
  folder: string
): { yours: IFileEntry[]; mantik: IFileEntry[] } {
  const top = folder.replace(/^\/+|\/+$/g, '') === '';
  const isMantik = (entry: IFileEntry) =>
    top && !entry.is_dir && Object.prototype.hasOwnProperty.call(MANTIK_FILES, baseName(entry.path));
  return {
    yours: entries.filter(e => !isMantik(e)),
    mantik: entries.filter(isMantik)
  };
}

/** The last part of a path in a run directory. */
export function baseName(path: string): string {
  const trimmed = path.replace(/\/+$/, '');
  return trimmed.slice(trimmed.lastIndexOf('/') + 1);
}

export function formatBytes(size: number): string {
  if (size < 1024) {
    return `${size} B`;
  }
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let value = size / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

// --------------------------------------------------------------------------- submit form

/** The config a form preselects: the settings' default, the server's, else the first. */
export function pickConfig(
  files: readonly string[],
  preferred: string,
  serverDefault: string | null
): string {
  if (preferred && files.includes(preferred)) {
    return preferred;
  }
  if (serverDefault && files.includes(serverDefault)) {
    return serverDefault;
  }
  return files[0] ?? '';
}

/** Client-side check of one parameter value; the server checks again. */
export function checkParam(
  type: string,
  value: string,
  required: boolean
): string | null {
  const v = value.trim();
  if (!v) {
    return required ? 'Required' : null;
  }
  const t = type.toLowerCase();
  if ((t === 'int' || t === 'integer') && !/^[+-]?\d+$/.test(v)) {
    return 'Must be a whole number';
  }
  if (
    (t === 'float' || t === 'double') &&
    (!/^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(v) || !Number.isFinite(Number(v)))
  ) {
    return 'Must be a number';
  }
  return null;
}

/** Longest parameter name MLflow records (its MAX_ENTITY_KEY_LENGTH). */
export const MAX_PARAM_NAME_LENGTH = 250;

/**
 * Why MLflow will refuse to record a parameter of this name, else null. MLflow's own rule
 * (`mlflow.utils.validation`): letters and digits of any alphabet, `_ - . : /` and spaces,
 * as a relative path without empty, `.` or `..` parts, at most 250 characters. Without
 * this check the dialog answered a name such as `T_2m (°C)` with the tracking server's
 * INVALID_PARAMETER_VALUE, its `\u00b0` escapes and `params[0].key`, under the buttons.
 */
export function checkParamName(name: string): string | null {
  const refused = `MLflow cannot record a parameter named "${name}"`;
  const where = 'Rename it in the MLproject.';
  const bad = [...new Set(Array.from(name).filter(c => !/^[\p{L}\p{N}_.\-:/ ]$/u.test(c)))];
  if (bad.length > 0) {
    const shown = bad.map(c => (/^\s$/u.test(c) ? JSON.stringify(c) : `"${c}"`)).join(', ');
    return (
      `${refused}: a name may contain only letters and digits (of any alphabet), ` +
      `spaces and _ - . : /, not ${shown}. ${where}`
    );
  }
  const parts = name.split('/');
  if (name.startsWith('/') || name.startsWith('..') || parts.some(p => ['', '.', '..'].includes(p))) {
    return (
      `${refused}: a name with "/" must read as a relative path, without a leading "/", ` +
      `"//", or "." and ".." parts. ${where}`
    );
  }
  if (name.length > MAX_PARAM_NAME_LENGTH) {
    return `${refused}: it has ${name.length} characters, at most ${MAX_PARAM_NAME_LENGTH} fit. ${where}`;
  }
  return null;
}

/** Parameters to send: only values that differ from the MLproject's defaults. */
export function changedParams(
  specs: ReadonlyArray<{ name: string; default: string | null }>,
  values: Readonly<Record<string, string>>
): Record<string, string> {
  const out: Record<string, string> = {};
  for (const spec of specs) {
    const value = (values[spec.name] ?? '').trim();
    if (value && value !== spec.default) {
      out[spec.name] = value;
    }
  }
  return out;
}

/**
 * Pixels to scroll `view` down so that the first `want` pixels of `target` (all of it when
 * shorter) are in sight; 0 when they are already, and never so far that the top of
 * `target` leaves the view. Rectangles are in the same coordinates (client rects).
 */
export function revealOffset(
  view: { top: number; bottom: number },
  target: { top: number; bottom: number },
  want: number
): number {
  const shown = target.top + Math.min(want, target.bottom - target.top);
  if (shown <= view.bottom) {
    return 0;
  }
  return Math.max(0, Math.min(shown - view.bottom, target.top - view.top));
}

// --------------------------------------------------------------------------- runs model

/** One answer of the runs list: the newest `limit` runs, and whether older ones exist. */
export interface IRunPage {
  runs: IRun[];
  more: boolean;
}

/** Runs the list asks for at first, and how many more each "older runs" click adds. */
export const RUNS_PAGE = 100;
/** Most runs the list asks for (the server's `max_results` limit). */
export const MAX_RUNS = 1000;

export interface IRunsModelOptions {
  /**
   * Fetch the newest `limit` runs; `refresh` asks the server to query the backends first.
   */
  fetchRuns: (refresh: boolean, limit: number, experimentId: string) => Promise<IRunPage>;
  /**
   * The experiments the user may read, for their names: asked with the first runs, and
   * again when a run of an unknown experiment shows up.
   */
  fetchExperiments?: () => Promise<IExperiment[]>;
  /** Poll delay while runs are active (ms); 0 disables polling. */
  interval: number;
  /** Longest delay while idle or failing (ms). */
  maxInterval?: number;
  factor?: number;
  /** Start hidden (paused). */
  visible?: boolean;
  timers?: ITimers;
  /** Error text of a failed fetch. */
  describeError?: (error: unknown) => string;
}

export interface IRunsSnapshot {
  runs: IRun[];
  error: string | null;
  loaded: boolean;
  /** A run the list should select (a new submission); `seq` grows with each request. */
  select: { runId: string; seq: number } | null;
  /** How many of the newest runs the list holds at most. */
  limit: number;
  /** Older runs exist beyond `limit`: filters do not see them until they are loaded. */
  more: boolean;
  /** A search is out: the list may be about to change (a hung server answers late). */
  busy: boolean;
  /** The experiment the server lists runs of; '' for every experiment. */
  experiment: string;
  /** The experiments known by name (maybe not yet, or not all of them). */
  experiments: IExperiment[];
}

const EMPTY_SNAPSHOT: IRunsSnapshot = {
  runs: [],
  error: null,
  loaded: false,
  select: null,
  limit: RUNS_PAGE,
  more: false,
  busy: false,
  experiment: '',
  experiments: []
};

/** Least time between two reads of the experiments for a name not known yet (ms). */
const EXPERIMENTS_RETRY_MS = 30_000;

/**
 * The runs list: fetched with backoff while the panel is visible, paused while it is
 * hidden; a submitted run is shown at once, before MLflow's search returns it.
 */
export class RunsModel {
  constructor(options: IRunsModelOptions) {
    this._fetch = options.fetchRuns;
    this._fetchExperiments = options.fetchExperiments ?? null;
    this._describe = options.describeError ?? (e => String(e));
    this._poller = new Poller({
      task: () => this._poll(),
      interval: options.interval,
      maxInterval: options.maxInterval ?? Math.max(options.interval * 8, 30_000),
      factor: options.factor ?? 1.5,
      paused: options.visible === false,
      timers: options.timers
    });
    this._poller.start();
  }

  get poller(): Poller {
    return this._poller;
  }

  get snapshot(): IRunsSnapshot {
    return this._snapshot;
  }

  subscribe(listener: () => void): () => void {
    this._listeners.add(listener);
    return () => this._listeners.delete(listener);
  }

  setVisible(visible: boolean): void {
    if (visible) {
      this._poller.resume();
    } else {
      this._poller.pause();
    }
  }

  setInterval(intervalMs: number, maxIntervalMs?: number): void {
    this._poller.configure({
      interval: intervalMs,
      maxInterval: maxIntervalMs ?? Math.max(intervalMs * 8, 30_000)
    });
  }

  /**
   * Show a run at the top now (a new submission, a cancel answer) and poll soon;
   * `select` asks the list to select it.
   */
  upsert(run: IRun, select = false): void {
    const experiment = this._snapshot.experiment;
    if (select && experiment && run.experiment_id !== experiment) {
      // A new submission to another experiment than the one listed: list them all, else
      // the run the user just submitted would not show.
      this._epoch++;
      this._set({ ...this._snapshot, experiment: '', runs: [], more: false });
    }
    if (!this._snapshot.experiments.some(e => e.experiment_id === run.experiment_id)) {
      // Most likely created by this submission: its name is read with the next poll.
      this._experimentsAsked = 0;
    }
    this._pinned = upsertRun(this._pinned, run);
    const request = select
      ? { runId: run.run_id, seq: (this._snapshot.select?.seq ?? 0) + 1 }
      : this._snapshot.select;
    this._set({
      ...this._snapshot,
      runs: upsertRun(this._snapshot.runs, run),
      select: request
    });
    void this._poller.refresh();
  }

  refresh(): Promise<void> {
    return this._poller.refresh();
  }

  /** Hold `RUNS_PAGE` older runs more (up to `MAX_RUNS`) and fetch them now. */
  showMore(): Promise<void> {
    const limit = Math.min(MAX_RUNS, this._snapshot.limit + RUNS_PAGE);
    this._set({ ...this._snapshot, limit });
    return this._poller.refresh();
  }

  /**
   * List the runs of one experiment ('' for every one): the server searches that
   * experiment only, so its runs beyond the newest of all experiments are found too.
   */
  setExperiment(experimentId: string): Promise<void> {
    if (experimentId === this._snapshot.experiment) {
      return Promise.resolve();
    }
    this._epoch++;
    this._set({
      ...EMPTY_SNAPSHOT,
      experiment: experimentId,
      experiments: this._snapshot.experiments,
      select: this._snapshot.select
    });
    return this._poller.refresh();
  }

  /**
   * Forget every run shown and look again: someone else (or nobody) is logged in now,
   * so the list, the selection and an error of the old login are not theirs.
   */
  reset(): Promise<void> {
    this._epoch++;
    this._logins++;
    this._pinned = [];
    this._experimentsAsked = 0;
    // Every experiment again: the one chosen is the old login's, which the new one may
    // not read.
    this._set(EMPTY_SNAPSHOT);
    return this._poller.refresh();
  }

  dispose(): void {
    this._poller.dispose();
    this._listeners.clear();
  }

  private async _poll(): Promise<PollOutcome> {
    const epoch = this._epoch;
    this._set({ ...this._snapshot, busy: true });
    try {
      const limit = this._snapshot.limit;
      const experiment = this._snapshot.experiment;
      const page = await this._fetch(hasActiveRuns(this._snapshot.runs), limit, experiment);
      const fetched = page.runs;
      if (epoch !== this._epoch) {
        this._set({ ...this._snapshot, busy: false });
        return 'active'; // asked before a reset: the poll that follows it answers
      }
      const ids = new Set(fetched.map(r => r.run_id));
      // A pinned run stays until the search returns it.
      this._pinned = this._pinned.filter(r => !ids.has(r.run_id));
      // A state never leaves FINISHED/FAILED/KILLED: an answer from a request that started
      // before a cancel confirmed (or a search that lags) must not bring a run back to life.
      const known = new Map(this._snapshot.runs.map(r => [r.run_id, r]));
      const fresh = fetched.map(r => {
        const before = known.get(r.run_id);
        return before && !isActive(before) && isActive(r) ? before : r;
      });
      const pinned = this._pinned.filter(r => !experiment || r.experiment_id === experiment);
      const runs = mergeRuns(fresh, pinned);
      // A "show more" while this poll was out asked for a larger page: the next poll has it.
      const more = page.more || limit < this._snapshot.limit;
      this._set({ ...this._snapshot, runs, error: null, loaded: true, more, busy: false });
      void this._nameExperiments(runs);
      return hasActiveRuns(runs) ? 'active' : 'idle';
    } catch (error) {
      if (epoch !== this._epoch) {
        this._set({ ...this._snapshot, busy: false });
        return 'active';
      }
      this._set({
        ...this._snapshot,
        error: this._describe(error),
        loaded: true,
        busy: false
      });
      return 'error';
    }
  }

  /** Read the experiments' names when a run's is not known (at most every 30 s). */
  private async _nameExperiments(runs: readonly IRun[]): Promise<void> {
    const known = new Set(this._snapshot.experiments.map(e => e.experiment_id));
    const unknown =
      this._experimentsAsked === 0 ||
      runs.some(r => !known.has(r.experiment_id)) ||
      (this._snapshot.experiment !== '' && !known.has(this._snapshot.experiment));
    const now = Date.now();
    if (
      this._fetchExperiments === null ||
      this._experimentsBusy ||
      !unknown ||
      (this._experimentsAsked !== 0 && now - this._experimentsAsked < EXPERIMENTS_RETRY_MS)
    ) {
      return;
    }
    const login = this._logins;
    this._experimentsAsked = now;
    this._experimentsBusy = true;
    try {
      const experiments = await this._fetchExperiments();
      // Asked before a new login: the names are the old user's, the new ones come next.
      if (login === this._logins) {
        this._set({ ...this._snapshot, experiments });
      }
    } catch {
      // The names stay as they were (ids where none is known); the runs list says why
      // the tracking server does not answer.
    } finally {
      this._experimentsBusy = false;
    }
  }

  private _set(next: IRunsSnapshot): void {
    this._snapshot = next;
    for (const listener of [...this._listeners]) {
      listener();
    }
  }

  private _fetch: (refresh: boolean, limit: number, experimentId: string) => Promise<IRunPage>;
  private _fetchExperiments: (() => Promise<IExperiment[]>) | null;
  private _experimentsAsked = 0;
  private _logins = 0;
  private _experimentsBusy = false;
  private _describe: (error: unknown) => string;
  private _poller: Poller;
  private _pinned: IRun[] = [];
  private _epoch = 0;
  private _listeners = new Set<() => void>();
  private _snapshot: IRunsSnapshot = EMPTY_SNAPSHOT;
}
