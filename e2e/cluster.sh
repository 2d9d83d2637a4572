#!/usr/bin/env bash
# Local Kubernetes API server for Gatehouse's end-to-end tests.
#
#   bash e2e/cluster.sh build        build (or reuse) the kube-apiserver+etcd binary,
#                                    helm, and kubectl if missing; prints
#                                    KUBE_APISERVER=, HELM=, KUBECTL= lines
#   bash e2e/cluster.sh start DIR [-- extra kube-apiserver flags]
#                                    start in the background (builds first if needed),
#                                    wait for DIR/kubeconfig, print its path
#   bash e2e/cluster.sh stop DIR     stop it (SIGTERM, then SIGKILL after 30 s)
#
# Every start begins with an empty cluster (see e2e/cluster/main.go).
# Built artefacts live in ${GATEHOUSE_CACHE:-$HOME/.cache/gatehouse}; Go's module
# and build caches are the defaults (under $HOME), so rebuilds on the same
# machine are cheap and a fresh machine builds from the Go module proxy.
#
# Environment:
#   GATEHOUSE_CACHE                where binaries are cached
#   GATEHOUSE_CLUSTER_START_TIMEOUT seconds to wait for the kubeconfig (default 120)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC="$HERE/cluster"
CACHE="${GATEHOUSE_CACHE:-$HOME/.cache/gatehouse}"
HELM_VERSION="v3.22.0"
START_TIMEOUT="${GATEHOUSE_CLUSTER_START_TIMEOUT:-120}"

die() { echo "cluster.sh: error: $*" >&2; exit 1; }
log() { echo "cluster.sh: $*" >&2; }

# Keep builds polite: the machine is shared with other compilers.
gobuild() { nice -n 19 env GOMAXPROCS="${GOMAXPROCS:-2}" go "$@"; }

need_go() {
  command -v go >/dev/null 2>&1 || die "'go' not found in PATH; install Go >= 1.25 to build the test cluster"
}

k8s_version() {
  local v
  v="$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$SRC/go.mod")"
  [ -n "$v" ] || die "cannot read the k8s.io/kubernetes version from $SRC/go.mod"
  echo "$v"
}

# Version stamping as Kubernetes' own build does: without it /version reports
# "v0.0.0-master", which kubectl cannot parse and helm's kubeVersion checks reject.
version_ldflags() {
  local v major minor pkg flags="-s -w"
  v="$(k8s_version)"
  major="${v#v}"; major="${major%%.*}"
  minor="${v#v*.}"; minor="${minor%%.*}"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags="$flags -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  echo "$flags"
}

binary_path() {
  local hash
  hash="$({ cat "$SRC/go.mod" "$SRC/go.sum" "$SRC/main.go"; version_ldflags; } | sha256sum | cut -c1-16)"
  echo "$CACHE/kube-apiserver-$(k8s_version)-$hash"
}

ensure_apiserver() {
  local bin tmp start
  bin="$(binary_path)"
  if [ -x "$bin" ]; then
    return 0
  fi
  need_go
  mkdir -p "$CACHE"
  tmp="$bin.tmp.$$"
  log "building $(basename "$bin") (a cold build takes ~5 min on 2 cores, more when the machine is busy)..."
  start=$(date +%s)
  if ! (cd "$SRC" && gobuild build -trimpath -ldflags="$(version_ldflags)" -o "$tmp" .); then
    rm -f "$tmp"
    die "building the kube-apiserver binary in $SRC failed (see the output above)"
  fi
  mv -f "$tmp" "$bin"
  log "built $bin in $(( $(date +%s) - start )) s"
}

ensure_helm() {
  local dir="$CACHE/helm-$HELM_VERSION"
  if [ ! -x "$dir/helm" ]; then
    need_go
    mkdir -p "$dir"
    log "installing helm $HELM_VERSION into $dir..."
    # Run outside the repository so the cluster module's go.mod is not involved.
    (cd "$dir" && GOBIN="$dir" gobuild install -trimpath \
        -ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
        "helm.sh/helm/v3/cmd/helm@$HELM_VERSION") \
      || die "go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION failed"
  fi
  mkdir -p "$CACHE/bin"
  ln -sfn "$dir/helm" "$CACHE/bin/helm"
}

