/**
 * "Submit to HPC": a modal form built from the MLproject's declared entry points and
 * parameters, with the project's compute backend configs. Errors from the server
 * (config, parameters, packaging) are shown inline and the form stays open.
 *
 * JupyterLab's `Dialog` closes on Enter and on any button, which cannot keep a
 * form open on a server error; this is a small modal of its own with the same look
 * (`jp-Dialog` classes), a focus trap, Escape to close and focus restored after.
 */
import { ReactWidget } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';
import React, { useEffect, useId, useRef, useState } from 'react';

import { IProject, IRun, MantikApi } from './api';
import { errorText, useWaitingSeconds } from './runs';
import { changedParams, checkParam, checkParamName, pickConfig } from './state';

export interface ISubmitOptions {
  api: MantikApi;
  /** A file or folder relative to the Jupyter root. */
  path: string;
  /** Settings: the config file preselected when the project has it. */
  defaultConfigFile: string;
  /** `path` was not chosen by the user but taken from the file in focus or the file
   * browser's folder (the sidebar's Submit…, the palette). */
  fromFocus?: boolean;
}

/**
 * Show the submit form; resolves with the submitted run, or null when closed.
 */
export function showSubmitDialog(options: ISubmitOptions): Promise<IRun | null> {
  return new Promise(resolve => {
    const previous = document.activeElement as HTMLElement | null;
    let done = false;
    // While the submission is on its way it cannot be taken back (the run may exist
    // already): Cancel, Escape and the backdrop wait for the answer.
    let submitting = false;
    const close = (run: IRun | null) => {
      if (done || (run === null && submitting)) {
        return;
      }
      done = true;
      document.removeEventListener('keydown', onKeyDown, true);
      widget.dispose();
      previous?.focus?.();
      resolve(run);
    };
    const widget = ReactWidget.create(
      <SubmitForm
        {...options}
        onDone={close}
        onSubmitting={busy => {
          submitting = busy;
        }}
      />
    );
    // jp-ThemedContainer: from JupyterLab 4.4 on, the backdrop that covers the lab and
    // centres the dialog is styled for `.jp-Dialog.jp-ThemedContainer` only; without it
    // the form sat at the top of the page, the lab behind it live and undimmed.
    widget.addClass('jp-Dialog');
    widget.addClass('jp-ThemedContainer');
    widget.addClass('mantik-SubmitDialog');
    widget.node.dataset.testid = 'mantik-submit-dialog';
    // On the document: focus may have left the dialog (a button that became disabled).
    const onKeyDown = (event: KeyboardEvent) => {
      if (event.key === 'Escape') {
        event.preventDefault();
        event.stopPropagation();
        close(null);
      } else if (event.key === 'Tab') {
        trapFocus(widget.node, event);
      }
    };
    document.addEventListener('keydown', onKeyDown, true);
    // Click on the backdrop closes, like JupyterLab's dialogs.
    widget.node.addEventListener('mousedown', event => {
      if (event.target === widget.node) {
        close(null);
      }
    });
    Widget.attach(widget, document.body);
  });
}

function trapFocus(root: HTMLElement, event: KeyboardEvent): void {
  const focusable = Array.from(
    root.querySelectorAll<HTMLElement>(
      'button:not([disabled]), input:not([disabled]), select:not([disabled]), textarea, [tabindex="0"], summary, a[href]'
    )
  ).filter(el => el.offsetParent !== null);
  if (focusable.length === 0) {
    return;
  }
  const first = focusable[0];
  const last = focusable[focusable.length - 1];
  if (!root.contains(document.activeElement)) {
    first.focus();
    event.preventDefault();
  } else if (event.shiftKey && document.activeElement === first) {
    last.focus();
    event.preventDefault();
  } else if (!event.shiftKey && document.activeElement === last) {
    first.focus();
    event.preventDefault();
  }
}

interface ISubmitFormProps extends ISubmitOptions {
  onDone: (run: IRun | null) => void;
  onSubmitting: (submitting: boolean) => void;
}

