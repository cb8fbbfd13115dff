# Multi-stage build: compile in the Rust image, run from a small Debian image as an
# unprivileged user. Build: docker build -t gatehouse .
# Run:   docker run -p 8080:8080 -v $PWD/gatehouse.toml:/etc/gatehouse/gatehouse.toml gatehouse
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY docs/openapi.json ./docs/openapi.json
COPY src ./src
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin gatehouse

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/gatehouse --create-home --shell /usr/sbin/nologin gatehouse \
    && mkdir -p /etc/gatehouse /var/log/gatehouse \
    && chown gatehouse:gatehouse /var/log/gatehouse
COPY --from=build /src/target/release/gatehouse /usr/local/bin/gatehouse
COPY examples/quickstart.toml /etc/gatehouse/gatehouse.toml
USER gatehouse
WORKDIR /var/lib/gatehouse
EXPOSE 8080
# The quickstart listens on 127.0.0.1 inside the container: mount a config whose
# listeners bind 0.0.0.0. Check it first: docker run --rm -v …  gatehouse validate /etc/gatehouse/gatehouse.toml
ENTRYPOINT ["/usr/local/bin/gatehouse"]
CMD ["run", "--config", "/etc/gatehouse/gatehouse.toml"]
