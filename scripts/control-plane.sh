#!/usr/bin/env bash
# A real Kubernetes control plane on loopback for Stratum's tests: etcd,
# kube-apiserver, kube-controller-manager and kube-scheduler, built once per
# machine from the Go module in tools/k8s/ and cached outside the repository.
#
#   scripts/control-plane.sh build          build (or reuse) the binaries; prints the bin dir
#   scripts/control-plane.sh start DIR      start a control plane whose state lives in DIR
#   scripts/control-plane.sh stop DIR       stop it (by the PIDs recorded in DIR)
#   scripts/control-plane.sh env DIR        print `export` lines for a started control plane
#
# start writes DIR/kubeconfig (admin, client certificate), DIR/env, the
# certificates and keys under DIR/pki, one log per process under DIR/logs and
# one pid file per process under DIR/pids. Every server listens on 127.0.0.1
# only, on free ports picked at start, so several control planes can run side
# by side. No kubelet runs: start creates fake Nodes (2 per zone, zones
# zone-a, zone-b, zone-c in topology.kubernetes.io/zone) and a process that
# keeps them Ready by renewing their Leases in kube-node-lease, so the
# scheduler places pods; tests mark pods Ready themselves.
#
# Environment:
#   STRATUM_CACHE               cache root (default /var/cache/stratum); binaries
#                               in $STRATUM_CACHE/k8s/<version>/bin, with VERSIONS
#   STRATUM_K8S_BIN             use the binaries in this directory (no build)
#   STRATUM_FAKE_ZONES          zones of the fake Nodes (default "zone-a zone-b zone-c")
#   STRATUM_FAKE_NODES_PER_ZONE fake Nodes per zone (default 2)
#   STRATUM_K8S_VERBOSITY       --v of the Kubernetes components (default 1)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/tools/k8s"
STRATUM_CACHE=${STRATUM_CACHE:-/var/cache/stratum}
# Versions pinned in tools/k8s/go.mod (the require lines).
K8S_VERSION=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2 }' "$tools/go.mod")
ETCD_VERSION=$(awk '$1 == "go.etcd.io/etcd/server/v3" && $2 ~ /^v/ { print $2 }' "$tools/go.mod")
[ -n "$K8S_VERSION" ] && [ -n "$ETCD_VERSION" ] || { echo "cannot read the pinned versions from $tools/go.mod" >&2; exit 1; }
cache_dir="$STRATUM_CACHE/k8s/$K8S_VERSION"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)

