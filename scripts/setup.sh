#!/usr/bin/env bash
# Create .venv at the repo root (if missing) and install mmrank with the given extras.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh train,dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train}"
if [ ! -x .venv/bin/python ]; then
    python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
stamp=".venv/.mmrank-installed-$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # torch==2.13.0 is pinned in pyproject.toml and comes from the local CPU wheel
    .venv/bin/python -m pip install --quiet -e ".[$extras]"
    touch "$stamp"
fi
