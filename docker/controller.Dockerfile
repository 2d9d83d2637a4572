# syntax=docker/dockerfile:1
# gatehouse-controller: compiles Gatehouse resources and streams config to dataplanes.
#
#   docker build -f docker/controller.Dockerfile -t REGISTRY/gatehouse-controller:0.1.0 .
#
# Run from the repository root (the build context is the whole workspace; .dockerignore
# leaves target/ and .git/ out). See docs/kubernetes.md.

# The toolchain the workspace is built and tested with; Debian 12, as the runtime image.
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and incremental target between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p gatehouse-controller --bin gatehouse-controller \
 && install -D -m 0755 target/release/gatehouse-controller /out/gatehouse-controller

# glibc and libgcc_s, CA certificates, a `nonroot` user (65532); no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/gatehouse-controller /usr/local/bin/gatehouse-controller
USER 65532:65532
# config stream (/v1/stream, /v1/ack); admin (/metrics, /healthz, /readyz)
EXPOSE 9443 8081
ENTRYPOINT ["/usr/local/bin/gatehouse-controller"]
