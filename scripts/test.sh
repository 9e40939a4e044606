#!/usr/bin/env bash
# Installs everything the tests need (Debian packages, a Slurm cluster with sshd on
# loopback, node modules, Python packages) and runs every test.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO"

apt_install chromium zip git ca-certificates
ensure_venv
install_project "[test]"

log "Lint: ruff"
ruff check mantik_jupyter tests bench

log "Types: mypy"
mypy

log "Extension unit tests (vitest)"
(cd labextension && jlpm test)

log "Starting the loopback Slurm cluster and sshd"
bash tests/cluster/setup.sh
trap 'bash "$REPO/tests/cluster/teardown.sh" >/dev/null 2>&1 || true' EXIT

log "pytest"
python -m pytest -p no:cacheprovider -ra "$@"
