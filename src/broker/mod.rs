//! Step 1 (and, in [`settle`], step 6): the RabbitMQ side. Connect, declare the
//! topology, consume with a prefetch window.

pub mod acks;
pub mod settle;
pub mod tls;

use crate::config::{AmqpConfig, QueueType};
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use std::sync::atomic::{AtomicU32, Ordering};

/// RabbitMQ's default `frame_max`, assumed until a connection has negotiated one.
const DEFAULT_FRAME_MAX: u32 = 131_072;

/// The smallest `frame_max` negotiated by any connection of this process (`u32::MAX`:
/// none yet). Kept here because lapin exposes it on the connection only, while
/// dead letters are published on channels handed down the pipeline.
static FRAME_MAX: AtomicU32 = AtomicU32::new(u32::MAX);

/// The largest frame the broker accepts from us (and sends to other consumers): a
/// dead-letter copy's content header must fit in it.
pub fn frame_max() -> u32 {
    match FRAME_MAX.load(Ordering::Relaxed) {
        u32::MAX => DEFAULT_FRAME_MAX,
        n => n,
    }
}

/// A broker operation that failed, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct BrokerError {
    pub what: String,
    #[source]
    pub source: lapin::Error,
}

trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, BrokerError>;
}

impl<T> Context<T> for Result<T, lapin::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, BrokerError> {
        self.map_err(|source| BrokerError {
            what: what(),
            source,
        })
    }
}

/// Why no connection could be opened: the broker side, or TLS (files or handshake).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("cannot use the TLS files for RabbitMQ (retrying, they are read again at each attempt): {0}")]
    TlsFiles(#[from] tls::TlsFileError),
    #[error("TLS with RabbitMQ at {host}:{port} failed: {reason}")]
    Handshake {
        host: String,
        port: u16,
        reason: String,
        #[source]
        source: lapin::Error,
    },
}

pub async fn connect(amqp: &AmqpConfig) -> Result<Connection, ConnectError> {
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("crisp-bridge/{}", env!("CARGO_PKG_VERSION")).into());
    // Read again before each connection: a rotated `amqp.url_file` is picked up.
    let url = amqp.current_url();
    let context = || "connecting to RabbitMQ (check amqp.url / CRISP_BRIDGE_AMQP__URL)".to_owned();
    // Read again before each connection too: cert-manager rotates them.
    let tls_config = match &amqp.tls {
        Some(files) => tls::load(files)?,
        None => Default::default(),
    };
    let client_cert = tls_config.identity.is_some();
    let runtime = lapin::runtime::default_runtime().context(context)?;
    let connecting = Connection::connect_with_config(url.expose(), properties, tls_config, runtime);
    let connection = match connecting.await {
        Ok(connection) => connection,
        Err(source) => {
            let (host, port) = host_port(url.expose());
            let reason = url
                .expose()
                .starts_with("amqps://")
                .then(|| tls::describe_failure(&source, &host, client_cert))
                .flatten();
            return Err(match reason {
                Some(reason) => ConnectError::Handshake {
                    host,
                    port,
                    reason,
                    source,
                },
                None => BrokerError {
                    what: context(),
                    source,
                }
                .into(),
            });
        }
    };
    // lapin records 0 ("no limit") as u32::MAX, which then keeps the default.
    FRAME_MAX.fetch_min(connection.configuration().frame_max(), Ordering::Relaxed);
    Ok(connection)
}

/// The host and port of an AMQP URL, for messages (never the user info).
fn host_port(url: &str) -> (String, u16) {
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(uri) => (uri.authority.host, uri.authority.port),
        Err(_) => ("[unparseable url]".into(), 0),
    }
}

/// Declares the topic exchange, the dead-letter exchange (fanout) and queue, the main
/// queue with its dead-letter arguments, and one binding per rule pattern. All
/// declarations are idempotent; a mismatch with an existing queue is reported as is.
pub async fn declare_topology(
    channel: &Channel,
    amqp: &AmqpConfig,
    patterns: &[&str],
) -> Result<(), BrokerError> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            amqp.exchange.as_str().into(),
            ExchangeKind::Topic,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .context(|| {
            format!(
                "declaring topic exchange `{}` (amqp.exchange)",
                amqp.exchange
            )
        })?;
    channel
        .exchange_declare(
            amqp.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .context(|| {
            format!(
                "declaring dead-letter exchange `{}`",
                amqp.dead_letter_exchange
            )
        })?;
    channel
        .queue_declare(
            amqp.dead_letter_queue.as_str().into(),
            durable_queue,
            queue_type_args(amqp.queue_type),
        )
        .await
        .context(|| format!("declaring dead-letter queue `{}`", amqp.dead_letter_queue))?;
    channel
        .queue_bind(
            amqp.dead_letter_queue.as_str().into(),
            amqp.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .context(|| {
            format!(
                "binding `{}` to `{}`",
                amqp.dead_letter_queue, amqp.dead_letter_exchange
            )
        })?;
    channel
        .queue_declare(amqp.queue.as_str().into(), durable_queue, main_queue_args(amqp))
        .await
        .context(|| {
            format!(
                "declaring queue `{}` (an existing queue with other arguments must be deleted or amqp.declare set to false)",
                amqp.queue
            )
        })?;
    for pattern in patterns {
        channel
            .queue_bind(
                amqp.queue.as_str().into(),
                amqp.exchange.as_str().into(),
                (*pattern).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .context(|| {
                format!(
                    "binding `{}` to `{}` with `{pattern}`",
                    amqp.queue, amqp.exchange
                )
            })?;
    }
    Ok(())
}

fn queue_type_args(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    let kind = match queue_type {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    };
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(kind)),
    );
    args
}

/// The main queue's arguments: its type, where the broker dead-letters (the same
/// exchange our own dead letters go to) and, for quorum queues, the delivery limit
/// that turns a message that keeps crashing its consumer into a dead letter.
pub fn main_queue_args(amqp: &AmqpConfig) -> FieldTable {
    let mut args = queue_type_args(amqp.queue_type);
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(amqp.dead_letter_exchange.as_str())),
    );
    if amqp.queue_type == QueueType::Quorum && amqp.delivery_limit > 0 {
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(amqp.delivery_limit as i32),
        );
    }
    args
}

/// Opens a channel with publisher confirms (for dead letters) and the prefetch window,
/// and starts consuming.
pub async fn consume(
    connection: &Connection,
    amqp: &AmqpConfig,
    tag: &str,
) -> Result<(Channel, Consumer), BrokerError> {
    let channel = connection
        .create_channel()
        .await
        .context(|| "opening a channel".into())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context(|| "enabling publisher confirms".into())?;
    channel
        .basic_qos(amqp.prefetch, BasicQosOptions::default())
        .await
        .context(|| format!("setting prefetch {} (amqp.prefetch)", amqp.prefetch))?;
    let consumer = channel
        .basic_consume(
            amqp.queue.as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context(|| {
            format!(
                "consuming from `{}` (amqp.queue; does it exist?)",
                amqp.queue
            )
        })?;
    Ok((channel, consumer))
}
