#!/usr/bin/env bash
# Makes sure a RabbitMQ 4.x broker answers on 127.0.0.1:5673 and prints its AMQP URL.
# Debian 12 ships 3.10 while users run 4.x, so this runs Debian 13's rabbitmq-server
# (4.0, Erlang 27) in a debootstrapped trixie chroot, next to any host broker: its own
# AMQP port (5673), distribution port (25673), epmd port (4370) and node name.
# Needs root. Reuses the chroot and the running node. Logs go to stderr.
# scripts/rabbitmqctl4 drives this node (tests/broker_restart.rs uses it).
set -euo pipefail

ROOT="${RABBITMQ4_ROOT:-/var/lib/crisp-bridge/rabbitmq4-trixie}"
MIRROR="${RABBITMQ4_MIRROR:-http://deb.debian.org/debian}"
PORT=5673
URL="amqp://guest:guest@127.0.0.1:$PORT/%2f"
HERE="$(cd "$(dirname "$0")" && pwd)"
# Nodes started below keep this working directory for their whole life: never the
# caller's (a deleted checkout makes `rabbitmqctl stop_app` fail with enoent).
cd /
CTL=("$HERE/rabbitmqctl4")

log() { echo "ensure-rabbitmq4: $*" >&2; }
now() { date +%s; }

# debootstrap, chroot and mount need root.
if [ "$(id -u)" -ne 0 ]; then
  exec sudo --preserve-env=RABBITMQ4_ROOT,RABBITMQ4_MIRROR "$0" "$@"
fi

# The ctl wrapper uses the same root.
export RABBITMQ4_ROOT="$ROOT"

if [ -x "$ROOT/usr/sbin/rabbitmqctl" ] && "${CTL[@]}" await_startup --timeout 5 >/dev/null 2>&1; then
  echo "$URL"
  exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
  log "installing debootstrap"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
fi

if [ ! -d "$ROOT" ]; then
  # Built aside and renamed when complete, so an interrupted run leaves only $ROOT.tmp.
  for m in proc sys; do
    if mountpoint -q "$ROOT.tmp/$m"; then umount "$ROOT.tmp/$m"; fi
  done
  rm -rf "$ROOT.tmp"
  mkdir -p "$(dirname "$ROOT")"
  log "debootstrap trixie into $ROOT"
  t=$(now)
  debootstrap --variant=minbase trixie "$ROOT.tmp" "$MIRROR" >&2 || {
    log "debootstrap failed; see $ROOT.tmp/debootstrap/debootstrap.log"
    exit 1
  }
  mv "$ROOT.tmp" "$ROOT"
  log "debootstrap took $(($(now) - t)) s"
fi

# Erlang reads /proc; /dev/shm is where POSIX shared memory would go.
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
mkdir -p "$ROOT/dev/shm"
mountpoint -q "$ROOT/dev/shm" || mount -t tmpfs -o mode=1777 shm "$ROOT/dev/shm"
# Short node names resolve "localhost" through /etc/hosts.
grep -qs '^127.0.0.1[[:space:]].*localhost' "$ROOT/etc/hosts" \
  || echo "127.0.0.1 localhost" >>"$ROOT/etc/hosts"

if [ ! -x "$ROOT/usr/sbin/rabbitmqctl" ]; then
  log "installing rabbitmq-server in the chroot"
  t=$(now)
  # Package scripts must not start a broker (it would take the host's 5672).
  printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
  chmod 755 "$ROOT/usr/sbin/policy-rc.d"
  chroot "$ROOT" apt-get update -qq >&2
  chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends rabbitmq-server >&2
  log "install took $(($(now) - t)) s"
fi

# Read by the server and by every rabbitmqctl in the chroot: this node's name and ports.
cat >"$ROOT/etc/rabbitmq/rabbitmq-env.conf" <<EOF
NODENAME=rabbit4@localhost
NODE_IP_ADDRESS=127.0.0.1
NODE_PORT=$PORT
DIST_PORT=25673
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF

log "starting rabbitmq-server $(chroot "$ROOT" dpkg-query -W -f '${Version}' rabbitmq-server) on port $PORT"
t=$(now)
# setsid: the node outlives this script and its caller's process group. ERL_EPMD_PORT
# keeps it off the host's epmd (4369); scripts/rabbitmqctl4 sets the same.
setsid chroot "$ROOT" env ERL_EPMD_PORT=4370 ERL_EPMD_ADDRESS=127.0.0.1 \
  /usr/sbin/rabbitmq-server </dev/null >/dev/null 2>&1 &
# await_startup fails at once until the node has registered with epmd.
for _ in $(seq 1 120); do
  if "${CTL[@]}" await_startup --timeout 60 >/dev/null 2>&1; then
    log "started in $(($(now) - t)) s"
    echo "$URL"
    exit 0
  fi
  sleep 1
done
log "rabbitmq-server did not start; see $ROOT/var/log/rabbitmq/"
exit 1
