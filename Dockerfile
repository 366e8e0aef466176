# The lobby as a container: `docker build -t lobby .` (README, Deploying).
# Build stage: the release binary, from the pinned toolchain (rust-toolchain.toml).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin lobby

# Runtime: a small Debian with only the binary, run as an unprivileged user.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/lobby --shell /usr/sbin/nologin lobby \
 && mkdir -p /etc/lobby /var/lib/lobby && chown lobby:lobby /var/lib/lobby
COPY --from=build /src/target/release/lobby /usr/local/bin/lobby
USER lobby
WORKDIR /var/lib/lobby
# /etc/lobby: lobby.toml and the certificates it names (read-only is fine);
# /var/lib/lobby: the SQLite store (`store.url = "sqlite:///var/lib/lobby/lobby.db"`).
VOLUME ["/etc/lobby", "/var/lib/lobby"]
EXPOSE 8883 443 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/lobby"]
CMD ["serve", "--config", "/etc/lobby/lobby.toml"]
