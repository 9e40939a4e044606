/**
 * The "Mantik" left-sidebar panel: tracking connection, login/logout and a
 * shortcut to the embedded MLflow UI.
 */
import {
  Button,
  InputGroup,
  ReactWidget,
  refreshIcon
} from '@jupyterlab/ui-components';
import { IStateDB } from '@jupyterlab/statedb';
import { Message } from '@lumino/messaging';
import React, { useCallback, useEffect, useId, useRef, useState } from 'react';

import {
  IAuthStatus,
  IRun,
  LoginCredentials,
  MantikApi,
  MantikApiError
} from './api';
import { mantikIcon } from './icons';
import { RunsSection } from './runs';
import { RunsModel } from './state';

/** Poll interval (seconds) while the embedded tracking server is starting. */
const STARTING_POLL_INTERVAL = 2;

/** Frames to wait for the content of a panel just shown before giving up focusing it. */
const FOCUS_FRAMES = 30;

/** Id of the sidebar widget. */
export const PANEL_ID = 'mantik-sidebar';

/** User-facing text of an error of any kind. */
export function errorMessage(error: unknown): string {
  if (error instanceof MantikApiError) {
    return error.message;
  }
  if (error instanceof Error) {
    return error.message;
  }
  return String(error);
}

/** Options of the sidebar panel. */
export interface IMantikPanelOptions {
  api: MantikApi;
  /** Run the "open MLflow" command (at a run's page when given one). */
  onOpenMlflow: (run?: IRun) => void;
  /** Run the "submit" command. */
  onSubmit: () => void;
  /** Ask the user to confirm cancelling a run. */
  confirmCancel: (run: IRun) => Promise<boolean>;
  /** Status poll interval in seconds (0: no polling). */
  pollInterval?: number;
  /**
   * Resolves once the lab restored its layout (`app.restored`): an activation before
   * then is the restore's, not the user's, and leaves the focus where it is.
   */
  restored?: Promise<unknown>;
  /** Where the runs list's experiment is kept across reloads of the lab. */
  state?: IStateDB;
}

/** Key of the runs list's filters in the lab's state database. */
const FILTER_STATE_KEY = 'mantik-jupyter:runs-filter';

/**
 * The sidebar widget. Lumino owns visibility; React owns the content.
 * Polling runs only while the panel is visible.
 */
export class MantikPanel extends ReactWidget {
  constructor(options: IMantikPanelOptions) {
    super();
    this._api = options.api;
    this._onOpenMlflow = options.onOpenMlflow;
    this._onSubmit = options.onSubmit;
    this._confirmCancel = options.confirmCancel;
    this._pollInterval = options.pollInterval ?? 5;
    if (options.restored) {
      this._restored = false;
      void options.restored.then(() => {
        this._restored = true;
      });
    }
    this.runs = new RunsModel({
      fetchRuns: async (refresh, limit, experimentId) => {
        const page = await this._api.listRuns({
          maxResults: limit,
          refresh,
          experimentId: experimentId || undefined
        });
        return { runs: page.runs, more: page.next_page_token !== null };
      },
      fetchExperiments: () => this._api.listExperiments(),
      interval: this._pollInterval * 1000,
      visible: false,
      describeError: errorMessage
    });
    if (options.state) {
      this._keepFilter(options.state);
    }
    this.id = PANEL_ID;
    this.addClass('mantik-Panel');
    this.node.dataset.testid = 'mantik-sidebar';
    this.title.icon = mantikIcon;
    this.title.caption = 'Mantik';
  }

  /** Status poll interval in seconds; 0 disables polling. */
  get pollInterval(): number {
    return this._pollInterval;
  }
  set pollInterval(value: number) {
    const seconds = Number.isFinite(value) && value > 0 ? value : 0;
    if (seconds !== this._pollInterval) {
      this._pollInterval = seconds;
      this.runs.setInterval(seconds * 1000);
      this.update();
    }
  }

  /** The runs list (polled with backoff while this panel is visible). */
  readonly runs: RunsModel;

  /** Show a run (e.g. just submitted) at the top of the list. */
  addRun(run: IRun): void {
    this.runs.upsert(run, true);
  }

  /** Ask the content to reload the status and the runs now. */
  refresh(): void {
    this._refreshToken++;
    void this.runs.refresh();
    this.update();
  }

