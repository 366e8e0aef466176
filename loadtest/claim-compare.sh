#!/usr/bin/env bash
# Claim throughput, two lobby binaries side by side: claims per second and claim → redirect
# latency, single node on SQLite and a two-node fleet on PostgreSQL, same PKI, same harness.
#
#   loadtest/claim-compare.sh [DEVICES]                  # default 3000 devices
#   BEFORE=/work/bin/lobby-before AFTER=target/release/lobby loadtest/claim-compare.sh 2000
#   BATCH=100 loadtest/claim-compare.sh                  # AFTER also claims 100 codes per batch
#   PG=postgres://postgres@127.0.0.1:5432 ARGS="--mqtt 5" loadtest/claim-compare.sh
#
# BEFORE defaults to /work/bin/lobby-before, AFTER to the release lobby built from this tree
# (built only when AFTER is not given). For each binary in turn, each run on a fresh lobby:
#   sqlite  one node (MQTT 127.0.0.1:31883, API :31080), DEVICES waiting, claim concurrency 16,
#           then again with 256;
#   pg      two nodes sharing a fresh PostgreSQL database (created with createdb, dropped after;
#           the second node on :31893 / :31090, its own [cluster] node_name), the devices dealt
#           to both MQTT ports, the claims to both APIs in turn, 16 in flight per node;
#   and with BATCH=N, for AFTER only, each of those again with `--claim-batch N` (concurrency =
#   batches in flight). Both binaries get the same config: nothing BEFORE would not know.
# Prints one line per run: binary, store, concurrency, batch, claims_per_sec, claim → redirect
# p50/p99, failures (devices not redirected: connect, claim, no redirect), and the CPU of the
# harness and of the lobbies over the claim phase (% of one core; the harness shares the host).
# Each run's harness stderr and lobby logs stay in $work/<run>.* and are shown on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/servers.sh
DEVICES=${1:-${DEVICES:-3000}}
BATCH=${BATCH:-0}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
BEFORE=${BEFORE:-/work/bin/lobby-before}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lobby-target}"
if [ -z "${AFTER:-}" ]; then
  cargo build -q --release -p lobby -p lobby-loadtest
  AFTER=$CARGO_TARGET_DIR/release/lobby
else
  cargo build -q --release -p lobby-loadtest
fi
LT=$CARGO_TARGET_DIR/release/lobby-loadtest
for bin in "$BEFORE" "$AFTER"; do
  [ -x "$bin" ] || { echo "no lobby binary at $bin" >&2; exit 1; }
done

work=$(mktemp -d)
pids=()
dbs=()
stop_lobbies() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  stop_lobbies
  for db in "${dbs[@]}"; do dropdb --if-exists --maintenance-db="$PG/postgres" "$db" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

"$BEFORE" certs init --dir "$work/certs" --devices 1 >/dev/null
c=$work/certs

start_lobby() { # bin label conf
  (ulimit -n 20000; exec "$1" serve --config "$3" 2>"$work/$2.log") &
  pids+=($!)
}

# One claim run on fresh lobbies: label side binary store(sqlite|pg) concurrency batch.
run() {
  local label=$1 side=$2 bin=$3 store=$4 conc=$5 batch=$6 ports apis out
  local dir=$work/$label
  mkdir -p "$dir"
  if [ "$store" = sqlite ]; then
    lobby_conf "$c" "$dir" 31883 31080 >"$dir/a.toml"
    start_lobby "$bin" "$label.a" "$dir/a.toml"
    wait_ready 31080
    ports=31883 apis=http://127.0.0.1:31080
  else
    local db
    db="lobby_claimcmp_$$_${label//[^a-z0-9]/_}"
    createdb --maintenance-db="$PG/postgres" "$db"
    dbs+=("$db")
    for node in a:31883:31080 b:31893:31090; do
      IFS=: read -r name mqtt api <<<"$node"
      lobby_conf "$c" "$dir" "$mqtt" "$api" "[cluster]
node_name = \"node-$name\"" | sed "s#^url = \"sqlite://.*#url = \"$PG/$db\"#" >"$dir/$name.toml"
      start_lobby "$bin" "$label.$name" "$dir/$name.toml"
      wait_ready "$api" # one at a time: the first migrates the fresh database
    done
    ports=31883,31893 apis=http://127.0.0.1:31080,http://127.0.0.1:31090
  fi
  local server_pids=()
  for p in "${pids[@]}"; do server_pids+=(--server-pid "$p"); done
  if ! out=$("$LT" claim --port "$ports" --api "$apis" --ca "$c/ca.pem" --ca-key "$c/ca.key" \
    --admin-token "@$c/admin.token" --claim-key "$c/claim.key" --devices "$DEVICES" \
    --concurrency 256 --claim-concurrency "$conc" --claim-batch "$batch" "${server_pids[@]}" \
    ${ARGS:-} 2>"$work/$label.err" | tail -n 1); then
    cat "$work/$label.err" "$work/$label".*.log >&2
    stop_lobbies
    return 1
  fi
  stop_lobbies
  if [ "$store" = pg ]; then
    dropdb --maintenance-db="$PG/postgres" "${dbs[-1]}"
    unset 'dbs[-1]'
  fi
  echo "$out" >"$work/$label.json"
  jq -r --arg bin "$side $(basename "$bin")" --arg store "$store" --arg conc "$conc" --arg batch "$batch" '
    def ms(f): if f == null then "-" else "\(f)ms" end;
    "\($bin) store=\($store) concurrency=\($conc) batch=\($batch)" +
    " claims_per_sec=\(.claims_per_sec // "-")" +
    " claim_to_redirect_p50=\(ms(.claim_to_redirect_ms.p50)) p99=\(ms(.claim_to_redirect_ms.p99))" +
    " failures=\(.devices - (.redirects // 0)) (connect \(.failed), claim \(.claims_failed)," +
    " no redirect \((.claims_ok // 0) - (.redirects // 0)))" +
    " cpu_harness=\(.harness_cpu_pct)% cpu_lobby=\(.server_cpu_pct // "-")%"' <<<"$out"
  grep -E '^error ' "$work/$label.err" | sed "s/^/$label   /" >&2 || true
}

n=0
for side in before after; do
  bin=$BEFORE
  [ "$side" = after ] && bin=$AFTER
  batches=(0)
  [ "$side" = after ] && [ "$BATCH" != 0 ] && batches+=("$BATCH")
  for batch in "${batches[@]}"; do
    for spec in sqlite:16 sqlite:256 pg:16; do
      IFS=: read -r store conc <<<"$spec"
      n=$((n + 1))
      run "$n-$side-$store-$conc-b$batch" "$side" "$bin" "$store" "$conc" "$batch"
    done
  done
done