log() { printf '[control-plane] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# What the cached binaries were built from: a change to tools/k8s/go.mod or
# go.sum (a new pin) means a rebuild.
versions_wanted() {
  printf 'kubernetes %s\netcd %s\ngo.mod+go.sum sha256 %s\n' \
    "$K8S_VERSION" "$ETCD_VERSION" "$(cat "$tools/go.mod" "$tools/go.sum" | sha256sum | cut -d' ' -f1)"
}

bin_dir() {
  if [ -n "${STRATUM_K8S_BIN:-}" ]; then
    echo "$STRATUM_K8S_BIN"
  else
    echo "$cache_dir/bin"
  fi
}

cached() {
  [ -n "${STRATUM_K8S_BIN:-}" ] && return 0
  [ -f "$cache_dir/VERSIONS" ] || return 1
  [ "$(head -n 3 "$cache_dir/VERSIONS")" = "$(versions_wanted)" ] || return 1
  local b
  for b in "${binaries[@]}"; do [ -x "$cache_dir/bin/$b" ] || return 1; done
}

cmd_build() {
  if cached; then
    bin_dir
    return 0
  fi
  command -v go >/dev/null || die "go not found: install Go >= $(awk '$1 == "go" { print $2 }' "$tools/go.mod")"
  mkdir -p "$cache_dir"
  # One build at a time per cache (two test runs may start together).
  exec 9>"$cache_dir/.build.lock"
  flock 9
  if cached; then
    bin_dir
    return 0
  fi
  log "building Kubernetes $K8S_VERSION and etcd $ETCD_VERSION into $cache_dir (first time only; several minutes)"
  local started=$SECONDS tmp="$cache_dir/bin.tmp"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  local minor=${K8S_VERSION#v1.}
  minor=${minor%%.*}
  local ldflags="-s -w"
  local pkg
  # The version the servers report (kubectl version, /version); the build
  # scripts of Kubernetes set the same variables.
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  # sum.golang.org may be unreachable; go.sum (checked in) pins every hash.
  (cd "$tools" && GOFLAGS=-mod=readonly GOSUMDB=off CGO_ENABLED=0 \
    go build -trimpath -ldflags "$ldflags" -o "$tmp/" \
      k8s.io/kubernetes/cmd/kube-apiserver \
      k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler \
      k8s.io/kubernetes/cmd/kubectl)
  (cd "$tools" && GOFLAGS=-mod=readonly GOSUMDB=off CGO_ENABLED=0 \
    go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
  rm -rf "$cache_dir/bin"
  mv "$tmp" "$cache_dir/bin"
  chmod -R a+rX "$cache_dir"
  {
    versions_wanted
    printf 'go %s\n' "$(go env GOVERSION)"
    printf 'built %s in %ss\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$((SECONDS - started))"
  } >"$cache_dir/VERSIONS"
  log "built in $((SECONDS - started))s: $(tr '\n' ';' <"$cache_dir/VERSIONS")"
  bin_dir
}

# --- start / stop -----------------------------------------------------------

# Free TCP ports on 127.0.0.1, chosen by the kernel. Another process could
# take one before our server binds it; start then fails loudly.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# sign NAME SUBJECT EXTFILE (in the pki directory): a key and a certificate
# signed by the test CA.
sign() {
  openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile "$3" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr"
}

pki() {
  local dir=$1/pki
  mkdir -p "$dir"
  (
    cd "$dir"
    umask 077
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout ca.key -out ca.crt \
      -subj "/CN=stratum-test-ca" 2>/dev/null
    # kube-apiserver serving certificate: loopback, and the in-cluster names
    # (the first address of the service range is the kubernetes Service).
    {
      echo "subjectAltName = IP:127.0.0.1, IP:10.96.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local"
      echo "extendedKeyUsage = serverAuth"
    } >apiserver.ext
    sign apiserver "/CN=kube-apiserver" apiserver.ext
    echo "extendedKeyUsage = clientAuth" >client.ext
    # Clients: the admin (system:masters), and the controller manager and
    # scheduler under the identities their bootstrap RBAC roles expect.
    sign admin "/O=system:masters/CN=stratum-admin" client.ext
    sign controller-manager "/CN=system:kube-controller-manager" client.ext
    sign scheduler "/CN=system:kube-scheduler" client.ext
    # Service-account token signing key pair.
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

# kubeconfig DIR USER FILE
kubeconfig() {
  local dir=$1 user=$2
  cat >"$3" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: stratum-test
    cluster:
      server: https://127.0.0.1:$(cat "$dir/ports/apiserver")
      certificate-authority: $dir/pki/ca.crt
users:
  - name: $user
    user:
      client-certificate: $dir/pki/$user.crt
      client-key: $dir/pki/$user.key
contexts:
  - name: stratum-test
    context:
      cluster: stratum-test
      user: $user
current-context: stratum-test
EOF
  chmod 600 "$3"
}

# launch DIR NAME COMMAND...: start in a session of its own (a Ctrl-C of the
# caller does not reach it), log to DIR/logs/NAME.log, record the PID.
launch() {
  local dir=$1 name=$2
  shift 2
  setsid "$@" >"$dir/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$dir/pids/$name"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# wait_for DIR NAME URL [CURL ARGS...]: until URL answers 2xx (60 s).
wait_for() {
  local dir=$1 name=$2 url=$3 i
  shift 3
  for i in $(seq 1 600); do
    if curl -fsS -o /dev/null --max-time 2 "$@" "$url" 2>/dev/null; then
      return 0
    fi
    if ! alive "$dir/pids/$name"; then
      log "$name exited; last lines of $dir/logs/$name.log:"
      tail -n 30 "$dir/logs/$name.log" >&2
      return 1
    fi
    sleep 0.1
  done
  log "$name not ready at $url after 60s; last lines of $dir/logs/$name.log:"
  tail -n 30 "$dir/logs/$name.log" >&2
  return 1
}

# api DIR METHOD PATH [CURL ARGS...]: a request to kube-apiserver as admin.
api() {
  local dir=$1 method=$2 path=$3
  shift 3
  curl -fsS --max-time 10 --cacert "$dir/pki/ca.crt" --cert "$dir/pki/admin.crt" \
    --key "$dir/pki/admin.key" -X "$method" "https://127.0.0.1:$(cat "$dir/ports/apiserver")$path" "$@"
}

# ssa DIR MANAGER PATH JSON: server-side apply as field manager MANAGER.
# The heartbeat applies under a manager of its own: applying only the
# conditions as the manager of the capacity would remove the capacity.
ssa() {
  api "$1" PATCH "$3?fieldManager=$2&force=true" \
    -H 'Content-Type: application/apply-patch+yaml' --data-binary "$4" -o /dev/null
}

# "name zone" of every fake Node.
fake_node_names() {
  local z i
  for z in ${STRATUM_FAKE_ZONES:-zone-a zone-b zone-c}; do
    for i in $(seq 1 "${STRATUM_FAKE_NODES_PER_ZONE:-2}"); do echo "fake-$z-$i $z"; done
  done
}

# One heartbeat of every fake Node: its Ready status and its Lease in
# kube-node-lease, which the node lifecycle controller of
# kube-controller-manager reads in place of a kubelet's.
heartbeat() {
  local dir=$1 now beat name zone
  now=$(date -u +%Y-%m-%dT%H:%M:%S.%6NZ)
  beat=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  while read -r name zone; do
    ssa "$dir" stratum-fake-kubelet-heartbeat "/api/v1/nodes/$name/status" '{"apiVersion":"v1","kind":"Node","metadata":{"name":"'"$name"'"},"status":{"conditions":[
      {"type":"Ready","status":"True","reason":"KubeletReady","message":"fake node: no kubelet, kept Ready by scripts/control-plane.sh","lastHeartbeatTime":"'"$beat"'"},
      {"type":"MemoryPressure","status":"False","reason":"KubeletHasSufficientMemory","lastHeartbeatTime":"'"$beat"'"},
      {"type":"DiskPressure","status":"False","reason":"KubeletHasNoDiskPressure","lastHeartbeatTime":"'"$beat"'"},
      {"type":"PIDPressure","status":"False","reason":"KubeletHasSufficientPID","lastHeartbeatTime":"'"$beat"'"}]}}' || return 1
    ssa "$dir" stratum-fake-kubelet-heartbeat "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/$name" '{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"'"$name"'","namespace":"kube-node-lease"},"spec":{"holderIdentity":"'"$name"'","leaseDurationSeconds":40,"renewTime":"'"$now"'"}}' || return 1
  done < <(fake_node_names)
}

create_fake_nodes() {
  local dir=$1 name zone
  while read -r name zone; do
    ssa "$dir" stratum-fake-kubelet "/api/v1/nodes/$name" '{"apiVersion":"v1","kind":"Node","metadata":{"name":"'"$name"'","labels":{
      "kubernetes.io/hostname":"'"$name"'","kubernetes.io/os":"linux","kubernetes.io/arch":"amd64",
      "topology.kubernetes.io/region":"fake-region","topology.kubernetes.io/zone":"'"$zone"'","stratum.dev/fake-node":"true"}}}'
    ssa "$dir" stratum-fake-kubelet "/api/v1/nodes/$name/status" '{"apiVersion":"v1","kind":"Node","metadata":{"name":"'"$name"'"},"status":{
      "capacity":{"cpu":"64","memory":"256Gi","pods":"250","ephemeral-storage":"500Gi"},
      "allocatable":{"cpu":"64","memory":"256Gi","pods":"250","ephemeral-storage":"500Gi"},
      "addresses":[{"type":"Hostname","address":"'"$name"'"}],
      "nodeInfo":{"kubeletVersion":"'"$K8S_VERSION"'","operatingSystem":"linux","architecture":"amd64","osImage":"fake","containerRuntimeVersion":"fake://0",
        "machineID":"","systemUUID":"","bootID":"","kernelVersion":"","kubeProxyVersion":""}}}'
  done < <(fake_node_names)
  heartbeat "$dir"
}

