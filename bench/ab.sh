#!/usr/bin/env bash
# A Gatehouse build against another one (say, the last release, or the commit before a
# change) as a plain reverse proxy, in the same run: the before/after figure of a change.
#
#   git worktree add /tmp/before HEAD~1 && (cd /tmp/before && cargo build --release -p gatehouse-dataplane)
#   bash bench/ab.sh /tmp/before/target/release/gatehouse-dataplane
#   ROUNDS=7 DURATION=10s bash bench/ab.sh OLD-BINARY
#   bash bench/ab.sh OLD-BINARY NEW-BINARY      # two builds made elsewhere; nothing is built
#
# Same layout as proxy.sh: each proxy alone on CPU 0 in its turn, rounds alternate, medians.
set -euo pipefail
cd "$(dirname "$0")/.."
base=$(realpath "${1:?usage: bench/ab.sh BASELINE-BINARY [NEW-BINARY]}")
new=${2:+$(realpath "$2")}
. bench/lib.sh

if [ -z "$new" ]; then
  echo "==> building gatehouse-dataplane (release)"
  cargo build --release -q -p gatehouse-dataplane --bin gatehouse-dataplane
  new=target/release/gatehouse-dataplane
fi
A=127.0.0.1:28084 B=127.0.0.1:28085

start_upstream
plain_api "$work/gh"
start_gatehouse "$A" 127.0.0.1:28094 "$work/gh" "$base"
start_gatehouse "$B" 127.0.0.1:28095 "$work/gh" "$new"
expect_1k "http://$A/"
expect_1k "http://$B/"
compare baseline "http://$A/" "new" "http://$B/" "proxy (1 worker, CPU $PROXY_CPU)"
