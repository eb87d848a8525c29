# syntax=docker/dockerfile:1
#
# crisp-bridge container image.
#
#   docker build -t crisp-bridge:0.1.0 .
#   docker run --rm crisp-bridge:0.1.0 check --config /etc/crisp-bridge/crisp-bridge.toml
#
# Stage 1 builds a release binary; stage 2 is distroless (glibc, libssl,
# CA certificates, no shell) running as the non-root user 65532.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
WORKDIR /build

# Dependencies first, against a placeholder crate, so this layer is reused
# until Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && cargo build --release --locked \
    && rm -rf src

# The real sources. Remove the placeholder's artefacts so cargo rebuilds the crate.
COPY src ./src
RUN rm -f target/release/crisp-bridge target/release/deps/crisp_bridge-* \
    && rm -rf target/release/.fingerprint/crisp-bridge-* \
    && cargo build --release --locked \
    && install -D -m 0755 target/release/crisp-bridge /out/crisp-bridge

FROM ${RUNTIME_IMAGE}
COPY --from=builder /out/crisp-bridge /usr/local/bin/crisp-bridge
USER 65532:65532
# Admin endpoints: /healthz /readyz /metrics (config server.listen).
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/crisp-bridge"]
CMD ["run"]
