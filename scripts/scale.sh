#!/usr/bin/env bash
# The fleet-scale checks (tests marked `scale`, tests/test_scale.py: thousands of
# simulated agents), one at a time since each loads both cores. CI runs them after
# scripts/test.sh; they take longer than the suite (about 15-20 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec pytest -m scale "$@"
