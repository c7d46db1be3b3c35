#!/usr/bin/env bash
# Start the whole product locally in ./.stack: broker (the project's mosquitto/ config),
# PostgreSQL, migrations, the bridge, and a few simulated agents; then show the fleet.
# Stop everything with: .venv/bin/eucora stack down --dir .stack
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
AGENTS=${DEMO_AGENTS:-5}

eucora stack up --dir .stack
eval "$(eucora stack env --dir .stack)"

if ! { [ -f .stack/simulate.pid ] && kill -0 "$(cat .stack/simulate.pid)" 2>/dev/null; }; then
  nohup eucora simulate --agents "$AGENTS" --telemetry-interval 5 --prefix demo \
    >.stack/simulate.log 2>&1 &
  echo $! >.stack/simulate.pid
fi
echo "waiting for $AGENTS simulated agents to come online and report..."
for _ in $(seq 120); do
  # healthy = connected, with a recent heartbeat and telemetry sample
  healthy=$(eucora agents list --online --json |
    python3 -c 'import json,sys; print(sum(a["healthy"] for a in json.load(sys.stdin)))')
  [ "$healthy" -ge "$AGENTS" ] && break
  sleep 0.5
done

eucora stack status --dir .stack
eucora status
eucora agents list
