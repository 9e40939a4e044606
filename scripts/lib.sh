# Shared steps of scripts/demo.sh and scripts/test.sh (sourced, not run).
# Works on a fresh Debian machine as root with Python 3.11 and Node 20.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MANTIK_VENV:-$REPO/.venv}"

log() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

apt_install() {
    # Installs the Debian packages that are missing; apt-get update only when needed.
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "Missing Debian packages: ${missing[*]} (run as root or install them)" >&2
        return 1
    fi
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        log "Creating the virtual environment $VENV"
        python3 -m venv "$VENV"
    fi
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
    python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
}

pip_quiet() {
    # pip -q, without the notes about unused find-links locations; fails when pip fails.
    local status
    python -m pip -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
    status=${PIPESTATUS[0]}
    [ "$status" -eq 0 ] || { echo "pip $1 failed (exit $status); see above" >&2; return "$status"; }
}

build_labextension() {
    log "Building the JupyterLab extension (jlpm)"
    (cd "$REPO/labextension" && jlpm install --immutable >/dev/null && jlpm build:prod >/dev/null)
}

install_project() {
    # $1: pip extras, e.g. "[test]"
    local extras="${1:-}"
    log "Installing mantik-jupyter$extras and its dependencies"
    # jlpm (shipped with jupyterlab) builds the extension; install the build tools first
    # so that the project can be installed without build isolation (much faster).
    # setuptools and wheel too: without isolation they build the dependencies that PyPI
    # ships only as source (pyunicore), and Python 3.11's venv setuptools cannot.
    pip_quiet install "hatchling>=1.21" "hatch-jupyter-builder>=0.9" "jupyterlab>=4.2,<5" \
        "setuptools>=70.1" "wheel>=0.43"
    build_labextension
    pip_quiet install --no-build-isolation "$REPO$extras"
    # From /, so that the source tree beside us cannot stand in for a failed install.
    (cd / && python -c "import mantik_jupyter, pyunicore") || { echo "mantik_jupyter failed to install" >&2; return 1; }
}
