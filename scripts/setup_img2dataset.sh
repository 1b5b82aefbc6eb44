#!/usr/bin/env bash
# Creates .venv-img2dataset (once) with img2dataset, kept apart from the product's .venv:
# img2dataset pins pandas<3 and pulls opencv, albumentations and wandb.
# Usage: scripts/setup_img2dataset.sh [VENV_DIR]   (default: .venv-img2dataset in the repo root)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${IMG2DATASET_VENV:-.venv-img2dataset}}
PYTHON=${PYTHON:-python3}
export NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=disabled
if [ ! -x "$VENV/bin/img2dataset" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "img2dataset>=1.45"
fi
"$VENV/bin/python" -c "import img2dataset" && echo "img2dataset ready in $VENV"
