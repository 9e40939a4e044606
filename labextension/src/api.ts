/**
 * Typed REST client for the mantik_jupyter server extension.
 *
 * Every request goes through `ServerConnection.makeRequest`, so Jupyter's
 * token/cookie authentication and the XSRF header are handled for us.
 * Errors from the server arrive as JSON `{message, reason}` with a 4xx/5xx
 * status and are turned into a `MantikApiError`.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** Path of the REST API below the Jupyter server's base URL. */
export const API_NAMESPACE = 'mantik/api';

/** Path of the MLflow UI proxy below the Jupyter server's base URL. */
export const MLFLOW_PROXY_PATH = 'mantik/mlflow/';

/** `GET mantik/api/auth/status` */
export interface IAuthStatus {
  /** URI of the tracking server, e.g. `http://127.0.0.1:5000` or a remote https URL. */
  tracking_uri: string;
  /** The user the server is logged in as, if any. */
  username: string | null;
  /** Whether the server holds a usable credential for the tracking server. */
  logged_in: boolean;
  /** Whether the tracking server is the embedded one started by the extension. */
  embedded: boolean;
  /**
   * False while the embedded tracking server is still starting
   * (absent from older servers: treat as ready).
   */
  ready?: boolean;
  /** Why a credential at hand is no login: the tracking server refused it. */
  message?: string;
}

/** Body of `POST mantik/api/auth/login`. */
export type LoginCredentials =
  | { username: string; password: string }
  | { token: string };

/** Reason used for errors that never reached the server. */
export const NETWORK_ERROR_REASON = 'network_error';

/**
 * An error answered by the server (or a failure to reach it).
 *
 * `message` is meant for humans and is shown as-is in the UI; `reason` is a
 * short machine-readable code; `status` is the HTTP status (0 when the
 * server could not be reached).
 */
export class MantikApiError extends Error {
  readonly reason: string;
  readonly status: number;

  constructor(message: string, reason: string, status: number) {
    super(message);
    this.name = 'MantikApiError';
    this.reason = reason;
    this.status = status;
    // Keep `instanceof` working when compiled to ES5-style classes.
    Object.setPrototypeOf(this, MantikApiError.prototype);
  }

  /** True for 401: the tracking server or Jupyter refused our credentials. */
  get isUnauthorized(): boolean {
    return this.status === 401;
  }
}

/** Options for `MantikApi`. */
export interface IMantikApiOptions {
  /** Server settings; defaults to `ServerConnection.makeSettings()`. */
  serverSettings?: ServerConnection.ISettings;
}

/**
 * Client for the mantik REST API.
 */
export class MantikApi {
  readonly serverSettings: ServerConnection.ISettings;

  constructor(options: IMantikApiOptions = {}) {
    this.serverSettings =
      options.serverSettings ?? ServerConnection.makeSettings();
  }

  /** Absolute URL of the proxied MLflow UI (always ends with a slash). */
  get mlflowUrl(): string {
    return URLExt.join(this.serverSettings.baseUrl, MLFLOW_PROXY_PATH);
  }

  /** The tracking connection as the server sees it. */
  async authStatus(): Promise<IAuthStatus> {
    const body = await this.request('auth/status', { method: 'GET' });
    return parseAuthStatus(body);
  }

  /**
   * Log in to a remote tracking server. Returns the new status when the
   * server answers with one, else fetches it.
   */
  async login(credentials: LoginCredentials): Promise<IAuthStatus> {
    const body = await this.request('auth/login', {
      method: 'POST',
      body: JSON.stringify(credentials)
    });
    return isAuthStatus(body) ? parseAuthStatus(body) : this.authStatus();
  }

  /**
   * One page of runs, newest first. `refresh` asks the server to query the
   * backends for the states of active runs first.
   */
  async listRuns(query: IRunQuery = {}): Promise<IRunList> {
    const params = new URLSearchParams();
    if (query.state) {
      params.set('state', query.state);
    }
    if (query.experimentId) {
      params.set('experiment_id', query.experimentId);
    } else if (query.experimentName) {
      params.set('experiment_name', query.experimentName);
    }
    if (query.maxResults !== undefined) {
      params.set('max_results', String(query.maxResults));
    }
    if (query.pageToken) {
      params.set('page_token', query.pageToken);
    }
    if (query.refresh) {
      params.set('refresh', 'true');
    }
    const qs = params.toString();
    const body = await this.request(qs ? `runs?${qs}` : 'runs', {
      method: 'GET'
    });
    if (!isRecord(body) || !Array.isArray(body.runs)) {
      throw invalid('runs');
    }
    return {
      runs: body.runs.map(parseRun),
      next_page_token:
        typeof body.next_page_token === 'string' ? body.next_page_token : null
    };
  }

