#!/usr/bin/env bash
# Resident memory of Gatehouse under a long full load: wrk (64 keep-alive connections)
# against one worker for DURATION, VmRSS sampled every INTERVAL seconds; prints the first
# sample (after a 10 s warm-up), the last and the largest.
#
#   bash bench/soak.sh                    # 10 minutes
#   DURATION=120 INTERVAL=10 bash bench/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SOAK=${DURATION:-600}
INTERVAL=${INTERVAL:-30}
DURATION=${SOAK}s
. bench/lib.sh

echo "==> building gatehouse-dataplane (release)"
cargo build --release -q -p gatehouse-dataplane --bin gatehouse-dataplane
GH=127.0.0.1:28083 GH_ADMIN=127.0.0.1:28093
start_upstream
plain_api "$work/gh"
start_gatehouse "$GH" "$GH_ADMIN" "$work/gh"
gh_pid=${pids[-1]}
expect_1k "http://$GH/"
rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }

taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d10s "http://$GH/" >/dev/null
taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$((SOAK + 5))s" "http://$GH/" > "$work/wrk.txt" &
load=$!
samples=()
for ((t = 0; t <= SOAK; t += INTERVAL)); do
  samples+=("$(rss_kb "$gh_pid")")
  echo "t=${t}s VmRSS ${samples[-1]} kB"
  [ "$t" -lt "$SOAK" ] && sleep "$INTERVAL"
done
wait "$load"
max=$(printf '%s\n' "${samples[@]}" | sort -n | tail -1)
echo "==> ${SOAK}s at full load: VmRSS ${samples[0]} kB at the start, ${samples[-1]} kB at the end, ${max} kB at most"
awk '/requests in|Requests\/sec|Socket errors|Non-2xx/' "$work/wrk.txt"
