#!/usr/bin/env bash
# Makes sure two TLS RabbitMQ nodes run beside the plain broker, and prints the variables
# the TLS tests (tests/it/tls.rs) read, as `export NAME=value` lines:
#   TEST_TLS_DIR        certificates made here with openssl: ca.crt, client.crt/.key (signed
#                       by ca), other-ca.crt and other-client.crt/.key (an unrelated CA)
#   TEST_TLS_AMQPS_URL  AMQPS, server certificate only (for 127.0.0.1; not for `localhost`)
#   TEST_TLS_PLAIN_URL  plain AMQP port of that same node (the tests publish and count there)
#   TEST_MTLS_AMQPS_URL AMQPS that requires a client certificate signed by ca.crt
#                       (fail_if_no_peer_cert), TLS 1.3 and 1.2
#   TEST_MTLS_PLAIN_URL plain AMQP port of that node
# Usage: eval "$(scripts/ensure-rabbitmq-tls.sh)"      (TEST_RABBITMQ=4: RabbitMQ 4.x)
# 3.x runs Debian's rabbitmq-server (scripts/ensure-rabbitmq.sh installs it); 4.x the
# binaries of scripts/ensure-rabbitmq4.sh's chroot. Each node has its own node name, ports,
# data folder and config; the 4.x ones use that chroot's epmd port (4370). Reuses running
# nodes and existing certificates. Needs root. Logs go to stderr.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
# Nodes started below keep this working directory for their whole life: never the
# caller's (a deleted checkout makes `rabbitmqctl stop_app` fail with enoent).
cd /
log() { echo "ensure-rabbitmq-tls: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  exec sudo --preserve-env=TEST_RABBITMQ,RABBITMQ4_ROOT "$0" "$@"
fi

BASE=/var/lib/crisp-bridge/rabbitmq-tls
CERTS="$BASE/certs"

if ! command -v openssl >/dev/null 2>&1; then
  log "installing openssl"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >&2
fi

# The brokers' binaries (a broker given by AMQP_URL brings none).
if [ "${TEST_RABBITMQ:-}" = 4 ]; then
  "$HERE/ensure-rabbitmq4.sh" >/dev/null
  ROOT="${RABBITMQ4_ROOT:-/var/lib/crisp-bridge/rabbitmq4-trixie}"
  export RABBITMQ4_ROOT="$ROOT"
  PREFIX=rabbit4
  TLS_PLAIN=5683 TLS_AMQPS=5693 MTLS_PLAIN=5684 MTLS_AMQPS=5694
else
  AMQP_URL="" "$HERE/ensure-rabbitmq.sh" >/dev/null
  ROOT=""
  PREFIX=rabbit3
  TLS_PLAIN=5681 TLS_AMQPS=5691 MTLS_PLAIN=5682 MTLS_AMQPS=5692
fi

# --- certificates (once; shared by the 3.x and 4.x nodes) ----------------------------
make_ca() { # name subject
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "$2" -keyout "$1.key" -out "$1.crt" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}
make_leaf() { # name subject ca extensions...
  local name=$1 subject=$2 ca=$3
  shift 3
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "$subject" -keyout "$name.key" -out "$name.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=CA:FALSE" "$@" >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA "$ca.crt" -CAkey "$ca.key" -CAcreateserial \
    -days 825 -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}
if [ ! -s "$CERTS/done" ]; then
  log "making a test CA, server and client certificates in $CERTS"
  rm -rf "$CERTS.tmp" && mkdir -p "$CERTS.tmp"
  (
    cd "$CERTS.tmp"
    make_ca ca "/CN=crisp-bridge test CA"
    make_ca other-ca "/CN=unrelated test CA"
    # Valid for 127.0.0.1 and a name nobody resolves, so `localhost` is a name mismatch.
    make_leaf server "/CN=crisp-bridge test broker" ca \
      "subjectAltName=IP:127.0.0.1,DNS:rabbitmq.crisp-bridge.test" \
      "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth"
    make_leaf client "/CN=crisp-bridge" ca \
      "keyUsage=critical,digitalSignature" "extendedKeyUsage=clientAuth"
    make_leaf other-client "/CN=crisp-bridge" other-ca \
      "keyUsage=critical,digitalSignature" "extendedKeyUsage=clientAuth"
    date -u >done
  )
  rm -rf "$CERTS" && mv "$CERTS.tmp" "$CERTS"
fi
chmod 755 "$BASE" "$CERTS" && chmod 644 "$CERTS"/*

# --- nodes ----------------------------------------------------------------------------
# A shell command run as the rabbitmq user (its home holds the Erlang cookie), in the
# chroot for 4.x, with that chroot's epmd port.
as_rabbitmq() {
  if [ -n "$ROOT" ]; then
    chroot "$ROOT" su rabbitmq -s /bin/sh -c "ERL_EPMD_PORT=4370 ERL_EPMD_ADDRESS=127.0.0.1 $1"
  else
    su rabbitmq -s /bin/sh -c "$1"
  fi
}
ctl() { # node args...
  local node=$1
  shift
  as_rabbitmq "/usr/lib/rabbitmq/bin/rabbitmqctl -n $node $*"
}

start_node() { # kind plain amqps dist mtls(true|false)
  local kind=$1 plain=$2 amqps=$3 dist=$4 mtls=$5
  local node="$PREFIX-$kind@localhost"
  # The node's folder as the node sees it (inside the chroot for 4.x).
  local dir="/var/lib/crisp-bridge-tls/$PREFIX-$kind"
  local host_dir="$ROOT$dir"
  if ctl "$node" await_startup --timeout 5 >/dev/null 2>&1; then
    return 0
  fi
  mkdir -p "$host_dir/certs" "$host_dir/log" "$host_dir/mnesia"
  cp "$CERTS/ca.crt" "$CERTS/server.crt" "$CERTS/server.key" "$host_dir/certs/"
  echo "[]." >"$host_dir/enabled_plugins"
  cat >"$host_dir/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$plain
listeners.ssl.default = 127.0.0.1:$amqps
ssl_options.cacertfile = $dir/certs/ca.crt
ssl_options.certfile = $dir/certs/server.crt
ssl_options.keyfile = $dir/certs/server.key
ssl_options.versions.1 = tlsv1.3
ssl_options.versions.2 = tlsv1.2
ssl_options.verify = $([ "$mtls" = true ] && echo verify_peer || echo verify_none)
ssl_options.fail_if_no_peer_cert = $mtls
EOF
  cat >"$host_dir/rabbitmq-env.conf" <<EOF
NODENAME=$node
NODE_IP_ADDRESS=127.0.0.1
NODE_PORT=$plain
DIST_PORT=$dist
CONFIG_FILE=$dir/rabbitmq.conf
MNESIA_BASE=$dir/mnesia
LOG_BASE=$dir/log
ENABLED_PLUGINS_FILE=$dir/enabled_plugins
PID_FILE=$dir/pid
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
  if [ -n "$ROOT" ]; then
    chroot "$ROOT" chown -R rabbitmq:rabbitmq "$dir"
  else
    chown -R rabbitmq:rabbitmq "$host_dir"
  fi
  log "starting $node: AMQPS 127.0.0.1:$amqps (client certificate required: $mtls), AMQP $plain"
  # setsid: the node outlives this script and its caller's process group.
  local server="RABBITMQ_CONF_ENV_FILE=$dir/rabbitmq-env.conf exec /usr/lib/rabbitmq/bin/rabbitmq-server"
  if [ -n "$ROOT" ]; then
    setsid chroot "$ROOT" su rabbitmq -s /bin/sh -c \
      "ERL_EPMD_PORT=4370 ERL_EPMD_ADDRESS=127.0.0.1 $server" \
      </dev/null >"$host_dir/log/startup.log" 2>&1 &
  else
    setsid su rabbitmq -s /bin/sh -c "$server" </dev/null >"$host_dir/log/startup.log" 2>&1 &
  fi
}

t=$(date +%s)
start_node tls "$TLS_PLAIN" "$TLS_AMQPS" $((TLS_PLAIN + 20000)) false
start_node mtls "$MTLS_PLAIN" "$MTLS_AMQPS" $((MTLS_PLAIN + 20000)) true
for kind in tls mtls; do
  node="$PREFIX-$kind@localhost"
  ok=""
  for _ in $(seq 1 120); do
    if ctl "$node" await_startup --timeout 60 >/dev/null 2>&1; then ok=1; break; fi
    sleep 1
  done
  [ -n "$ok" ] || {
    log "$node did not start; see $ROOT/var/lib/crisp-bridge-tls/$PREFIX-$kind/log/"
    exit 1
  }
done
log "TLS nodes up ($(($(date +%s) - t)) s)"

cat <<EOF
export TEST_TLS_DIR=$CERTS
export TEST_TLS_AMQPS_URL=amqps://guest:guest@127.0.0.1:$TLS_AMQPS/%2f
export TEST_TLS_PLAIN_URL=amqp://guest:guest@127.0.0.1:$TLS_PLAIN/%2f
export TEST_MTLS_AMQPS_URL=amqps://guest:guest@127.0.0.1:$MTLS_AMQPS/%2f
export TEST_MTLS_PLAIN_URL=amqp://guest:guest@127.0.0.1:$MTLS_PLAIN/%2f
EOF