  /** The experiments the user may read (active ones), with their names. */
  async listExperiments(): Promise<IExperiment[]> {
    const body = await this.request('experiments', { method: 'GET' });
    if (!isRecord(body) || !Array.isArray(body.experiments)) {
      throw invalid('experiments');
    }
    return body.experiments.filter(isExperiment).map(e => ({
      experiment_id: String(e.experiment_id),
      name: e.name
    }));
  }

  /** One run, its state refreshed from the backend. */
  async getRun(ref: string): Promise<IRun> {
    return parseRun(
      await this.request(`runs/${encodeURIComponent(ref)}`, { method: 'GET' })
    );
  }

  /** Submit an MLproject folder; answers the new run (201). */
  async submitRun(request: ISubmitRequest): Promise<IRun> {
    return parseRun(
      await this.request('runs', {
        method: 'POST',
        body: JSON.stringify(request)
      })
    );
  }

  /** Cancel a run; answers the run after the backend confirmed (or not yet). */
  async cancelRun(ref: string): Promise<IRun> {
    return parseRun(
      await this.request(`runs/${encodeURIComponent(ref)}/cancel`, {
        method: 'POST',
        body: '{}'
      })
    );
  }

  /** A chunk of the run's log from a byte offset. */
  async runLogs(ref: string, offset = 0): Promise<ILogChunk> {
    const body = await this.request(
      `runs/${encodeURIComponent(ref)}/logs?offset=${Math.max(0, offset)}`,
      { method: 'GET' }
    );
    if (
      !isRecord(body) ||
      typeof body.text !== 'string' ||
      typeof body.offset !== 'number' ||
      typeof body.final !== 'boolean'
    ) {
      throw invalid('logs');
    }
    return { text: body.text, offset: body.offset, final: body.final };
  }

  /** The entries of one folder of the run directory. */
  async runFiles(ref: string, path = ''): Promise<IFileEntry[]> {
    const qs = path ? `?path=${encodeURIComponent(path)}` : '';
    const body = await this.request(
      `runs/${encodeURIComponent(ref)}/files${qs}`,
      { method: 'GET' }
    );
    if (!isRecord(body) || !Array.isArray(body.files)) {
      throw invalid('files');
    }
    return body.files.filter(isFileEntry).map(entry => ({
      path: entry.path,
      size: entry.size,
      is_dir: entry.is_dir
    }));
  }

  /**
   * URL that downloads one file of a run, or a folder (`''`: the whole run) as one zip
   * archive (the lab's cookie authenticates a plain browser download; no token is put in
   * the URL).
   */
  downloadUrl(ref: string, path: string): string {
    return (
      URLExt.join(
        this.serverSettings.baseUrl,
        API_NAMESPACE,
        'runs',
        encodeURIComponent(ref),
        'download'
      ) + `?path=${encodeURIComponent(path)}`
    );
  }

  /**
   * Whether `downloadUrl(ref, path)` would answer with the file (or the folder's zip
   * archive): null when it would, else the server's error. A browser download that fails only says "failed" (or nothing), so
   * the panel asks first; the body is not read (the request ends with its headers).
   */
  async downloadProblem(ref: string, path: string): Promise<MantikApiError | null> {
    const controller = new AbortController();
    let response: Response;
    try {
      response = await this._send(this.downloadUrl(ref, path), {
        method: 'GET',
        signal: controller.signal
      });
    } catch (error) {
      return error as MantikApiError;
    }
    if (response.ok) {
      controller.abort();
      return null;
    }
    const text = await response.text();
    let data: unknown = null;
    try {
      data = JSON.parse(text);
    } catch {
      // Not one of our JSON errors: errorFromResponse words it from the status.
    }
    return errorFromResponse(response, data, text);
  }

  /** Describe the MLproject that a file or folder of the Jupyter root belongs to. */
  async describeProject(path: string): Promise<IProject> {
    const body = await this.request(
      `projects?path=${encodeURIComponent(path)}`,
      { method: 'GET' }
    );
    return parseProject(body);
  }

