# pullthrough's image: one static (musl) release binary on `scratch`, with the CA bundle and a
# passwd/group entry for its user beside it. It runs as that non-root user, is happy with a
# read-only root filesystem (it writes only to its data volume), and is health-checked by its
# own `healthcheck` subcommand (there is no shell or curl in the image).
FROM rust:1-slim-bookworm AS build
# musl-tools: musl-gcc, which compiles aws-lc-sys's C (rustls' crypto) for the musl target
# (with cc: no cmake needed).
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
ENV CARGO_BUILD_TARGET=x86_64-unknown-linux-musl
WORKDIR /src
# Dependencies in their own layer: a change to src/ does not rebuild them.
COPY Cargo.toml Cargo.lock ./
# Cargo.toml declares the bench targets: stubs for them too.
RUN mkdir src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/hit_allocations.rs && cp benches/hit_allocations.rs benches/hit_instructions.rs \
    && cargo build --release --locked && rm -rf src
COPY src ./src
# /rootfs becomes the whole image: the binary, the root certificates rustls verifies upstreams
# against, the user and group 10001 (so the process's uid and gid have names), and the data
# directory owned by that user (a new volume takes its owner from it).
RUN touch src/main.rs src/lib.rs && cargo build --release --locked \
    && mkdir -p /rootfs/usr/local/bin /rootfs/etc/ssl/certs /rootfs/etc/pullthrough /rootfs/var/lib/pullthrough \
    && cp target/x86_64-unknown-linux-musl/release/pullthrough /rootfs/usr/local/bin/pullthrough \
    && strip /rootfs/usr/local/bin/pullthrough \
    && cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ca-certificates.crt \
    && printf 'root:x:0:0:root:/root:/usr/sbin/nologin\npullthrough:x:10001:10001::/nonexistent:/usr/sbin/nologin\n' > /rootfs/etc/passwd \
    && printf 'root:x:0:\npullthrough:x:10001:\n' > /rootfs/etc/group \
    && chown 10001:10001 /rootfs/var/lib/pullthrough

FROM scratch
COPY --from=build /rootfs /
COPY config/pullthrough.toml /etc/pullthrough/pullthrough.toml
LABEL org.opencontainers.image.title="pullthrough" \
      org.opencontainers.image.description="A caching pull-through proxy for container registries" \
      org.opencontainers.image.source="https://github.com/pullthrough/pullthrough" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
ENV PULLTHROUGH_CONFIG=/etc/pullthrough/pullthrough.toml \
    PULLTHROUGH_LISTEN=0.0.0.0:5000 \
    PULLTHROUGH_DATA_DIR=/var/lib/pullthrough \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 10001:10001
VOLUME /var/lib/pullthrough
EXPOSE 5000
# The first check runs one interval after the start: 5s keeps that wait short (a start interval
# would need Docker 25; Debian 12's docker.io is 20.10).
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/pullthrough", "healthcheck"]
# SIGTERM: stop accepting, finish responses in progress (shutdown_grace), exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/pullthrough"]
