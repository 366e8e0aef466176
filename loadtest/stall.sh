#!/usr/bin/env bash
# Legitimate connects while thousands of handshakes stall (issue 12: limits.max_handshakes),
# the lobby and a TLS mosquitto side by side, same PKI, same clients, same run.
#
#   loadtest/stall.sh [STALLED] [DEVICES] [CONCURRENCY]     # defaults 5000 2000 16
#   MAX_HANDSHAKES=8192 loadtest/stall.sh                    # the lobby's budget (default 2048)
#
# For each server: `lobby-loadtest connect` (full mTLS connects) and 100 runs of
# `mosquitto_pub -q 1` (a client that is not ours; each run is a process start, TLS, CONNECT,
# PUBLISH, PUBACK, DISCONNECT), first with nothing else going on, then while loadtest/stall.py
# holds STALLED TCP connections that never send a ClientHello (replacing each one the server
# closes) from 127.0.0.2-127.0.0.5. Prints the harness's JSON and the mosquitto_pub p50/p99.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/servers.sh
STALLED=${1:-5000}
DEVICES=${2:-2000}
CONCURRENCY=${3:-16}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lobby-target}"
cargo build -q --release -p lobby -p lobby-loadtest
LOBBY=$CARGO_TARGET_DIR/release/lobby
LT=$CARGO_TARGET_DIR/release/lobby-loadtest

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

"$LOBBY" certs init --dir "$work/certs" --devices 1 >/dev/null
lobby_conf "$work/certs" "$work" 28883 28080 "[limits]
max_connections = 19000
max_handshakes = ${MAX_HANDSHAKES:-2048}
reconnect_burst = 1000" >"$work/lobby.toml"
mosquitto_conf "$work/certs" 28884 >"$work/mosquitto.conf"
ulimit -n "$(ulimit -Hn)"
"$LOBBY" serve --config "$work/lobby.toml" & pids+=($!)
/usr/sbin/mosquitto -c "$work/mosquitto.conf" & pids+=($!)
sleep 2
dev=$work/certs/devices/device-0001
ID=$("$LOBBY" device-id --cert "$dev.pem")

pubs() { # port → "p50 p99" of 100 mosquitto_pub runs, in ms
  for _ in $(seq 100); do
    local t0 t1
    t0=$(date +%s%N)
    mosquitto_pub -h localhost -p "$1" --cafile "$work/certs/ca.pem" --cert "$dev.pem" \
      --key "$dev.key" -q 1 -t "\$lobby/devices/$ID/ack" -m '{}' >/dev/null 2>&1 || echo fail >&2
    t1=$(date +%s%N)
    echo $(( (t1 - t0) / 1000 ))
  done | sort -n | awk '{a[NR]=$1} END {printf "p50 %.1f ms, p99 %.1f ms\n", a[int(NR*0.5)]/1000, a[int(NR*0.99)]/1000}'
}

run() { # name port
  local out
  out=$("$LT" connect --port "$2" --ca "$work/certs/ca.pem" --ca-key "$work/certs/ca.key" \
    --devices "$DEVICES" --concurrency "$CONCURRENCY" 2>/dev/null | tail -n 1)
  echo "$1 harness $out"
  echo "$1 mosquitto_pub $(pubs "$2")"
}

for server in lobby:28883 mosquitto:28884; do
  name=${server%%:*}; port=${server##*:}
  run "$name idle" "$port"
  python3 loadtest/stall.py 127.0.0.1 "$port" "$STALLED" 60 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5 \
    >"$work/stall-$name.json" & stall=$!
  sleep 8
  run "$name stalled=$STALLED" "$port"
  kill -TERM "$stall" 2>/dev/null || true
  wait "$stall" 2>/dev/null || true
  echo "$name stall $(cat "$work/stall-$name.json")"
  if [ "$name" = lobby ]; then
    echo "lobby $(curl -s 127.0.0.1:28080/metrics | grep '^lobby_tls_handshake_failures_total' | tr '\n' ' ')"
  fi
  sleep 2
done
