#!/usr/bin/env bash
# Gatehouse against nginx as a plain reverse proxy: a 1 KiB response over keep-alive
# connections, both proxies with one worker on the same CPU, measured in the same run.
#
#   bash bench/proxy.sh                 # 3 rounds of 10 s each per proxy
#   ROUNDS=5 DURATION=20s CONNS=128 bash bench/proxy.sh
#
# Layout on a 2-core machine: the proxy under test alone on CPU 0; the upstream (nginx,
# one worker) and wrk (one thread) on CPU 1. Rounds alternate nginx / Gatehouse so drift
# on a shared machine hits both; medians are reported.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

echo "==> building gatehouse-dataplane (release)"
cargo build --release -q -p gatehouse-dataplane --bin gatehouse-dataplane
NGX=127.0.0.1:28082 GH=127.0.0.1:28083

start_upstream
start_nginx_proxy "$NGX"
plain_api "$work/gh"
start_gatehouse "$GH" 127.0.0.1:28093 "$work/gh"
sleep 0.3
expect_1k "http://$NGX/"
expect_1k "http://$GH/"
compare "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///')" "http://$NGX/" gatehouse "http://$GH/" "proxy (1 worker, CPU $PROXY_CPU)"
