import { LabIcon } from '@jupyterlab/ui-components';

/**
 * The Mantik icon: a cluster node with a rising metric curve.
 * `jp-icon3` lets JupyterLab recolour it for light and dark themes.
 */
const MANTIK_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M3 3h18a1 1 0 0 1 1 1v16a1 1 0 0 1-1 1H3a1 1 0 0 1-1-1V4a1 1 0 0 1 1-1zm1 2v14h16V5H4z"/>
    <path d="M5.3 16.7l-1.4-1.4 5.1-5.1 3 3 4.3-4.3H14V7h5v5h-2V9.3l-5 5-3-3z"/>
  </g>
</svg>`;

export const mantikIcon = new LabIcon({
  name: 'mantik-jupyter:mantik',
  svgstr: MANTIK_SVG
});
