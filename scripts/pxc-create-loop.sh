#!/bin/bash
# Create the 3-member Galera cluster of the local_pxc tests N times on the
# local runtime (P at a time), each until Healthy (every member Synced in
# a 3-member Primary component), then stop and delete it. Prints one line
# per run ("OK <seconds> <dir>" or "FAIL <seconds> <dir>"; a failed run's
# directory is kept with every log) and a summary. Reproduces creation
# flakes; the timings are observations on a shared machine, not a benchmark.
#
#   cargo build --bin stratum
#   scripts/pxc-create-loop.sh [N=10] [P=1]
set -euo pipefail
N=${1:-10}
P=${2:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${STRATUM_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/stratum}
[ -x "$BIN" ] || { echo "no $BIN: run cargo build --bin stratum first" >&2; exit 1; }
WORK=$(mktemp -d /tmp/pxc-create-loop.XXXX)
chmod 755 "$WORK"
cat > "$WORK/cluster.yaml" <<'EOF'
apiVersion: stratum.dev/v1alpha1
kind: PxcCluster
metadata:
  name: simple-pxc
spec:
  instances: 3
  flavor: MariaDB
  version: "10.11"
  storage:
    size: 1Gi
  configuration: |
    [mysqld]
    innodb_buffer_pool_size = 64M
    max_connections = 100
EOF

healthy() {
  local s
  s=$("$BIN" local status -o json --state-dir "$1" 2>/dev/null) || return 1
  [ -n "$s" ] || return 1
  echo "$s" | python3 -c '
import json, sys
s = json.load(sys.stdin)
ok = s["phase"] == "Healthy" and all(
    i.get("wsrep", {}).get("state") == "Synced" and i["wsrep"].get("clusterSize") == 3
    for i in s["instances"])
sys.exit(0 if ok else 1)' 2>/dev/null
}

one() {
  local d
  d=$(mktemp -d "$WORK/run.XXXX")
  chmod 755 "$d"
  local start end ok=0
  start=$(date +%s.%N)
  STRATUM_LOCAL_TICK_MS=200 RUST_LOG=info \
    "$BIN" local up -f "$WORK/cluster.yaml" --state-dir "$d/state" > "$d/up.log" 2>&1 &
  local up=$!
  while (( $(date +%s) - ${start%.*} < 240 )); do
    if healthy "$d/state"; then ok=1; break; fi
    sleep 0.2
  done
  end=$(date +%s.%N)
  "$BIN" local down --state-dir "$d/state" > /dev/null 2>&1 || true
  wait "$up" || true
  if [ $ok = 1 ]; then
    printf 'OK %.1f %s\n' "$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')" "$d"
    rm -rf "$d"
  else
    printf 'FAIL %.1f %s\n' "$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')" "$d"
  fi
}

stream() { for _ in $(seq 1 "$1"); do one; done; }

for s in $(seq 1 "$P"); do
  stream $(( N / P + (s <= N % P ? 1 : 0) )) > "$WORK/stream-$s.txt" &
  sleep 5
done
wait
cat "$WORK"/stream-*.txt
awk '{ print $2, $1 }' "$WORK"/stream-*.txt | sort -n | awk '
  { t[NR] = $1; if ($2 != "OK") fail++ }
  END { m = NR % 2 ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2
        printf "%d runs, %d failed; Healthy after: median %.1fs, min %.1fs, max %.1fs\n", NR, fail, m, t[1], t[NR] }'
echo "results and the directories of failed runs: $WORK"
