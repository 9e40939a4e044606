import { ServerConnection } from '@jupyterlab/services';
import { describe, expect, it } from 'vitest';

import {
  isAuthStatus,
  MantikApi,
  MantikApiError,
  NETWORK_ERROR_REASON,
  parseAuthStatus,
  parseRun
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

  it('keeps the message of a refused credential', () => {
    const refused = { ...REMOTE_OUT, logged_in: false, message: 'refused' };
    expect(parseAuthStatus(refused).message).toBe('refused');
    expect('message' in parseAuthStatus(REMOTE_OUT)).toBe(false);
    expect(isAuthStatus({ ...REMOTE_OUT, message: 3 })).toBe(false);
  });

  it('rejects arrays and wrong types', () => {
    expect(isAuthStatus([])).toBe(false);
    expect(isAuthStatus({ ...EMBEDDED, logged_in: 'yes' })).toBe(false);
  });
});

describe('MantikApi runs and projects', () => {
  const RUN = {
    run_id: 'abc123',
    run_name: 'e2e',
    experiment_id: '7',
    state: 'RUNNING',
    is_final: false,
    mlflow_status: 'RUNNING',
    backend: 'local',
    job_id: '42',
    entry_point: 'main',
    source: 'lab',
    start_time: 1,
    end_time: null,
    running_since: 5,
    params: { epochs: '2' },
    metrics: { rmse: 0.5 },
    tags: {},
    reason: null,
    exit_code: null,
    user: 'ada',
    warnings: [],
    not_followed: null,
    mlflow_url: '/lab-under-test/mantik/mlflow/#/experiments/7/runs/abc123'
  };

  it('reads the link to the run in MLflow that the server gives', () => {
    expect(parseRun(RUN).mlflow_url).toBe(RUN.mlflow_url);
    const { mlflow_url: _, ...older } = RUN;
    expect(parseRun(older).mlflow_url).toBeNull();
  });

  it('opens only pages of the lab\'s MLflow proxy in the MLflow tab', () => {
    const { api } = fakeServer();
    expect(api.isMlflowPage('http://127.0.0.1:8888/lab-under-test/mantik/mlflow/#/x')).toBe(true);
    expect(api.isMlflowPage('http://127.0.0.1:8888/lab-under-test/mantik/api/runs')).toBe(false);
    expect(api.isMlflowPage('https://evil.example/lab-under-test/mantik/mlflow/')).toBe(false);
    expect(api.isMlflowPage('javascript:alert(1)')).toBe(false);
  });

  it('reads why a run is not followed here', () => {
    const why = 'Run abc123 was submitted from another mantik installation';
    expect(parseRun({ ...RUN, not_followed: why }).not_followed).toBe(why);
    const { not_followed: _, ...older } = RUN;
    expect(parseRun(older).not_followed).toBeNull();
    // A server before running_since: the run shows its time since submission.
    const { running_since: __, ...before } = RUN;
    expect(parseRun(before).running_since).toBeNull();
  });

  it('reads metrics that are not finite as the server spells them', () => {
    const metrics = { loss: 'NaN', grad: 'Infinity', low: '-Infinity', rmse: 0.5, bad: 'x' };
    expect(parseRun({ ...RUN, metrics }).metrics).toEqual({
      loss: NaN,
      grad: Infinity,
      low: -Infinity,
      rmse: 0.5
    });
    expect(parseRun({ ...RUN, metrics: { loss: 'toString' } }).metrics).toEqual({});
  });

  it('lists runs with query parameters', async () => {
    const { api, requests } = fakeServer(json({ runs: [RUN], next_page_token: null }));
    const list = await api.listRuns({ maxResults: 100, refresh: true, state: 'active' });
    expect(list.runs[0]).toEqual(RUN);
    expect(list.next_page_token).toBeNull();
    expect(requests[0].url).toMatch(/\/lab-under-test\/mantik\/api\/runs$/);
  });

  it('lists the runs of one experiment, and the experiments by name', async () => {
    const seen: string[] = [];
    const { api } = fakeServer(
      json({ runs: [RUN], next_page_token: null }),
      json({ experiments: [{ experiment_id: 7, name: 'study-a' }, { name: 'no id' }] })
    );
    const fetchFn = api.serverSettings.fetch;
    (api.serverSettings as { fetch: typeof fetch }).fetch = (input, init) => {
      seen.push(new URL((input as Request).url).search);
      return fetchFn(input, init);
    };
    await api.listRuns({ experimentId: '7', experimentName: 'ignored' });
    expect(seen[0]).toContain('experiment_id=7');
    expect(seen[0]).not.toContain('experiment_name');
    expect(await api.listExperiments()).toEqual([{ experiment_id: '7', name: 'study-a' }]);
  });

  it('submits a run as JSON and parses the 201 answer', async () => {
    const { api, requests } = fakeServer(json(RUN, 201, 'Created'));
    const run = await api.submitRun({
      project_dir: 'weather-forecast',
      backend_config: 'compute-backend-config.yaml',
      entry_point: 'main',
      params: { epochs: '2' },
      source: 'lab'
    });
    expect(run.run_id).toBe('abc123');
    expect(requests[0].method).toBe('POST');
    expect(JSON.parse(requests[0].body)).toMatchObject({
      project_dir: 'weather-forecast',
      params: { epochs: '2' }
    });
  });

  it('surfaces a config error of a submission with its reason', async () => {
    const { api } = fakeServer(
      json({ message: "x.yaml, line 4: unknown key 'Nodez' (did you mean 'Nodes'?)", reason: 'invalid_config' }, 400, 'Bad Request')
    );
    const error = (await api
      .submitRun({ project_dir: 'p' })
      .catch(e => e)) as MantikApiError;
    expect(error.reason).toBe('invalid_config');
    expect(error.message).toContain('Nodez');
  });

  it('cancels, reads logs from an offset, lists files, builds download URLs', async () => {
    const { api, requests } = fakeServer(
      json({ ...RUN, state: 'KILLED', is_final: true }),
      json({ text: 'epoch 1\n', offset: 8, final: false }),
      json({ files: [{ path: 'mantik.log', size: 8, is_dir: false }] })
    );
    expect((await api.cancelRun('abc123')).state).toBe('KILLED');
    expect(requests[0].method).toBe('POST');
    expect(requests[0].url).toMatch(/runs\/abc123\/cancel$/);
    expect(await api.runLogs('abc123', 8)).toEqual({
      text: 'epoch 1\n',
      offset: 8,
      final: false
    });
    expect(requests[1].url).toMatch(/runs\/abc123\/logs$/);
    expect(await api.runFiles('abc123')).toEqual([
      { path: 'mantik.log', size: 8, is_dir: false }
    ]);
    expect(api.downloadUrl('abc123', 'out/a b.csv')).toBe(
      'http://127.0.0.1:8888/lab-under-test/mantik/api/runs/abc123/download?path=out%2Fa%20b.csv'
    );
    // A folder (here the whole run) downloads from the same route, as one zip.
    expect(api.downloadUrl('abc123', '')).toBe(
      'http://127.0.0.1:8888/lab-under-test/mantik/api/runs/abc123/download?path='
    );
  });

  it('describes a project', async () => {
    const { api, requests } = fakeServer(
      json({
        project_dir: 'work/weather-forecast',
        name: 'weather-forecast',
        entry_points: {
          main: {
            command: 'python train.py',
            parameters: [
              { name: 'epochs', type: 'int', default: '5', required: false },
              { name: 'data', type: 'path', default: null, required: true }
            ]
          }
        },
        config_files: ['compute-backend-config.yaml'],
        config_checks: {
          'compute-backend-config.yaml': { ok: true, backend: 'local', error: null, warnings: [] }
        },
        default_config: 'compute-backend-config.yaml'
      })
    );
    const project = await api.describeProject('work/weather-forecast/x.ipynb');
    expect(requests[0].url).toMatch(/mantik\/api\/projects$/);
    expect(project.entry_points.main.parameters[1]).toEqual({
      name: 'data',
      type: 'path',
      default: null,
      required: true
    });
    expect(project.config_checks['compute-backend-config.yaml'].backend).toBe('local');
  });

  it('rejects malformed run and project bodies', async () => {
    const { api } = fakeServer(json({ runs: 'nope' }), json({ name: 1 }));
    await expect(api.listRuns()).rejects.toBeInstanceOf(MantikApiError);
    await expect(api.describeProject('x')).rejects.toBeInstanceOf(MantikApiError);
  });
});

