#!/usr/bin/env bash
# Makes sure a three-node RabbitMQ 3.x cluster runs beside the plain broker, with haproxy
# in front of it as a TCP load balancer, and prints the variables the cluster tests
# (tests/it/cluster.rs) read, as `export NAME=value` lines:
#   TEST_CLUSTER_NODES      the node names, space-separated (rabbit-c1@localhost ...)
#   TEST_CLUSTER_NODE_URLS  the AMQP URL of each node, space-separated, in that order
#   TEST_CLUSTER_LB_URL     the AMQP URL of haproxy (127.0.0.1:5700), one address for all
#   TEST_CLUSTER_CTL        Debian's rabbitmqctl (it runs as the rabbitmq user, whose
#                           home holds the shared Erlang cookie; append -n NODE ...)
#   TEST_CLUSTER_SCRIPT     this script (the tests run it again to bring back a node they
#                           killed)
# Usage: eval "$(scripts/ensure-rabbitmq-cluster.sh)"
# Runs Debian's rabbitmq-server (scripts/ensure-rabbitmq.sh installs it) and Debian's
# haproxy (installed here when missing). Each node has its own node name, ports (AMQP
# 5701-5703, distribution 25701-25703), data folder and config under
# /var/lib/crisp-bridge/rabbitmq-cluster; haproxy runs as its own process with its own
# config and pid file there (not the system service). Reuses running nodes and a running
# haproxy; a node that is up but not clustered is joined. Only RabbitMQ 3.x (the CI runs
# the cluster tests on 3.x only). Needs root. Logs go to stderr.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
# Nodes started below keep this working directory for their whole life: never the
# caller's (a deleted checkout makes `rabbitmqctl stop_app` fail with enoent).
cd /
log() { echo "ensure-rabbitmq-cluster: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  exec sudo "$0" "$@"
fi

BASE=/var/lib/crisp-bridge/rabbitmq-cluster
LB_PORT=5700
NODES=(rabbit-c1@localhost rabbit-c2@localhost rabbit-c3@localhost)
PORTS=(5701 5702 5703)

AMQP_URL="" "$HERE/ensure-rabbitmq.sh" >/dev/null
if ! command -v haproxy >/dev/null 2>&1; then
  log "installing haproxy"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >&2
fi
# The system service, when the package started one, is not ours to use; it binds nothing
# of ours, so it is left alone.

# rabbitmqctl as the rabbitmq user (its home holds the Erlang cookie the nodes share).
ctl() { # node args...
  local node=$1
  shift
  su rabbitmq -s /bin/sh -c "/usr/lib/rabbitmq/bin/rabbitmqctl -n $node $*"
}

start_node() { # index
  local i=$1
  local node=${NODES[$i]} port=${PORTS[$i]}
  local dist=$((port + 20000))
  local dir="$BASE/${node%@*}"
  if ctl "$node" await_startup --timeout 5 >/dev/null 2>&1; then
    return 0
  fi
  # A node that is not answering may still have a beam running (stopped app, or starting).
  if ctl "$node" status >/dev/null 2>&1; then
    log "$node runs with its app stopped: starting the app"
    ctl "$node" start_app >&2 || true
    return 0
  fi
  mkdir -p "$dir/log" "$dir/mnesia"
  echo "[]." >"$dir/enabled_plugins"
  cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$port
loopback_users = none
cluster_partition_handling = pause_minority
EOF
  cat >"$dir/rabbitmq-env.conf" <<EOF
NODENAME=$node
NODE_IP_ADDRESS=127.0.0.1
NODE_PORT=$port
DIST_PORT=$dist
CONFIG_FILE=$dir/rabbitmq.conf
MNESIA_BASE=$dir/mnesia
LOG_BASE=$dir/log
ENABLED_PLUGINS_FILE=$dir/enabled_plugins
PID_FILE=$dir/pid
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
  chown -R rabbitmq:rabbitmq "$dir"
  log "starting $node: AMQP 127.0.0.1:$port, distribution $dist"
  # setsid: the node outlives this script and its caller's process group.
  setsid su rabbitmq -s /bin/sh -c \
    "RABBITMQ_CONF_ENV_FILE=$dir/rabbitmq-env.conf exec /usr/lib/rabbitmq/bin/rabbitmq-server" \
    </dev/null >>"$dir/log/startup.log" 2>&1 &
}

await_node() { # node
  local node=$1
  for _ in $(seq 1 120); do
    if ctl "$node" await_startup --timeout 60 >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  log "$node did not start; see $BASE/${node%@*}/log/"
  exit 1
}

t=$(date +%s)
mkdir -p "$BASE"
chown rabbitmq:rabbitmq "$BASE"
for i in 0 1 2; do start_node "$i"; done
for node in "${NODES[@]}"; do await_node "$node"; done

# Join c2 and c3 to c1 unless they already are in its cluster.
for node in "${NODES[@]:1}"; do
  if ctl "${NODES[0]}" cluster_status --formatter json 2>/dev/null |
    grep -o '"running_nodes":\[[^]]*\]' | grep -q "\"$node\""; then
    continue
  fi
  log "joining $node to ${NODES[0]}"
  ctl "$node" stop_app >&2
  ctl "$node" reset >&2
  ctl "$node" join_cluster "${NODES[0]}" >&2
  ctl "$node" start_app >&2
  await_node "$node"
done
running="$(ctl "${NODES[0]}" cluster_status --formatter json |
  grep -o '"running_nodes":\[[^]]*\]')"
