#!/usr/bin/env bash
# Runs every check and test: formatting, lints, unit, integration and end-to-end tests.
# Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh
need_rust
# cc builds the C example plugin and fixtures, and checks the C header; redis-server backs
# the shared-counter tests (dataplane/tests/redis.rs).
apt_install gcc libc6-dev redis-server

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -q -- -D warnings
echo "==> cargo test: unit and integration tests"
cargo test --workspace --exclude gatehouse-e2e

# End to end against a real kube-apiserver with etcd, built from e2e/cluster (the first
# build takes ~5 min and is cached under ~/.cache/gatehouse).
need_go
echo "==> e2e: building the test cluster"
bash e2e/cluster.sh build >/dev/null
echo "==> cargo test: end to end"
cargo test -p gatehouse-e2e --test e2e
