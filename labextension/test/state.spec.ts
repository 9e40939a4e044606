import { describe, expect, it } from 'vitest';

import { IRun, parseRun } from '../src/api';
import paramNames from './param-names.json';
import {
  changedParams,
  checkParam,
  checkParamName,
  EMPTY_FILTER,
  emptyRunsText,
  experimentLabel,
  filterRuns,
  formatAge,
  ITimers,
  LogBuffer,
  MAX_RUNS,
  mergeRuns,
  nextDelay,
  pickConfig,
  PollOutcome,
  Poller,
  revealOffset,
  RunsModel,
  splitRunFiles,
  RUNS_PAGE,
  rowTimes,
  runDuration,
  startedPhrase,
  terminalText,
  upsertRun
} from '../src/state';

/** Manual timers: `advance(ms)` fires what is due, in order. */
function fakeTimers() {
  let now = 0;
  let nextId = 1;
  const pending = new Map<number, { at: number; fn: () => void }>();
  const timers: ITimers = {
    setTimeout: (fn, ms) => {
      const id = nextId++;
      pending.set(id, { at: now + ms, fn });
      return id;
    },
    clearTimeout: id => {
      pending.delete(id as number);
    }
  };
  const flush = async () => {
    for (let i = 0; i < 10; i++) {
      await Promise.resolve();
    }
  };
  return {
    timers,
    get pending() {
      return [...pending.values()].map(t => t.at - now);
    },
    async advance(ms: number) {
      const until = now + ms;
      for (;;) {
        const due = [...pending.entries()]
          .filter(([, t]) => t.at <= until)
          .sort((a, b) => a[1].at - b[1].at)[0];
        if (!due) {
          break;
        }
        pending.delete(due[0]);
        now = due[1].at;
        due[1].fn();
        await flush();
      }
      now = until;
      await flush();
    }
  };
}

function run(id: string, state: string, start: number | null = 1000): IRun {
  return parseRun({
    run_id: id,
    run_name: `name-${id}`,
    experiment_id: '1',
    state,
    is_final: ['FINISHED', 'FAILED', 'KILLED'].includes(state),
    backend: id.startsWith('s') ? 'ssh-slurm' : 'local',
    start_time: start
  });
}

const BACKOFF = { interval: 1000, maxInterval: 8000, factor: 2 };

describe('nextDelay', () => {
  it('goes back to the interval while runs are active', () => {
    expect(nextDelay(8000, 'active', BACKOFF)).toBe(1000);
  });
  it('grows while idle or failing, up to the maximum', () => {
    expect(nextDelay(1000, 'idle', BACKOFF)).toBe(2000);
    expect(nextDelay(2000, 'error', BACKOFF)).toBe(4000);
    expect(nextDelay(8000, 'idle', BACKOFF)).toBe(8000);
  });
});