# Prints the kubectl to use: the one on PATH, or one built from the pinned
# k8s.io/kubernetes (already in the module cache) into the cache.
ensure_kubectl() {
  if command -v kubectl >/dev/null 2>&1; then
    command -v kubectl
    return 0
  fi
  local version bin work
  version="$(k8s_version)"
  bin="$CACHE/kubectl-$version"
  if [ ! -x "$bin" ]; then
    need_go
    mkdir -p "$CACHE"
    log "kubectl not on PATH; building kubectl $version into $bin..."
    # A scratch copy of the module: cmd/kubectl needs go.sum entries that the
    # tidy go.sum of the cluster module does not carry.
    work="$(mktemp -d)"
    cp "$SRC/go.mod" "$SRC/go.sum" "$work/"
    if ! (cd "$work" && gobuild build -mod=mod -trimpath -ldflags="$(version_ldflags)" -o "$bin.tmp.$$" k8s.io/kubernetes/cmd/kubectl); then
      rm -rf "$work" "$bin.tmp.$$"
      die "building kubectl $version failed"
    fi
    rm -rf "$work"
    mv -f "$bin.tmp.$$" "$bin"
  fi
  mkdir -p "$CACHE/bin"
  ln -sfn "$bin" "$CACHE/bin/kubectl"
  echo "$bin"
}

abs_dir() {
  mkdir -p "$1" || die "cannot create directory $1"
  (cd "$1" && pwd)
}

# Succeeds if the pid in DIR/cluster.pid is alive and is our server.
running_pid() {
  local dir="$1" pid
  [ -f "$dir/cluster.pid" ] || return 1
  pid="$(cat "$dir/cluster.pid")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "--data-dir $dir " || return 1
  echo "$pid"
}

cmd_build() {
  ensure_apiserver
  ensure_helm
  local kubectl
  kubectl="$(ensure_kubectl)"
  echo "KUBE_APISERVER=$(binary_path)"
  echo "HELM=$CACHE/bin/helm"
  echo "KUBECTL=$kubectl"
}

cmd_start() {
  [ $# -ge 1 ] || die "usage: $0 start DIR [-- kube-apiserver flags...]"
  local dir bin pid waited=0
  dir="$(abs_dir "$1")"; shift
  [ "${1:-}" = "--" ] && shift
  if pid="$(running_pid "$dir")"; then
    die "a cluster is already running for $dir (pid $pid); run: $0 stop $dir"
  fi
  ensure_apiserver
  bin="$(binary_path)"
  rm -f "$dir/kubeconfig" "$dir/cluster.pid"
  # setsid: detach from the caller's process group and terminal; all output
  # goes to the log so no pipe of the caller is held open.
  setsid "$bin" --data-dir "$dir" -- "$@" </dev/null >"$dir/kube-apiserver.log" 2>&1 &
  pid=$!
  echo "$pid" > "$dir/cluster.pid"
  while [ ! -s "$dir/kubeconfig" ]; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "---- last lines of $dir/kube-apiserver.log ----" >&2
      tail -n 40 "$dir/kube-apiserver.log" >&2 || true
      rm -f "$dir/cluster.pid"
      die "the cluster process exited before it became ready (log: $dir/kube-apiserver.log)"
    fi
    if [ "$waited" -ge $(( START_TIMEOUT * 5 )) ]; then
      echo "---- last lines of $dir/kube-apiserver.log ----" >&2
      tail -n 40 "$dir/kube-apiserver.log" >&2 || true
      kill -KILL "$pid" 2>/dev/null || true
      rm -f "$dir/cluster.pid"
      die "no $dir/kubeconfig after ${START_TIMEOUT}s; killed pid $pid"
    fi
    sleep 0.2
    waited=$(( waited + 1 ))
  done
  log "cluster ready after ~$(( waited / 5 )) s (pid $pid, log $dir/kube-apiserver.log)"
  echo "$dir/kubeconfig"
}

cmd_stop() {
  [ $# -eq 1 ] || die "usage: $0 stop DIR"
  local dir pid i
  [ -d "$1" ] || die "no such directory: $1"
  dir="$(cd "$1" && pwd)"
  if ! pid="$(running_pid "$dir")"; then
    rm -f "$dir/cluster.pid"
    log "no cluster running for $dir"
    return 0
  fi
  kill -TERM "$pid"
  for i in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "pid $pid did not stop within 30 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/cluster.pid" "$dir/kubeconfig"
  log "stopped cluster for $dir (pid $pid)"
}

case "${1:-}" in
  build) shift; cmd_build "$@" ;;
  start) shift; cmd_start "$@" ;;
  stop)  shift; cmd_stop "$@" ;;
  *) die "usage: $0 build | start DIR [-- kube-apiserver flags...] | stop DIR" ;;
esac
