#!/usr/bin/env bash
# The claim API alone, measured by a client that is not the lobby's harness: wrk (apt-get
# install wrk) POSTs /v1/claims with a new code each time, CONNS connections for DURATION,
# against each lobby binary in turn on a fresh SQLite store. The devices never connect, so a
# claim is HTTP + code check + store commit + map update (no redirect is sent): the claim
# phase without the device side. Prints wrk's summary and latency percentiles per binary.
#
#   loadtest/claim-wrk.sh [CONNS] [DURATION]        # default 256 connections, 10s
#   BEFORE=/work/bin/lobby-before AFTER=target/release/lobby loadtest/claim-wrk.sh 16 10s
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/servers.sh
CONNS=${1:-256}
DURATION=${2:-10s}
BEFORE=${BEFORE:-/work/bin/lobby-before}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lobby-target}"
if [ -z "${AFTER:-}" ]; then
  cargo build -q --release -p lobby
  AFTER=$CARGO_TARGET_DIR/release/lobby
fi
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 1; }

work=$(mktemp -d)
lobby_pid=
cleanup() {
  [ -n "$lobby_pid" ] && kill "$lobby_pid" 2>/dev/null && wait "$lobby_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
"$AFTER" certs init --dir "$work/certs" --devices 1 >/dev/null
c=$work/certs

# Codes for random device ids (the lobby's code: HMAC-SHA256(claim key, id), 16 bytes,
# base32), more than any run claims.
python3 - "$c/claim.key" 400000 >"$work/codes" <<'PY'
import base64, hashlib, hmac, os, sys
key = bytes.fromhex(open(sys.argv[1]).read().strip())
for _ in range(int(sys.argv[2])):
    d = os.urandom(32)
    s = base64.b32encode(hmac.new(key, d, hashlib.sha256).digest()[:16]).decode().rstrip("=")
    print(f"LOBBY1:{d.hex()}:{s}")
PY

cat >"$work/claim.lua" <<'LUA'
-- Each wrk thread claims every THREADS-th code of the file, in turn.
local n = 0
function setup(thread)
  thread:set("first", n)
  n = n + 1
end
function init(args)
  codes = {}
  local i = 0
  for line in io.lines(os.getenv("CODES")) do
    if i % tonumber(os.getenv("THREADS")) == first then codes[#codes + 1] = line end
    i = i + 1
  end
  next_code = 0
  headers = { ["Authorization"] = "Bearer " .. os.getenv("TOKEN"),
              ["Content-Type"] = "application/json" }
end
function request()
  next_code = next_code % #codes + 1
  return wrk.format("POST", "/v1/claims", headers, '{"code":"' .. codes[next_code] .. '"}')
end
function done(summary, latency, requests)
  io.write(string.format("status: %d non-2xx/3xx, %d errors\n",
    summary.errors.status, summary.errors.connect + summary.errors.read +
    summary.errors.write + summary.errors.timeout))
  for _, p in ipairs({ 50, 90, 99, 99.9 }) do
    io.write(string.format("p%s %.2f ms\n", p, latency:percentile(p) / 1000))
  end
end
LUA

for side in before after; do
  bin=$BEFORE
  [ "$side" = after ] && bin=$AFTER
  rm -f "$work"/lobby.db*
  lobby_conf "$c" "$work" 31883 31080 >"$work/lobby.toml"
  (ulimit -n 20000; exec "$bin" serve --config "$work/lobby.toml" 2>"$work/$side.log") &
  lobby_pid=$!
  wait_ready 31080
  token=$(curl -fs -H "Authorization: Bearer $(cat "$c/admin.token")" \
    -H 'Content-Type: application/json' -d '{"id":"wrk","name":"wrk","endpoint":"iot.wrk.example"}' \
    http://127.0.0.1:31080/v1/tenants | jq -r .token)
  cpu0=$(awk '{print $14 + $15}' "/proc/$lobby_pid/stat")
  if [ -n "${PERF:-}" ]; then # PERF=1: a profile of the lobby over the run, $PERF_OUT.<side>
    perf record -F 999 -g -p "$lobby_pid" -o "${PERF_OUT:-/tmp/claim-wrk.perf}.$side" \
      -- sleep "${DURATION%s}" >/dev/null 2>&1 &
  fi
  echo "== $side $(basename "$bin"): $CONNS connections, $DURATION"
  CODES=$work/codes THREADS=2 TOKEN=$token \
    wrk -t2 -c"$CONNS" -d"$DURATION" -s "$work/claim.lua" http://127.0.0.1:31080 |
    grep -E 'Requests/sec|requests in|status:|^p[0-9]'
  cpu1=$(awk '{print $14 + $15}' "/proc/$lobby_pid/stat")
  secs=${DURATION%s}
  echo "lobby CPU: $(( (cpu1 - cpu0) * 100 / $(getconf CLK_TCK) / secs ))% of one core"
  kill "$lobby_pid"; wait "$lobby_pid" 2>/dev/null || true; lobby_pid=
done
