#!/usr/bin/env bash
# Makes sure a RabbitMQ broker answers on 127.0.0.1:5672 and prints its AMQP URL.
# Uses $AMQP_URL when set; otherwise installs and starts Debian's rabbitmq-server.
set -euo pipefail

if [ -n "${AMQP_URL:-}" ]; then
  echo "$AMQP_URL"
  exit 0
fi

log() { echo "ensure-rabbitmq: $*" >&2; }

wait_port() {
  for _ in $(seq 1 90); do
    (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && return 0
    sleep 1
  done
  return 1
}

if ! command -v rabbitmq-server >/dev/null 2>&1 && ! command -v apt-get >/dev/null 2>&1 \
   && command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  # No Debian packages here, but a Docker engine: run the broker in a container.
  if ! docker ps --format '{{.Names}}' | grep -qx crisp-bridge-rabbitmq; then
    log "starting RabbitMQ in Docker (container crisp-bridge-rabbitmq)"
    docker run -d --rm --name crisp-bridge-rabbitmq -p 127.0.0.1:5672:5672 rabbitmq:3.13 >&2
  fi
  wait_port && sleep 3 && { echo "amqp://guest:guest@127.0.0.1:5672/%2f"; exit 0; }
  log "the RabbitMQ container did not open port 5672"; exit 1
fi

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    log "installing rabbitmq-server with apt-get"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq rabbitmq-server >&2
  else
    log "no rabbitmq-server and no apt-get: start a broker yourself (docker run -p 5672:5672 rabbitmq:3.13) and set AMQP_URL"
    exit 1
  fi
fi

if ! rabbitmqctl status >/dev/null 2>&1; then
  log "starting rabbitmq-server"
  # From /: the node keeps its working directory for its whole life, never the caller's.
  (cd / && rabbitmq-server -detached >&2) || true
fi
# -detached returns before the node exists; await_startup fails until it does.
for _ in $(seq 1 90); do
  if rabbitmqctl await_startup >/dev/null 2>&1; then
    echo "amqp://guest:guest@127.0.0.1:5672/%2f"
    exit 0
  fi
  sleep 1
done
log "rabbitmq-server did not start; see /var/log/rabbitmq/"
exit 1