  /** The experiment chosen is the one the list shows after the lab is reloaded. */
  private _keepFilter(state: IStateDB): void {
    let saved: string | null = null;
    void state
      .fetch(FILTER_STATE_KEY)
      .then(value => {
        const experiment =
          value !== null && typeof value === 'object'
            ? (value as { experiment?: unknown }).experiment
            : undefined;
        saved = typeof experiment === 'string' ? experiment : '';
        if (saved !== '' && this.runs.snapshot.experiment === '') {
          void this.runs.setExperiment(saved);
        }
      })
      .catch(reason => {
        console.warn('mantik-jupyter: the runs filter of the last session is lost', reason);
      });
    this.runs.subscribe(() => {
      const experiment = this.runs.snapshot.experiment;
      if (saved !== null && experiment !== saved) {
        saved = experiment;
        void state.save(FILTER_STATE_KEY, { experiment });
      }
    });
  }

  dispose(): void {
    this.runs.dispose();
    super.dispose();
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this.runs.setVisible(true);
    // The login may have changed while hidden (a notebook's %mantik_login, `mantik
    // logout`): look now, as the runs list does, not at the next status poll.
    this._refreshToken++;
    this.update();
  }

  /**
   * Move the keyboard focus into the panel, as JupyterLab's file browser does when it is
   * opened: to the runs list's current row, else Submit…. Else a keyboard user who opened
   * the panel from the palette is left in the notebook, many Tab presses away.
   */
  focusContent(): void {
    let frames = 0;
    const attempt = () => {
      if (this.isDisposed || !this.isVisible || this.node.contains(document.activeElement)) {
        return;
      }
      const target =
        this.node.querySelector<HTMLElement>('.mantik-run-row[tabindex="0"]') ??
        this.node.querySelector<HTMLElement>('[data-testid="mantik-submit-open"]') ??
        this.node.querySelector<HTMLElement>('button, input, select');
      if (target) {
        target.focus();
      } else if (++frames < FOCUS_FRAMES) {
        // A panel shown for the first time renders its content a few frames later.
        window.requestAnimationFrame(attempt);
      }
    };
    window.requestAnimationFrame(attempt);
  }

  /**
   * Activated: a click on its tab or a key press takes the focus into the panel. The lab
   * also activates a panel it restores open at start-up (and the submit dialog after it
   * closes, when its row takes the focus itself); the focus belongs then to the launcher
   * or the notebook the user opened, and taking it left them typing into the sidebar.
   */
  protected onActivateRequest(msg: Message): void {
    super.onActivateRequest(msg);
    if (this._restored && navigator.userActivation?.isActive !== false) {
      this.focusContent();
    }
  }

  protected onAfterHide(msg: Message): void {
    super.onAfterHide(msg);
    this.runs.setVisible(false);
    this.update();
  }

  protected render(): JSX.Element {
    return (
      <MantikPanelComponent
        api={this._api}
        onOpenMlflow={this._onOpenMlflow}
        pollInterval={
          this.isVisible && this._pollInterval > 0 ? Math.max(this._pollInterval, 10) : 0
        }
        refreshToken={this._refreshToken}
        onIdentityChange={this._onIdentityChange}
      >
        <RunsSection
          api={this._api}
          model={this.runs}
          visible={this.isVisible}
          onOpenMlflow={this._onOpenMlflow}
          onSubmit={this._onSubmit}
          confirmCancel={this._confirmCancel}
        />
      </MantikPanelComponent>
    );
  }

  private _api: MantikApi;
  private _onOpenMlflow: (run?: IRun) => void;
  private _onSubmit: () => void;
  private _confirmCancel: (run: IRun) => Promise<boolean>;
  private _pollInterval: number;
  private _refreshToken = 0;
  private _restored = true;
  private _onIdentityChange = (): void => {
    void this.runs.reset();
  };
}

interface IPanelProps {
  api: MantikApi;
  onOpenMlflow: (run?: IRun) => void;
  /** The runs section, shown below the tracking connection. */
  children?: React.ReactNode;
  /** Seconds between status polls; 0 pauses polling. */
  pollInterval: number;
  /** Changing this number reloads the status. */
  refreshToken: number;
  /** Called after a login or logout went through. */
  onIdentityChange?: () => void;
}

