# Multi-stage build: compile in the Rust image, run in a slim Debian image as
# a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
COPY benches benches
RUN cargo build --release --locked --bin concord

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/concord --create-home concord
COPY --from=build /src/target/release/concord /usr/local/bin/concord
USER concord
WORKDIR /var/lib/concord
ENV CONCORD_BIND=0.0.0.0:8080 CONCORD_LOG_FORMAT=json
EXPOSE 8080
ENTRYPOINT ["concord"]
CMD ["serve"]
