#!/usr/bin/env bash
# Create .venv (once) with the CPU build of torch and this package with its extras.
# Usage: bash scripts/setup.sh [extras]   (default extras: test)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned: 2.13.0 is the small CPU build this project's machines carry (see README);
# an unpinned torch would pull a multi-GB CUDA build
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "is ignored: it is neither" || true
fi
.venv/bin/pip install -q --disable-pip-version-check -e ".[${extras}]" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import lightning_gradguard, torch, lightning; print('ready: torch', torch.__version__, '| lightning', lightning.__version__)"