describe('Poller', () => {
  function poller(outcomes: PollOutcome[], paused = false) {
    const clock = fakeTimers();
    let calls = 0;
    const p = new Poller({
      ...BACKOFF,
      paused,
      timers: clock.timers,
      task: async () => {
        calls++;
        const next = outcomes.shift() ?? 'idle';
        if (next === 'error') {
          throw new Error('server down');
        }
        return next;
      }
    });
    return { p, clock, calls: () => calls };
  }

  it('polls at once, then backs off while idle and on errors', async () => {
    const { p, clock, calls } = poller(['active', 'idle', 'error', 'idle']);
    p.start();
    await clock.advance(0);
    expect(calls()).toBe(1);
    expect(p.delay).toBe(1000);
    await clock.advance(1000);
    expect(calls()).toBe(2);
    expect(p.delay).toBe(2000);
    await clock.advance(2000);
    expect(calls()).toBe(3); // the error
    expect(p.delay).toBe(4000);
    await clock.advance(3999);
    expect(calls()).toBe(3);
    await clock.advance(1);
    expect(calls()).toBe(4);
    expect(p.delay).toBe(8000);
  });

  it('does not poll while paused and polls at once on resume', async () => {
    const { p, clock, calls } = poller([], true);
    p.start();
    await clock.advance(60_000);
    expect(calls()).toBe(0);
    expect(p.isScheduled).toBe(false);
    p.resume();
    await clock.advance(0);
    expect(calls()).toBe(1);
    p.pause();
    expect(clock.pending).toEqual([]);
    await clock.advance(60_000);
    expect(calls()).toBe(1);
  });

  it('refresh polls now and resets the backoff', async () => {
    const { p, clock, calls } = poller(['idle', 'idle', 'idle', 'active']);
    p.start();
    await clock.advance(0);
    await clock.advance(2000);
    expect(p.delay).toBe(4000);
    await p.refresh();
    expect(calls()).toBe(3);
    expect(p.delay).toBe(2000); // reset to 1000, then one idle poll
  });

  it('does not start a second poll beside one still out when resumed', async () => {
    const clock = fakeTimers();
    const buffer = new LogBuffer();
    const answers: Array<() => void> = [];
    let out = 0;
    let most = 0;
    const p = new Poller({
      ...BACKOFF,
      timers: clock.timers,
      task: async () => {
        most = Math.max(most, ++out);
        const from = buffer.offset;
        // The log is "line1\n" (6 bytes); its answer comes when the test says so.
        await new Promise<void>(resolve => answers.push(resolve));
        out--;
        const chunk = from === 0 ? { text: 'line1\n', offset: 6 } : { text: '', offset: from };
        return buffer.append({ ...chunk, final: false }) ? 'active' : 'idle';
      }
    });
    p.start();
    await clock.advance(0); // a log read is out
    p.pause(); // the panel is collapsed ...
    p.resume(); // ... and opened again before the answer came
    await clock.advance(0);
    expect(answers).toHaveLength(1);
    answers.shift()!();
    await clock.advance(0);
    await clock.advance(0); // the read that the resume asked for follows
    expect(answers).toHaveLength(1);
    answers.shift()!();
    await clock.advance(0);
    expect(most).toBe(1);
    expect(buffer.text).toBe('line1\n');
    p.dispose();
  });

  it('stops scheduling when disposed or when the interval is 0', async () => {
    const { p, clock, calls } = poller([]);
    p.start();
    await clock.advance(0);
    p.configure({ interval: 0 });
    await clock.advance(60_000);
    expect(calls()).toBe(1);
    p.configure({ interval: 1000 });
    await clock.advance(1000);
    expect(calls()).toBe(2);
    p.dispose();
    await clock.advance(60_000);
    expect(calls()).toBe(2);
  });
});

