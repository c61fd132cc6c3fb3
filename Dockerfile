# Multi-stage build: compile with the Rust toolchain, run on a small Debian image as non-root.
FROM rust:1-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked && strip target/release/pullthrough

FROM debian:bookworm-slim
# ca-certificates: the root certificates rustls verifies Docker Hub against.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/pullthrough pullthrough \
    && mkdir -p /var/lib/pullthrough && chown pullthrough /var/lib/pullthrough
COPY --from=build /src/target/release/pullthrough /usr/local/bin/pullthrough
COPY config/pullthrough.toml /etc/pullthrough/pullthrough.toml
ENV PULLTHROUGH_CONFIG=/etc/pullthrough/pullthrough.toml \
    PULLTHROUGH_LISTEN=0.0.0.0:5000 \
    PULLTHROUGH_DATA_DIR=/var/lib/pullthrough
USER pullthrough
VOLUME /var/lib/pullthrough
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=3s CMD curl -fsS http://127.0.0.1:5000/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/pullthrough"]
