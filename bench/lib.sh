# Shared by the benchmark scripts: builds, a 1 KiB nginx upstream on the load CPU, wrk
# runs and medians. Source it from a script that has cd'ed to the repository root.
. scripts/lib.sh
need_rust
apt_install wrk nginx-light

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
UP=127.0.0.1:28081

work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM

# nginx_conf NAME HTTP-BLOCK-BODY: a one-worker, single-process nginx config in $work.
nginx_conf() {
  cat > "$work/$1.conf" <<NGINX
daemon off;
master_process off;
worker_processes 1;
pid $work/$1.pid;
error_log $work/$1.error.log warn;
events { worker_connections ${NGINX_WORKER_CONNECTIONS:-4096}; }
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

# The location block of nginx as the peer proxy: pooled upstream keep-alive and the
# X-Forwarded-* headers Gatehouse sets. Goes in a server beside `upstream up { ... }`.
NGINX_PROXY_LOCATION="location / {
    proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\";
    proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto \$scheme;
    proxy_set_header X-Forwarded-Host \$host; }"

# start_nginx_proxy LISTEN: nginx as the peer proxy (one worker, on the proxy CPU) in front
# of the upstream; its pid is the last of $pids.
start_nginx_proxy() {
  nginx_conf proxy "upstream up { server $UP; keepalive 128; }
  server { listen $1; $NGINX_PROXY_LOCATION }"
  taskset -c "$PROXY_CPU" nginx -c "$work/proxy.conf" -e "$work/proxy.error.log" &
  pids+=($!)
}

start_upstream() {
  local body
  body=$(head -c 1024 /dev/zero | tr '\0' 'x')
  nginx_conf upstream "server { listen $UP; location / { default_type text/plain; return 200 '$body'; } }"
  taskset -c "$LOAD_CPU" nginx -c "$work/upstream.conf" -e "$work/upstream.error.log" &
  pids+=($!)
}

# start_gatehouse LISTEN ADMIN CONFIG-DIR [BINARY [FLAG...]]: one worker thread, on the
# proxy CPU.
start_gatehouse() {
  RUST_LOG=warn TOKIO_WORKER_THREADS=1 GATEHOUSE_WORKERS=1 taskset -c "$PROXY_CPU" "${4:-target/release/gatehouse-dataplane}" \
    --listen "$1" --admin-listen "$2" --config "$3" --plugin-dir "$work/plugin-cache-${1##*:}" "${@:5}" &
  pids+=($!)
  for _ in $(seq 100); do curl -fs "http://$2/readyz" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "gatehouse did not become ready" >&2
  exit 1
}

# plain_api DIR: a config directory with one API, `/` proxied to the upstream.
plain_api() {
  mkdir -p "$1"
  cat > "$1/api.yaml" <<YAML
apiVersion: gatehouse.dev/v1alpha1
kind: ApiDefinition
metadata: {name: bench}
spec:
  listenPath: /
  upstream: {url: "http://$UP"}
YAML
}

# expect_1k URL: the proxy under test really returns the 1 KiB body.
expect_1k() {
  [ "$(curl -fs ${WRK_ARGS[@]+"${WRK_ARGS[@]}"} "$1" | wc -c)" = 1024 ] || { echo "$1 does not return the 1 KiB body" >&2; exit 1; }
}

# cpu_ticks N: busy and total jiffies of CPU N so far, from /proc/stat.
cpu_ticks() { awk -v c="cpu$1" '$1 == c { print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 }' /proc/stat; }

# measure URL: prints "rps p50_ms p99_ms proxy_cpu_% load_cpu_%" for one wrk run (how busy
# the proxy's CPU and the load CPU were: with the proxy's under 100 and the load's at 100,
# wrk and the upstream set the pace, not the proxy); fails on any non-2xx answer. WRK_ARGS
# (an array) adds wrk options, e.g. a header.
WRK_ARGS=()
measure() {
  local before after lbefore lafter out
  before=$(cpu_ticks "$PROXY_CPU") lbefore=$(cpu_ticks "$LOAD_CPU")
  out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" --latency ${WRK_ARGS[@]+"${WRK_ARGS[@]}"} "$1" | awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /Requests\/sec/ { rps = $2 }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    / Non-2xx/ { bad = $NF }
    END { if (bad) { print "wrk saw non-2xx answers" > "/dev/stderr"; exit 1 } printf "%.0f %.3f %.3f\n", rps, p50, p99 }')
  after=$(cpu_ticks "$PROXY_CPU") lafter=$(cpu_ticks "$LOAD_CPU")
  echo "$out $(busy "$before" "$after") $(busy "$lbefore" "$lafter")"
}

