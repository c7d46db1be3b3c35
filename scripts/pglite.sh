#!/usr/bin/env bash
# Install PGlite with TimescaleDB (npm, from tests/pglite/package-lock.json) for
# tests/test_timescale_ddl.py, which checks the TimescaleDB migration and the
# dashboard queries. Optional: without Node.js and npm this says so and succeeds, and
# those tests are skipped. Does not install Node.js. Safe to run again: does nothing
# when the installed packages already match the lock file.
set -euo pipefail
cd "$(dirname "$0")/../tests/pglite"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "pglite: node/npm not found, skipping (tests/test_timescale_ddl.py will be skipped)" >&2
  exit 0
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 18 ]; then
  echo "pglite: node $(node --version) is too old (18+ needed), skipping" >&2
  exit 0
fi

# npm ci writes node_modules/.package-lock.json; newer than the lock file = up to date.
stamp=node_modules/.package-lock.json
if [ -f "$stamp" ] && [ "$stamp" -nt package-lock.json ] && [ "$stamp" -nt package.json ]; then
  exit 0
fi
echo "pglite: installing PGlite with TimescaleDB into tests/pglite/node_modules" >&2
npm ci --no-audit --no-fund --loglevel=error