describe('RunsModel', () => {
  it('polls while visible, pauses while hidden, keeps a submitted run on top', async () => {
    const clock = fakeTimers();
    const answers: IRun[][] = [[run('a', 'FINISHED', 1)]];
    const refreshFlags: boolean[] = [];
    const model = new RunsModel({
      fetchRuns: async refresh => {
        refreshFlags.push(refresh);
        const runs = answers.shift() ?? [run('b', 'RUNNING', 2), run('a', 'FINISHED', 1)];
        return { runs, more: false };
      },
      interval: 1000,
      maxInterval: 8000,
      factor: 2,
      visible: false,
      timers: clock.timers
    });
    let notified = 0;
    model.subscribe(() => notified++);
    await clock.advance(10_000);
    expect(refreshFlags).toEqual([]); // hidden: nothing fetched
    model.setVisible(true);
    await clock.advance(0);
    expect(model.snapshot.runs.map(r => r.run_id)).toEqual(['a']);
    expect(model.snapshot.loaded).toBe(true);
    expect(model.poller.delay).toBe(2000); // nothing active: backing off

    // A submission shows at once (before the search returns it) and is selected.
    model.upsert(run('b', 'QUEUED', null), true);
    expect(model.snapshot.runs[0].run_id).toBe('b');
    expect(model.snapshot.select).toEqual({ runId: 'b', seq: 1 });
    await clock.advance(0);
    // The next fetch asked for a backend refresh because a run is active.
    expect(refreshFlags.at(-1)).toBe(true);
    expect(model.snapshot.runs.map(r => `${r.run_id}:${r.state}`)).toEqual([
      'b:RUNNING',
      'a:FINISHED'
    ]);
    expect(model.poller.delay).toBe(1000);
    expect(notified).toBeGreaterThan(1);

    model.setVisible(false);
    const count = refreshFlags.length;
    await clock.advance(60_000);
    expect(refreshFlags.length).toBe(count);
    model.dispose();
  });

  it('never brings an ended run back to an active state', async () => {
    const clock = fakeTimers();
    const model = new RunsModel({
      fetchRuns: async () => ({ runs: [run('b', 'RUNNING', 2)], more: false }),
      interval: 1000,
      timers: clock.timers
    });
    await clock.advance(0);
    model.upsert(run('b', 'KILLED', 2));
    await clock.advance(0);
    expect(model.snapshot.runs[0].state).toBe('KILLED');
    model.dispose();
  });

  it('reports fetch errors and keeps the last runs', async () => {
    const clock = fakeTimers();
    let fail = false;
    const model = new RunsModel({
      fetchRuns: async () => {
        if (fail) {
          throw new Error('Tracking server unavailable');
        }
        return { runs: [run('a', 'FINISHED')], more: false };
      },
      interval: 1000,
      timers: clock.timers,
      describeError: e => (e as Error).message
    });
    await clock.advance(0);
    fail = true;
    await model.refresh();
    expect(model.snapshot.error).toBe('Tracking server unavailable');
    expect(model.snapshot.runs).toHaveLength(1);
    model.dispose();
  });

  it('says a search is out until it answers or fails (a hung server answers late)', async () => {
    const clock = fakeTimers();
    const answers: Array<(ok: boolean) => void> = [];
    const model = new RunsModel({
      fetchRuns: () =>
        new Promise((resolve, reject) => {
          answers.push(ok =>
            ok ? resolve({ runs: [run('a', 'FINISHED')], more: false }) : reject(new Error('timeout'))
          );
        }),
      interval: 1000,
      timers: clock.timers,
      describeError: e => (e as Error).message
    });
    await clock.advance(0);
    expect(model.snapshot.busy).toBe(true);
    expect(model.snapshot.loaded).toBe(false);
    answers.shift()!(true);
    await clock.advance(0);
    expect(model.snapshot.busy).toBe(false);
    expect(model.snapshot.runs).toHaveLength(1);

    const refreshed = model.refresh();
    await clock.advance(0);
    expect(model.snapshot.busy).toBe(true);
    expect(model.snapshot.runs).toHaveLength(1); // the old list stays while waiting
    answers.shift()!(false);
    await refreshed;
    expect(model.snapshot.busy).toBe(false);
    expect(model.snapshot.error).toBe('timeout');
    model.dispose();
  });
});

describe('RunsModel with more runs than one page', () => {
  it('says older runs exist and loads them on request, up to the server limit', async () => {
    const clock = fakeTimers();
    const all = Array.from({ length: 1500 }, (_, i) => run(`r${i}`, 'FINISHED', 2000 - i));
    const limits: number[] = [];
    const model = new RunsModel({
      fetchRuns: async (_refresh, limit) => {
        limits.push(limit);
        return { runs: all.slice(0, limit), more: limit < all.length };
      },
      interval: 1000,
      timers: clock.timers
    });
    await clock.advance(0);
    expect(limits).toEqual([RUNS_PAGE]);
    expect(model.snapshot.runs).toHaveLength(RUNS_PAGE);
    expect(model.snapshot.more).toBe(true);
    await model.showMore();
    expect(limits.at(-1)).toBe(2 * RUNS_PAGE);
    expect(model.snapshot.runs).toHaveLength(2 * RUNS_PAGE);
    // Later polls keep the larger page.
    await clock.advance(60_000);
    expect(limits.at(-1)).toBe(2 * RUNS_PAGE);
    for (let i = 0; i < 20; i++) {
      await model.showMore();
    }
    expect(Math.max(...limits)).toBe(MAX_RUNS);
    expect(model.snapshot.runs).toHaveLength(MAX_RUNS);
    expect(model.snapshot.more).toBe(true);
    // A new login starts from one page again.
    await model.reset();
    expect(limits.at(-1)).toBe(RUNS_PAGE);
    model.dispose();
  });

  it('knows when every run is shown', async () => {
    const clock = fakeTimers();
    const model = new RunsModel({
      fetchRuns: async () => ({ runs: [run('a', 'FINISHED', 1)], more: false }),
      interval: 1000,
      timers: clock.timers
    });
    await clock.advance(0);
    expect(model.snapshot.more).toBe(false);
    model.dispose();
  });
});

