#!/usr/bin/env bash
# README command 1: set up, then run the whole system on its embedded default (local Ray, local disk,
# a loopback web server). Extra arguments go to jobs/demo.py (e.g. --run-dir, --address, --small).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
exec python jobs/demo.py "$@"
