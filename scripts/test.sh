#!/usr/bin/env bash
# Runs every check and test: formatting, lints, unit, integration and end-to-end tests.
# Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh
need_rust
# cc builds the C example plugin and fixtures, and checks the C header; redis-server backs
# the shared-counter tests (dataplane/tests/redis.rs); buildah packages the Go bundle as an
# OCI image (dataplane/tests/go_plugins.rs).
apt_install gcc libc6-dev redis-server buildah
# Go builds the Go plugins (and, below, the test cluster). Here the Go plugin tests must run,
# not skip as they do on a machine without Go.
need_go
export GATEHOUSE_REQUIRE_GO=1 GATEHOUSE_REQUIRE_BUILDAH=1

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -q -- -D warnings
echo "==> Go SDK: gofmt, go vet, go test"
unformatted="$(gofmt -l plugins/go plugins/examples/go)"
[ -z "$unformatted" ] || { echo "gofmt would change: $unformatted" >&2; exit 1; }
(cd plugins/go && go vet ./... && go test ./...)
(cd plugins/examples/go && go vet ./...)
echo "==> cargo test: unit and integration tests"
cargo test --workspace --exclude gatehouse-e2e

# End to end against a real kube-apiserver with etcd, built from e2e/cluster (the first
# build takes ~5 min and is cached under ~/.cache/gatehouse).
echo "==> e2e: building the test cluster"
bash e2e/cluster.sh build >/dev/null
echo "==> cargo test: end to end"
cargo test -p gatehouse-e2e --test e2e
