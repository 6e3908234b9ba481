#!/usr/bin/env bash
# The light install as a line PC gets it: a fresh virtual environment with `pip install .`, where torch must not be
# importable (then the "batch" and "report" extras: fewvision batch's Parquet, --report's charts); then the
# light-install tests run their commands with that environment's python (models are fitted and packed by the full
# install in .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/light"
"$work/light/bin/pip" install --quiet --upgrade pip
"$work/light/bin/pip" install --quiet .
if "$work/light/bin/python" -c "import torch" 2>/dev/null; then
    echo "light install: torch is importable" >&2
    exit 1
fi
echo "light install: $(du -sm "$work/light" | cut -f1) MB, torch not importable"
"$work/light/bin/pip" install --quiet ".[batch,report]"
FEWVISION_LIGHT_PYTHON="$work/light/bin/python" .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_runtime.py -m light
