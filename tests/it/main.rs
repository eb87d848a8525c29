//! One integration-test binary: the bridge against a real RabbitMQ and the Crisp sandbox.
//! The broker, names, configs and the bridge itself come from `crisp-bridge-testkit`.
//! The TLS tests (tls.rs) need the AMQPS nodes of scripts/ensure-rabbitmq-tls.sh, the
//! cluster tests (cluster.rs) the three nodes of scripts/ensure-rabbitmq-cluster.sh.

mod answers;
mod cluster;
mod consumer_timeout;
mod contracts;
mod delivery;
mod dying_connection;
mod failures;
mod holds;
mod hostile;
mod kit;
mod ordered_failover;
mod pipes;
mod process;
mod proxy;
mod replay;
mod tap;
mod tls;
mod tracing;
mod wire;