# The heartbeat loop, a process of its own that stop ends by PID. Leases
# last 40 s; a renewal every 10 s keeps the nodes Ready.
heartbeat_loop() {
  local dir=$1 sleeper=
  # `wait` (unlike a foreground sleep) returns as soon as TERM arrives.
  trap 'kill $sleeper 2>/dev/null; exit 0' TERM INT
  while true; do
    sleep 10 &
    sleeper=$!
    wait $sleeper
    heartbeat "$dir" || log "fake node heartbeat failed (is kube-apiserver up?)"
  done
}

cmd_start() {
  local dir=${1:?usage: control-plane.sh start DIR}
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  local p
  for p in "$dir"/pids/*; do
    if alive "$p"; then die "$(basename "$p") is already running from $dir; stop it first"; fi
  done
  local bin t0
  t0=$(date +%s%N)
  bin=$(cmd_build)
  for p in "${binaries[@]}"; do [ -x "$bin/$p" ] || die "$bin/$p is missing"; done
  command -v openssl >/dev/null || die "openssl not found (scripts/setup.sh installs it)"
  rm -rf "$dir/pki" "$dir/etcd" "$dir/logs" "$dir/pids" "$dir/ports" "$dir/env"
  mkdir -p "$dir/logs" "$dir/pids" "$dir/ports"
  trap 'log "start failed; stopping what was started"; cmd_stop "$dir" >/dev/null 2>&1 || true' ERR
  local ports
  read -r -a ports <<<"$(free_ports 5)"
  echo "${ports[0]}" >"$dir/ports/etcd"
  echo "${ports[1]}" >"$dir/ports/etcd-peer"
  echo "${ports[2]}" >"$dir/ports/apiserver"
  echo "${ports[3]}" >"$dir/ports/controller-manager"
  echo "${ports[4]}" >"$dir/ports/scheduler"
  pki "$dir"
  kubeconfig "$dir" admin "$dir/kubeconfig"
  kubeconfig "$dir" controller-manager "$dir/controller-manager.kubeconfig"
  kubeconfig "$dir" scheduler "$dir/scheduler.kubeconfig"

  local etcd_url="http://127.0.0.1:${ports[0]}" peer_url="http://127.0.0.1:${ports[1]}"
  # No fsync: the data of a test control plane is disposable, and fsync
  # dominates etcd's latency on a small VM.
  launch "$dir" etcd "$bin/etcd" --name stratum-test --data-dir "$dir/etcd" \
    --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "$peer_url" --initial-advertise-peer-urls "$peer_url" \
    --initial-cluster "stratum-test=$peer_url" --unsafe-no-fsync --log-level warn
  wait_for "$dir" etcd "$etcd_url/health"

  local v=${STRATUM_K8S_VERBOSITY:-1}
  # OwnerReferencesPermissionEnforcement is on so that the tests prove the
  # operator's RBAC for blockOwnerDeletion (<plural>/finalizers). No
  # endpoint reconciler: the kubernetes Service cannot point at loopback.
  # A /16 of Service IPs: each cluster takes three (-rw, -ro, -r), and the
  # benchmark creates hundreds of clusters.
  launch "$dir" kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers "$etcd_url" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "${ports[2]}" \
    --tls-cert-file "$dir/pki/apiserver.crt" --tls-private-key-file "$dir/pki/apiserver.key" \
    --client-ca-file "$dir/pki/ca.crt" \
    --service-account-key-file "$dir/pki/sa.pub" \
    --service-account-signing-key-file "$dir/pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --authorization-mode Node,RBAC \
    --enable-admission-plugins OwnerReferencesPermissionEnforcement \
    --service-cluster-ip-range 10.96.0.0/16 --endpoint-reconciler-type none \
    --allow-privileged=true --profiling=false --v "$v"
  wait_for "$dir" kube-apiserver "https://127.0.0.1:${ports[2]}/readyz" \
    --cacert "$dir/pki/ca.crt" --cert "$dir/pki/admin.crt" --key "$dir/pki/admin.key"

  # Every default controller (statefulset, garbagecollector, endpoints,
  # endpointslice, persistentvolume-binder, serviceaccount, serviceaccount-
  # token, namespace, nodelifecycle, ...). One instance: no leader election.
  launch "$dir" kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$dir/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$dir/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$dir/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "${ports[3]}" \
    --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file "$dir/pki/sa.key" \
    --root-ca-file "$dir/pki/ca.crt" \
    --cluster-name stratum-test --profiling=false --v "$v"
  launch "$dir" kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig "$dir/scheduler.kubeconfig" \
    --authentication-kubeconfig "$dir/scheduler.kubeconfig" \
    --authorization-kubeconfig "$dir/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "${ports[4]}" \
    --leader-elect=false --profiling=false --v "$v"
  wait_for "$dir" kube-controller-manager "https://127.0.0.1:${ports[3]}/healthz" -k
  wait_for "$dir" kube-scheduler "https://127.0.0.1:${ports[4]}/healthz" -k

  create_fake_nodes "$dir"
  heartbeat_loop "$dir" >>"$dir/logs/fake-nodes.log" 2>&1 </dev/null &
  echo $! >"$dir/pids/fake-nodes"
  trap - ERR

  cat >"$dir/env" <<EOF
export STRATUM_TEST_KUBECONFIG=$dir/kubeconfig
export STRATUM_K8S_BIN=$bin
EOF
  local ms=$((($(date +%s%N) - t0) / 1000000))
  log "ready in $((ms / 1000)).$(printf '%03d' $((ms % 1000)))s: kube-apiserver https://127.0.0.1:${ports[2]}, kubeconfig $dir/kubeconfig"
  log "$(fake_node_names | wc -l) fake nodes in zones: ${STRATUM_FAKE_ZONES:-zone-a zone-b zone-c}; stop with: $0 stop $dir"
}

cmd_stop() {
  local dir=${1:?usage: control-plane.sh stop DIR} name pid i
  [ -d "$dir/pids" ] || { log "nothing to stop in $dir"; return 0; }
  # Clients first, etcd last.
  for name in fake-nodes kube-scheduler kube-controller-manager kube-apiserver etcd; do
    [ -f "$dir/pids/$name" ] || continue
    pid=$(cat "$dir/pids/$name")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      # kube-apiserver's graceful termination can hang for long after it
      # stopped serving; the state is disposable, so 3 s is enough.
      for i in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      if kill -0 "$pid" 2>/dev/null; then
        log "$name ($pid) did not stop within 3s of SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
      fi
    fi
    rm -f "$dir/pids/$name"
  done
  log "stopped the control plane of $dir"
}

case "${1:-}" in
  build) cmd_build ;;
  start) cmd_start "${2:-}" ;;
  stop) cmd_stop "${2:-}" ;;
  env) cat "${2:?usage: control-plane.sh env DIR}/env" ;;
  *) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
