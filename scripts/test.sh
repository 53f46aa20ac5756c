#!/usr/bin/env bash
# Install what the tests need (idempotent), then run every test: unit tests,
# CRD drift, the engine/local-runtime tests against real PostgreSQL, and the
# Kubernetes tests (tests/k8s_*.rs, `cargo test --workspace` finds every
# test binary, tests/k8s_e2e.rs included: the operator with real databases
# run by the fake kubelet of tests/support/kubelet.rs; tests/k8s_pxc.rs: a
# Galera cluster's full crash recovered by the controller; tests/k8s_pg_ha.rs:
# PostgreSQL failover, switchover, refused switchover and an operator killed
# mid-failover on Kubernetes, under writes, with the same kubelet;
# tests/k8s_reconfigure.rs: changed PostgreSQL parameters and my.cnf
# reaching running instances, live or as a pending restart; tests/k8s_rolling.rs:
# rolling updates of PostgreSQL and Galera pods and a scale-down of the
# primary, under writes, with the same kubelet) against a real
# control plane that this script starts and stops (scripts/control-plane.sh).
# Ends with one summary line over every test binary: "tests: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

log=$(mktemp)
# One Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, fake Nodes; binaries cached by setup.sh) for the
# tests/k8s_*.rs tests, stopped on exit (and before the summary line, so
# that the summary is the last line printed).
cp_dir=$(mktemp -d /tmp/stratum-control-plane.XXXXXX)
stop_control_plane() {
  if [ -n "$cp_dir" ]; then
    bash scripts/control-plane.sh stop "$cp_dir" >&2 || true
    rm -rf "$cp_dir"
    cp_dir=
  fi
}
trap 'stop_control_plane; rm -f "$log"' EXIT
bash scripts/control-plane.sh start "$cp_dir"
# shellcheck disable=SC1091
source "$cp_dir/env"
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
stop_control_plane
passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
echo
echo "tests: ${passed} passed, ${failed} failed"
exit "$status"
