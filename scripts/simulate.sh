#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run a simulation: by default the default scenario.
# Arguments go to `fedstill simulate`, e.g. scripts/simulate.sh fmnist-iid --set num-server-rounds=3
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/fedstill simulate "$@"
