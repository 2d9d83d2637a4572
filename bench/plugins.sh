#!/usr/bin/env bash
# What five no-op plugin hooks cost a Gatehouse proxying a 1 KiB response: one gateway,
# one API without plugins and one with five `Noop` hooks (one pre, four post), measured
# alternately in the same run with the same pinning as bench/proxy.sh.
#
#   bash bench/plugins.sh
#   ORDER_A="5 no-op plugins" PATH_A=five ORDER_B="0 plugins" PATH_B=none bash bench/plugins.sh
#                                  # the same, measured in the other order, to rule out order bias
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

echo "==> building gatehouse-dataplane and the noop plugin (release)"
cargo build --release -q -p gatehouse-dataplane --bin gatehouse-dataplane
cargo build --release -q -p noop
GH=127.0.0.1:28083

start_upstream
mkdir -p "$work/gh"
noop="$PWD/target/release/libnoop.so"
cat > "$work/gh/api.yaml" <<YAML
apiVersion: gatehouse.dev/v1alpha1
kind: Plugin
metadata: {name: noop}
spec: {path: $noop}
---
apiVersion: gatehouse.dev/v1alpha1
kind: ApiDefinition
metadata: {name: none}
spec:
  listenPath: /none/
  upstream: {url: "http://$UP"}
---
apiVersion: gatehouse.dev/v1alpha1
kind: ApiDefinition
metadata: {name: five}
spec:
  listenPath: /five/
  upstream: {url: "http://$UP"}
  middleware:
    pre: [{plugin: noop, symbol: Noop}]
    post: [{plugin: noop, symbol: Noop}, {plugin: noop, symbol: Noop}, {plugin: noop, symbol: Noop}, {plugin: noop, symbol: Noop}]
YAML
start_gatehouse "$GH" 127.0.0.1:28093 "$work/gh"
sleep 0.3
expect_1k "http://$GH/none/"
expect_1k "http://$GH/five/"
calls=$(curl -fs http://127.0.0.1:28093/metrics | awk '/^gatehouse_plugin_calls_total/ { s += $2 } END { print s + 0 }')
[ "$calls" -ge 5 ] || { echo "the five hooks did not run ($calls calls)" >&2; exit 1; }
compare "${ORDER_A:-0 plugins}" "http://$GH/${PATH_A:-none}/" "${ORDER_B:-5 no-op plugins}" "http://$GH/${PATH_B:-five}/" "gatehouse, same process"
