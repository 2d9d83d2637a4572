#!/usr/bin/env bash
# Memory per open keep-alive connection, Gatehouse against nginx: N client connections held
# open, the first half after one proxied request each, the other half before any; each
# proxy's resident memory (VmRSS) before and after, divided by N. Gatehouse is measured
# once its idle connections have parked (its gauge says all ASKED of them are). Each proxy
# holds two waves of N connections, one after the other: the first wave's figure includes
# the buffers its requests used, freed since but kept by the allocator for reuse; the second
# wave reuses them, so its figure is what one more idle connection costs. Each reading is
# taken SETTLE seconds (default 20) after the proxy went quiet: Gatehouse's allocator gives
# pages freed for ~10 s back to the kernel, and the figure before that ("at once") is
# printed too.
#
#   bash bench/connections.sh            # 8,000 connections
#   N=2000 bash bench/connections.sh
#   ASKED=0 bash bench/connections.sh    # how many of them send a request (default N/2)
#
# Both proxies run one worker; their idle and header timeouts are raised so that nothing
# is closed while it is counted.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-8000}
ASKED=${ASKED:-$((N / 2))}
SETTLE=${SETTLE:-20}
export NGINX_WORKER_CONNECTIONS=$((2 * N + 1024))
. bench/lib.sh
apt_install python3
# Each process holds at most N + a few hundred descriptors.
need_fds=$((N + 1024))
[ "$(ulimit -Hn)" = unlimited ] || [ "$(ulimit -Hn)" -ge "$need_fds" ] ||
  { echo "N=$N needs $need_fds open files; the hard limit is $(ulimit -Hn)" >&2; exit 1; }
ulimit -n "$need_fds"

echo "==> building gatehouse-dataplane (release)"
cargo build --release -q -p gatehouse-dataplane --bin gatehouse-dataplane
NGX=127.0.0.1:28082 GH=127.0.0.1:28083 GH_ADMIN=127.0.0.1:28093

start_upstream
nginx_conf proxy "upstream up { server $UP; keepalive 128; }
  server { listen $NGX backlog=4096; keepalive_timeout 600s; client_header_timeout 600s;
           $NGINX_PROXY_LOCATION }"
taskset -c "$PROXY_CPU" nginx -c "$work/proxy.conf" -e "$work/proxy.error.log" &
pids+=($!)
ngx_pid=$!
plain_api "$work/gh"
start_gatehouse "$GH" "$GH_ADMIN" "$work/gh" target/release/gatehouse-dataplane \
  --header-read-timeout 600s --idle-timeout 600s --max-connections $((N + 1000))
gh_pid=${pids[-1]}

rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }

# hold NAME ADDR PID WAVE [ADMIN]: warms the proxy up, holds N connections, prints its RSS
# before and after (each SETTLE seconds after the proxy went quiet) and the bytes per
# connection. With ADMIN (Gatehouse's admin address), "after" is read once every connection
# that asked has parked.
hold() {
  local before at_once after line parked=""
  for _ in $(seq 100); do curl -fs "http://$2/" >/dev/null 2>&1 && break; sleep 0.1; done
  expect_1k "http://$2/"
  taskset -c "$LOAD_CPU" wrk -t1 -c64 -d2s "http://$2/" >/dev/null
  sleep "$SETTLE"
  before=$(rss_kb "$3")
  coproc HOLD { taskset -c "$LOAD_CPU" python3 bench/hold_connections.py "$2" "$N" "$ASKED"; }
  read -r line <&"${HOLD[0]}"
  [ "$line" = "held $N" ] || { echo "$1: the client did not hold $N connections: $line" >&2; exit 1; }
  if [ -n "${5:-}" ]; then
    for _ in $(seq 600); do
      parked=$(curl -fs "http://$5/metrics" | awk '/^gatehouse_client_connections_parked / { print $2 }')
      [ "${parked:-0}" -ge "$ASKED" ] && break
      sleep 0.1
    done
    [ "${parked:-0}" -ge "$ASKED" ] || { echo "$1: only ${parked:-0} of $ASKED connections parked" >&2; exit 1; }
    parked=" ($parked parked)"
  fi
  at_once=$(rss_kb "$3")
  sleep "$SETTLE"
  after=$(rss_kb "$3")
  eval "exec ${HOLD[1]}>&-"
  wait "$HOLD_PID" || true
  printf '%-10s wave %d %8d kB -> %8d kB   %6d bytes per connection (at once: %d)%s\n' "$1" "$4" \
    "$before" "$after" $(((after - before) * 1024 / N)) $(((at_once - before) * 1024 / N)) "$parked"
}

echo "==> $N connections, $ASKED of them after one request (VmRSS of the proxy process)"
for wave in 1 2; do
  hold nginx "$NGX" "$ngx_pid" "$wave"
  hold gatehouse "$GH" "$gh_pid" "$wave" "$GH_ADMIN"
done
