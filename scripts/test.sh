#!/usr/bin/env bash
# The test suite CI runs: lint, types, then every test against a real Mosquitto and a
# real PostgreSQL that the fixtures start (see tests/fix_*.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# Where Node.js is present the TimescaleDB DDL check must run, not be skipped.
if command -v node >/dev/null 2>&1; then export EUCORA_REQUIRE_PGLITE=1; fi

ruff check .
ruff format --check .
mypy
python -m schemas.generate --check

set +e
# Two workers (EUCORA_TEST_WORKERS, 0 = in this process): each starts its own services.
pytest -n "${EUCORA_TEST_WORKERS:-2}" "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit $rc
