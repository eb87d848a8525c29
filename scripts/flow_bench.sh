#!/usr/bin/env bash
# Flow-control benchmark (figures in the README): pods started cold on a backlog, sharing
# one sandbox rate limit of each common shape; the whole run counts, first seconds and
# joining pods included. Each row runs RUNS times (default 1; read the median of 3 with
# RUNS=3). ROWS=quick runs a subset (0 ms latency, no minute window).
#   BASE_BIN=/path/to/older/crisp-bridge scripts/flow_bench.sh   # adds a same-run baseline
set -euo pipefail
cd "$(dirname "$0")/.."
AMQP_URL="${AMQP_URL:-$(scripts/ensure-rabbitmq.sh)}"
export AMQP_URL
RUNS="${RUNS:-1}"
cargo build --release --quiet --bin crisp-bridge --example flow_bench
latencies=(0 100)
shapes=(token_bucket sliding_window fixed_window)
[[ "${ROWS:-}" == quick ]] && latencies=(0)
setups=(
  "--pods 1"
  "--pods 3"
  "--pods 3 --join-every 10"
)
scenarios=()
for latency in "${latencies[@]}"; do
  for shape in "${shapes[@]}"; do
    for setup in "${setups[@]}"; do
      scenarios+=("$setup --limit 50 --shape $shape --latency-ms $latency")
    done
  done
done
# A window resetting each minute admits a minute's worth at once: only runs over
# several minutes say anything about it.
if [[ "${ROWS:-}" != quick ]]; then
  for latency in "${latencies[@]}"; do
    scenarios+=("--pods 3 --limit 50 --shape fixed_window_minute --latency-ms $latency --seconds 180")
  done
fi
# Without a limit: throughput only.
scenarios+=("--pods 1 --limit 0 --latency-ms 0")
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
