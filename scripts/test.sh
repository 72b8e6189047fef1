#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the unit and integration tests. FEDSTILL_SKIP_SETUP=1 skips the
# setup when it has just run (.ci/run sets up once, then checks, then calls this).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${FEDSTILL_SKIP_SETUP:-0}" != 1 ]; then
  ./scripts/setup.sh
fi
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 RAY_USAGE_STATS_ENABLED=0
export FLWR_HOME="$PWD/.flwr-home/tests"
exec .venv/bin/python -m pytest -q --durations=25 "$@"
