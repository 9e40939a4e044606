/**
 * mantik-jupyter JupyterLab extension: the "Mantik" sidebar and the MLflow tab.
 */
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  ICommandPalette,
  MainAreaWidget,
  WidgetTracker
} from '@jupyterlab/apputils';
import { ISettingRegistry } from '@jupyterlab/settingregistry';

import { MantikApi } from './api';
import { mantikIcon } from './icons';
import { createMlflowWidget, MlflowFrame, MLFLOW_WIDGET_ID } from './mlflow';
import { MantikPanel, PANEL_ID } from './panel';

export { MantikApi, MantikApiError } from './api';
export type { IAuthStatus, LoginCredentials } from './api';

/** Plugin id; also the settings schema id (`schema/plugin.json`). */
const PLUGIN_ID = 'mantik-jupyter:plugin';

/** Command ids. */
export namespace CommandIDs {
  export const openMlflow = 'mantik:open-mlflow';
  export const openPanel = 'mantik:open-panel';
}

/** Settings (`schema/plugin.json`). */
export interface IMantikSettings {
  pollInterval: number;
  defaultConfigFile: string;
}

const DEFAULT_SETTINGS: IMantikSettings = {
  pollInterval: 10,
  defaultConfigFile: 'compute-backend-config.yaml'
};

const PALETTE_CATEGORY = 'Mantik';

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'Mantik sidebar: MLflow tracking connection and the MLflow UI.',
  autoStart: true,
  optional: [ICommandPalette, ILayoutRestorer, ISettingRegistry],
  activate: (
    app: JupyterFrontEnd,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null,
    settingRegistry: ISettingRegistry | null
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
      execute: async () => {
        let widget = tracker.find(w => w.id === MLFLOW_WIDGET_ID) ?? null;
        if (!widget || widget.isDisposed) {
          widget = createMlflowWidget(api.mlflowUrl);
          void tracker.add(widget);
          app.shell.add(widget, 'main');
        }
        app.shell.activateById(widget.id);
        return widget;
      }
    });

    // --- Sidebar ----------------------------------------------------------
    const panel = new MantikPanel({
      api,
      pollInterval: settings.pollInterval,
      onOpenMlflow: () => {
        void app.commands.execute(CommandIDs.openMlflow);
      }
    });
    app.shell.add(panel, 'left', { rank: 900 });

    app.commands.addCommand(CommandIDs.openPanel, {
      label: 'Open Mantik Panel',
      caption: 'Show the Mantik sidebar',
      icon: args => (args['isPalette'] ? undefined : mantikIcon),
      execute: () => {
        app.shell.activateById(PANEL_ID);
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