describe('RunsModel after a login or logout', () => {
  it('forgets the old runs and drops an answer asked for before the reset', async () => {
    const clock = fakeTimers();
    let user = 'alice';
    const pending: Array<() => void> = [];
    const model = new RunsModel({
      fetchRuns: async () => {
        const asker = user;
        await new Promise<void>(resolve => pending.push(resolve));
        if (asker === 'nobody') {
          throw new Error('Not logged in');
        }
        return { runs: [run(`${asker}-run`, 'FINISHED')], more: false };
      },
      interval: 1000,
      timers: clock.timers,
      describeError: e => (e as Error).message
    });
    await clock.advance(0);
    pending.shift()!();
    await clock.advance(0);
    model.upsert(run('alice-new', 'QUEUED'), true);
    expect(model.snapshot.runs.map(r => r.run_id)).toEqual(['alice-new', 'alice-run']);
    // alice's search is out when she logs out: its answer must not come back.
    user = 'nobody';
    void model.reset();
    expect(model.snapshot).toMatchObject({ runs: [], error: null, loaded: false, select: null });
    pending.shift()!();
    await clock.advance(0);
    expect(model.snapshot.runs).toEqual([]);
    await clock.advance(0);
    pending.shift()!(); // the poll after the reset, as nobody
    await clock.advance(0);
    expect(model.snapshot.runs).toEqual([]);
    expect(model.snapshot.error).toBe('Not logged in');
    user = 'bob';
    void model.reset();
    expect(model.snapshot.error).toBeNull();
    await clock.advance(0);
    pending.shift()!();
    await clock.advance(0);
    expect(model.snapshot.runs.map(r => r.run_id)).toEqual(['bob-run']);
    model.dispose();
  });
});

describe('RunsModel by experiment', () => {
  const inExperiment = (id: string, experiment: string) => ({
    ...run(id, 'FINISHED'),
    experiment_id: experiment
  });
  const all = [inExperiment('a1', '1'), inExperiment('b1', '2'), inExperiment('b2', '2')];

  function model() {
    const clock = fakeTimers();
    const asked: string[] = [];
    let experimentReads = 0;
    const m = new RunsModel({
      fetchRuns: async (_refresh, _limit, experimentId) => {
        asked.push(experimentId);
        return {
          runs: all.filter(r => !experimentId || r.experiment_id === experimentId),
          more: false
        };
      },
      fetchExperiments: async () => {
        experimentReads++;
        return [
          { experiment_id: '1', name: 'study-a' },
          { experiment_id: '2', name: 'study-b' }
        ];
      },
      interval: 1000,
      timers: clock.timers
    });
    return { m, clock, asked, reads: () => experimentReads };
  }

  it('asks the server for the chosen experiment, on every poll after', async () => {
    const { m, clock, asked } = model();
    await clock.advance(0);
    expect(asked).toEqual(['']);
    expect(m.snapshot.runs).toHaveLength(3);
    void m.setExperiment('2');
    expect(m.snapshot).toMatchObject({ experiment: '2', runs: [], loaded: false });
    await clock.advance(0);
    expect(m.snapshot.runs.map(r => r.run_id).sort()).toEqual(['b1', 'b2']);
    // The refresh button and the polls keep it.
    await m.refresh();
    await clock.advance(60_000);
    expect(asked.slice(1).every(e => e === '2')).toBe(true);
    expect(asked.length).toBeGreaterThan(2);
    m.dispose();
  });

  it('names the experiments once, and again for an unknown one after a while', async () => {
    const { m, clock, reads } = model();
    await clock.advance(0);
    expect(reads()).toBe(1);
    expect(m.snapshot.experiments.map(e => e.name)).toEqual(['study-a', 'study-b']);
    expect(experimentLabel(m.snapshot.experiments, '2')).toBe('study-b');
    expect(experimentLabel(m.snapshot.experiments, '9')).toBe('experiment 9');
    await m.refresh();
    expect(reads()).toBe(1);
    // A submission to an experiment it just created: named at the next poll.
    m.upsert({ ...run('new', 'QUEUED'), experiment_id: '3' }, true);
    await clock.advance(0);
    expect(reads()).toBe(2);
    m.dispose();
  });

  it('lists every experiment again when a submission went to another one', async () => {
    const { m, clock } = model();
    await clock.advance(0);
    void m.setExperiment('1');
    await clock.advance(0);
    m.upsert(inExperiment('new', '2'), true);
    expect(m.snapshot.experiment).toBe('');
    expect(m.snapshot.runs.map(r => r.run_id)).toContain('new');
    m.dispose();
  });

  it('keeps a pinned run of another experiment out of the list', async () => {
    const { m, clock } = model();
    await clock.advance(0);
    m.upsert(inExperiment('pinned', '2'));
    await clock.advance(0);
    expect(m.snapshot.runs.map(r => r.run_id)).toContain('pinned');
    void m.setExperiment('1');
    await clock.advance(0);
    expect(m.snapshot.runs.map(r => r.run_id)).toEqual(['a1']);
    m.dispose();
  });
});