# busy BEFORE AFTER: the busy % between two cpu_ticks readings.
busy() { echo "$1 $2" | awk '{ t = $4 - $2; printf "%.0f", (t > 0 ? 100 * ($3 - $1) / t : 0) }'; }

# col N FILE: the median of column N.
col() { awk -v c="$1" '{ print $c }' "$2" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# compare NAME_A URL_A NAME_B URL_B: alternating rounds, then a table and the ratio B/A.
compare() {
  echo "==> warm-up"
  measure "$2" >/dev/null; measure "$4" >/dev/null
  : > "$work/a.txt"; : > "$work/b.txt"
  for r in $(seq "$ROUNDS"); do
    a=$(measure "$2"); b=$(measure "$4")
    echo "round $r: $1 $a | $3 $b   (rps p50_ms p99_ms proxy_cpu_% load_cpu_%)"
    echo "$a" >> "$work/a.txt"; echo "$b" >> "$work/b.txt"
  done
  echo
  echo "| $5 | requests/s | p50 ms | p99 ms | CPU $PROXY_CPU busy % | load CPU $LOAD_CPU busy % |"
  echo "| --- | --- | --- | --- | --- | --- |"
  for f in a:"$1" b:"$3"; do
    local t="$work/${f%%:*}.txt"
    echo "| ${f#*:} | $(col 1 "$t") | $(col 2 "$t") | $(col 3 "$t") | $(col 4 "$t") | $(col 5 "$t") |"
  done
  echo
  awk -v a="$(col 1 "$work/a.txt")" -v b="$(col 1 "$work/b.txt")" -v n="$ROUNDS" -v d="$DURATION" -v c="$CONNS" -v an="$1" -v bn="$3" \
    'BEGIN { printf "ratio %s/%s: %.3f (median of %d rounds, %s each, %d connections)\n", bn, an, b / a, n, d, c }'
}

# bench_key API: on stdout, the manifest of a token key (`bench-token`, sent as X-Api-Key)
# for API with a per-key rate limit no run reaches; writes the key id secret Gatehouse
# needs for it to $work/key-id-secret (pass --key-id-secret-file).
bench_key() {
  printf 'a benchmark key id secret' > "$work/key-id-secret"
  cat <<YAML
apiVersion: v1
kind: Secret
metadata: {name: bench-key, labels: {gatehouse.dev/key: "true"}}
stringData:
  key: bench-token
  session.yaml: |
    rate: 1000000000
    per: 1s
    accessRights: [$1]
YAML
}

# count NAME URL PID-PATTERN: for a process under callgrind writing $out/NAME.out.*: warm up,
# zero (and call on_zero if the script defines it), drive with wrk (WRK_ARGS too), dump;
# prints instructions per request and appends the line to $work/counts.txt.
count() {
  local pid reqs total
  for _ in $(seq 200); do curl -fs ${WRK_ARGS[@]+"${WRK_ARGS[@]}"} "$2" >/dev/null 2>&1 && break; sleep 0.2; done
  expect_1k "$2"
  pid=$(pgrep -f "$3" | head -1)
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d3s ${WRK_ARGS[@]+"${WRK_ARGS[@]}"} "$2" >/dev/null
  callgrind_control -z "$pid" >/dev/null
  # A script's own counters to zero with the instructions' (optional).
  if declare -F on_zero >/dev/null; then on_zero; fi
  reqs=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" ${WRK_ARGS[@]+"${WRK_ARGS[@]}"} "$2" | awk '/requests in/ { print $1 }')
  callgrind_control -d "$pid" >/dev/null
  sleep 1
  total=$(callgrind_annotate "$(ls -t "$out/$1".out.* | head -1)" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
  kill "$pid"
  awk -v t="$total" -v r="$reqs" -v n="$1" 'BEGIN { printf "%s: %.0f instructions per request (%d over %d requests)\n", n, t / r, t, r }' | tee -a "$work/counts.txt"
}
