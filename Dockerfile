# syntax=docker/dockerfile:1
#
# crisp-bridge container image.
#
#   docker build --build-arg GIT_REVISION="$(git rev-parse --short=12 HEAD)" -t crisp-bridge:0.1.0 .
#   docker run --rm crisp-bridge:0.1.0 check --config /etc/crisp-bridge/crisp-bridge.toml
#
# Stage 1 builds a release binary; stage 2 is distroless (glibc, libssl,
# CA certificates, no shell) running as the non-root user 65532.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
WORKDIR /build

# Dependencies first, against a placeholder crate, so this layer is reused
# until Cargo.toml, Cargo.lock or build.rs change. Cargo refuses a manifest whose
# targets are missing, so every target it names gets a placeholder too (the bench
# one stays: the image never builds it, but cargo parses it on every build).
COPY Cargo.toml Cargo.lock build.rs ./
# The test kit is a workspace member: cargo reads its manifest (it never builds it here).
COPY testkit/Cargo.toml testkit/
RUN mkdir -p src benches testkit/src \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > benches/route.rs \
    && touch testkit/src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The real sources. Remove the placeholder's artefacts so cargo rebuilds the crate.
# GIT_REVISION (there is no .git in the build context) becomes the revision label of
# crisp_bridge_build_info; declared only here so it does not void the layer above.
COPY src ./src
ARG GIT_REVISION=unknown
RUN rm -f target/release/crisp-bridge target/release/deps/crisp_bridge-* \
    && rm -rf target/release/.fingerprint/crisp-bridge-* \
    && BUILD_REVISION="$GIT_REVISION" cargo build --release --locked \
    && install -D -m 0755 target/release/crisp-bridge /out/crisp-bridge

FROM ${RUNTIME_IMAGE}
COPY --from=builder /out/crisp-bridge /usr/local/bin/crisp-bridge
USER 65532:65532
# Admin endpoints: /healthz /readyz /metrics (config server.listen).
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/crisp-bridge"]
CMD ["run"]