/** The panel's content. */
export function MantikPanelComponent(props: IPanelProps): JSX.Element {
  const { api, onOpenMlflow, onIdentityChange, pollInterval, refreshToken, children } = props;
  const [status, setStatus] = useState<IAuthStatus | null>(null);
  const [statusError, setStatusError] = useState<string | null>(null);
  const [loading, setLoading] = useState(true);
  const [busy, setBusy] = useState(false);
  const [actionError, setActionError] = useState<string | null>(null);
  const mounted = useRef(true);
  const inFlight = useRef(false);
  // Grows with each login/logout: a status asked for before one is out of date.
  const epoch = useRef(0);

  useEffect(() => {
    mounted.current = true;
    return () => {
      mounted.current = false;
    };
  }, []);

  const loadStatus = useCallback(async () => {
    if (inFlight.current) {
      return;
    }
    inFlight.current = true;
    const asked = epoch.current;
    try {
      const next = await api.authStatus();
      if (mounted.current && asked === epoch.current) {
        setStatus(next);
        setStatusError(null);
      }
    } catch (error) {
      if (mounted.current && asked === epoch.current) {
        setStatusError(errorMessage(error));
      }
    } finally {
      inFlight.current = false;
      if (mounted.current) {
        setLoading(false);
      }
    }
  }, [api]);

  // Initial load and explicit refreshes.
  useEffect(() => {
    void loadStatus();
  }, [loadStatus, refreshToken]);

  // Polling while visible; faster while the embedded server is starting.
  const starting = status !== null && status.ready === false;
  const interval =
    pollInterval > 0 && starting
      ? Math.min(pollInterval, STARTING_POLL_INTERVAL)
      : pollInterval;
  useEffect(() => {
    if (interval <= 0) {
      return;
    }
    const timer = window.setInterval(() => {
      void loadStatus();
    }, interval * 1000);
    return () => window.clearInterval(timer);
  }, [loadStatus, interval]);

  const runAction = useCallback(
    async (action: () => Promise<IAuthStatus>): Promise<boolean> => {
      setBusy(true);
      setActionError(null);
      epoch.current++;
      try {
        const next = await action();
        epoch.current++;
        if (mounted.current) {
          setStatus(next);
          setStatusError(null);
          onIdentityChange?.();
        }
        return true;
      } catch (error) {
        if (mounted.current) {
          setActionError(errorMessage(error));
        }
        return false;
      } finally {
        if (mounted.current) {
          setBusy(false);
        }
      }
    },
    [onIdentityChange]
  );

  const onLogin = useCallback(
    (credentials: LoginCredentials) =>
      runAction(() => api.login(credentials)),
    [api, runAction]
  );
  const onLogout = useCallback(
    () => void runAction(() => api.logout()),
    [api, runAction]
  );

  return (
    <div className="mantik-PanelContent">
      <header className="mantik-Panel-header">
        <mantikIcon.react tag="span" className="mantik-Panel-logo" />
        <h2 className="mantik-Panel-title">Mantik</h2>
        <Button
          minimal
          small
          className="mantik-refresh"
          data-testid="mantik-refresh"
          title="Refresh status"
          aria-label="Refresh status"
          onClick={() => void loadStatus()}
          disabled={busy}
        >
          <refreshIcon.react tag="span" />
        </Button>
      </header>

      <section
        className="mantik-Section mantik-status"
        data-testid="mantik-status"
        aria-labelledby="mantik-status-heading"
        aria-busy={loading}
      >
        <h3 id="mantik-status-heading" className="mantik-Section-title">
          Tracking
        </h3>
        {loading && status === null && statusError === null ? (
          <p className="mantik-muted">Checking the tracking connection…</p>
        ) : null}
        {statusError !== null ? (
          <p
            className="mantik-error mantik-status-error"
            data-testid="mantik-status-error"
            role="alert"
          >
            {statusError}
          </p>
        ) : null}
        {status !== null ? <StatusView status={status} /> : null}
      </section>

      {status !== null && !status.embedded && !status.logged_in ? (
        <LoginForm busy={busy} onLogin={onLogin} />
      ) : null}

      {actionError !== null ? (
        <p
          className="mantik-error mantik-action-error"
          data-testid="mantik-action-error"
          role="alert"
        >
          {actionError}
        </p>
      ) : null}

      <section className="mantik-Section mantik-actions">
        <Button
          className="jp-mod-styled jp-mod-accept mantik-open-mlflow"
          data-testid="mantik-open-mlflow"
          onClick={() => onOpenMlflow()}
          title="Open the MLflow UI in a tab"
        >
          Open MLflow
        </Button>
        {status !== null && !status.embedded && status.logged_in ? (
          <Button
            className="jp-mod-styled jp-mod-reject mantik-logout"
            data-testid="mantik-logout"
            onClick={onLogout}
            disabled={busy}
          >
            Log out
          </Button>
        ) : null}
      </section>
      {children}
    </div>
  );
}

