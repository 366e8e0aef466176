#!/usr/bin/env bash
# CPU per full mTLS connect with a client that is not the lobby's harness (Python's ssl, that
# is OpenSSL: loadtest/ossl-storm.py): the lobby, the bare tokio-rustls floor
# (examples/bare_tls.rs) and mosquitto, all up at once on one dev PKI, measured in the order
# lobby, bare, mosquitto, mosquitto, bare, lobby (drift on a shared machine cancels out), each
# pass DEVICES connects with their own certificates.
#
#   loadtest/ossl-compare.sh [DEVICES] [THREADS]
#   ARGS=--tls12 loadtest/ossl-compare.sh 2000 8
#   LOBBY_TLS='resumption = false' loadtest/ossl-compare.sh   # [tls] keys for the lobby
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/servers.sh
DEVICES=${1:-2000}
THREADS=${2:-8}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lobby-target}"
cargo build -q --release -p lobby --bins --example bare_tls
LOBBY=$CARGO_TARGET_DIR/release/lobby
BARE=$CARGO_TARGET_DIR/release/examples/bare_tls

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

"$LOBBY" certs init --dir "$work/certs" --devices "$DEVICES" >/dev/null
# Devices reconnect once per pass: no per-device reconnect limit in the way.
lobby_conf "$work/certs" "$work" 28883 28080 \
  "$(printf '[limits]\nreconnect_burst = 1000\n')" "${LOBBY_TLS:-}" >"$work/lobby.toml"
mosquitto_conf "$work/certs" 28884 >"$work/mosquitto.conf"

start_three "$work"
wait_ready 28080
sleep 1

pass() { # name pid port
  local out
  out=$(python3 loadtest/ossl-storm.py --port "$3" --certs "$work/certs" --threads "$THREADS" \
    --server-pid "$2" ${ARGS:-} | tail -n 1)
  echo "$1 $out"
}
# One unmeasured pass each: first use of randomness, allocator and page warm-up.
for p in "lobby ${pids[0]} 28883" "bare ${pids[2]} 28885" "mosquitto ${pids[1]} 28884"; do
  set -- $p
  python3 loadtest/ossl-storm.py --port "$3" --certs "$work/certs" --threads "$THREADS" \
    ${ARGS:-} >/dev/null
done
pass lobby "${pids[0]}" 28883
pass bare "${pids[2]}" 28885
pass mosquitto "${pids[1]}" 28884
pass mosquitto "${pids[1]}" 28884
pass bare "${pids[2]}" 28885
pass lobby "${pids[0]}" 28883
