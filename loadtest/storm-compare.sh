#!/usr/bin/env bash
# Reconnect storm side by side (issue 16 item 4): the lobby and mosquitto, same PKI, same
# harness, same run.
#
#   loadtest/storm-compare.sh [DEVICES=2000] [CONCURRENCY=64]
#   loadtest/storm-compare.sh 19000 64
#   SIGNAL=TERM loadtest/storm-compare.sh 2000    # a graceful stop (the lobby drains) instead of a crash
#   ARGS="--storm-concurrency 512" loadtest/storm-compare.sh    # extra harness arguments
#   EXTRA_TOML=$'[limits]\nmax_handshakes = 8192' loadtest/storm-compare.sh   # lobby config
#   BUILD=0 loadtest/storm-compare.sh    # use the binaries already built (a tree mid-edit)
#   PASSES="lobby:restart" loadtest/storm-compare.sh 19000   # some of the four passes only
#
# For each server (a release lobby on 127.0.0.1:28883, API :28080; a TLS mosquitto with
# require_certificate on 127.0.0.1:28884; one dev PKI in a temp dir), two passes:
#   restart  `lobby-loadtest storm`: DEVICES connect (CONCURRENCY at once) and are held; once the
#            harness writes its --ready-file the script kills the server (SIGNAL, default KILL)
#            and starts it again at once. Every device reconnects, retrying refused connects
#            (50–200 ms jitter) until --deadline. A restarted lobby has new ticket keys: every
#            reconnect is a full handshake. CPU per reconnect = the new process's utime+stime
#            from its start (startup included) ÷ reconnects.
#   resume   `storm --drop-after 2s --resume`: the harness closes every connection at once and
#            reconnects them to the same server, offering the session ticket each device got.
#            CPU per reconnect = the server's utime+stime over the storm ÷ reconnects.
# Sources: SOURCE_IPS (default 127.0.0.1-127.0.0.4). Per pass it prints the harness's JSON and
# stderr summary, the kernel's listen-queue counters (nstat deltas) and, for the lobby, its
# handshake-failure metrics; then one table.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/servers.sh
DEVICES=${1:-2000}
CONCURRENCY=${2:-64}
SIGNAL=${SIGNAL:-KILL}
SOURCE_IPS=${SOURCE_IPS:-127.0.0.1-127.0.0.4}
ulimit -n 20000
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lobby-target}"
[ "${BUILD:-1}" = 0 ] || cargo build -q --release --bins --example bare_tls
LOBBY=$CARGO_TARGET_DIR/release/lobby
LT=$CARGO_TARGET_DIR/release/lobby-loadtest

work=$(mktemp -d)
cleanup() {
  [ -f "$work/pid" ] && kill "$(cat "$work/pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$LOBBY" certs init --dir "$work/certs" --devices 1 >/dev/null
lobby_conf "$work/certs" "$work" 28883 28080 "${EXTRA_TOML:-}" >"$work/lobby.toml"
mosquitto_conf "$work/certs" 28884 >"$work/mosquitto.conf"

# Started in this shell (not a subshell), so that `wait` can reap a killed server.
start_lobby() {
  (ulimit -n 20000; exec "$LOBBY" serve --config "$work/lobby.toml") &
  echo $! >"$work/pid"
}
start_mosquitto() {
  (ulimit -n 20000; exec mosquitto -c "$work/mosquitto.conf") &
  echo $! >"$work/pid"
}
wait_port() { # port
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listening on $1" >&2
  return 1
}
stop_server() { # signal
  local pid
  pid=$(cat "$work/pid")
  kill "-$1" "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -f "$work/pid"
}

NSTAT_KEYS="TcpExtListenOverflows TcpExtListenDrops TcpExtTCPReqQFullDrop TcpExtTCPReqQFullDoCookies TcpExtSyncookiesSent TcpExtTCPSynRetrans"
nstat_snap() { nstat -asz 2>/dev/null | awk -v keys="$NSTAT_KEYS" \
  'BEGIN { n = split(keys, k); for (i = 1; i <= n; i++) want[k[i]] = 1 } $1 in want { print $1, $2 }' | sort; }
nstat_delta() { # before after
  join "$1" "$2" | awk '{ d = $3 - $2; printf "%s%s=%d", sep, substr($1, 7), d; sep = " " } END { print "" }'
}
lobby_metrics() { # the restarted process's (restart) or the whole run's (resume) non-zero counts
  curl -fs http://127.0.0.1:28080/metrics 2>/dev/null |
    awk '/^lobby_(tls_handshake_failures|connections|tls_handshakes)_total/ && $2 != 0 {
      sub(/^lobby_/, ""); sub(/_total/, ""); printf "%s%s=%s", sep, $1, $2; sep = " " } END { print "" }'
}

rows=()
pass() { # name port start_fn mode
  local name=$1 port=$2 start=$3 mode=$4 out err lt
  out="$work/$name-$mode.json" err="$work/$name-$mode.err"
  rm -f "$work/ready"
  $start
  # Not probed on the lobby's MQTT port: a bare TCP probe counts as a handshake failure there.
  if [ "$name" = lobby ]; then wait_ready 28080; else wait_port "$port"; fi
  nstat_snap >"$work/nstat.before"
  local extra=(--hold 120s --ready-file "$work/ready")
  [ "$mode" = resume ] && extra=(--drop-after 2s --resume)
  "$LT" storm --port "$port" --ca "$work/certs/ca.pem" --ca-key "$work/certs/ca.key" \
    --devices "$DEVICES" --concurrency "$CONCURRENCY" --source-ips "$SOURCE_IPS" \
    --deadline 60s --server-pid-file "$work/pid" "${extra[@]}" ${ARGS:-} >"$out" 2>"$err" &
  lt=$!
  if [ "$mode" = restart ]; then
    while [ ! -f "$work/ready" ] && kill -0 "$lt" 2>/dev/null; do sleep 0.1; done
    sleep 1
    stop_server "$SIGNAL"
    $start # no wait: the devices retry until it listens
  fi
  wait "$lt" || echo "$name $mode: harness exited with $?" >&2
  nstat_snap >"$work/nstat.after"
  echo "== $name $mode"
  grep -E '^(storm|error|server cpu|connack code)' "$err" || true
  echo "json $(tail -n 1 "$out")"
  echo "kernel $(nstat_delta "$work/nstat.before" "$work/nstat.after")"
  [ "$name" = lobby ] && echo "metrics $(lobby_metrics)"
  rows+=("$name $mode $(tail -n 1 "$out" | jq -r '[.connected, .failed, .storm_s,
    .latency_ms.tcp.p99, .latency_ms.tls.p99, .latency_ms.connack.p99, .reconnect_ms.p99,
    .resumed, .server_cpu_us_per_connect] | map(. // "-") | join(" ")')")
  stop_server TERM
}

for p in ${PASSES:-lobby:restart mosquitto:restart lobby:resume mosquitto:resume}; do
  case $p in
    lobby:*) pass lobby 28883 start_lobby "${p#*:}" ;;
    mosquitto:*) pass mosquitto 28884 start_mosquitto "${p#*:}" ;;
  esac
done

echo
echo "storm: $DEVICES devices, sources $SOURCE_IPS, restart by SIG$SIGNAL; latencies p99 in ms"
{
  echo "server pass connected failed storm_s tcp tls connack reconnect resumed cpu_us/reconnect"
  printf '%s\n' "${rows[@]}"
} | column -t