  /**
   * Whether `url` (a run's `mlflow_url`) opens in the lab's MLflow proxy: the MLflow tab
   * loads nothing else. Relative URLs count from the page.
   */
  isMlflowPage(url: string): boolean {
    try {
      const base = globalThis.location?.href ?? this.serverSettings.baseUrl;
      const page = new URL(url, base);
      const proxy = new URL(this.mlflowUrl, base);
      return page.origin === proxy.origin && page.pathname.startsWith(proxy.pathname);
    } catch {
      return false;
    }
  }

  /** Forget the stored credential. Returns the new status. */
  async logout(): Promise<IAuthStatus> {
    const body = await this.request('auth/logout', {
      method: 'POST',
      body: '{}'
    });
    return isAuthStatus(body) ? parseAuthStatus(body) : this.authStatus();
  }

  /**
   * Send a request to `mantik/api/<endpoint>` and return the parsed JSON body
   * (or `null` for an empty body).
   *
   * @throws MantikApiError on network failures and non-2xx answers.
   */
  async request(endpoint: string, init: RequestInit = {}): Promise<unknown> {
    const url = URLExt.join(
      this.serverSettings.baseUrl,
      API_NAMESPACE,
      endpoint
    );
    const headers = new Headers(init.headers ?? undefined);
    if (init.body !== undefined && !headers.has('Content-Type')) {
      headers.set('Content-Type', 'application/json');
    }
    const response = await this._send(url, { ...init, headers });

    const text = await response.text();
    let data: unknown = null;
    let parsed = true;
    if (text.length > 0) {
      try {
        data = JSON.parse(text);
      } catch {
        parsed = false;
      }
    }

    if (!response.ok) {
      throw errorFromResponse(response, parsed ? data : null, text);
    }
    if (!parsed) {
      throw new MantikApiError(
        `Invalid JSON in the answer from ${endpoint}`,
        'invalid_response',
        response.status
      );
    }
    return data;
  }

  /**
   * `fetch` through Jupyter's connection (auth, XSRF).
   *
   * @throws MantikApiError (network_error) when the server cannot be reached.
   */
  private async _send(url: string, init: RequestInit): Promise<Response> {
    try {
      return await ServerConnection.makeRequest(url, init, this.serverSettings);
    } catch (error) {
      const detail = error instanceof Error ? error.message : String(error);
      throw new MantikApiError(
        `Cannot reach the Jupyter server: ${detail}`,
        NETWORK_ERROR_REASON,
        0
      );
    }
  }
}

function invalid(what: string): MantikApiError {
  return new MantikApiError(
    `Unexpected answer from ${what}`,
    'invalid_response',
    200
  );
}

