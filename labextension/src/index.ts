/**
 * mantik-jupyter JupyterLab extension: the "Mantik" sidebar and the MLflow tab.
 */
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  Dialog,
  ICommandPalette,
  MainAreaWidget,
  showDialog,
  WidgetTracker
} from '@jupyterlab/apputils';
import { IDefaultFileBrowser } from '@jupyterlab/filebrowser';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStateDB } from '@jupyterlab/statedb';
import { Widget } from '@lumino/widgets';

import { IRun, MantikApi } from './api';
import { mantikIcon } from './icons';
import { createMlflowWidget, MlflowFrame, MLFLOW_WIDGET_ID } from './mlflow';
import { MantikPanel, PANEL_ID } from './panel';
import { displayName } from './state';
import { showSubmitDialog } from './submit';

export { MantikApi, MantikApiError } from './api';
export type { IAuthStatus, LoginCredentials } from './api';

/** Plugin id; also the settings schema id (`schema/plugin.json`). */
const PLUGIN_ID = 'mantik-jupyter:plugin';

/** Command ids. */
export namespace CommandIDs {
  export const openMlflow = 'mantik:open-mlflow';
  export const openPanel = 'mantik:open-panel';
  export const submit = 'mantik:submit';
  export const submitFromBrowser = 'mantik:submit-from-browser';
}

/** Whether a file name is an MLproject file (matched case-insensitively, as MLflow does). */
function isMLprojectFile(name: string): boolean {
  return name.toLowerCase() === 'mlproject';
}

/** Settings (`schema/plugin.json`). */
export interface IMantikSettings {
  pollInterval: number;
  defaultConfigFile: string;
}

const DEFAULT_SETTINGS: IMantikSettings = {
  pollInterval: 5,
  defaultConfigFile: 'compute-backend-config.yaml'
};