describe('the files of a run', () => {
  const file = (path: string, is_dir = false) => ({ path, size: 10, is_dir });

  it("puts the user's files first and mantik's apart, in the top folder only", () => {
    const top = [
      file('code', true),
      file('mantik-job.sh'),
      file('mantik.exitcode'),
      file('mantik.jobid'),
      file('mantik.log'),
      file('mantik-login.log'),
      file('package.tar.gz'),
      file('results.nc')
    ];
    const { yours, mantik } = splitRunFiles(top, '');
    expect(yours.map(e => e.path)).toEqual([
      'code',
      'mantik.log',
      'mantik-login.log',
      'results.nc'
    ]);
    expect(mantik.map(e => e.path)).toEqual([
      'mantik-job.sh',
      'mantik.exitcode',
      'mantik.jobid',
      'package.tar.gz'
    ]);
    // A user's file of the same name further down is theirs.
    const inCode = [file('code/package.tar.gz'), file('code/mantik-job.sh')];
    expect(splitRunFiles(inCode, 'code').mantik).toEqual([]);
    // A folder is never mantik's.
    expect(splitRunFiles([file('package.tar.gz', true)], '').mantik).toEqual([]);
  });
});

describe('the empty runs list', () => {
  it('says which filters are on', () => {
    expect(
      emptyRunsText({ filter: EMPTY_FILTER, experiment: null, loaded: 0, more: false })
    ).toBe('No runs yet. Use "Submit…" or right-click an MLproject folder.');
    expect(
      emptyRunsText({ filter: EMPTY_FILTER, experiment: 'study-a', loaded: 0, more: false })
    ).toBe('No runs in experiment "study-a". Choose "All experiments" to see the others.');
    expect(
      emptyRunsText({
        filter: { text: ' lr ', state: 'FAILED', backend: 'ssh-slurm' },
        experiment: 'study-a',
        loaded: 12,
        more: false
      })
    ).toBe(
      'No run matches the filters: experiment "study-a", state "Failed", ' +
        'backend "ssh-slurm", text "lr".'
    );
    expect(
      emptyRunsText({
        filter: { ...EMPTY_FILTER, text: 'old-000' },
        experiment: null,
        loaded: 100,
        more: true
      })
    ).toBe('No run among the 100 newest matches the filters: text "old-000".');
  });
});

