#!/usr/bin/env bash
# Runs every test: unit tests, and integration tests against a real RabbitMQ and the
# Crisp sandbox. Starts a local broker when AMQP_URL is not set.
set -euo pipefail
cd "$(dirname "$0")/.."
AMQP_URL="$(scripts/ensure-rabbitmq.sh)"
export AMQP_URL
cargo test --locked "$@"
