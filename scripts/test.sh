#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the unit and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 RAY_USAGE_STATS_ENABLED=0
export FLWR_HOME="$PWD/.flwr-home/tests"
exec .venv/bin/python -m pytest -q "$@"