for node in "${NODES[@]}"; do
  grep -q "\"$node\"" <<<"$running" || { log "$node is not running in the cluster: $running"; exit 1; }
done

# --- haproxy: plain TCP, health-checked, round robin over the three nodes --------------
cat >"$BASE/haproxy.cfg.new" <<EOF
global
  daemon
  pidfile $BASE/haproxy.pid
  maxconn 512

defaults
  mode tcp
  timeout connect 2s
  # Longer than any AMQP heartbeat the tests use: haproxy must not be the one to cut.
  timeout client 2m
  timeout server 2m
  option redispatch
  retries 2

frontend amqp
  bind 127.0.0.1:$LB_PORT
  default_backend rabbitmq

backend rabbitmq
  balance roundrobin
  # A node whose app is stopped closes its AMQP port: a TCP check sees it.
  default-server check inter 1s fall 2 rise 2 on-marked-down shutdown-sessions
  server c1 127.0.0.1:${PORTS[0]}
  server c2 127.0.0.1:${PORTS[1]}
  server c3 127.0.0.1:${PORTS[2]}
EOF
haproxy -c -q -f "$BASE/haproxy.cfg.new" >&2
lb_running() { [ -s "$BASE/haproxy.pid" ] && kill -0 "$(cat "$BASE/haproxy.pid")" 2>/dev/null; }
if lb_running && cmp -s "$BASE/haproxy.cfg" "$BASE/haproxy.cfg.new"; then
  rm "$BASE/haproxy.cfg.new"
else
  mv "$BASE/haproxy.cfg.new" "$BASE/haproxy.cfg"
  if lb_running; then
    log "reloading haproxy (config changed)"
    kill "$(cat "$BASE/haproxy.pid")"
    sleep 0.5
  fi
  log "starting haproxy on 127.0.0.1:$LB_PORT"
  haproxy -f "$BASE/haproxy.cfg" >&2
fi
for _ in $(seq 1 30); do
  (exec 3<>/dev/tcp/127.0.0.1/$LB_PORT) 2>/dev/null && break
  sleep 0.2
done
log "cluster up ($(($(date +%s) - t)) s): ${NODES[*]}, haproxy on $LB_PORT"

urls=""
for port in "${PORTS[@]}"; do urls="$urls amqp://guest:guest@127.0.0.1:$port/%2f"; done
cat <<EOF
export TEST_CLUSTER_NODES="${NODES[*]}"
export TEST_CLUSTER_NODE_URLS="${urls# }"
export TEST_CLUSTER_LB_URL=amqp://guest:guest@127.0.0.1:$LB_PORT/%2f
export TEST_CLUSTER_CTL=/usr/sbin/rabbitmqctl
export TEST_CLUSTER_SCRIPT=$HERE/ensure-rabbitmq-cluster.sh
EOF
