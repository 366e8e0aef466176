#!/usr/bin/env bash
# The tests, on a fresh machine: installs what they need when it is missing (Debian packages
# with apt-get, Python packages with pip, the console test's npm package), then runs
# `cargo test --workspace` with any arguments given (`./test.sh -- --nocapture`, a filter).
# Developers who have the services can run `cargo test` directly.
#
# PostgreSQL must answer at $LOBBY_TEST_POSTGRES (default below; a role that may create
# databases): the store tests fail, saying so, when it does not.
set -euo pipefail
cd "$(dirname "$0")"
export LOBBY_TEST_POSTGRES="${LOBBY_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}"

need=()
command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
# The bridge tests start their own TLS mosquitto as the tenant's broker.
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || need+=(mosquitto)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# A test holds the SQLite store's write lock from an sqlite3 shell.
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
# The packaging test verifies the systemd unit.
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# The PostgreSQL TLS tests start their own server (initdb, pg_ctl).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 ||
  need+=(postgresql)
# The console's browser test: Debian's chromium driven by Playwright (playwright-core, npm).
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

# The AWS tests run against moto's server (an AWS emulator).
command -v moto_server >/dev/null 2>&1 || python3 -m pip install --quiet 'moto[server]'
# Stock AWS IoT Device SDK v2 clients connect to the lobby's 443 listener.
python3 -c 'import awsiot' >/dev/null 2>&1 || python3 -m pip install --quiet awsiotsdk
# The console's browser test (playwright-core) and the WebSocket test's MQTT.js (mqtt).
{ [ -d tests/console/node_modules/playwright-core ] && [ -d tests/console/node_modules/mqtt ]; } ||
  npm ci --prefix tests/console --no-audit --no-fund --loglevel=error


cargo test --workspace "$@"
