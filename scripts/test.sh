#!/usr/bin/env bash
# Runs every test: unit tests, and integration tests against a real RabbitMQ and the
# Crisp sandbox. Starts a local broker when AMQP_URL is not set.
# TEST_RABBITMQ=4 runs them against RabbitMQ 4.x instead (Debian 13's, in a chroot on
# port 5673: scripts/ensure-rabbitmq4.sh), e.g. only the integration tests:
# (Both ways it also starts two AMQPS nodes beside it: scripts/ensure-rabbitmq-tls.sh;
# on 3.x a three-node cluster behind haproxy too: scripts/ensure-rabbitmq-cluster.sh.)
#   TEST_RABBITMQ=4 scripts/test.sh --test it --test broker_restart
# (Test settings are not named CRISP_BRIDGE_*: the bridge reads those as config keys.)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${TEST_RABBITMQ:-}" = 4 ]; then
  AMQP_URL="$(scripts/ensure-rabbitmq4.sh)"
  # tests/broker_restart.rs restarts the broker through this.
  export TEST_RABBITMQCTL="$PWD/scripts/rabbitmqctl4"
else
  AMQP_URL="$(scripts/ensure-rabbitmq.sh)"
fi
export AMQP_URL

# The AMQPS nodes and certificates of the TLS tests (tests/it/tls.rs), of the same
# RabbitMQ line; they fail, saying how to start them, when these are missing.
if [ -z "${TEST_TLS_AMQPS_URL:-}" ]; then
  if tls_env="$(scripts/ensure-rabbitmq-tls.sh)"; then
    eval "$tls_env"
  else
    echo "test.sh: the TLS brokers did not start (scripts/ensure-rabbitmq-tls.sh); the TLS tests will fail" >&2
  fi
fi

# The three-node cluster of the failover tests (tests/it/cluster.rs), RabbitMQ 3.x only:
# with TEST_RABBITMQ=4 its variables are unset and those tests skip, saying so. When it
# does not start, the variables name its nodes anyway, so those tests fail (not skip).
if [ "${TEST_RABBITMQ:-}" = 4 ]; then
  unset TEST_CLUSTER_NODES TEST_CLUSTER_NODE_URLS TEST_CLUSTER_LB_URL
elif [ -z "${TEST_CLUSTER_NODES:-}" ]; then
  if cluster_env="$(scripts/ensure-rabbitmq-cluster.sh)"; then
    eval "$cluster_env"
  else
    echo "test.sh: the cluster did not start (scripts/ensure-rabbitmq-cluster.sh); the cluster tests will fail" >&2
    export TEST_CLUSTER_NODES="rabbit-c1@localhost rabbit-c2@localhost rabbit-c3@localhost"
    export TEST_CLUSTER_NODE_URLS="amqp://guest:guest@127.0.0.1:5701/%2f amqp://guest:guest@127.0.0.1:5702/%2f amqp://guest:guest@127.0.0.1:5703/%2f"
    export TEST_CLUSTER_LB_URL=amqp://guest:guest@127.0.0.1:5700/%2f
    export TEST_CLUSTER_SCRIPT="$PWD/scripts/ensure-rabbitmq-cluster.sh"
  fi
fi

# Name the broker version in the log, when the local rabbitmqctl drives the URL's node
# (it lists an AMQP listener on the URL's port).
ctl=(${TEST_RABBITMQCTL:-rabbitmqctl})
port="$(sed -E 's#^[a-z]+://([^@/]*@)?[^:/]*:?([0-9]*).*#\2#' <<<"$AMQP_URL")"
status="$("${ctl[@]}" status 2>/dev/null || true)"
if grep -q "port: ${port:-5672}, protocol: amqp," <<<"$status"; then
  echo "test.sh: broker $AMQP_URL is RabbitMQ $("${ctl[@]}" version 2>/dev/null)," \
    "$(grep -o 'Erlang/OTP [0-9]*' <<<"$status" | head -1)" >&2
else
  echo "test.sh: broker $AMQP_URL (version unknown: ${ctl[*]} does not drive it)" >&2
fi

cargo test --locked "$@"
