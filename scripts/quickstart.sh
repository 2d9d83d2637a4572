#!/usr/bin/env bash
# Runs Gatehouse standalone on the example config in examples/standalone, in front of an
# example upstream on loopback, and prints requests to try. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh
need_rust

apt_install gcc libc6-dev
echo "==> building (release)"
cargo build --release -q -p gatehouse-dataplane --bin gatehouse-dataplane --example echo_upstream
cargo build --release -q -p foo-bar-header -p session-meta -p hit-counter -p response-rewrite
plugins=/tmp/gatehouse-quickstart/plugins
mkdir -p "$plugins"
for p in foo_bar_header session_meta hit_counter response_rewrite; do cp "target/release/lib$p.so" "$plugins/"; done
cc -shared -fPIC -O2 -I plugins/sdk/include -o "$plugins/libc_add_header.so" plugins/examples/c-add-header/add_header.c

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

target/release/examples/echo_upstream 127.0.0.1:18081 &
pids+=($!)
target/release/gatehouse-dataplane --listen 127.0.0.1:18080 --admin-listen 127.0.0.1:19090 \
  --config examples/standalone --plugin-dir /tmp/gatehouse-quickstart/loaded --analytics stdout &
pids+=($!)

for _ in $(seq 100); do
  curl -fs localhost:19090/readyz >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fs localhost:19090/readyz >/dev/null || { echo "gateway did not become ready" >&2; exit 1; }

cat <<'TRY'

Gatehouse is serving on http://localhost:18080 (admin on http://localhost:19090).
Try:
  curl -s localhost:18080/httpbin/get?hello=world        # keyless; plugins add Foo: Bar (Rust) and X-C-Plugin (C)
  curl -i localhost:18080/orders/list                    # 401: needs a key
  curl -s -H 'Authorization: alice-secret-key' localhost:18080/orders/list  # a plugin adds the key's metadata
  curl -s 'localhost:18080/orders/list?key=alice-secret-key'               # the same key, as a query parameter
  curl -s -H 'Authorization: alice-secret-key' localhost:18080/hits/a     # the hit counter answers itself
  curl -i localhost:18080/rewrite/x                      # a response hook rewrote the upstream's answer
  curl -s localhost:19090/config                         # what is served, plugins loaded, config errors
  curl -s localhost:19090/metrics | grep gatehouse_      # Prometheus metrics, plugin hooks included
Edit examples/standalone/*.yaml and the change is served without a restart.
Analytics records are printed below. Ctrl-C to stop.

TRY
wait
