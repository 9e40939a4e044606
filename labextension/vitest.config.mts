import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    environment: 'node',
    include: ['test/**/*.spec.ts'],
    server: {
      deps: {
        // JupyterLab/Lumino ship ES modules in plain .js files: let Vite transform them.
        inline: [/@jupyterlab\//, /@lumino\//]
      }
    }
  }
});
