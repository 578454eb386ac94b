#!/usr/bin/env bash
# Install what the 好差评 evaluation gateway needs on a Debian 12 machine.
#
#   bash scripts/bootstrap.sh           Debian run-time packages, .venv, `pip install -e .`
#   bash scripts/bootstrap.sh --test    also the test tools (PostgreSQL server, espeak-ng, sox,
#                                       Node.js + npm), `pip install -e ".[test]"` and `npm ci`
#                                       for the node SMSC (gateway/testing/node_smsc)
#
# Idempotent: apt is skipped entirely when every package is already installed, and an
# existing working .venv is reused. Environment: PYTHON (interpreter for a new .venv,
# default python3).
set -euo pipefail

usage() {
    sed -n '2,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

with_test=0
for arg in "$@"; do
    case "$arg" in
        --test) with_test=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            printf 'bootstrap: unknown argument: %s\n' "$arg" >&2
            usage >&2
            exit 2
            ;;
    esac
done

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

log() { printf '==> %s\n' "$*"; }
die() {
    printf 'bootstrap: error: %s\n' "$*" >&2
    exit 1
}

# Run a noisy command with its output kept in a log; show the log only when it fails.
quietly() {
    local out status=0
    out="$(mktemp "${TMPDIR:-/tmp}/bootstrap.XXXXXX")"
    "$@" >"$out" 2>&1 || status=$?
    if ((status != 0)); then
        printf 'bootstrap: command failed (exit %d): %s\n' "$status" "$*" >&2
        tail -n 60 "$out" >&2
        rm -f "$out"
        exit "$status"
    fi
    rm -f "$out"
}

python="${PYTHON:-python3}"
command -v "$python" >/dev/null 2>&1 || die "$python not found (Python >= 3.11 is required)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$("$python" --version 2>&1) is too old: Python >= 3.11 is required"

# --- Debian packages -----------------------------------------------------------------------
# At run time the gateway needs only Python; these keep TLS (platform, SMTP) and time zones
# (Asia/Shanghai working-day logic) working on a minimal image.
runtime_pkgs=(ca-certificates tzdata)
# Tests: a real PostgreSQL server for the store tests, espeak-ng + sox for the prompt
# regeneration checks, Node.js + npm for the SMPP test server.
test_pkgs=(postgresql espeak-ng sox)

wanted=("${runtime_pkgs[@]}")
if ((with_test)); then
    wanted+=("${test_pkgs[@]}")
    # Any Node.js already on the machine will do (e.g. a vendor build that ships its own npm,
    # which conflicts with Debian's npm package).
    command -v node >/dev/null 2>&1 || wanted+=(nodejs npm)
fi
# A new .venv needs ensurepip, which Debian's own python3 only has with python3-venv.
if [[ ! -x .venv/bin/python ]] && ! "$python" -c 'import ensurepip' >/dev/null 2>&1; then
    [[ "$(command -v "$python")" == /usr/bin/* ]] ||
        die "$python has no ensurepip module; cannot create .venv"
    wanted+=(python3-venv)
fi

is_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]
}

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in "${wanted[@]}"; do
        is_installed "$pkg" || missing+=("$pkg")
    done
else
    log "no dpkg on this machine: not installing Debian packages (${wanted[*]})"
fi

if ((${#missing[@]})); then
    as_root=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null 2>&1 ||
            die "missing Debian packages (${missing[*]}) and not root, no sudo: install them first"
        as_root=(sudo)
    fi
    apt_env=(env DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a)
    log "apt-get update"
    quietly "${as_root[@]}" "${apt_env[@]}" apt-get update -q
    log "apt-get install ${missing[*]}"
    quietly "${as_root[@]}" "${apt_env[@]}" apt-get install -y -q --no-install-recommends \
        "${missing[@]}"
else
    log "Debian packages already installed (${wanted[*]})"
fi

# --- Python virtual environment ------------------------------------------------------------
if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import pip' >/dev/null 2>&1; then
    log "using existing .venv ($(.venv/bin/python --version 2>&1))"
else
    log "creating .venv with $("$python" --version 2>&1)"
    quietly "$python" -m venv --clear .venv
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
log "upgrading pip"
quietly .venv/bin/python -m pip install --upgrade pip

if ((with_test)); then
    target='.[test]'
else
    target='.'
fi
log "pip install -e \"$target\""
quietly .venv/bin/python -m pip install -e "$target"

# --- The node SMSC for the SMPP tests (npm `smpp`, pinned by package-lock.json) --------------
if ((with_test)); then
    node_smsc=gateway/testing/node_smsc
    if cmp -s "$node_smsc/package-lock.json" "$node_smsc/node_modules/.bootstrap-lock.json"; then
        log "node SMSC packages already installed ($node_smsc)"
    else
        command -v npm >/dev/null 2>&1 || die "npm not found: install Node.js with npm (Debian: nodejs npm)"
        log "npm ci in $node_smsc"
        quietly npm ci --no-audit --no-fund --prefix "$node_smsc"
        cp "$node_smsc/package-lock.json" "$node_smsc/node_modules/.bootstrap-lock.json"
    fi
fi

log "bootstrap done"
