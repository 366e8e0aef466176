#!/usr/bin/env bash
# Where a connect's CPU goes: the lobby and the bare tokio-rustls floor (examples/bare_tls.rs)
# under callgrind, serving the same connect storm (full mTLS handshake, CONNECT, CONNACK,
# DISCONNECT per device). Instruction counts repeat run to run, unlike CPU time on a shared box.
#
#   loadtest/profile.sh [DEVICES] [CONCURRENCY]        # default 300 devices, 4 in flight
#   OUT=/tmp/profile TOP=25 loadtest/profile.sh 300 4
#   RESUMPTION=false loadtest/profile.sh      # lobby without session tickets (as bare_tls)
#   BIN=DIR loadtest/profile.sh               # use lobby, lobby-loadtest, bare_tls from DIR
#
# Each server starts under `valgrind --tool=callgrind --instr-atstart=no`; once it listens,
# `callgrind_control -i on` starts counting, the storm runs, `callgrind_control -d` dumps, so
# start-up (config, PKI, SQLite) is not in the profile. Prints Ir per connect (total Ir of the
# dump / devices) and the top functions by inclusive cost. Profiles stay in $OUT:
#   callgrind_annotate --inclusive=yes $OUT/callgrind.lobby.out.1 | less
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/servers.sh
DEVICES=${1:-300}
CONCURRENCY=${2:-4}
OUT=${OUT:-/tmp/profile}
TOP=${TOP:-20}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lobby-target}"
if [ -z "${BIN:-}" ]; then   # BIN=DIR: use copies of the three binaries instead of building
  cargo build -q --release -p lobby -p lobby-loadtest --bins --example bare_tls
fi
LOBBY=${BIN:-$CARGO_TARGET_DIR/release}/lobby
BARE=${BIN:-$CARGO_TARGET_DIR/release/examples}/bare_tls
LT=${BIN:-$CARGO_TARGET_DIR/release}/lobby-loadtest
mkdir -p "$OUT"

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

"$LOBBY" certs init --dir "$work/certs" --devices 1 >/dev/null
lobby_config() { # mqtt-port api-port; valgrind runs the server ~50x slower: long deadlines
  lobby_conf "$work/certs" "$work" "$1" "$2" "[limits]
handshake_timeout = \"120s\"
connect_timeout = \"120s\"" "resumption = ${RESUMPTION:-true}" >"$work/lobby.toml"
}
# The servers' command lines for MQTT port $1.
lobby_cmd() { lobby_config "$1" $(($1 + 10)); echo "$LOBBY" serve --config "$work/lobby.toml"; }
bare_cmd() { echo "$BARE" "127.0.0.1:$1" "$work/certs/server.pem" "$work/certs/server.key" \
  "$work/certs/ca.pem"; }

# Up when the port answers; fails when the server died. Ports 38880-38899 sit inside the
# ephemeral range, so another storm on this host may hold one: bind fails, try the next port.
wait_port() { # port pid
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.2
  done
  return 1
}

profile() { # name command-function
  local name=$1 pid port f total once
  rm -f "$OUT/callgrind.$name.out"*
  for port in $(seq 38880 38889) fail; do
    [ "$port" = fail ] && { echo "$name did not start: $OUT/valgrind.$name.log" >&2; exit 1; }
    # shellcheck disable=SC2046
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.$name.out" \
      $("$2" "$port") 2>"$OUT/valgrind.$name.log" &
    pid=$!
    pids+=("$pid")
    wait_port "$port" "$pid" && break
  done
  callgrind_control -i on "$pid" >/dev/null 2>&1  # count from here: start-up is not in it
  "$LT" connect --port "$port" --ca "$work/certs/ca.pem" --ca-key "$work/certs/ca.key" \
    --devices "$DEVICES" --concurrency "$CONCURRENCY" --timeout 120s 2>/dev/null | tail -n 1
  sleep 2                                      # let the server finish the last closes
  callgrind_control -d "$pid" >/dev/null 2>&1     # writes callgrind.$name.out.1
  kill -KILL "$pid"
  wait "$pid" 2>/dev/null || true
  rm -f "$OUT/callgrind.$name.out"             # the empty end-of-run file (SIGKILL)
  f="$OUT/callgrind.$name.out.1"
  total=$(awk '/^summary:/ { print $2 }' "$f")
  # aws-lc seeds its entropy pool (jitter entropy, ~420M Ir) on the process's first RAND_bytes:
  # in the storm for bare_tls, at start-up for a lobby with tickets (Ticketer::new).
  once=$(callgrind_annotate --inclusive=yes "$f" | awk '/tree_jitter_initialize_once/ && !d {
    gsub(",", "", $1); print $1; d = 1 }')
  once=${once:-0}
  echo "$name: $total Ir in the storm, $((total / DEVICES)) Ir per connect;" \
    "without the one-off entropy seeding ($once Ir): $(((total - once) / DEVICES)) ($f)"
  callgrind_annotate --inclusive=yes "$f" | awk -v n="$TOP" '/^ *[0-9,]+ / && c++ < n'
}

profile lobby lobby_cmd
profile bare_tls bare_cmd
