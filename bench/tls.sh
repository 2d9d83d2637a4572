#!/usr/bin/env bash
# Gatehouse against nginx terminating TLS 1.3 in front of the same plain-HTTP upstream:
# the same ECDSA P-256 certificate, a 1 KiB response, one worker each on the same CPU,
# measured in the same run. Two scenarios:
#   - keep-alive: requests/s and p99 over open TLS connections;
#   - new handshakes: every request on a new connection (`Connection: close`), so
#     requests/s is full TLS handshakes/s (wrk resumes no sessions).
#
#   bash bench/tls.sh                  # 3 rounds of 10 s each per proxy and scenario
#   ROUNDS=5 DURATION=20s CONNS=128 bash bench/tls.sh
#   BIN=OTHER-BUILD bash bench/tls.sh  # another build; nothing is built
#
# Layout as bench/proxy.sh: the proxy under test alone on CPU 0; the upstream and wrk on
# CPU 1; rounds alternate nginx / Gatehouse; medians are reported.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
apt_install openssl

if [ -z "${BIN:-}" ]; then
  echo "==> building gatehouse-dataplane (release)"
  cargo build --release -q -p gatehouse-dataplane --bin gatehouse-dataplane
fi
BIN=${BIN:-target/release/gatehouse-dataplane}
NGX=127.0.0.1:28182 GH_PLAIN=127.0.0.1:28183 GH=127.0.0.1:28184

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=bench.test -addext "subjectAltName=DNS:bench.test,IP:127.0.0.1" \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

start_upstream
nginx_conf proxy "upstream up { server $UP; keepalive 128; }
  server { listen $NGX ssl;
    ssl_certificate $work/cert.pem; ssl_certificate_key $work/key.pem; ssl_protocols TLSv1.3;
    $NGINX_PROXY_LOCATION }"
taskset -c "$PROXY_CPU" nginx -c "$work/proxy.conf" -e "$work/proxy.error.log" & pids+=($!)

# The certificate as Gatehouse's default: wrk sends the URL's host (an IP) as SNI.
plain_api "$work/gh"
{
  printf 'apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\n'
  printf 'metadata: {name: bench-cert, labels: {gatehouse.dev/default-certificate: "true"}}\n'
  printf 'stringData:\n  tls.crt: |\n'; sed 's/^/    /' "$work/cert.pem"
  printf '  tls.key: |\n'; sed 's/^/    /' "$work/key.pem"
} > "$work/gh/cert.yaml"
start_gatehouse "$GH_PLAIN" 127.0.0.1:28193 "$work/gh" "$BIN" --tls-listen "$GH"

for url in "https://$NGX/" "https://$GH/"; do
  for _ in $(seq 50); do curl -fsk "$url" >/dev/null 2>&1 && break; sleep 0.1; done
  [ "$(curl -fsk --tlsv1.3 "$url" | wc -c)" = 1024 ] || { echo "$url does not return the 1 KiB body" >&2; exit 1; }
done
version="nginx $(nginx -v 2>&1 | sed 's/.*nginx\///')"

echo "==> keep-alive"
compare "$version" "https://$NGX/" gatehouse "https://$GH/" "TLS 1.3, keep-alive (1 worker, CPU $PROXY_CPU)"
echo
echo "==> a new connection and handshake per request"
WRK_ARGS=(-H "Connection: close")
compare "$version" "https://$NGX/" gatehouse "https://$GH/" "TLS 1.3, new handshake per request: requests/s = handshakes/s"
