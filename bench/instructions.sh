#!/usr/bin/env bash
# User-space instructions per proxied request, Gatehouse against nginx, counted by
# callgrind: a count, not a time, so it barely moves with how busy the machine is (the
# kernel's share, about half of the CPU on loopback, is not counted; see bench/profile.sh).
#
#   bash bench/instructions.sh            # 10 s of 1 KiB keep-alive requests each
#   DURATION=20s CONNS=16 bash bench/instructions.sh
#   KEEP=1 bash bench/instructions.sh     # keep the callgrind files for callgrind_annotate
#   BIN=/tmp/before/target/release/gatehouse-dataplane bash bench/instructions.sh  # another build
#
# Each proxy runs alone under valgrind (one worker), warmed up, counters zeroed, then
# driven by wrk; the count is divided by the requests wrk completed.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-8}
. bench/lib.sh
apt_install valgrind

if [ -z "${BIN:-}" ]; then
  echo "==> building gatehouse-dataplane (release)"
  cargo build --release -q -p gatehouse-dataplane --bin gatehouse-dataplane
fi
BIN=${BIN:-target/release/gatehouse-dataplane}
NGX=127.0.0.1:28082 GH=127.0.0.1:28083
out=${KEEP:+bench-callgrind}
out=${out:-$work}
mkdir -p "$out"

start_upstream
nginx_conf proxy "upstream up { server $UP; keepalive 128; }
  server { listen $NGX; $NGINX_PROXY_LOCATION }"
plain_api "$work/gh"

taskset -c "$PROXY_CPU" valgrind --tool=callgrind --callgrind-out-file="$out/nginx.out" \
  nginx -c "$work/proxy.conf" -e "$work/proxy.error.log" >"$work/vg-nginx.log" 2>&1 &
pids+=($!)
count nginx "http://$NGX/" "callgrind-out-file=$out/nginx.out"

RUST_LOG=warn TOKIO_WORKER_THREADS=1 GATEHOUSE_WORKERS=1 taskset -c "$PROXY_CPU" valgrind --tool=callgrind \
  --callgrind-out-file="$out/gatehouse.out" "$BIN" --listen "$GH" \
  --admin-listen 127.0.0.1:28093 --config "$work/gh" --plugin-dir "$work/plugin-cache" >"$work/vg-gh.log" 2>&1 &
pids+=($!)
count gatehouse "http://$GH/" "callgrind-out-file=$out/gatehouse.out"

awk '{ v[$1] = $2 } END { printf "ratio gatehouse/nginx: %.2f\n", v["gatehouse:"] / v["nginx:"] }' "$work/counts.txt"
[ -n "${KEEP:-}" ] && echo "callgrind files in $out/ (callgrind_annotate $out/gatehouse.out.1)"
exit 0
