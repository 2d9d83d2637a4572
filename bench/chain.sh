#!/usr/bin/env bash
# What the chain's usual work costs against the plain proxy's own figure: one gateway, three
# APIs in front of the same nginx upstream, measured in the same run with the pinning of
# bench/proxy.sh. `plain` proxies; `auth` checks a token and a per-key rate limit (counted
# in memory, never reached); `header` runs one header-adding Rust plugin (Tyk's
# AddFooBarHeader example, as plugins/examples/foo-bar-header writes it).
#
#   bash bench/chain.sh                  # ROUNDS=3 DURATION=10s by default
#   ROUNDS=5 bash bench/chain.sh
#
# Every request carries the token, so the three differ only in what the chain does.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

echo "==> building gatehouse-dataplane and the header plugin (release)"
cargo build --release -q -p gatehouse-dataplane --bin gatehouse-dataplane
cargo build --release -q -p foo-bar-header
GH=127.0.0.1:28083 ADMIN=127.0.0.1:28093

start_upstream
mkdir -p "$work/gh"
cat > "$work/gh/api.yaml" <<YAML
apiVersion: gatehouse.dev/v1alpha1
kind: Plugin
metadata: {name: foo-bar}
spec: {path: $PWD/target/release/libfoo_bar_header.so}
---
apiVersion: gatehouse.dev/v1alpha1
kind: ApiDefinition
metadata: {name: plain}
spec:
  listenPath: /plain/
  upstream: {url: "http://$UP"}
---
apiVersion: gatehouse.dev/v1alpha1
kind: ApiDefinition
metadata: {name: auth}
spec:
  listenPath: /auth/
  upstream: {url: "http://$UP"}
  auth: {type: authToken, authToken: {header: X-Api-Key}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: ApiDefinition
metadata: {name: header}
spec:
  listenPath: /header/
  upstream: {url: "http://$UP"}
  middleware:
    pre: [{plugin: foo-bar, symbol: AddFooBarHeader}]
YAML
bench_key auth > "$work/gh/key.yaml"
start_gatehouse "$GH" "$ADMIN" "$work/gh" target/release/gatehouse-dataplane \
  --key-id-secret-file "$work/key-id-secret"
WRK_ARGS=(-H "X-Api-Key: bench-token")
for p in plain auth header; do
  for _ in $(seq 100); do
    [ "$(curl -fs -H 'X-Api-Key: bench-token' "http://$GH/$p/" | wc -c)" = 1024 ] && continue 2
    sleep 0.1
  done
  echo "/$p/ does not return the 1 KiB body" >&2
  exit 1
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$GH/auth/")" = 401 ] || { echo "/auth/ lets a request without a token in" >&2; exit 1; }

compare plain "http://$GH/plain/" "token auth + rate limit" "http://$GH/auth/" "gatehouse, same process"
compare plain "http://$GH/plain/" "one header plugin" "http://$GH/header/" "gatehouse, same process"
calls=$(curl -fs "http://$ADMIN/metrics" | awk '/^gatehouse_plugin_calls_total/ { s += $2 } END { print s + 0 }')
[ "$calls" -ge 100000 ] || { echo "the header plugin did not run ($calls calls)" >&2; exit 1; }