function SubmitForm(props: ISubmitFormProps): JSX.Element {
  const { api, path, defaultConfigFile, fromFocus, onDone, onSubmitting } = props;
  const id = useId();
  const [project, setProject] = useState<IProject | null>(null);
  const [loadError, setLoadError] = useState<string | null>(null);
  const [config, setConfig] = useState('');
  const [entryPoint, setEntryPoint] = useState('main');
  const [values, setValues] = useState<Record<string, string>>({});
  const [experiment, setExperiment] = useState('');
  const [runName, setRunName] = useState('');
  const [submitting, setSubmitting] = useState(false);
  const [submitError, setSubmitError] = useState<{ message: string; reason: string } | null>(
    null
  );
  const [touched, setTouched] = useState(false);
  const submittingFor = useWaitingSeconds(submitting);
  const firstField = useRef<HTMLSelectElement>(null);
  const closeButton = useRef<HTMLButtonElement>(null);

  useEffect(() => {
    let cancelled = false;
    api
      .describeProject(path)
      .then(p => {
        if (cancelled) {
          return;
        }
        setProject(p);
        setConfig(pickConfig(p.config_files, defaultConfigFile, p.default_config));
        const names = Object.keys(p.entry_points);
        const ep = names.includes('main') ? 'main' : (names[0] ?? 'main');
        setEntryPoint(ep);
        setValues(defaults(p, ep));
      })
      .catch(e => {
        if (!cancelled) {
          setLoadError(errorText(e));
        }
      });
    return () => {
      cancelled = true;
    };
  }, [api, path, defaultConfigFile]);

  useEffect(() => {
    if (project) {
      firstField.current?.focus();
    } else {
      closeButton.current?.focus();
    }
  }, [project === null]);

  const specs = project?.entry_points[entryPoint]?.parameters ?? [];
  const fieldErrors: Record<string, string | null> = {};
  // A name MLflow refuses is the MLproject's mistake, whatever the value: said at once.
  const nameErrors: Record<string, string | null> = {};
  for (const spec of specs) {
    fieldErrors[spec.name] = checkParam(spec.type, values[spec.name] ?? '', spec.required);
    nameErrors[spec.name] = checkParamName(spec.name);
  }
  const atFault = (name: string) => fieldErrors[name] !== null || nameErrors[name] !== null;
  const hasFieldErrors = specs.some(spec => atFault(spec.name));
  const check = config ? project?.config_checks[config] : undefined;

  const submit = async (event: React.FormEvent) => {
    event.preventDefault();
    setTouched(true);
    if (hasFieldErrors) {
      // The click on Submit would otherwise do nothing a keyboard or screen reader user
      // notices: go to the first field at fault, which names its error.
      const first = specs.findIndex(spec => atFault(spec.name));
      if (first >= 0) {
        document.getElementById(`${id}-param-${first}`)?.focus();
      }
      return;
    }
    if (!project || submitting) {
      return;
    }
    setSubmitting(true);
    onSubmitting(true);
    setSubmitError(null);
    try {
      const run = await api.submitRun({
        project_dir: project.project_dir,
        backend_config: config || undefined,
        entry_point: entryPoint,
        params: changedParams(specs, values),
        experiment_name: experiment.trim() || undefined,
        run_name: runName.trim() || undefined,
        source: 'lab'
      });
      onDone(run);
    } catch (e) {
      const reason =
        e instanceof Error && 'reason' in e ? String((e as { reason: unknown }).reason) : '';
      setSubmitError({ message: errorText(e), reason });
      setSubmitting(false);
      onSubmitting(false);
    }
  };

  return (
    <div
      className="jp-Dialog-content mantik-SubmitDialog-content"
      role="dialog"
      aria-modal="true"
      aria-labelledby={`${id}-title`}
    >
      <header className="jp-Dialog-header">
        <h2 id={`${id}-title`} className="mantik-SubmitDialog-title">
          Submit to HPC{project ? `: ${project.name}` : ''}
        </h2>
      </header>
      <form className="mantik-SubmitForm" onSubmit={e => void submit(e)} noValidate>
        {/* Only the fields scroll: the server's error and the buttons stay in sight. */}
        <div className="jp-Dialog-body mantik-SubmitForm-fields">
          {project === null && loadError === null ? (
            <p className="mantik-muted">Reading the MLproject of {path || 'the root folder'}…</p>
          ) : null}
          {loadError !== null ? (
            // <pre>: a YAML error points at the column with a caret under the quoted line.
            <pre className="mantik-error mantik-submit-load-error" role="alert">
              {loadError}
            </pre>
          ) : null}
          {loadError !== null && fromFocus ? (
            // The user did not name that folder: say where it came from and how to pick one.
            <p className="mantik-submit-load-hint" data-testid="mantik-submit-load-hint">
              Submit… takes the project of the notebook or file in focus, else of the folder
              open in the file browser (here {path ? <code>{path}</code> : 'the root folder'}).
              To choose a project, open one of its files, or right-click its folder in the
              file browser and pick <em>Submit to HPC…</em>.
            </p>
          ) : null}
          {project !== null ? (
            <>
              <p className="mantik-muted mantik-submit-project">
                Project folder: <code>{project.project_dir}</code>
              </p>
              <div className="mantik-FormRow">
                <label htmlFor={`${id}-config`}>Backend config</label>
                {project.config_files.length > 0 ? (
                  <select
                    id={`${id}-config`}
                    ref={firstField}
                    className="jp-mod-styled mantik-submit-config"
                    value={config}
                    onChange={e => {
                      setConfig(e.target.value);
                      setSubmitError(null);
                    }}
                  >
                    {project.config_files.map(f => (
                      <option key={f} value={f}>
                        {f}
                        {project.config_checks[f]?.backend
                          ? ` (${project.config_checks[f]?.backend})`
                          : ''}
                      </option>
                    ))}
                  </select>
                ) : (
                  <p className="mantik-error" role="alert">
                    No compute backend config in {project.project_dir}: add a{' '}
                    <code>{defaultConfigFile}</code>.
                  </p>
                )}
              </div>
              {check && !check.ok && check.error ? (
                <pre className="mantik-error mantik-config-error" role="alert">
                  {check.error}
                </pre>
              ) : null}
              {check?.warnings.map(w => (
                <p key={w} className="mantik-warning">
                  {w}
                </p>
              ))}
              <div className="mantik-FormRow">
                <label htmlFor={`${id}-entry`}>Entry point</label>
                <select
                  id={`${id}-entry`}
                  className="jp-mod-styled mantik-submit-entry-point"
                  value={entryPoint}
                  onChange={e => {
                    setEntryPoint(e.target.value);
                    setValues(defaults(project, e.target.value));
                    setSubmitError(null);
                  }}
                >
                  {Object.keys(project.entry_points).map(name => (
                    <option key={name} value={name}>
                      {name}
                    </option>
                  ))}
                </select>
              </div>
              <fieldset className="mantik-params-fieldset">
                <legend>Parameters</legend>
                {specs.length === 0 ? (
                  <p className="mantik-muted">This entry point declares no parameters.</p>
                ) : null}
                {specs.map((spec, index) => {
                  // By position: a name may hold spaces, which would split the id lists
                  // of aria-describedby.
                  const fieldId = `${id}-param-${index}`;
                  const err = touched || values[spec.name] !== (spec.default ?? '')
                    ? fieldErrors[spec.name]
                    : null;
                  const nameErr = nameErrors[spec.name];
                  const described = [
                    nameErr ? `${fieldId}-name-error` : '',
                    err ? `${fieldId}-error` : ''
                  ].filter(Boolean);
                  const numeric = ['int', 'integer', 'float', 'double'].includes(
                    spec.type.toLowerCase()
                  );
                  return (
                    <div className="mantik-FormRow" key={spec.name}>
                      <label htmlFor={fieldId}>
                        {spec.name}
                        <span className="mantik-muted"> ({spec.type})</span>
                        {spec.required ? <span aria-hidden="true"> *</span> : null}
                      </label>
                      <input
                        id={fieldId}
                        name={spec.name}
                        className="jp-mod-styled mantik-param-input"
                        data-param={spec.name}
                        inputMode={numeric ? 'decimal' : undefined}
                        required={spec.required}
                        aria-required={spec.required}
                        aria-invalid={err || nameErr ? true : undefined}
                        aria-describedby={described.length ? described.join(' ') : undefined}
                        placeholder={spec.default ?? 'required'}
                        value={values[spec.name] ?? ''}
                        onChange={e => setValues({ ...values, [spec.name]: e.target.value })}
                      />
                      {nameErr ? (
                        <span
                          id={`${fieldId}-name-error`}
                          className="mantik-field-error mantik-param-name-error"
                        >
                          {nameErr}
                        </span>
                      ) : null}
                      {err ? (
                        <span id={`${fieldId}-error`} className="mantik-field-error">
                          {err}
                        </span>
                      ) : null}
                    </div>
                  );
                })}
              </fieldset>
              <div className="mantik-FormRow">
                <label htmlFor={`${id}-experiment`}>Experiment</label>
                <input
                  id={`${id}-experiment`}
                  className="jp-mod-styled mantik-submit-experiment"
                  placeholder={project.name}
                  value={experiment}
                  onChange={e => setExperiment(e.target.value)}
                />
              </div>
              <div className="mantik-FormRow">
                <label htmlFor={`${id}-run-name`}>Run name</label>
                <input
                  id={`${id}-run-name`}
                  className="jp-mod-styled mantik-submit-run-name"
                  placeholder="generated by MLflow"
                  value={runName}
                  onChange={e => setRunName(e.target.value)}
                />
              </div>
            </>
          ) : null}
        </div>
        {submitError !== null ? (
          <pre
            className="mantik-error mantik-submit-error"
            data-testid="mantik-submit-error"
            data-reason={submitError.reason}
            role="alert"
          >
            {submitError.message}
          </pre>
        ) : null}
        <p className="mantik-muted mantik-submit-progress" role="status">
          {submittingFor !== null
            ? `Packaging the project folder and handing it to the backend: ${submittingFor} s ` +
              'so far. Everything in the folder is sent, data files too, unless the backend ' +
              'config lists them under Exclude.'
            : ''}
        </p>
        <div className="jp-Dialog-footer">
          <div className="jp-Dialog-footerButtons">
            <button
              type="button"
              ref={closeButton}
              className="jp-Dialog-button jp-mod-reject jp-mod-styled mantik-submit-cancel"
              disabled={submitting}
              onClick={() => onDone(null)}
            >
              <span className="jp-Dialog-buttonLabel">Cancel</span>
            </button>
            <button
              type="submit"
              className="jp-Dialog-button jp-mod-accept jp-mod-styled mantik-submit-button"
              data-testid="mantik-submit-button"
              disabled={project === null || submitting || project.config_files.length === 0}
            >
              <span className="jp-Dialog-buttonLabel">{submitting ? 'Submitting…' : 'Submit'}</span>
            </button>
          </div>
        </div>
      </form>
    </div>
  );
}

function defaults(project: IProject, entryPoint: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const spec of project.entry_points[entryPoint]?.parameters ?? []) {
    out[spec.name] = spec.default ?? '';
  }
  return out;
}
