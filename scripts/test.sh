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

logs=$(mktemp -d)
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
trap 'stop_control_plane; rm -rf "$logs"' EXIT
bash scripts/control-plane.sh start "$cp_dir"
# shellcheck disable=SC1091
source "$cp_dir/env"

# Build every test binary once, then run them in two lanes at the same
# time: the Kubernetes binaries (tests/k8s_*.rs) and everything else
# (unit tests, engine tests, tests/local_*.rs, doc tests). Both lanes spend
# most of their time waiting on real servers (failure detection, leases,
# state transfers), so together they take about as long as the longer one
# instead of the sum. Within a binary, tests run as cargo runs them. Each
# output line is prefixed with its lane; each lane's output is kept for the
# summary.
cargo test --workspace --no-run "$@"
run_lane() {
  local name=$1
  shift
  {
    rc=0
    "$@" 2>&1 || rc=$?
    echo "$rc" >"$logs/$name.rc"
  } | tee "$logs/$name.log" | sed -u "s/^/[$name] /"
}
run_lane k8s cargo test -p stratum --no-fail-fast --test 'k8s_*' "$@" &
k8s_lane=$!
run_lane rest bash -c '
  status=0
  cargo test --workspace --exclude stratum --no-fail-fast "$@" || status=$?
  cargo test -p stratum --no-fail-fast --lib --bins --test "[!k]*" "$@" || status=$?
  cargo test --workspace --doc "$@" || status=$?
  exit $status' rest "$@" &
rest_lane=$!
wait "$k8s_lane" "$rest_lane" || true
stop_control_plane

status=0
for name in k8s rest; do
  rc=$(cat "$logs/$name.rc" 2>/dev/null || echo 1)
  [ "$rc" = 0 ] || status=$rc
done
cat "$logs/k8s.log" "$logs/rest.log" >"$logs/all.log"
passed=$(grep -aEo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$logs/all.log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -aEo '[0-9]+ failed;' "$logs/all.log" | awk '{s+=$1} END {print s+0}')
echo
if [ "$failed" != 0 ] || [ "$status" != 0 ]; then
  echo "failed tests:"
  grep -ahE '^test .* FAILED$' "$logs/all.log" | sed 's/^/  /' || true
  grep -ahE '^error: .*(failed|could not compile)' "$logs/all.log" | sed 's/^/  /' || true
fi
echo "tests: ${passed} passed, ${failed} failed"
exit "$status"
