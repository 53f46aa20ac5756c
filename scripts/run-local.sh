#!/usr/bin/env bash
# Install what is needed (idempotent), build Stratum, and run a PostgreSQL
# cluster from deploy/examples on the local runtime, in the foreground.
# Ctrl-C stops it; the data stays in the state directory for the next run.
#
#   scripts/run-local.sh [CLUSTER.yaml] [STATE_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
file=${1:-deploy/examples/postgres-ha.yaml}
state=${2:-.stratum/$(basename "$file" .yaml)}
bash scripts/setup.sh
cargo build --bin stratum
echo "[run-local] $file -> $state; in another shell: target/debug/stratum local status --state-dir $state" >&2
exec target/debug/stratum local up -f "$file" --state-dir "$state"
