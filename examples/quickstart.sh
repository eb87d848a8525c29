#!/usr/bin/env bash
# Quickstart: a local RabbitMQ, the Crisp sandbox and the bridge; publishes the sample
# events in examples/events and shows the Crisp events they became.
#   KEEP=1 examples/quickstart.sh   leaves the sandbox and the bridge running.
set -euo pipefail
cd "$(dirname "$0")/.."

AMQP_URL="$(scripts/ensure-rabbitmq.sh)"
export AMQP_URL
echo "== building"
cargo build --quiet --bin crisp-bridge --example publish
bin=target/debug/crisp-bridge
logs="$(mktemp -d)"

cleanup() {
  [ -n "${bridge_pid:-}" ] && kill "$bridge_pid" 2>/dev/null && wait "$bridge_pid" 2>/dev/null
  [ -n "${sandbox_pid:-}" ] && kill "$sandbox_pid" 2>/dev/null && wait "$sandbox_pid" 2>/dev/null
  return 0
}
[ "${KEEP:-0}" = 1 ] || trap cleanup EXIT

wait_http() { # url what
  for _ in $(seq 1 100); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "$2 did not come up; logs in $logs" >&2; exit 1
}

echo "== starting the Crisp sandbox on 127.0.0.1:8787 (log: $logs/sandbox.log)"
"$bin" sandbox --listen 127.0.0.1:8787 >"$logs/sandbox.log" 2>&1 &
sandbox_pid=$!
wait_http http://127.0.0.1:8787/ "the sandbox"
curl -fsS -X DELETE http://127.0.0.1:8787/_sandbox/events

echo "== checking the config"
export CRISP_BRIDGE_AMQP__URL="$AMQP_URL"
export CRISP_BRIDGE_CRISP__IDENTIFIER=sandbox-identifier
export CRISP_BRIDGE_CRISP__KEY=sandbox-key
"$bin" check --config examples/crisp-bridge.toml

echo "== starting crisp-bridge (log: $logs/bridge.log)"
"$bin" run --config examples/crisp-bridge.toml >"$logs/bridge.log" 2>&1 &
bridge_pid=$!
wait_http http://127.0.0.1:9464/readyz "crisp-bridge"

echo "== publishing examples/events/*.json"
target/debug/examples/publish --url "$AMQP_URL" --exchange domain-events examples/events/*.json

expected=4   # order.created, trial.started, invoice.paid, user.signed_up (a CloudEvent); trial.ended is dead-lettered
for _ in $(seq 1 100); do
  # grep finds nothing (exit 1) until the first event arrives: not a failure.
  got=$(curl -fsS http://127.0.0.1:8787/_sandbox/events | { grep -o '"website_id"' || true; } | wc -l)
  [ "$got" -ge "$expected" ] && break
  sleep 0.1
done

if [ "$got" -lt "$expected" ]; then
  echo "only $got of $expected events reached the sandbox; logs in $logs" >&2
  exit 1
fi

echo "== what the Crisp sandbox received"
curl -fsS http://127.0.0.1:8787/
echo "(nested data arrives flat, in Crisp's key rule: card.brand became card_brand; card_number and cvc were stripped)"
echo "== dead letters (trial.ended has no valid email): see the bridge log"
grep -i "dead-lettered" "$logs/bridge.log" || true
echo "== metrics"
curl -fsS http://127.0.0.1:9464/metrics | grep -E '^crisp_bridge_messages_total' || true
if [ "${KEEP:-0}" = 1 ]; then
  echo "sandbox: http://127.0.0.1:8787/  bridge admin: http://127.0.0.1:9464/metrics  (pids $sandbox_pid $bridge_pid)"
fi
