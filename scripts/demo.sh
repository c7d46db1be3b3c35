#!/usr/bin/env bash
# Start the whole product locally (broker, database, migrations, bridge) in ./.stack,
# then show that it is up. Stop it with: .venv/bin/eucora stack down
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

eucora stack up --dir .stack
eval "$(eucora stack env --dir .stack)"
eucora stack status --dir .stack
eucora status
