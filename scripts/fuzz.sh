#!/usr/bin/env bash
# Fuzzes Gatehouse's parsers and request path with cargo-fuzz (libFuzzer), each target for
# SECONDS (default 60), and prints per target the executions run and what was found.
#
#   scripts/fuzz.sh [SECONDS]          run every target
#   FUZZ_TARGETS="duration_parse" scripts/fuzz.sh 300
#   scripts/fuzz.sh --build            only build the targets
#
# Seeds live in fuzz/seeds/<target>/ (committed); what the fuzzer learns goes to
# fuzz/corpus/<target>/ and inputs that fail to fuzz/artifacts/<target>/ (both ignored by
# git). Replay a finding with `RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none -a <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh
need_rust
# libFuzzer itself is C++, built by libfuzzer-sys.
apt_install g++
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> cargo install --locked cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

# cargo-fuzz passes rustc flags that are unstable (-Z...); RUSTC_BOOTSTRAP lets a stable
# toolchain take them, so no nightly is needed. No sanitizer: the code under test is safe
# Rust, and the sanitizer runtimes ship only with nightly. Debug assertions catch overflows;
# 16 codegen units keep the instrumented build of the dependencies short on small machines.
export RUSTC_BOOTSTRAP=1
FUZZ=(--sanitizer none --debug-assertions --codegen-units 16)

if [ "${1:-}" = "--build" ]; then
  echo "==> cargo fuzz build"
  cargo fuzz build "${FUZZ[@]}"
  exit 0
fi

seconds="${1:-60}"
targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
echo "==> cargo fuzz build"
cargo fuzz build "${FUZZ[@]}"

summary=()
failed=0
for t in $targets; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  log="fuzz/artifacts/$t/last-run.log"
  echo "==> fuzzing $t for ${seconds}s"
  marker="fuzz/artifacts/$t/.started"
  touch "$marker"
  # Corpus first (the fuzzer writes new inputs there), seeds second (read only).
  if cargo fuzz run "${FUZZ[@]}" "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=4096 >"$log" 2>&1; then
    result="no findings"
  else
    result="FOUND A FAILURE (log: $log)"
    failed=1
    grep -m1 -A20 -E "panicked at|ERROR: libFuzzer|==ERROR" "$log" || tail -n 30 "$log"
  fi
  runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -n1)
  [ -n "$runs" ] || runs=$(grep -oE 'Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' | tail -n1)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n1 | grep -oE '[0-9]+')
  new=$(find "fuzz/artifacts/$t" -type f ! -name '*.log' ! -name .started -newer "$marker" | head -n 3 | tr '\n' ' ')
  line="$t: ${runs:-?} executions, coverage ${cov:-?}, corpus $(find "fuzz/corpus/$t" -type f | wc -l) inputs: $result"
  [ -n "$new" ] && line+=" — inputs saved: $new"
  summary+=("$line")
done

echo
echo "==> fuzzing summary (${seconds}s per target)"
printf '  %s\n' "${summary[@]}"
exit "$failed"
