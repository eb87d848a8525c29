#!/usr/bin/env bash
# Flow-control benchmark (figures in the README): pods sharing a sandbox rate limit.
# Each scenario runs RUNS times (default 3); read the median.
#   BASE_BIN=/path/to/older/crisp-bridge scripts/flow_bench.sh   # adds a same-run baseline
set -euo pipefail
cd "$(dirname "$0")/.."
AMQP_URL="${AMQP_URL:-$(scripts/ensure-rabbitmq.sh)}"
export AMQP_URL
RUNS="${RUNS:-3}"
cargo build --release --quiet --bin crisp-bridge --example flow_bench
scenarios=(
  "--pods 1 --limit 50 --latency-ms 0"
  "--pods 3 --limit 50 --latency-ms 100"
  "--pods 3 --limit 50 --latency-ms 0"
  "--pods 1 --limit 0 --latency-ms 0"
)
for s in "${scenarios[@]}"; do
  for _ in $(seq "$RUNS"); do
    # shellcheck disable=SC2086
    target/release/examples/flow_bench $s
    if [[ -n "${BASE_BIN:-}" ]]; then
      # shellcheck disable=SC2086
      FLOW_BENCH_BIN="$BASE_BIN" target/release/examples/flow_bench $s | sed 's/^/baseline /'
    fi
  done
done
