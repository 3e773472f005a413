#!/usr/bin/env bash
# Make sure RabbitMQ answers on 127.0.0.1:5672.
# - already answering: nothing to do
# - installed but stopped: start it with `rabbitmq-server -detached`
# - not installed: as root on Debian/Ubuntu, install the rabbitmq-server package (and its
#   Erlang runtime) from the distribution (set INSTALL_BROKER=0 to refuse); otherwise explain
#   how to get one.
set -euo pipefail

HOST=127.0.0.1
PORT=5672

answers() { (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; }

if answers; then
  echo "broker: RabbitMQ answers on $HOST:$PORT"
  exit 0
fi

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  if [ "${INSTALL_BROKER:-1}" = "1" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "broker: RabbitMQ is missing; installing the Debian package rabbitmq-server (with its Erlang runtime) via apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq rabbitmq-server >/dev/null
  else
    cat >&2 <<MSG
broker: RabbitMQ is not running on $HOST:$PORT and rabbitmq-server is not installed.
  Debian/Ubuntu:  sudo apt-get install rabbitmq-server   (then run this again)
  Docker:         docker compose -f deploy/compose.yaml up -d rabbitmq
  As root on Debian/Ubuntu this script installs it itself (INSTALL_BROKER=0 turns that off).
MSG
    exit 1
  fi
fi

echo "broker: starting RabbitMQ (rabbitmq-server -detached)"
rabbitmq-server -detached >/dev/null 2>&1 || true
for _ in $(seq 1 90); do
  if answers; then
    # The port opens a moment before the node accepts connections.
    rabbitmqctl await_startup >/dev/null 2>&1 || sleep 2
    echo "broker: RabbitMQ is up on $HOST:$PORT"
    exit 0
  fi
  sleep 1
done
echo "broker: RabbitMQ did not answer on $HOST:$PORT within 90 s; see /var/log/rabbitmq/" >&2
exit 1
