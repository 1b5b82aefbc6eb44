#!/usr/bin/env bash
# Creates .venv-openclip (once) with open_clip + webdataset, the reference loader of
# benchmarks/bench_ingest.py, kept apart from the product's .venv: open_clip needs torchvision, which only
# imports beside torch 2.14.1 (not the product's 2.13.0). The project itself is never installed into it
# (with its dependencies it would downgrade torch and break torchvision); the benchmark puts the repository
# on sys.path only where it needs our files, not in this venv.
# Usage: scripts/setup_open_clip.sh [VENV_DIR]   (default: .venv-openclip in the repo root)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${OPEN_CLIP_VENV:-.venv-openclip}}
PYTHON=${PYTHON:-python3}
if ! "$VENV/bin/python" -c "import open_clip, open_clip_train.data, webdataset, torchvision
assert webdataset.__version__ <= '0.2.86'" 2>/dev/null; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  # open_clip's requirements-training.txt: webdataset<=0.2.86 (1.x breaks open_clip_train's tar reader)
  # and pandas (open_clip_train.data imports it).
  "$VENV/bin/python" -m pip install -q open_clip_torch "webdataset>=0.2.5,<=0.2.86" pandas
fi
"$VENV/bin/python" -c "import open_clip, webdataset; print('open_clip', open_clip.__version__, 'ready in $VENV')"