describe('runs list helpers', () => {
  const runs = [run('a', 'FINISHED', 3), run('s1', 'RUNNING', 2), run('c', 'KILLED', 1)];

  it('filters by state, backend and text', () => {
    const ids = (f: Parameters<typeof filterRuns>[1]) =>
      filterRuns(runs, f).map(r => r.run_id);
    expect(ids({ text: '', state: 'active', backend: '' })).toEqual(['s1']);
    expect(ids({ text: '', state: 'KILLED', backend: '' })).toEqual(['c']);
    expect(ids({ text: '', state: 'all', backend: 'local' })).toEqual(['a', 'c']);
    expect(ids({ text: 'NAME-S', state: 'all', backend: '' })).toEqual(['s1']);
  });

  it('merges, upserts and sorts newest first', () => {
    expect(mergeRuns(runs, [run('new', 'QUEUED', null)])[0].run_id).toBe('new');
    expect(upsertRun(runs, run('c', 'KILLED', 10)).map(r => r.run_id)).toEqual([
      'c',
      'a',
      's1'
    ]);
  });

  it('formats ages', () => {
    expect(formatAge(null, 0)).toBe('—');
    expect(formatAge(0, 2_000)).toBe('just now');
    expect(formatAge(0, 42_000)).toBe('42 s');
    expect(formatAge(0, 5 * 60_000)).toBe('5 min');
    expect(formatAge(0, 3 * 3600_000)).toBe('3 h');
    expect(formatAge(0, 72 * 3600_000)).toBe('3 d');
    // What the run rows say to a screen reader.
    expect(startedPhrase(0, 2_000)).toBe('started just now');
    expect(startedPhrase(0, 5 * 60_000)).toBe('started 5 min ago');
    expect(startedPhrase(null, 0)).toBe('not started yet');
    expect(startedPhrase(0, 5 * 60_000, 'RUNNING')).toBe('started 5 min ago');
    expect(startedPhrase(0, 5 * 60_000, 'QUEUED')).toBe('submitted 5 min ago');
  });

  it('shows the time a run waits as queued time, not as a running duration', () => {
    const at = (state: string, end: number | null = null) => ({
      state,
      start_time: 0,
      end_time: end
    });
    expect(runDuration(at('QUEUED'), 330_000)).toBe('queued for 5 min 30 s');
    expect(runDuration(at('SUBMITTING'), 4_000)).toBe('submitting for 4 s');
    expect(runDuration(at('RUNNING'), 330_000)).toBe('5 min 30 s');
    expect(runDuration(at('KILLED', 60_000), 330_000)).toBe('1 min 0 s');
    expect(runDuration({ state: 'QUEUED', start_time: null, end_time: null }, 1)).toBe('—');
  });

  it('splits the queue wait from the running time once the job ran', () => {
    const min = 60_000;
    const ran = (state: string, end: number | null) => ({
      state,
      start_time: 0,
      running_since: 121 * min,
      end_time: end
    });
    expect(runDuration(ran('RUNNING', null), 124 * min + 5_000)).toBe(
      'queued 2 h 1 min, running for 3 min 5 s'
    );
    expect(runDuration(ran('FINISHED', 161 * min), 999 * min)).toBe(
      'queued 2 h 1 min, ran 40 min 0 s'
    );
    // A cluster clock a little behind the server's: no negative queue time.
    expect(runDuration({ ...ran('RUNNING', null), running_since: -2_000 }, 10_000)).toBe(
      'queued 0 s, running for 12 s'
    );
    // Waiting again after a requeue (the server sends no start then), or never ran.
    expect(runDuration({ ...ran('QUEUED', null), running_since: null }, 5 * min)).toBe(
      'queued for 5 min 0 s'
    );
    // Recorded before the server kept it: the time since submission, as before.
    expect(runDuration({ state: 'FINISHED', start_time: 0, end_time: 3 * min }, 9 * min)).toBe(
      '3 min 0 s'
    );
    // The row's label: the submission, then both times.
    expect(rowTimes(ran('RUNNING', null), 124 * min)).toBe(
      'submitted 2 h ago, queued 2 h 1 min, running for 3 min 0 s'
    );
    expect(rowTimes({ state: 'FINISHED', start_time: 0, end_time: 60_000 }, 5 * min)).toBe(
      'started 5 min ago'
    );
  });

  it('accumulates log chunks by offset', () => {
    const log = new LogBuffer();
    expect(log.append({ text: 'a\n', offset: 2, final: false })).toBe(true);
    expect(log.append({ text: '', offset: 2, final: false })).toBe(false);
    log.append({ text: 'b\n', offset: 4, final: true });
    expect(log.text).toBe('a\nb\n');
    expect(log.offset).toBe(4);
    expect(log.final).toBe(true);
  });
});

