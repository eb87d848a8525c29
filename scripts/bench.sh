#!/usr/bin/env bash
# Throughput benchmark (figures in the README): release build, then three runs.
set -euo pipefail
cd "$(dirname "$0")/.."
AMQP_URL="$(scripts/ensure-rabbitmq.sh)"
export AMQP_URL
cargo build --release --quiet --bin crisp-bridge --example bench
for args in "20000 0 32" "5000 20 32" "5000 20 64"; do
  # shellcheck disable=SC2086
  target/release/examples/bench $args
done
