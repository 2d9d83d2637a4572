#!/usr/bin/env bash
# Runs every check and test: formatting, lints, unit and integration tests.
# Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh
need_rust
# cc builds the C example plugin and fixtures, and checks the C header.
apt_install gcc libc6-dev

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -q -- -D warnings
echo "==> cargo test"
cargo test --workspace
