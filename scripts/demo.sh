#!/usr/bin/env bash
# Installs mantik-jupyter and runs JupyterLab on the embedded default: an embedded,
# authenticated MLflow, the local backend, and the example project and notebook.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ensure_venv
install_project ""
jupyter server extension list 2>&1 | grep -i mantik
jupyter labextension list 2>&1 | grep -i mantik

args=(--ServerApp.root_dir="$REPO/examples" --ip="${MANTIK_DEMO_IP:-127.0.0.1}" --port="${MANTIK_DEMO_PORT:-8888}")
[ "$(id -u)" -eq 0 ] && args+=(--allow-root)
[ -n "${CI:-}" ] || [ ! -t 0 ] && args+=(--no-browser)
log "Starting JupyterLab: open the URL below; the Mantik panel is in the left sidebar"
exec jupyter lab "${args[@]}" "$@"
