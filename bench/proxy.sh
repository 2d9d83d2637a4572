#!/usr/bin/env bash
# Gatehouse against nginx as a plain reverse proxy: a 1 KiB response over keep-alive
# connections, both proxies with one worker on the same CPU, measured in the same run.
#
#   bash bench/proxy.sh                 # 3 rounds of 10 s each per proxy
#   ROUNDS=5 DURATION=20s CONNS=128 bash bench/proxy.sh
#
# Layout on a 2-core machine: the proxy under test alone on CPU 0; the upstream (nginx,
# one worker) and wrk (one thread) on CPU 1. Rounds alternate nginx / Gatehouse so drift
# on a shared machine hits both; the medians are reported.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_rust
apt_install wrk nginx-light

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
UP=127.0.0.1:28081 NGX=127.0.0.1:28082 GH=127.0.0.1:28083 GH_ADMIN=127.0.0.1:28093

echo "==> building gatehouse-dataplane (release)"
cargo build --release -q -p gatehouse-dataplane --bin gatehouse-dataplane

work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM

body=$(head -c 1024 /dev/zero | tr '\0' 'x')
nginx_conf() { # name, body of the http block
  cat > "$work/$1.conf" <<NGINX
daemon off;
master_process off;
worker_processes 1;
pid $work/$1.pid;
error_log $work/$1.error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/$1-body;
  proxy_temp_path $work/$1-proxy;
  fastcgi_temp_path $work/$1-fastcgi;
  uwsgi_temp_path $work/$1-uwsgi;
  scgi_temp_path $work/$1-scgi;
  keepalive_requests 1000000;
  $2
}
NGINX
}
nginx_conf upstream "server { listen $UP; location / { default_type text/plain; return 200 '$body'; } }"
nginx_conf proxy "upstream up { server $UP; keepalive 128; }
  server { listen $NGX; location / {
    proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\";
    proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto \$scheme;
    proxy_set_header X-Forwarded-Host \$host; } }"
mkdir -p "$work/gh"
cat > "$work/gh/api.yaml" <<YAML
apiVersion: gatehouse.dev/v1alpha1
kind: ApiDefinition
metadata: {name: bench}
spec:
  listenPath: /
  upstream: {url: "http://$UP"}
YAML

taskset -c "$LOAD_CPU" nginx -c "$work/upstream.conf" -e "$work/upstream.error.log" & pids+=($!)
taskset -c "$PROXY_CPU" nginx -c "$work/proxy.conf" -e "$work/proxy.error.log" & pids+=($!)
RUST_LOG=warn TOKIO_WORKER_THREADS=1 taskset -c "$PROXY_CPU" target/release/gatehouse-dataplane \
  --listen "$GH" --admin-listen "$GH_ADMIN" --config "$work/gh" & pids+=($!)

for _ in $(seq 100); do
  curl -fs "http://$GH_ADMIN/readyz" >/dev/null 2>&1 && curl -fs "http://$NGX/" >/dev/null 2>&1 && break
  sleep 0.1
done
[ "$(curl -fs "http://$GH/" | wc -c)" = 1024 ] || { echo "gatehouse does not proxy the 1 KiB body" >&2; exit 1; }
[ "$(curl -fs "http://$NGX/" | wc -c)" = 1024 ] || { echo "nginx does not proxy the 1 KiB body" >&2; exit 1; }

# Prints "rps p50_ms p99_ms" for one wrk run.
measure() {
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" --latency "http://$1/" | awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /Requests\/sec/ { rps = $2 }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    / Non-2xx/ { bad = $NF }
    END { if (bad) { print "wrk saw non-2xx answers" > "/dev/stderr"; exit 1 } printf "%.0f %.3f %.3f\n", rps, p50, p99 }'
}
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

echo "==> warm-up"
measure "$NGX" >/dev/null; measure "$GH" >/dev/null
: > "$work/nginx.txt"; : > "$work/gatehouse.txt"
for r in $(seq "$ROUNDS"); do
  n=$(measure "$NGX"); g=$(measure "$GH")
  echo "round $r: nginx $n | gatehouse $g   (rps p50_ms p99_ms)"
  echo "$n" >> "$work/nginx.txt"; echo "$g" >> "$work/gatehouse.txt"
done

col() { awk -v c="$1" '{ print $c }' "$2" | median; }
n_rps=$(col 1 "$work/nginx.txt"); g_rps=$(col 1 "$work/gatehouse.txt")
echo
echo "| proxy (1 worker, CPU $PROXY_CPU) | requests/s | p50 ms | p99 ms |"
echo "| --- | --- | --- | --- |"
echo "| nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') | $n_rps | $(col 2 "$work/nginx.txt") | $(col 3 "$work/nginx.txt") |"
echo "| gatehouse | $g_rps | $(col 2 "$work/gatehouse.txt") | $(col 3 "$work/gatehouse.txt") |"
echo
awk -v g="$g_rps" -v n="$n_rps" 'BEGIN { printf "ratio gatehouse/nginx: %.2f (median of %d rounds, %s each, %d connections)\n", g / n, '"$ROUNDS"', "'"$DURATION"'", '"$CONNS"' }'
