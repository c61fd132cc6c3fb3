# pullthrough's image: a static-ish release binary on a small Debian base, run as a non-root user,
# happy with a read-only root filesystem (it writes only to its data volume), health-checked by
# its own `healthcheck` subcommand (no curl in the image).
FROM rust:1-slim-bookworm AS build
# cmake: aws-lc-rs (rustls' crypto) builds with it.
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies in their own layer: a change to src/ does not rebuild them.
COPY Cargo.toml Cargo.lock ./
# Cargo.toml declares the bench targets: stubs for them too.
RUN mkdir src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/hit_allocations.rs && cp benches/hit_allocations.rs benches/hit_instructions.rs \
    && cargo build --release --locked && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked && strip target/release/pullthrough

FROM debian:bookworm-slim
# ca-certificates: the root certificates rustls verifies Docker Hub against.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pullthrough \
    && mkdir -p /var/lib/pullthrough && chown 10001:10001 /var/lib/pullthrough
COPY --from=build /src/target/release/pullthrough /usr/local/bin/pullthrough
COPY config/pullthrough.toml /etc/pullthrough/pullthrough.toml
LABEL org.opencontainers.image.title="pullthrough" \
      org.opencontainers.image.description="A caching pull-through proxy for container registries" \
      org.opencontainers.image.source="https://github.com/pullthrough/pullthrough" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
ENV PULLTHROUGH_CONFIG=/etc/pullthrough/pullthrough.toml \
    PULLTHROUGH_LISTEN=0.0.0.0:5000 \
    PULLTHROUGH_DATA_DIR=/var/lib/pullthrough
USER 10001:10001
VOLUME /var/lib/pullthrough
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s \
    CMD ["/usr/local/bin/pullthrough", "healthcheck"]
# SIGTERM: stop accepting, finish responses in progress (shutdown_grace), exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/pullthrough"]