function StatusView(props: { status: IAuthStatus }): JSX.Element {
  const { status } = props;
  return (
    <dl className="mantik-StatusList">
      <dt>Server</dt>
      <dd className="mantik-tracking-uri" data-testid="mantik-tracking-uri">
        {status.embedded ? (
          <span title={status.tracking_uri}>Embedded tracking</span>
        ) : (
          <a href={status.tracking_uri} target="_blank" rel="noreferrer">
            {status.tracking_uri}
          </a>
        )}
      </dd>
      {status.ready === false ? (
        <>
          <dt>Server state</dt>
          <dd>
            <span
              className="mantik-chip mantik-chip-pending"
              data-testid="mantik-server-state"
            >
              Starting…
            </span>
          </dd>
        </>
      ) : null}
      <dt>User</dt>
      <dd className="mantik-username" data-testid="mantik-username">
        {status.username ?? <span className="mantik-muted">—</span>}
      </dd>
      <dt>State</dt>
      <dd>
        <span
          className={`mantik-chip ${
            status.logged_in ? 'mantik-chip-ok' : 'mantik-chip-warn'
          }`}
          data-testid="mantik-login-state"
          data-logged-in={status.logged_in ? 'true' : 'false'}
        >
          {status.logged_in ? 'Logged in' : 'Not logged in'}
        </span>
      </dd>
      {status.message !== undefined ? (
        <dd
          className="mantik-error mantik-status-message"
          data-testid="mantik-status-message"
          role="status"
        >
          {status.message}
        </dd>
      ) : null}
    </dl>
  );
}

type LoginMode = 'password' | 'token';

function LoginForm(props: {
  busy: boolean;
  onLogin: (credentials: LoginCredentials) => Promise<boolean>;
}): JSX.Element {
  const { busy, onLogin } = props;
  const [mode, setMode] = useState<LoginMode>('password');
  const [username, setUsername] = useState('');
  const [password, setPassword] = useState('');
  const [token, setToken] = useState('');
  const id = useId();
  // The secret's field, focused again after a refused login: the submit button is
  // disabled while the request is out, which drops the focus to the page.
  const secretInput = useRef<HTMLInputElement>(null);

  const canSubmit =
    !busy &&
    (mode === 'password'
      ? username.trim().length > 0 && password.length > 0
      : token.trim().length > 0);

  const submit = async (event: React.FormEvent<HTMLFormElement>) => {
    event.preventDefault();
    if (!canSubmit) {
      return;
    }
    const credentials: LoginCredentials =
      mode === 'password'
        ? { username: username.trim(), password }
        : { token: token.trim() };
    const ok = await onLogin(credentials);
    if (ok) {
      // Never keep secrets around longer than needed.
      setPassword('');
      setToken('');
    } else {
      secretInput.current?.focus();
      secretInput.current?.select();
    }
  };

  return (
    <form
      className="mantik-Section mantik-login-form"
      data-testid="mantik-login-form"
      aria-label="Log in to the tracking server"
      onSubmit={event => void submit(event)}
    >
      <h3 className="mantik-Section-title">Log in</h3>
      <fieldset className="mantik-login-mode">
        <legend>Authentication</legend>
        <label>
          <input
            type="radio"
            name={`${id}-mode`}
            value="password"
            checked={mode === 'password'}
            onChange={() => setMode('password')}
          />{' '}
          With password
        </label>
        <label>
          <input
            type="radio"
            name={`${id}-mode`}
            value="token"
            checked={mode === 'token'}
            onChange={() => setMode('token')}
          />{' '}
          With token
        </label>
      </fieldset>
      {mode === 'password' ? (
        <>
          <label className="mantik-Field" htmlFor={`${id}-username`}>
            Username
          </label>
          <InputGroup
            id={`${id}-username`}
            name="username"
            className="mantik-username-input"
            data-testid="mantik-username-input"
            autoComplete="username"
            value={username}
            onChange={event => setUsername(event.target.value)}
            readOnly={busy}
          />
          <label className="mantik-Field" htmlFor={`${id}-password`}>
            Password
          </label>
          <InputGroup
            id={`${id}-password`}
            name="password"
            type="password"
            className="mantik-password-input"
            data-testid="mantik-password-input"
            autoComplete="current-password"
            inputRef={secretInput}
            value={password}
            onChange={event => setPassword(event.target.value)}
            readOnly={busy}
          />
        </>
      ) : (
        <>
          <label className="mantik-Field" htmlFor={`${id}-token`}>
            Token
          </label>
          <InputGroup
            id={`${id}-token`}
            name="token"
            type="password"
            className="mantik-token-input"
            data-testid="mantik-token-input"
            autoComplete="off"
            inputRef={secretInput}
            value={token}
            onChange={event => setToken(event.target.value)}
            readOnly={busy}
          />
        </>
      )}
      <Button
        type="submit"
        className="jp-mod-styled jp-mod-accept mantik-login-submit"
        data-testid="mantik-login-submit"
        disabled={!canSubmit}
      >
        {busy ? 'Logging in…' : 'Log in'}
      </Button>
    </form>
  );
}