const PALETTE_CATEGORY = 'Mantik';

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'Mantik sidebar: MLflow tracking connection and the MLflow UI.',
  autoStart: true,
  optional: [
    ICommandPalette,
    ILayoutRestorer,
    ISettingRegistry,
    IDefaultFileBrowser,
    IStateDB
  ],
  activate: (
    app: JupyterFrontEnd,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null,
    settingRegistry: ISettingRegistry | null,
    fileBrowser: IDefaultFileBrowser | null,
    stateDB: IStateDB | null
  ) => {
    const api = new MantikApi({
      serverSettings: app.serviceManager.serverSettings
    });
    const settings: IMantikSettings = { ...DEFAULT_SETTINGS };

    // --- MLflow tab -------------------------------------------------------
    const tracker = new WidgetTracker<MainAreaWidget<MlflowFrame>>({
      namespace: 'mantik-mlflow'
    });

    app.commands.addCommand(CommandIDs.openMlflow, {
      label: 'Open MLflow',
      caption: 'Open the MLflow tracking UI in a tab',
      icon: args => (args['isPalette'] ? undefined : mantikIcon),
      execute: async args => {
        // A run's page: the link the server gives with the run (`mlflow_url`), passed by
        // the sidebar or fetched for a run id. Only a page of the lab's MLflow proxy is
        // loaded: a command's arguments may come from anywhere.
        const runId = typeof args['runId'] === 'string' ? args['runId'] : '';
        let url = typeof args['url'] === 'string' ? args['url'] : '';
        if (runId && !url) {
          try {
            url = (await api.getRun(runId)).mlflow_url ?? '';
          } catch (error) {
            console.warn(`mantik: cannot find run ${runId} to open in MLflow`, error);
          }
        }
        if (!url || !api.isMlflowPage(url)) {
          url = api.mlflowUrl;
        }
        let widget = tracker.find(w => w.id === MLFLOW_WIDGET_ID) ?? null;
        if (!widget || widget.isDisposed) {
          widget = createMlflowWidget(url);
          void tracker.add(widget);
          app.shell.add(widget, 'main');
        } else if (runId) {
          widget.content.url = url;
        }
        app.shell.activateById(widget.id);
        return widget;
      }
    });

    // --- Submit to HPC ----------------------------------------------------
    const localPath = (path: string) =>
      app.serviceManager.contents.localPath(path);

    /** The file in focus (notebook, editor), else the file browser's folder. */
    const pathInFocus = (): string => {
      const current = app.shell.currentWidget as
        | (Widget & { context?: { path?: unknown } })
        | null;
      const path = current?.context?.path;
      if (typeof path === 'string') {
        return localPath(path);
      }
      return fileBrowser ? localPath(fileBrowser.model.path) : '';
    };

    const selectedInBrowser = () => {
      const item = fileBrowser?.selectedItems().next();
      return item && !item.done ? item.value : null;
    };

    const submit = async (path: string, fromFocus = false): Promise<IRun | null> => {
      const run = await showSubmitDialog({
        api,
        path,
        defaultConfigFile: settings.defaultConfigFile,
        fromFocus
      });
      if (run) {
        panel.addRun(run);
        app.shell.activateById(PANEL_ID);
      }
      return run;
    };

    app.commands.addCommand(CommandIDs.submit, {
      label: args =>
        args['isPalette'] ? 'Submit Project to HPC…' : 'Submit to HPC…',
      caption:
        'Submit the MLproject of the file in focus to a compute backend',
      icon: args => (args['isPalette'] ? undefined : mantikIcon),
      execute: args =>
        typeof args['path'] === 'string'
          ? submit(args['path'])
          : submit(pathInFocus(), true)
    });

    app.commands.addCommand(CommandIDs.submitFromBrowser, {
      label: 'Submit to HPC…',
      caption: 'Submit this MLproject to a compute backend',
      icon: mantikIcon,
      isVisible: () => {
        const item = selectedInBrowser();
        return (
          !!item &&
          (item.type === 'directory' || isMLprojectFile(item.name))
        );
      },
      execute: () => {
        const item = selectedInBrowser();
        return submit(item ? localPath(item.path) : pathInFocus());
      }
    });
    app.contextMenu.addItem({
      command: CommandIDs.submitFromBrowser,
      selector: '.jp-DirListing-item[data-isdir="true"]',
      rank: 3
    });
    app.contextMenu.addItem({
      command: CommandIDs.submitFromBrowser,
      selector: '.jp-DirListing-item[data-isdir="false"]',
      rank: 3
    });

    // --- Sidebar ----------------------------------------------------------
    const panel = new MantikPanel({
      api,
      pollInterval: settings.pollInterval,
      restored: app.restored,
      state: stateDB ?? undefined,
      onOpenMlflow: run => {
        void app.commands.execute(
          CommandIDs.openMlflow,
          run ? { runId: run.run_id, url: run.mlflow_url ?? '' } : {}
        );
      },
      onSubmit: () => {
        void app.commands.execute(CommandIDs.submit);
      },
      confirmCancel: async run => {
        const result = await showDialog({
          title: 'Cancel run?',
          body: `Cancel run "${displayName(run)}" on ${
            run.backend ?? 'its backend'
          }? The job is stopped and the run is marked KILLED.`,
          buttons: [
            Dialog.cancelButton({ label: 'Keep running' }),
            Dialog.warnButton({ label: 'Cancel run' })
          ],
          // A job that ran for hours is not lost to an Enter pressed out of habit.
          defaultButton: 0
        });
        return result.button.accept;
      }
    });
    app.shell.add(panel, 'left', { rank: 900 });

    app.commands.addCommand(CommandIDs.openPanel, {
      label: 'Open Mantik Panel',
      caption: 'Show the Mantik sidebar',
      icon: args => (args['isPalette'] ? undefined : mantikIcon),
      execute: () => {
        app.shell.activateById(PANEL_ID);
        // Asked for by the user (palette, menu, shortcut), whatever the browser counts
        // as a user's activation by the time the command runs.
        panel.focusContent();
        panel.refresh();
      }
    });

    if (palette) {
      palette.addItem({
        command: CommandIDs.openPanel,
        category: PALETTE_CATEGORY,
        args: { isPalette: true }
      });
      palette.addItem({
        command: CommandIDs.openMlflow,
        category: PALETTE_CATEGORY,
        args: { isPalette: true }
      });
      palette.addItem({
        command: CommandIDs.submit,
        category: PALETTE_CATEGORY,
        args: { isPalette: true }
      });
    }

    if (restorer) {
      restorer.add(panel, PANEL_ID);
      void restorer.restore(tracker, {
        command: CommandIDs.openMlflow,
        name: () => MLFLOW_WIDGET_ID
      });
    }

    // --- Settings ---------------------------------------------------------
    if (settingRegistry) {
      const apply = (loaded: ISettingRegistry.ISettings) => {
        const poll = loaded.get('pollInterval').composite;
        const configFile = loaded.get('defaultConfigFile').composite;
        settings.pollInterval =
          typeof poll === 'number' ? poll : DEFAULT_SETTINGS.pollInterval;
        settings.defaultConfigFile =
          typeof configFile === 'string'
            ? configFile
            : DEFAULT_SETTINGS.defaultConfigFile;
        panel.pollInterval = settings.pollInterval;
      };
      settingRegistry
        .load(PLUGIN_ID)
        .then(loaded => {
          apply(loaded);
          loaded.changed.connect(apply);
        })
        .catch(reason => {
          console.error('mantik-jupyter: failed to load settings', reason);
        });
    }
  }
};

export default plugin;
