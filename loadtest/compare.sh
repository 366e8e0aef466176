#!/usr/bin/env bash
# Side-by-side connect storm: the lobby, mosquitto and a bare tokio-rustls server (the floor,
# examples/bare_tls.rs), same PKI, same harness, same run.
#
#   loadtest/compare.sh [DEVICES] [CONCURRENCY]
#   SCENARIO=idle HOLD=20s loadtest/compare.sh 15000 64    # held connections, server RSS each
#   RESUME=1 loadtest/compare.sh 5000 64    # also: reconnects that resume their TLS session
#   ARGS="--tls12" loadtest/compare.sh       # extra harness arguments for every run
#
# Starts a release lobby (its own temp dir and dev PKI, MQTT on 127.0.0.1:28883) and a TLS
# mosquitto (require_certificate, same CA and server certificate, 127.0.0.1:28884), runs
# `lobby-loadtest connect` against each in turn, and prints the harness's JSON plus the server
# process's CPU time (utime+stime from /proc) per connection, so the client's cost does not count.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/servers.sh
DEVICES=${1:-3000}
CONCURRENCY=${2:-64}
SCENARIO=${SCENARIO:-connect}
HOLD=${HOLD:-20s}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lobby-target}"
cargo build -q --release -p lobby -p lobby-loadtest --bins --example bare_tls
LOBBY=$CARGO_TARGET_DIR/release/lobby
BARE=$CARGO_TARGET_DIR/release/examples/bare_tls   # the floor: handshake + CONNACK only
LT=$CARGO_TARGET_DIR/release/lobby-loadtest
TICK=$(getconf CLK_TCK)

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

"$LOBBY" certs init --dir "$work/certs" --devices 1 >/dev/null
lobby_conf "$work/certs" "$work" 28883 28080 >"$work/lobby.toml"
mosquitto_conf "$work/certs" 28884 >"$work/mosquitto.conf"

cpu() { awk -v t="$TICK" '{ printf "%.0f", ($14 + $15) * 1000000 / t }' "/proc/$1/stat"; }

run() { # name pid port
  local before after out
  before=$(cpu "$2")
  local extra=()
  [ "$SCENARIO" = idle ] && extra=(--hold "$HOLD" --server-pid "$2")
  out=$("$LT" "$SCENARIO" --port "$3" --ca "$work/certs/ca.pem" --ca-key "$work/certs/ca.key" \
    --devices "$DEVICES" --concurrency "$CONCURRENCY" "${extra[@]}" ${ARGS:-} 2>/dev/null | tail -n 1)
  sleep 1
  after=$(cpu "$2")
  echo "$1 $out"
  echo "$1 server_cpu_us_per_connect $(( (after - before) / DEVICES ))"
  if [ "${RESUME:-0}" = 1 ] && [ "$SCENARIO" = connect ]; then
    # A warm-up pass of full handshakes, then every device reconnects offering its ticket;
    # the harness reads the server's CPU over the second pass only.
    out=$("$LT" connect --resume --server-pid "$2" --port "$3" --ca "$work/certs/ca.pem" \
      --ca-key "$work/certs/ca.key" --devices "$DEVICES" --concurrency "$CONCURRENCY" \
      ${ARGS:-} 2>/dev/null | tail -n 1)
    echo "$1 resumed $out"
  fi
}

start_three "$work"
sleep 2
run lobby "${pids[0]}" 28883
run mosquitto "${pids[1]}" 28884
run bare_tls "${pids[2]}" 28885