describe('MantikApi.downloadProblem', () => {
  it('is null for a file the server streams, without reading the body', async () => {
    let pulled = 0;
    const body = new ReadableStream<Uint8Array>({
      pull(controller) {
        pulled++;
        controller.enqueue(new Uint8Array(1024));
      }
    });
    const { api, requests } = fakeServer(new Response(body, { status: 200 }));
    expect(await api.downloadProblem('abc', 'outputs/forecast.csv')).toBeNull();
    expect(requests[0].url).toBe(
      'http://127.0.0.1:8888/lab-under-test/mantik/api/runs/abc/download'
    );
    expect(requests[0].method).toBe('GET');
    expect(pulled).toBeLessThan(3);
  });

  it("is the server's error for a file it cannot send", async () => {
    const { api } = fakeServer(
      json({ message: "No file 'x.csv' in run directory /r", reason: 'not_found' }, 404)
    );
    const problem = await api.downloadProblem('abc', 'x.csv');
    expect(problem).toBeInstanceOf(MantikApiError);
    expect(problem?.message).toBe("No file 'x.csv' in run directory /r");
    expect(problem?.reason).toBe('not_found');
  });

  it('is a network error when the Jupyter server cannot be reached', async () => {
    const { api } = fakeServer(new TypeError('Failed to fetch'));
    const problem = await api.downloadProblem('abc', 'x.csv');
    expect(problem?.reason).toBe(NETWORK_ERROR_REASON);
  });
});
