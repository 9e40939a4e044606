/**
 * The MLflow UI, served by the server extension's proxy, in a main-area tab.
 */
import { MainAreaWidget } from '@jupyterlab/apputils';
import { IFrame, ToolbarButton, refreshIcon } from '@jupyterlab/ui-components';

import { mantikIcon } from './icons';

/** Id of the main-area widget (there is at most one). */
export const MLFLOW_WIDGET_ID = 'mantik-mlflow';

/** Sandbox exceptions the MLflow single-page app needs. */
export const MLFLOW_SANDBOX: IFrame.SandboxExceptions[] = [
  'allow-scripts',
  'allow-same-origin',
  'allow-forms',
  'allow-downloads',
  'allow-popups'
];

/** The IFrame content of the MLflow tab. */
export class MlflowFrame extends IFrame {
  constructor(url: string) {
    super({ sandbox: MLFLOW_SANDBOX, referrerPolicy: 'same-origin' });
    this.addClass('mantik-MlflowFrame');
    this.url = url;
    this.node.querySelector('iframe')?.setAttribute('title', 'MLflow UI');
    this.node.dataset.testid = 'mantik-mlflow-frame';
  }

  /** Reload the MLflow UI (keeps the page the user navigated to). */
  reload(): void {
    const iframe = this.node.querySelector('iframe');
    try {
      iframe?.contentWindow?.location.reload();
    } catch {
      // Cross-origin (should not happen behind our proxy): reset the URL.
      const url = this.url;
      this.url = '';
      this.url = url;
    }
  }
}

/** Create the MLflow main-area widget. */
export function createMlflowWidget(url: string): MainAreaWidget<MlflowFrame> {
  const content = new MlflowFrame(url);
  const widget = new MainAreaWidget({ content });
  widget.id = MLFLOW_WIDGET_ID;
  widget.title.label = 'MLflow';
  widget.title.caption = 'MLflow tracking UI';
  widget.title.icon = mantikIcon;
  widget.title.closable = true;
  widget.addClass('mantik-MlflowWidget');
  widget.toolbar.addItem(
    'reload',
    new ToolbarButton({
      icon: refreshIcon,
      tooltip: 'Reload MLflow',
      onClick: () => content.reload()
    })
  );
  return widget;
}
