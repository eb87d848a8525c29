#!/usr/bin/env bash
# Bridge against the floor consumer (the README's performance table): release
# build, then three runs (order alternating), medians. Extra arguments go to examples/perf.rs,
# e.g. `scripts/perf.sh --messages 100000`.
set -euo pipefail
cd "$(dirname "$0")/.."
AMQP_URL="$(scripts/ensure-rabbitmq.sh)"
export AMQP_URL
cargo build --release --locked --quiet --bin crisp-bridge --example perf --example floor
target/release/examples/perf --runs 3 "$@"
