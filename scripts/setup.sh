#!/usr/bin/env bash
# Creates .venv (once) and installs the project with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and alone, pinned, so that no other requirement can drag in a different build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
