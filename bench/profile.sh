#!/usr/bin/env bash
# Where Gatehouse's CPU goes on the plain proxy path: perf samples of the gateway (one
# worker, pinned as in bench/proxy.sh) while wrk drives 1 KiB keep-alive requests through
# it. Prints the hottest functions by self time, and the same time summed by crate (and
# the kernel), so a change can be aimed at what is measured rather than what is read.
# First, system calls per request of Gatehouse and of nginx as the same proxy: a count,
# not a time, so it does not depend on how busy the machine is.
#
#   bash bench/profile.sh                       # 15 s of samples
#   DURATION=30s TOP=50 bash bench/profile.sh
#
# Self time only: the release build has no frame pointers, so call stacks would be
# guesses. Requests/s are lower than in bench/proxy.sh while perf samples.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-15s}
. bench/lib.sh
apt_install linux-perf
TOP=${TOP:-40}

echo "==> building gatehouse-dataplane (release)"
cargo build --release -q -p gatehouse-dataplane --bin gatehouse-dataplane
NGX=127.0.0.1:28082 GH=127.0.0.1:28083

start_upstream
start_nginx_proxy "$NGX"
ngx_pid=${pids[-1]}
plain_api "$work/gh"
start_gatehouse "$GH" 127.0.0.1:28093 "$work/gh"
gh_pid=${pids[-1]}
expect_1k "http://$NGX/"
expect_1k "http://$GH/"
echo "without perf (rps p50_ms p99_ms proxy_cpu_% load_cpu_%): nginx $(measure "http://$NGX/") | gatehouse $(measure "http://$GH/")"

# syscalls NAME PID URL: system calls per request over a 5 s run.
syscalls() {
  local n reqs
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d5s "$3" >"$work/sc-wrk.txt" &
  n=$(perf stat -x, -e raw_syscalls:sys_enter -p "$2" -- sleep 5 2>&1 >/dev/null | awk -F, '/raw_syscalls/ { print $1 }')
  wait $!
  reqs=$(awk '/requests in/ { print $1 }' "$work/sc-wrk.txt")
  awk -v n="$n" -v r="$reqs" -v who="$1" 'BEGIN { printf "%s: %.2f system calls per request (%d calls, %d requests)\n", who, n / r, n, r }'
}
echo
syscalls nginx "$ngx_pid" "http://$NGX/"
syscalls gatehouse "$gh_pid" "http://$GH/"
echo

echo "==> sampling the gateway for $DURATION under load"
taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" "http://$GH/" >"$work/wrk.txt" &
wrk_pid=$!
perf record -q -F 1999 -p "$gh_pid" -o "$work/perf.data" -- sleep "${DURATION%s}" 2>/dev/null
wait "$wrk_pid"
grep "Requests/sec" "$work/wrk.txt"

perf report -i "$work/perf.data" --stdio --no-children --sort symbol 2>/dev/null |
  awk '/^ *[0-9.]+%/' >"$work/symbols.txt"
echo
echo "| self % | function |"
echo "| --- | --- |"
head -n "$TOP" "$work/symbols.txt" | awk '{ p = $1; $1 = ""; $2 = ""; sub(/^ +/, ""); sub(/ +- +-$/, ""); printf "| %s | `%s` |\n", p, $0 }'
echo
echo "| self % | crate (or kernel) |"
echo "| --- | --- |"
# A symbol's crate is its first path segment, with generics (<T as Trait>) looked through.
awk '{
  p = $1; sub(/%/, "", p); kind = $2; $1 = ""; $2 = ""; sub(/^ +/, ""); sub(/ +- +-$/, "")
  s = $0; gsub(/^<+/, "", s)
  if (kind == "[k]") c = "kernel"
  else { split(s, a, "::"); c = a[1]; if (c == s) c = "C library and other (malloc, free, memmove, ...)" }
  t[c] += p
} END { for (c in t) printf "%.2f %s\n", t[c], c }' "$work/symbols.txt" | sort -rn | head -n 20 |
  awk '{ p = $1; $1 = ""; sub(/^ +/, ""); printf "| %s | %s |\n", p, $0 }'
