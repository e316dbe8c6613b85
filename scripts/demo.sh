#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then run `mmrank demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh train
exec .venv/bin/mmrank demo "$@"
