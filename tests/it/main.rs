//! One integration-test binary: the bridge against a real RabbitMQ and the Crisp sandbox.
//! The broker, names, configs and the bridge itself come from `crisp-bridge-testkit`.

mod answers;
mod consumer_timeout;
mod contracts;
mod delivery;
mod dying_connection;
mod failures;
mod holds;
mod hostile;
mod kit;
mod pipes;
mod process;
mod replay;
mod wire;
