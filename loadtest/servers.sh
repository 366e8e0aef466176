# Shared by the comparison scripts (source it): the configuration of a release lobby and of a
# TLS mosquitto on one dev PKI, so every script measures the same servers.
#
#   lobby_conf CERTS WORK MQTT_PORT API_PORT [EXTRA_TOML] [TLS_KEYS]   # prints a lobby.toml
#   mosquitto_conf CERTS PORT [EXTRA_LINES]                 # prints a mosquitto.conf
#   wait_ready API_PORT                                     # waits for a lobby's /readyz
#   start_three WORK                     # lobby :28883, mosquitto :28884, bare_tls :28885
#
# CERTS is a `lobby certs init` directory, WORK where the lobby keeps its SQLite file.
# EXTRA_TOML is appended as is (e.g. a [limits] table), TLS_KEYS go into [tls]; [log] level
# is "warn".

lobby_conf() {
  cat <<CONF
[listener]
mqtt = "127.0.0.1:$3"
api = "127.0.0.1:$4"
[tls]
cert = "$1/server.pem"
key = "$1/server.key"
client_cas = ["$1/ca.pem"]
${6:-}
[store]
url = "sqlite://$2/lobby.db"
[claims]
code_key = "$1/claim.key"
[api]
admin_token_file = "$1/admin.token"
[log]
level = "warn"
${5:-}
CONF
}

mosquitto_conf() {
  cat <<CONF
listener $2 127.0.0.1
cafile $1/ca.pem
certfile $1/server.pem
keyfile $1/server.key
require_certificate true
allow_anonymous true
set_tcp_nodelay true
max_connections -1
persistence false
user root
log_dest none
${3:-}
CONF
}

wait_ready() { # api_port
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "no ready lobby on API port $1" >&2
  return 1
}

# Starts $LOBBY (WORK/lobby.toml), mosquitto (WORK/mosquitto.conf) and $BARE (the floor, on
# WORK/certs) with the open-files limit raised; their pids go into the caller's `pids` array
# (lobby, mosquitto, bare), for the caller's cleanup.
start_three() { # work
  (ulimit -n 20000; exec "$LOBBY" serve --config "$1/lobby.toml") &
  pids+=($!)
  (ulimit -n 20000; exec mosquitto -c "$1/mosquitto.conf") &
  pids+=($!)
  (ulimit -n 20000; exec "$BARE" 127.0.0.1:28885 "$1/certs/server.pem" "$1/certs/server.key" \
    "$1/certs/ca.pem") &
  pids+=($!)
}