describe('submit form helpers', () => {
  it('picks the settings default, else the server default, else the first', () => {
    expect(pickConfig(['a.yaml', 'b.yaml'], 'b.yaml', 'a.yaml')).toBe('b.yaml');
    expect(pickConfig(['a.yaml', 'b.yaml'], 'x.yaml', 'a.yaml')).toBe('a.yaml');
    expect(pickConfig(['c.json'], 'x.yaml', null)).toBe('c.json');
    expect(pickConfig([], 'x.yaml', null)).toBe('');
  });

  it('checks parameter values by their MLproject type', () => {
    expect(checkParam('int', '2', false)).toBeNull();
    expect(checkParam('int', 'two', false)).toBe('Must be a whole number');
    expect(checkParam('float', '1e-3', false)).toBeNull();
    expect(checkParam('float', '1,5', false)).toBe('Must be a number');
    expect(checkParam('string', '', true)).toBe('Required');
    expect(checkParam('path', 'data/x.nc', true)).toBeNull();
  });

  it("refuses the parameter names MLflow refuses, and only those", () => {
    const names = paramNames.names as Array<[string, boolean]>;
    const wrong = names.filter(([name, accepted]) => (checkParamName(name) === null) !== accepted);
    expect(wrong).toEqual([]);
  });

  it('says at a name MLflow refuses what is allowed, and which characters are not', () => {
    expect(checkParamName('T_2m (°C)')).toBe(
      'MLflow cannot record a parameter named "T_2m (°C)": a name may contain only letters ' +
        'and digits (of any alphabet), spaces and _ - . : /, not "(", "°", ")". ' +
        'Rename it in the MLproject.'
    );
    expect(checkParamName('température')).toBeNull();
    expect(checkParamName('a//b')).toContain('relative path');
    expect(checkParamName('a'.repeat(251))).toContain('251 characters, at most 250');
  });

  it('sends only values that differ from the defaults', () => {
    const specs = [
      { name: 'epochs', default: '5' },
      { name: 'station', default: 'Juelich' },
      { name: 'data', default: null }
    ];
    expect(changedParams(specs, { epochs: '2', station: 'Juelich', data: ' x ' })).toEqual({
      epochs: '2',
      data: 'x'
    });
  });
});

describe('terminalText', () => {
  it('shows the last state of a progress bar, not every update on one line', () => {
    const log =
      'start\n\rtraining:   0% |   |\rtraining:  50% |#  |\rtraining: 100% |###|\ndone\n';
    expect(terminalText(log)).toBe('start\ntraining: 100% |###|\ndone\n');
  });

  it('overwrites from the start of the line as a terminal does', () => {
    expect(terminalText('loss 0.123456\rloss 0.5')).toBe('loss 0.523456');
    // A bar not yet overwritten stays visible; CRLF line ends are plain line ends.
    expect(terminalText('epoch 1\r')).toBe('epoch 1');
    expect(terminalText('a\r\nb\r\n')).toBe('a\nb\n');
  });

  it('drops colour codes and other terminal escapes', () => {
    expect(terminalText('\x1b[32mdone\x1b[0m \x1b[1;31mERROR\x1b[0m')).toBe('done ERROR');
    expect(terminalText('\x1b]0;title\x07text\x1b[2K\x1b[1A')).toBe('text');
  });

  it('leaves ordinary text alone', () => {
    const text = 'epoch 1/2  loss=0.1\n[mantik] exit status 0\n';
    expect(terminalText(text)).toBe(text);
  });
});

describe('revealOffset', () => {
  const view = { top: 100, bottom: 600 };
  it('scrolls details below the fold up until their first pixels show', () => {
    // Wholly below: bring 220 px of them in.
    expect(revealOffset(view, { top: 650, bottom: 1200 }, 220)).toBe(270);
    // Their header peeks in at the bottom.
    expect(revealOffset(view, { top: 590, bottom: 1200 }, 220)).toBe(210);
    // Shorter than asked: all of them.
    expect(revealOffset(view, { top: 650, bottom: 750 }, 220)).toBe(150);
  });
  it('leaves shown details alone and never scrolls their top out of the view', () => {
    expect(revealOffset(view, { top: 200, bottom: 1200 }, 220)).toBe(0);
    expect(revealOffset(view, { top: 380, bottom: 1200 }, 220)).toBe(0);
    // A view shorter than asked for: their top stops at the view's top.
    expect(revealOffset({ top: 0, bottom: 150 }, { top: 100, bottom: 900 }, 220)).toBe(100);
  });
});
