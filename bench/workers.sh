#!/usr/bin/env bash
# How the proxy scales with workers: Gatehouse with --workers 1 and 2, against nginx with
# worker_processes 1 and 2 (reuseport, as Gatehouse's workers), in one run.
#
#   bash bench/workers.sh                  # 3 rounds of 10 s each per configuration
#   BIN=OTHER-BUILD bash bench/workers.sh  # another build (TOKIO_WORKER_THREADS is set too,
#                                          # for builds from before --workers)
#
# A 2-core machine cannot give two proxy workers two cores while the upstream and wrk run
# too, so requests/s alone cannot show scaling here. What is measured besides it is the
# proxy's own CPU time per request (user + system, all its threads or processes, from
# /proc): if two workers serve a request for the same CPU as one, two dedicated cores
# give twice the requests/s. "scaling" = 2 x (CPU per request with 1 worker) / (with 2).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

if [ -z "${BIN:-}" ]; then
  echo "==> building gatehouse-dataplane (release)"
  cargo build --release -q -p gatehouse-dataplane --bin gatehouse-dataplane
fi
BIN=${BIN:-target/release/gatehouse-dataplane}
HZ=$(getconf CLK_TCK)

start_upstream
plain_api "$work/gh"

# nginx_workers N LISTEN: nginx with N worker processes (a master, so that N applies).
nginx_workers() {
  cat > "$work/ngx$1.conf" <<NGINX
daemon off;
worker_processes $1;
pid $work/ngx$1.pid;
error_log $work/ngx$1.error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/ngx$1-body;
  proxy_temp_path $work/ngx$1-proxy;
  fastcgi_temp_path $work/ngx$1-fastcgi;
  uwsgi_temp_path $work/ngx$1-uwsgi;
  scgi_temp_path $work/ngx$1-scgi;
  keepalive_requests 1000000;
  upstream up { server $UP; keepalive 128; }
  server { listen $2 reuseport; $NGINX_PROXY_LOCATION }
}
NGINX
  nginx -c "$work/ngx$1.conf" -e "$work/ngx$1.error.log" &
  pids+=($!)
}

nginx_workers 1 127.0.0.1:28084
NGX1=${pids[-1]}
nginx_workers 2 127.0.0.1:28085
NGX2=${pids[-1]}
for w in 1 2; do
  RUST_LOG=warn GATEHOUSE_WORKERS=$w TOKIO_WORKER_THREADS=$w "$BIN" --listen "127.0.0.1:2808$((5 + w))" \
    --admin-listen "127.0.0.1:2809$((5 + w))" --config "$work/gh" --plugin-dir "$work/plugins-$w" &
  pids+=($!)
  eval "GH$w=\$!"
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:2809$((5 + w))/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
done
for port in 28084 28085 28086 28087; do expect_1k "http://127.0.0.1:$port/"; done

# cpu_of PID: user + system clock ticks of PID and its children alive now.
cpu_of() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '{ print $14 + $15 }' "/proc/$p/stat")))
  done
  echo "$total"
}

# run NAME PID URL: one wrk run; prints "rps cpu_us_per_request".
run() {
  local before after out
  before=$(cpu_of "$2")
  out=$(wrk -t2 -c"$CONNS" -d"$DURATION" "$3" | awk '/Requests\/sec/ { print $2 } / Non-2xx/ { exit 1 }')
  after=$(cpu_of "$2")
  echo "$out" | awk -v t=$((after - before)) -v hz="$HZ" -v d="${DURATION%s}" \
    '{ printf "%.0f %.2f\n", $1, 1e6 * t / hz / ($1 * d) }'
}

names=(nginx-1 nginx-2 gatehouse-1 gatehouse-2)
procs=("$NGX1" "$NGX2" "$GH1" "$GH2")
urls=(http://127.0.0.1:28084/ http://127.0.0.1:28085/ http://127.0.0.1:28086/ http://127.0.0.1:28087/)
echo "==> warm-up"
for i in 0 1 2 3; do DURATION=2s run "${names[$i]}" "${procs[$i]}" "${urls[$i]}" >/dev/null; done
for i in 0 1 2 3; do : > "$work/${names[$i]}.txt"; done
for r in $(seq "$ROUNDS"); do
  line="round $r:"
  for i in 0 1 2 3; do
    m=$(run "${names[$i]}" "${procs[$i]}" "${urls[$i]}")
    echo "$m" >> "$work/${names[$i]}.txt"
    line="$line ${names[$i]} $m |"
  done
  echo "$line   (rps cpu_us_per_request)"
done
echo
echo "| proxy | workers | requests/s | CPU µs per request | scaling (2 × CPU per request of 1 worker / of 2) |"
echo "| --- | --- | --- | --- | --- |"
for p in nginx gatehouse; do
  one=$(col 2 "$work/$p-1.txt") two=$(col 2 "$work/$p-2.txt")
  echo "| $p | 1 | $(col 1 "$work/$p-1.txt") | $one | |"
  echo "| $p | 2 | $(col 1 "$work/$p-2.txt") | $two | $(awk -v a="$one" -v b="$two" 'BEGIN { printf "%.2f", 2 * a / b }') |"
done
