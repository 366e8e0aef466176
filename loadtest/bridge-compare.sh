#!/usr/bin/env bash
# Bridge throughput side by side: devices → lobby (bridge-mode tenant) → mosquitto B, and
# devices → mosquitto A (`connection` bridge) → mosquitto B, same PKI, same harness.
#
#   loadtest/bridge-compare.sh [DEVICES] [MESSAGES]     # default 100 devices, 1000 messages
#   QOS=0 PAYLOAD=256 loadtest/bridge-compare.sh 100 1000
#
# Starts, in a temp dir with a dev PKI (`lobby certs init`):
#   B  upstream mosquitto, TLS + require_certificate, 127.0.0.1:29884 (server.pem, SAN localhost)
#   L  release lobby, MQTT 127.0.0.1:29883, API 127.0.0.1:29080; its tenant bridges to B with
#      devices/device-0001.pem as client certificate
#   A  mosquitto, TLS + require_certificate, 127.0.0.1:29885, bridging `things/# out 1` to B
# and runs `lobby-loadtest bridge` with 1 device and with DEVICES devices against L, then with
# --skip-claim against A. The observer (on B) uses device-0001's certificate too. Prints one
# labelled JSON line per run; the harness's stderr (with "lost") goes to $work/*.err, shown
# on failure and summarised after each line.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/servers.sh
DEVICES=${1:-100}
MESSAGES=${2:-1000}
QOS=${QOS:-1}
PAYLOAD=${PAYLOAD:-64}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lobby-target}"
cargo build -q --release -p lobby -p lobby-loadtest
LOBBY=$CARGO_TARGET_DIR/release/lobby
LT=$CARGO_TARGET_DIR/release/lobby-loadtest

work=$(mktemp -d)
pids=()
cleanup() { # newest first: A, the lobby, then B (so the lobby does not log B going away)
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$LOBBY" certs init --dir "$work/certs" --devices 1 >/dev/null
c=$work/certs
lobby_conf "$c" "$work" 29883 29080 >"$work/lobby.toml"
common_conf() { # port
  mosquitto_conf "$c" "$1" "max_queued_messages 100000
max_inflight_messages 100"
}
common_conf 29884 >"$work/mosquitto-b.conf"
{
  common_conf 29885
  cat <<EOF
connection lt-bridge
address localhost:29884
bridge_cafile $c/ca.pem
bridge_certfile $c/devices/device-0001.pem
bridge_keyfile $c/devices/device-0001.key
bridge_insecure false
bridge_protocol_version mqttv311
cleansession true
try_private false
topic things/# out 1
EOF
} >"$work/mosquitto-a.conf"

wait_port() { # port
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  return 1
}

run() { # label port devices [extra args]
  local label=$1 port=$2 n=$3 out
  shift 3
  if ! out=$("$LT" bridge --port "$port" --ca "$c/ca.pem" --ca-key "$c/ca.key" --devices "$n" \
    --concurrency 64 --messages "$MESSAGES" --qos "$QOS" --payload "$PAYLOAD" \
    --upstream-host localhost --upstream-port 29884 --upstream-ca "$c/ca.pem" \
    --upstream-cert "$c/devices/device-0001.pem" --upstream-key "$c/devices/device-0001.key" \
    "$@" 2>"$work/$label.err" | tail -n 1); then
    cat "$work/$label.err" >&2
    return 1
  fi
  echo "$label $out"
  grep -E '^(bridge:|error )' "$work/$label.err" | sed "s/^/$label   /" >&2 || true
}

(ulimit -n 20000; exec mosquitto -c "$work/mosquitto-b.conf" 2>"$work/b.log") &
pids+=($!)
(ulimit -n 20000; exec "$LOBBY" serve --config "$work/lobby.toml" 2>"$work/lobby.log") &
pids+=($!)
wait_port 29884
wait_port 29883
lobby_args=(--api http://127.0.0.1:29080 --admin-token "@$c/admin.token" --claim-key "$c/claim.key")
run "lobby-1" 29883 1 "${lobby_args[@]}"
run "lobby-$DEVICES" 29883 "$DEVICES" "${lobby_args[@]}"

(ulimit -n 20000; exec mosquitto -c "$work/mosquitto-a.conf" 2>"$work/a.log") &
pids+=($!)
wait_port 29885
sleep 1 # A's bridge connects to B in the background
run "mosquitto-1" 29885 1 --skip-claim
run "mosquitto-$DEVICES" 29885 "$DEVICES" --skip-claim
