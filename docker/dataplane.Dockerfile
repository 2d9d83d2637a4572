# syntax=docker/dockerfile:1
# gatehouse-dataplane: the gateway, its middleware chain and the native plugin host.
#
#   docker build -f docker/dataplane.Dockerfile -t REGISTRY/gatehouse-dataplane:0.1.0 .
#
# Run from the repository root (the build context is the whole workspace; .dockerignore
# leaves target/ and .git/ out). See docs/kubernetes.md.
#
# Plugins are loaded into this image's process: build them against glibc 2.36 or older
# (Debian 12, e.g. in the rust:*-bookworm image below), or they fail to load with
# "version `GLIBC_2.xx' not found". The runtime has glibc, libgcc_s and libstdc++.

# The toolchain the workspace is built and tested with; Debian 12, as the runtime image.
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and incremental target between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p gatehouse-dataplane --bin gatehouse-dataplane \
 && install -D -m 0755 target/release/gatehouse-dataplane /out/gatehouse-dataplane

# glibc, libgcc_s and libstdc++ (what plugins link against), CA certificates, a `nonroot`
# user (65532); no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/gatehouse-dataplane /usr/local/bin/gatehouse-dataplane
USER 65532:65532
# gateway; admin (/metrics, /healthz, /readyz, /config)
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/gatehouse-dataplane"]
