#!/usr/bin/env bash
# All checks on a fresh machine: set up .venv, then lint, type-check and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh train,dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy .
scripts/security.sh  # bandit (fails on findings), pip-audit (reports; needs the network)
exec .venv/bin/python -m pytest "$@"
