#!/usr/bin/env bash
# CPU profiles of the floor and the bridge draining the same backlog: one run of
# examples/perf.rs with binaries that keep their symbols (the `profiling` profile), and
# `perf record` attached to each contender for a few seconds of its drain. Writes
# target/profiles/{floor,bridge}.{data,txt}; the .txt lists symbols by share of samples.
#   scripts/profile.sh [messages]
set -euo pipefail
cd "$(dirname "$0")/.."
AMQP_URL="$(scripts/ensure-rabbitmq.sh)"
export AMQP_URL
cargo build --profile profiling --locked --quiet --bin crisp-bridge --example perf --example floor
out=target/profiles
mkdir -p "$out"
PERF_BRIDGE_BIN=target/profiling/crisp-bridge PERF_FLOOR_BIN=target/profiling/examples/floor \
  target/profiling/examples/perf --runs 1 --messages "${1:-150000}" &
perf_pid=$!
for who in floor bridge; do
  case $who in
    floor) pattern='profiling/examples/floor' ;;
    bridge) pattern='profiling/crisp-bridge run' ;;
  esac
  pid=""
  until [ -n "$pid" ]; do pid="$(pgrep -f "$pattern" | head -1 || true)"; sleep 0.1; done
  sleep 1 # past the start-up
  perf record -q -F 999 -p "$pid" -o "$out/$who.data" -- sleep 3
  perf report -i "$out/$who.data" --no-children --sort dso,symbol --stdio 2>/dev/null \
    | grep -v '^#' | grep -v '^$' > "$out/$who.txt"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
done
wait "$perf_pid"
echo "profiles in $out: floor.txt, bridge.txt" >&2
