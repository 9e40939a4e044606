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
    let response: Response;
    try {
      response = await ServerConnection.makeRequest(
        url,
        { ...init, headers },
        this.serverSettings
      );
    } catch (error) {
      const detail = error instanceof Error ? error.message : String(error);
      throw new MantikApiError(
        `Cannot reach the Jupyter server: ${detail}`,
        NETWORK_ERROR_REASON,
        0
      );
    }

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
    (value.ready === undefined || typeof value.ready === 'boolean')
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
    ready: value.ready ?? true
  };
}
