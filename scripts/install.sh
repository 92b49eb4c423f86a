#!/usr/bin/env bash
# Create .venv with every workspace package and the dev tools, from the committed uv.lock.
#
# Works from a fresh clone with only a Python >= 3.11 on the machine: when `uv` is not on PATH it is installed
# with pip (`python3 -m uv` then runs it), and when pip itself is missing as root on Debian it comes from apt.
# Used by `make install`; PYTHON picks the interpreter (default python3).
#
#   scripts/install.sh              # sync .venv to uv.lock
#   scripts/install.sh --check-lock # exit 1 when uv.lock does not match the pyproject files (`make lint`)
#   scripts/install.sh --docker     # Debian's docker.io and docker-registry for the docker runtime's tests (as
#                                   # root with apt-get; `make test` runs it; without them those tests skip)
#   scripts/install.sh --peers      # also the `peers` extra (Ray, Celery, redis-py) and Debian's redis-server, for
#                                   # `make bench`; what cannot be installed is only warned about (the bench skips it)
set -euo pipefail

PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "DuanFlow needs Python >= 3.11; $PYTHON is $("$PYTHON" --version 2>&1 || echo missing)." >&2
    echo "Pick another interpreter with: make install PYTHON=/path/to/python3.11" >&2
    exit 1
fi

if [ "${1:-}" = "--docker" ]; then
    if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker-registry >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-registry \
                >/dev/null; } || echo "warning: apt-get could not install docker.io: the docker tests skip" >&2
        else
            echo "warning: dockerd or docker-registry is missing (Debian's docker.io, docker-registry as root):" \
                "the docker tests skip" >&2
        fi
    fi
    exit 0
fi

uv_cmd() {
    if command -v uv >/dev/null 2>&1; then
        uv "$@"
    else
        "$PYTHON" -m uv "$@"
    fi
}

if ! command -v uv >/dev/null 2>&1 && ! "$PYTHON" -m uv --version >/dev/null 2>&1; then
    echo "uv not found: installing it with pip" >&2
    if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
        else
            echo "neither uv nor pip is available for $PYTHON: install uv (or pip) first" >&2
            exit 1
        fi
    fi
    # Debian's own python3 refuses plain `pip install` (PEP 668); the user site is still fine for one tool.
    "$PYTHON" -m pip install -q uv \
        || "$PYTHON" -m pip install -q --user --break-system-packages uv
fi

if [ "${1:-}" = "--check-lock" ]; then
    uv_cmd lock --check || { echo "uv.lock is stale: run 'uv lock' and commit it" >&2; exit 1; }
    exit 0
fi

if [ "${1:-}" = "--peers" ]; then
    uv_cmd sync --all-packages --frozen --compile-bytecode --extra peers --python "$PYTHON" \
        || echo "warning: the peers extra (ray, celery, redis) could not be installed: the bench skips them" >&2
    if ! command -v redis-server >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; } \
                || echo "warning: apt-get could not install redis-server: the bench skips Celery" >&2
            # Debian's package starts a system redis on :6379; the benches start their own on a free port
            if command -v service >/dev/null 2>&1; then service redis-server stop >/dev/null 2>&1 || true; fi
        else
            echo "warning: redis-server is missing (install Debian's redis-server as root): the bench skips Celery" >&2
        fi
    fi
    exit 0
fi

# --frozen: install exactly what uv.lock says (`make lint` checks that the lock matches the pyproject files).
# The dev group (pytest, ruff, mypy, ...) is uv's default group, so it comes along.
# --compile-bytecode, and compileall for the workspace's own (editable) sources: every replica, service and CLI
# start imports hundreds of modules, and where PYTHONDONTWRITEBYTECODE is set nothing would ever cache their
# bytecode (a replica's imports: 0.28 s compiled from source each time, 0.15 s from bytecode). Already compiled
# files are skipped, so a re-run costs little.
uv_cmd sync --all-packages --frozen --compile-bytecode --python "$PYTHON"
.venv/bin/python -m compileall -q -j 0 proto/src sdk/src services/*/src >/dev/null