function errorFromResponse(
  response: Response,
  data: unknown,
  text: string
): MantikApiError {
  let message = '';
  let reason = '';
  if (isRecord(data)) {
    if (typeof data.message === 'string') {
      message = data.message;
    }
    if (typeof data.reason === 'string') {
      reason = data.reason;
    }
  }
  if (!message) {
    // Not one of our JSON errors (e.g. an HTML page from a proxy).
    const snippet = text.trim().slice(0, 200);
    message =
      snippet && data === null && !snippet.startsWith('<')
        ? snippet
        : `${response.status} ${response.statusText || 'Error'}`.trim();
  }
  return new MantikApiError(
    message,
    reason || response.statusText || 'error',
    response.status
  );
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** Whether `value` looks like an `IAuthStatus`. */
export function isAuthStatus(value: unknown): value is IAuthStatus {
  return (
    isRecord(value) &&
    typeof value.tracking_uri === 'string' &&
    typeof value.logged_in === 'boolean' &&
    typeof value.embedded === 'boolean' &&
    (value.username === null ||
      value.username === undefined ||
      typeof value.username === 'string') &&
    (value.ready === undefined || typeof value.ready === 'boolean') &&
    (value.message === undefined || typeof value.message === 'string')
  );
}

/**
 * Validate the body of `auth/status`.
 *
 * @throws MantikApiError if the body has the wrong shape.
 */
export function parseAuthStatus(value: unknown): IAuthStatus {
  if (!isAuthStatus(value)) {
    throw new MantikApiError(
      'Unexpected answer from auth/status',
      'invalid_response',
      200
    );
  }
  return {
    tracking_uri: value.tracking_uri,
    username: value.username ?? null,
    logged_in: value.logged_in,
    embedded: value.embedded,
    ready: value.ready ?? true,
    ...(value.message !== undefined ? { message: value.message } : {})
  };
}

/** Run states (`RunState` in docs/openapi.yaml). */
export type RunState =
  | 'SUBMITTING'
  | 'QUEUED'
  | 'RUNNING'
  | 'FINISHED'
  | 'FAILED'
  | 'KILLED'
  | 'UNKNOWN';

/** States after which a run never changes again. */
export const FINAL_STATES: ReadonlySet<string> = new Set([
  'FINISHED',
  'FAILED',
  'KILLED'
]);

/** A run as `GET runs` / `GET runs/{ref}` describe it. */
export interface IRun {
  run_id: string;
  run_name: string | null;
  experiment_id: string;
  state: RunState | string;
  is_final: boolean;
  mlflow_status: string;
  backend: string | null;
  job_id: string | null;
  entry_point: string | null;
  source: string | null;
  /** ms since the epoch */
  start_time: number | null;
  end_time: number | null;
  /**
   * When the job's latest attempt started running (ms since the epoch); `start_time` is
   * the submission. null while it waits (again), for a run that never ran, and for runs
   * recorded before the server kept it.
   */
  running_since: number | null;
  params: Record<string, string>;
  metrics: Record<string, number>;
  tags: Record<string, string>;
  reason: string | null;
  exit_code: number | null;
  user: string | null;
  warnings: string[];
  /**
   * Why this installation does not follow the run (submitted elsewhere: its binding does
   * not verify), the message its log, files, downloads and cancel answer 403 with; null
   * when it is followed.
   */
  not_followed: string | null;
  /**
   * The link that opens the run's page in the MLflow UI, as the server makes it for every
   * face (in a lab: through its MLflow proxy); null from a server that does not send it.
   */
  mlflow_url: string | null;
}

export interface IRunList {
  runs: IRun[];
  next_page_token: string | null;
}

export interface IRunQuery {
  /** A run state, or `active` / `final`. */
  state?: string;
  /** Runs of this experiment only (wins over `experimentName`). */
  experimentId?: string;
  experimentName?: string;
  maxResults?: number;
  pageToken?: string;
  refresh?: boolean;
}

/** Body of `POST runs`. */
export interface ISubmitRequest {
  project_dir: string;
  backend_config?: string;
  entry_point?: string;
  params?: Record<string, string>;
  experiment_name?: string;
  experiment_id?: string;
  run_name?: string;
  source?: 'lab' | 'notebook' | 'cli' | 'api';
}

/** An experiment as `GET experiments` lists it. */
export interface IExperiment {
  experiment_id: string;
  name: string;
}

export interface ILogChunk {
  text: string;
  offset: number;
  final: boolean;
}

export interface IFileEntry {
  path: string;
  size: number;
  is_dir: boolean;
}

export interface IParameterSpec {
  name: string;
  type: string;
  /** null when the parameter is required */
  default: string | null;
  required: boolean;
}

export interface IConfigCheck {
  ok: boolean;
  backend?: string;
  error: string | null;
  warnings: string[];
}

/** `GET projects?path=` */
export interface IProject {
  project_dir: string;
  name: string;
  entry_points: Record<
    string,
    { command?: string; parameters: IParameterSpec[] }
  >;
  config_files: string[];
  config_checks: Record<string, IConfigCheck>;
  default_config: string | null;
}

function stringRecord(value: unknown): Record<string, string> {
  const out: Record<string, string> = {};
  if (isRecord(value)) {
    for (const [key, v] of Object.entries(value)) {
      if (typeof v === 'string') {
        out[key] = v;
      } else if (typeof v === 'number' || typeof v === 'boolean') {
        out[key] = String(v);
      }
    }
  }
  return out;
}

// Values that are not finite come as MLflow writes them in JSON.
const NON_FINITE = new Map<string, number>([
  ['NaN', NaN],
  ['Infinity', Infinity],
  ['-Infinity', -Infinity]
]);

function numberRecord(value: unknown): Record<string, number> {
  const out: Record<string, number> = {};
  if (isRecord(value)) {
    for (const [key, v] of Object.entries(value)) {
      if (typeof v === 'number') {
        out[key] = v;
      } else if (typeof v === 'string' && NON_FINITE.has(v)) {
        out[key] = NON_FINITE.get(v) as number;
      }
    }
  }
  return out;
}

function strOrNull(value: unknown): string | null {
  return typeof value === 'string' ? value : null;
}

function numOrNull(value: unknown): number | null {
  return typeof value === 'number' && Number.isFinite(value) ? value : null;
}

/**
 * Validate one run of the API.
 *
 * @throws MantikApiError if required fields are missing.
 */
export function parseRun(value: unknown): IRun {
  if (
    !isRecord(value) ||
    typeof value.run_id !== 'string' ||
    typeof value.state !== 'string'
  ) {
    throw invalid('runs');
  }
  const state = value.state;
  return {
    run_id: value.run_id,
    run_name: strOrNull(value.run_name),
    experiment_id:
      typeof value.experiment_id === 'string' ||
      typeof value.experiment_id === 'number'
        ? String(value.experiment_id)
        : '',
    state,
    is_final:
      typeof value.is_final === 'boolean'
        ? value.is_final
        : FINAL_STATES.has(state),
    mlflow_status: typeof value.mlflow_status === 'string' ? value.mlflow_status : '',
    backend: strOrNull(value.backend),
    job_id: strOrNull(value.job_id),
    entry_point: strOrNull(value.entry_point),
    source: strOrNull(value.source),
    start_time: numOrNull(value.start_time),
    end_time: numOrNull(value.end_time),
    running_since: numOrNull(value.running_since),
    params: stringRecord(value.params),
    metrics: numberRecord(value.metrics),
    tags: stringRecord(value.tags),
    reason: strOrNull(value.reason),
    exit_code: numOrNull(value.exit_code),
    user: strOrNull(value.user),
    warnings: Array.isArray(value.warnings)
      ? value.warnings.filter((w): w is string => typeof w === 'string')
      : [],
    not_followed: strOrNull(value.not_followed),
    mlflow_url: strOrNull(value.mlflow_url)
  };
}

function isExperiment(
  value: unknown
): value is { experiment_id: string | number; name: string } {
  return (
    isRecord(value) &&
    (typeof value.experiment_id === 'string' || typeof value.experiment_id === 'number') &&
    typeof value.name === 'string'
  );
}

function isFileEntry(value: unknown): value is IFileEntry {
  return (
    isRecord(value) &&
    typeof value.path === 'string' &&
    typeof value.size === 'number' &&
    typeof value.is_dir === 'boolean'
  );
}

function parseParameter(value: unknown): IParameterSpec | null {
  if (!isRecord(value) || typeof value.name !== 'string') {
    return null;
  }
  const def =
    typeof value.default === 'string' || typeof value.default === 'number'
      ? String(value.default)
      : null;
  return {
    name: value.name,
    type: typeof value.type === 'string' ? value.type : 'string',
    default: def,
    required: typeof value.required === 'boolean' ? value.required : def === null
  };
}

/**
 * Validate the body of `GET projects`.
 *
 * @throws MantikApiError if the body has the wrong shape.
 */
export function parseProject(value: unknown): IProject {
  if (
    !isRecord(value) ||
    typeof value.project_dir !== 'string' ||
    !isRecord(value.entry_points)
  ) {
    throw invalid('projects');
  }
  const entryPoints: IProject['entry_points'] = {};
  for (const [name, ep] of Object.entries(value.entry_points)) {
    const params = isRecord(ep) && Array.isArray(ep.parameters) ? ep.parameters : [];
    entryPoints[name] = {
      command: isRecord(ep) && typeof ep.command === 'string' ? ep.command : undefined,
      parameters: params
        .map(parseParameter)
        .filter((p): p is IParameterSpec => p !== null)
    };
  }
  const checks: Record<string, IConfigCheck> = {};
  if (isRecord(value.config_checks)) {
    for (const [name, check] of Object.entries(value.config_checks)) {
      if (isRecord(check) && typeof check.ok === 'boolean') {
        checks[name] = {
          ok: check.ok,
          backend: typeof check.backend === 'string' ? check.backend : undefined,
          error: strOrNull(check.error),
          warnings: Array.isArray(check.warnings)
            ? check.warnings.filter((w): w is string => typeof w === 'string')
            : []
        };
      }
    }
  }
  return {
    project_dir: value.project_dir,
    name: typeof value.name === 'string' ? value.name : value.project_dir,
    entry_points: entryPoints,
    config_files: Array.isArray(value.config_files)
      ? value.config_files.filter((f): f is string => typeof f === 'string')
      : [],
    config_checks: checks,
    default_config: strOrNull(value.default_config)
  };
}
