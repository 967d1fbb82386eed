#!/usr/bin/env bash
# Set up (once) and run the demo: a real training that hits gradient problems, and what the guard saw and did.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh examples
exec .venv/bin/python examples/demo.py "$@"
