import { ServerConnection } from '@jupyterlab/services';
import { describe, expect, it } from 'vitest';

import {
  isAuthStatus,
  MantikApi,
  MantikApiError,
  NETWORK_ERROR_REASON,
  parseAuthStatus
} from '../src/api';

interface IRecorded {
  url: string;
  method: string;
  body: string;
  headers: Headers;
}

/** A fake `fetch` answering from a queue and recording the requests. */
function fakeServer(...answers: Array<Response | Error>) {
  const requests: IRecorded[] = [];
  const fetchFn = async (input: RequestInfo | URL): Promise<Response> => {
    const request = input as Request;
    requests.push({
      // makeRequest may add a cache-busting query: compare the path only.
      url: new URL(request.url).origin + new URL(request.url).pathname,
      method: request.method,
      body: await request.text(),
      headers: request.headers
    });
    const next = answers.shift();
    if (next === undefined) {
      throw new Error('unexpected request');
    }
    if (next instanceof Error) {
      throw next;
    }
    return next;
  };
  const serverSettings = ServerConnection.makeSettings({
    baseUrl: 'http://127.0.0.1:8888/lab-under-test/',
    wsUrl: 'ws://127.0.0.1:8888/lab-under-test/',
    token: 'secret-token',
    fetch: fetchFn as typeof fetch,
    Request,
    Headers
  });
  return { api: new MantikApi({ serverSettings }), requests };
}

function json(body: unknown, status = 200, statusText = 'OK'): Response {
  return new Response(JSON.stringify(body), {
    status,
    statusText,
    headers: { 'Content-Type': 'application/json' }
  });
}

const EMBEDDED = {
  tracking_uri: 'http://127.0.0.1:5123',
  username: 'jovyan',
  logged_in: true,
  embedded: true
};

const REMOTE_OUT = {
  tracking_uri: 'https://mlflow.example.org',
  username: null,
  logged_in: false,
  embedded: false
};

describe('MantikApi', () => {
  it('reads auth/status below the base URL with Jupyter auth', async () => {
    const { api, requests } = fakeServer(json(EMBEDDED));
    const status = await api.authStatus();
    expect(status).toEqual({ ...EMBEDDED, ready: true });
    expect(requests).toHaveLength(1);
    expect(requests[0].method).toBe('GET');
    expect(requests[0].url).toBe(
      'http://127.0.0.1:8888/lab-under-test/mantik/api/auth/status'
    );
    expect(requests[0].headers.get('Authorization')).toBe(
      'token secret-token'
    );
  });

  it('builds the MLflow proxy URL from the base URL', () => {
    const { api } = fakeServer();
    expect(api.mlflowUrl).toBe(
      'http://127.0.0.1:8888/lab-under-test/mantik/mlflow/'
    );
  });

  it('posts username/password as JSON and returns the new status', async () => {
    const loggedIn = {
      ...REMOTE_OUT,
      username: 'ada',
      logged_in: true,
      ready: true
    };
    const { api, requests } = fakeServer(json(loggedIn));
    const status = await api.login({ username: 'ada', password: 'pw' });
    expect(status).toEqual(loggedIn);
    expect(requests[0].method).toBe('POST');
    expect(requests[0].url).toMatch(/\/lab-under-test\/mantik\/api\/auth\/login$/);
    expect(requests[0].headers.get('Content-Type')).toBe('application/json');
    expect(JSON.parse(requests[0].body)).toEqual({
      username: 'ada',
      password: 'pw'
    });
  });

  it('posts a token and fetches the status when login answers without one', async () => {
    const loggedIn = {
      ...REMOTE_OUT,
      username: 'ada',
      logged_in: true,
      ready: true
    };
    const { api, requests } = fakeServer(
      new Response(null, { status: 204 }),
      json(loggedIn)
    );
    const status = await api.login({ token: 'tok' });
    expect(status).toEqual(loggedIn);
    expect(JSON.parse(requests[0].body)).toEqual({ token: 'tok' });
    expect(requests[1].url).toMatch(/auth\/status$/);
  });

  it('logs out with a POST', async () => {
    const { api, requests } = fakeServer(json(REMOTE_OUT));
    const status = await api.logout();
    expect(status.logged_in).toBe(false);
    expect(requests[0].method).toBe('POST');
    expect(requests[0].url).toMatch(/auth\/logout$/);
  });

  it('turns a JSON error into MantikApiError with message, reason and status', async () => {
    const { api } = fakeServer(
      json(
        { message: 'Wrong user name or password', reason: 'unauthorized' },
        401,
        'Unauthorized'
      )
    );
    const error = await api
      .login({ username: 'ada', password: 'bad' })
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(MantikApiError);
    const apiError = error as MantikApiError;
    expect(apiError.message).toBe('Wrong user name or password');
    expect(apiError.reason).toBe('unauthorized');
    expect(apiError.status).toBe(401);
    expect(apiError.isUnauthorized).toBe(true);
  });

  it('reports a non-JSON error page by its status', async () => {
    const { api } = fakeServer(
      new Response('<html>Bad Gateway</html>', {
        status: 502,
        statusText: 'Bad Gateway'
      })
    );
    const error = (await api.authStatus().catch(e => e)) as MantikApiError;
    expect(error).toBeInstanceOf(MantikApiError);
    expect(error.status).toBe(502);
    expect(error.message).toBe('502 Bad Gateway');
  });

  it('reports a network failure with status 0', async () => {
    const { api } = fakeServer(new TypeError('Failed to fetch'));
    const error = (await api.authStatus().catch(e => e)) as MantikApiError;
    expect(error).toBeInstanceOf(MantikApiError);
    expect(error.status).toBe(0);
    expect(error.reason).toBe(NETWORK_ERROR_REASON);
    expect(error.message).toContain('Failed to fetch');
  });

  it('rejects a status body of the wrong shape', async () => {
    const { api } = fakeServer(json({ tracking_uri: 1 }));
    await expect(api.authStatus()).rejects.toBeInstanceOf(MantikApiError);
  });

  it('rejects a 200 answer that is not JSON', async () => {
    const { api } = fakeServer(new Response('not json', { status: 200 }));
    const error = (await api.authStatus().catch(e => e)) as MantikApiError;
    expect(error.reason).toBe('invalid_response');
  });
});

describe('auth status validation', () => {
  it('accepts a missing username as null', () => {
    const { username: _ignored, ...rest } = REMOTE_OUT;
    expect(isAuthStatus(rest)).toBe(true);
    expect(parseAuthStatus(rest).username).toBeNull();
  });

  it('keeps ready=false while the embedded server starts', () => {
    expect(parseAuthStatus({ ...EMBEDDED, ready: false }).ready).toBe(false);
  });

  it('rejects arrays and wrong types', () => {
    expect(isAuthStatus([])).toBe(false);
    expect(isAuthStatus({ ...EMBEDDED, logged_in: 'yes' })).toBe(false);
  });
});
