#!/usr/bin/env bash
# Per-key rate limits counted in memory vs in Redis, in the same run: what sharing the
# counters across replicas costs. One API with token auth and a per-key rate limit that is
# never reached; redis-server is pinned with the upstream and wrk on the load CPU, each
# gateway alone on the proxy CPU in its turn.
#
#   bash bench/redis.sh
#   ROUNDS=5 DURATION=10s bash bench/redis.sh
#   BIN=OTHER-BUILD bash bench/redis.sh     # another build; nothing is built
#   COUNT=1 bash bench/redis.sh             # user-space instructions per request instead,
#                                           # each gateway under callgrind (CONNS=64 by default)
#   COUNT=1 KEEP=1 bash bench/redis.sh      # and keep the callgrind files in bench-callgrind/
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
apt_install redis-server

if [ -z "${BIN:-}" ]; then
  echo "==> building gatehouse-dataplane (release)"
  cargo build --release -q -p gatehouse-dataplane --bin gatehouse-dataplane
fi
BIN=${BIN:-target/release/gatehouse-dataplane}
MEM=127.0.0.1:28086 RED=127.0.0.1:28087 REDIS_PORT=28379

taskset -c "$LOAD_CPU" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
  --dir "$work" --logfile "$work/redis.log" &
pids+=($!)
for _ in $(seq 100); do [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && break; sleep 0.1; done

start_upstream
mkdir -p "$work/gh"
cat > "$work/gh/api.yaml" <<YAML
apiVersion: gatehouse.dev/v1alpha1
kind: ApiDefinition
metadata: {name: bench}
spec:
  listenPath: /
  upstream: {url: "http://$UP"}
  auth: {type: authToken, authToken: {header: X-Api-Key}}
YAML
bench_key bench > "$work/gh/key.yaml"
WRK_ARGS=(-H "X-Api-Key: bench-token")
if [ -n "${COUNT:-}" ]; then
  # A count, not a time: what Redis adds to each request's own work, whatever else the
  # machine runs (the kernel's share is not counted).
  apt_install valgrind
  # Script calls counted over the same requests as the instructions.
  on_zero() { redis-cli -p "$REDIS_PORT" config resetstat >/dev/null; }
  out=${KEEP:+bench-callgrind}
  out=${out:-$work}
  mkdir -p "$out"
  for mode in memory redis; do
    [ "$mode" = redis ] && more=(--counters "redis://127.0.0.1:$REDIS_PORT") || more=()
    RUST_LOG=warn TOKIO_WORKER_THREADS=1 GATEHOUSE_WORKERS=1 taskset -c "$PROXY_CPU" valgrind --tool=callgrind \
      --callgrind-out-file="$out/$mode.out" "$BIN" --listen "$MEM" --admin-listen 127.0.0.1:28096 \
      --config "$work/gh" --plugin-dir "$work/plugin-cache-$mode" --key-id-secret-file "$work/key-id-secret" \
      ${more[@]+"${more[@]}"} >"$work/vg-$mode.log" 2>&1 &
    pids+=($!)
    count "$mode" "http://$MEM/" "callgrind-out-file=$out/$mode.out"
    wait "${pids[-1]}" 2>/dev/null || true
  done
  # Counted in Redis, not let through by the failure policy.
  calls=$(redis-cli -p "$REDIS_PORT" info commandstats | awk -F'[=,:]' '/^cmdstat_evalsha:/ { print $3 }')
  [ "${calls:-0}" -ge 100 ] || { echo "${calls:-0} script calls: the Redis gateway did not count in Redis" >&2; exit 1; }
  echo "checks per script call: $(awk -v c="$calls" '/^redis:/ { printf "%.1f", $8 / c }' "$work/counts.txt")"
  [ -n "${KEEP:-}" ] && echo "callgrind files in $out/ (redis.out.1, memory.out.1)"
  awk '{ v[$1] = $2 } END { printf "Redis adds %.0f instructions per request (%.1f%%)\n", v["redis:"] - v["memory:"], 100 * (v["redis:"] / v["memory:"] - 1) }' "$work/counts.txt"
  exit 0
fi
start_gatehouse "$MEM" 127.0.0.1:28096 "$work/gh" "$BIN" \
  --key-id-secret-file "$work/key-id-secret"
start_gatehouse "$RED" 127.0.0.1:28097 "$work/gh" "$BIN" \
  --key-id-secret-file "$work/key-id-secret" --counters "redis://127.0.0.1:$REDIS_PORT"
for a in "$MEM" "$RED"; do
  [ "$(curl -fs -H 'X-Api-Key: bench-token' "http://$a/" | wc -c)" = 1024 ] || { echo "$a does not return the 1 KiB body" >&2; exit 1; }
done
compare memory "http://$MEM/" redis "http://$RED/" "per-key rate limit (1 worker, CPU $PROXY_CPU)"
# The counters themselves expire within milliseconds at this rate: the gateway's count of
# checks and the server's count of script calls (one per batch of checks) show that every
# request was checked in Redis.
checks=$(curl -fs http://127.0.0.1:28097/metrics | awk '/^gatehouse_counter_store_duration_seconds_count/ { print $2 }')
calls=$(redis-cli -p "$REDIS_PORT" info commandstats | awk -F'[=,:]' '/^cmdstat_evalsha:/ { print $3 }')
[ "${checks:-0}" -ge 100000 ] && [ "${calls:-0}" -ge 1 ] \
  || { echo "${checks:-0} checks, ${calls:-0} script calls: the Redis gateway did not count" >&2; exit 1; }
echo "checks: $checks in $calls script calls ($(awk -v a="$checks" -v b="$calls" 'BEGIN { printf "%.1f", a / b }') per call), the warm-up included"
echo "p99 added by Redis: $(awk -v a="$(col 3 "$work/a.txt")" -v b="$(col 3 "$work/b.txt")" 'BEGIN { printf "%.3f ms", b - a }')"
