#!/usr/bin/env bash
# Install what the tests need (idempotent), then run every test: unit tests,
# CRD drift, and the engine/local-runtime tests against real PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec cargo test --workspace --no-fail-fast "$@"
