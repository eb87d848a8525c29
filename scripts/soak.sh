#!/usr/bin/env bash
# Soak: the bridge under a steady stream with random faults for a bounded time, then
# published / delivered / dead-lettered / lost / duplicated. Exits 1 if lost > 0.
#   scripts/soak.sh [--seconds 180] [--rate 40] [--seed N]
set -euo pipefail
cd "$(dirname "$0")/.."
AMQP_URL="$(scripts/ensure-rabbitmq.sh)"
export AMQP_URL
cargo build --release --quiet --bin crisp-bridge --example soak
target/release/examples/soak "$@"
