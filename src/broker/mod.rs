//! Step 1 (and, in [`settle`], step 6): the RabbitMQ side. Connect, declare the
//! topology, consume with a prefetch window.

pub mod acks;
mod attempt;
pub mod settle;
pub mod tls;

use crate::config::{self, redact, AmqpConfig, QueueType};
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

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

/// A broker operation that failed, with what was being done. Its text is scrubbed of
/// secrets (lapin's errors may quote the URL, password included), and it has no
/// `source()`, through which a chain printer would show lapin's raw text.
pub struct BrokerError {
    pub what: String,
    pub source: lapin::Error,
}

impl std::fmt::Display for BrokerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = self.source.to_string();
        write!(f, "{}: {}", self.what, redact::scrub(&source))
    }
}

impl std::fmt::Debug for BrokerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = format!("{:?}", self.source);
        f.debug_struct("BrokerError")
            .field("what", &self.what)
            .field("source", &redact::scrub(&source))
            .finish()
    }
}

impl std::error::Error for BrokerError {}

/// Why no connection was made: the URL itself (nothing was sent), the broker, or TLS
/// (its files, or the handshake).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Url(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("cannot use the TLS files for RabbitMQ (retrying, they are read again at each attempt): {0}")]
    TlsFiles(#[from] tls::TlsFileError),
    /// No `source()`, as for [`BrokerError`]: `reason` holds what lapin said, scrubbed.
    #[error("TLS with RabbitMQ at {host}:{port} failed: {reason}")]
    Handshake {
        host: String,
        port: u16,
        reason: String,
    },
    /// The node took the TCP connection and did not finish a step of the setup in time
    /// (the handshake: [`handshake_timeout`]; later steps: [`SETUP_STEP_TIMEOUT`]).
    #[error("RabbitMQ at {node} did not finish {step} within {}s (is the node overloaded, or its network dropping packets?)", .after.as_secs())]
    Silent {
        node: String,
        step: &'static str,
        after: Duration,
    },
    /// Not worth retrying: the queue stays as it is until someone changes it or the config.
    #[error(transparent)]
    QueueArguments(#[from] QueueMismatch),
}

/// A queue exists with other arguments than the config declares (RabbitMQ answered
/// 406 PRECONDITION_FAILED "inequivalent arg"). RabbitMQ cannot change a queue's
/// arguments, so retrying cannot help: `run` stops (exit 78).
#[derive(Debug, thiserror::Error)]
#[error("queue `{queue}` already exists with another `{argument}` argument than this config declares, and RabbitMQ cannot change a queue's arguments (it said: {said}); {fix}")]
pub struct QueueMismatch {
    pub queue: String,
    pub argument: String,
    /// The broker's words (they name the queue, the vhost and both values; no secret).
    pub said: String,
    pub fix: String,
}

impl QueueMismatch {
    /// The mismatch `error` reports, if it is one, for `queue` declared from `amqp`.
    fn of(error: &lapin::Error, queue: &str, amqp: &AmqpConfig) -> Option<Self> {
        let lapin::ErrorKind::ProtocolError(e) = error.kind() else {
            return None;
        };
        let precondition = lapin::protocol::AMQPErrorKind::Soft(
            lapin::protocol::AMQPSoftError::PRECONDITIONFAILED,
        );
        let said = e.get_message().as_str();
        if *e.kind() != precondition || !said.contains("for queue '") {
            return None;
        }
        // "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': ..."
        let (_, rest) = said.split_once("inequivalent arg '")?;
        let (argument, _) = rest.split_once('\'')?;
        let key = match argument {
            "x-single-active-consumer" => Some(format!(
                "amqp.single_active_consumer (now {})",
                amqp.single_active_consumer
            )),
            "x-queue-type" => Some("amqp.queue_type".to_owned()),
            "x-delivery-limit" => {
                Some(format!("amqp.delivery_limit (now {})", amqp.delivery_limit))
            }
            "x-dead-letter-exchange" => Some("amqp.dead_letter_exchange".to_owned()),
            _ => None,
        };
        let matching = match key {
            Some(key) => format!("set {key} to match the existing queue"),
            None => "declare the queue yourself and set amqp.declare = false".to_owned(),
        };
        Some(Self {
            queue: queue.to_owned(),
            argument: argument.to_owned(),
            said: said.to_owned(),
            fix: format!(
                "to fix it, either {matching}, or stop every bridge, move or drain the queue's messages and delete the queue (`rabbitmqctl delete_queue {queue}`) so that the bridge declares it again"
            ),
        })
    }
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

/// The least time a connection's handshake is given, however short the heartbeat.
pub const HANDSHAKE_FLOOR: Duration = Duration::from_secs(5);

/// How long a connection's handshake (TCP, TLS, AMQP) may take: two heartbeats (what a
/// silent open connection is given), at least [`HANDSHAKE_FLOOR`]; 30 s with heartbeats
/// off. Heartbeats begin only after the handshake, so without this a node that takes the
/// TCP connection and never answers would hold the bridge forever.
fn handshake_timeout(heartbeat_secs: u16) -> Duration {
    match heartbeat_secs {
        0 => Duration::from_secs(30),
        s => (Duration::from_secs(u64::from(s)) * 2).max(HANDSHAKE_FLOOR),
    }
}

/// How long each later step of the setup (declaring the topology, starting the consumer)
/// may take. Heartbeats notice a silent node there; this bounds a broker that answers
/// them but not the request (a quorum queue without a majority), and leaves a busy
/// cluster time to declare many bindings.
pub const SETUP_STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// An open connection, the node's `host:port` for logs, and its socket for
/// [`Connected::give_up`].
pub struct Connected {
    pub connection: Connection,
    pub node: String,
    attempt: std::sync::Arc<attempt::Attempt>,
}

impl Connected {
    /// Shuts the connection's socket down (a setup step that never ended): lapin's I/O
    /// thread for it ends, where closing would wait for the broker's answer.
    pub fn give_up(&self) {
        self.attempt.give_up();
    }
}

/// Connects to the `turn`-th of the configured URLs (counting round and round: the
/// nodes of a cluster are tried in turn).
pub async fn connect(amqp: &AmqpConfig, turn: usize) -> Result<Connected, ConnectError> {
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("crisp-bridge/{}", env!("CARGO_PKG_VERSION")).into());
    // Read again before each connection: a rotated `amqp.url_file` is picked up.
    let urls = amqp.current_urls();
    let url = match urls.len() {
        0 => amqp.url.clone(),
        n => urls[turn % n].clone(),
    };
    // Parsed here, not by lapin, whose error would quote the URL whole.
    let mut uri = config::parse_amqp_url(url.expose())
        .map_err(|why| ConnectError::Url(bad_url_message(amqp, &why)))?;
    if uri.query.heartbeat.is_none() {
        // A `?heartbeat=` in the URL wins; lapin closes a connection whose peer stays
        // silent for two heartbeats.
        uri.query.heartbeat = Some(u16::try_from(amqp.heartbeat.as_secs()).unwrap_or(u16::MAX));
    }
    let uri_heartbeat = uri.query.heartbeat.unwrap_or(0);
    let node = format!("{}:{}", uri.authority.host, uri.authority.port);
    let context = || {
        format!(
            "connecting to RabbitMQ at {} (check {})",
            redact::redact_url(url.expose()),
            amqp.url_key()
        )
    };
    // Read again before each connection too: cert-manager rotates them.
    let tls_config = match &amqp.tls {
        Some(files) => tls::load(files)?,
        None => Default::default(),
    };
    let client_cert = tls_config.identity.is_some();
    let amqps = uri.scheme == lapin::uri::AMQPScheme::AMQPS;
    let (host, port) = (uri.authority.host.clone(), uri.authority.port);
    let attempt = std::sync::Arc::new(attempt::Attempt::default());
    let connecting = attempt::connect(attempt.clone(), uri, properties, tls_config);
    let after = handshake_timeout(uri_heartbeat);
    let Ok(connecting) = tokio::time::timeout(after, connecting).await else {
        attempt.give_up();
        return Err(ConnectError::Silent {
            node,
            step: "the connection handshake",
            after,
        });
    };
    let connection = match connecting {
        Ok(connection) => connection,
        Err(source) => {
            let reason = amqps
                .then(|| tls::describe_failure(&source, &host, client_cert))
                .flatten();
            return Err(match reason {
                Some(reason) => ConnectError::Handshake {
                    host,
                    port,
                    reason: redact::scrub(&reason).into_owned(),
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
    Ok(Connected {
        connection,
        node,
        attempt,
    })
}

/// What failed, where, and what to do, for a URL that does not parse; never the URL.
fn bad_url_message(amqp: &AmqpConfig, why: &str) -> String {
    let todo = if amqp.url_file.is_some() {
        "write it into that file as"
    } else {
        "set it as"
    };
    let reread = if amqp.url_file.is_some() {
        "; the file is read again before each connection attempt"
    } else {
        ""
    };
    format!(
        "the AMQP URL from {} does not parse: {why}; {todo} {}{reread}",
        amqp.url_key(),
        config::AMQP_URL_FORM
    )
}

/// Declares the topic exchange, the dead-letter exchange (fanout) and queue, the main
/// queue with its dead-letter arguments, and one binding per rule pattern. All
/// declarations are idempotent; a queue that exists with other arguments is a
/// [`QueueMismatch`].
pub async fn declare_topology(
    channel: &Channel,
    amqp: &AmqpConfig,
    patterns: &[&str],
) -> Result<(), ConnectError> {
    let (durable_exchange, durable_queue) = durable();
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
    declare_dead_letter_topology(channel, amqp)
        .await
        .map_err(
            |e| match QueueMismatch::of(&e.source, &amqp.dead_letter_queue, amqp) {
                Some(mismatch) => mismatch.into(),
                None => ConnectError::from(e),
            },
        )?;
    let declared = channel
        .queue_declare(
            amqp.queue.as_str().into(),
            durable_queue,
            main_queue_args(amqp),
        )
        .await;
    if let Err(source) = declared {
        if let Some(mismatch) = QueueMismatch::of(&source, &amqp.queue, amqp) {
            return Err(mismatch.into());
        }
        return Err(BrokerError {
            what: format!("declaring queue `{}` (amqp.queue)", amqp.queue),
            source,
        }
        .into());
    }
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

/// Declares the dead-letter exchange (fanout) and queue, and binds them: at start, and
/// again when a dead-letter copy found no queue (someone deleted it).
pub async fn declare_dead_letter_topology(
    channel: &Channel,
    amqp: &AmqpConfig,
) -> Result<(), BrokerError> {
    let (durable_exchange, durable_queue) = durable();
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
    Ok(())
}

/// Everything we declare survives a broker restart.
fn durable() -> (ExchangeDeclareOptions, QueueDeclareOptions) {
    (
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
    )
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
            // An absurd limit is "never", not a wrapped negative number.
            AMQPValue::LongInt(i32::try_from(amqp.delivery_limit).unwrap_or(i32::MAX)),
        );
    }
    if amqp.single_active_consumer {
        // Only when set: a queue declared before the option existed keeps matching.
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handshake_gets_two_heartbeats_at_least_the_floor_and_30_s_without_heartbeats() {
        assert_eq!(handshake_timeout(10), Duration::from_secs(20));
        assert_eq!(handshake_timeout(1), HANDSHAKE_FLOOR);
        assert_eq!(handshake_timeout(0), Duration::from_secs(30));
        assert_eq!(handshake_timeout(u16::MAX), Duration::from_secs(131_070));
    }

    #[tokio::test]
    async fn a_url_that_does_not_parse_is_reported_without_its_password() {
        let dir = std::env::temp_dir().join(format!("crisp-bridge-url-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("url");
        std::fs::write(&file, "amqp:guest:Br0k-unparsed=pw@127.0.0.1:1/%2f\n").unwrap();
        let amqp = AmqpConfig {
            url_file: Some(file.clone()),
            ..AmqpConfig::default()
        };
        let text = match connect(&amqp, 0).await {
            Err(e @ ConnectError::Url(_)) => format!("{e} {e:?}"),
            Err(e) => panic!("not a URL error: {e}"),
            Ok(_) => panic!("connected with a URL that does not parse"),
        };
        assert!(!text.contains("Br0k-unparsed"), "{text}");
        assert!(
            text.contains(&format!("amqp.url_file ({})", file.display()))
                && text.contains("does not parse")
                && text.contains("`//` missing"),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn refusal(code: lapin::protocol::AMQPSoftError, text: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(lapin::protocol::AMQPError::new(
            lapin::protocol::AMQPErrorKind::Soft(code),
            text.into(),
        ))
        .into()
    }

    #[test]
    fn an_inequivalent_queue_argument_names_the_queue_the_argument_and_the_fix() {
        use lapin::protocol::AMQPSoftError;
        let amqp = AmqpConfig {
            single_active_consumer: true,
            ..AmqpConfig::default()
        };
        let said = "PRECONDITION_FAILED - inequivalent arg 'x-single-active-consumer' for queue 'q1' in vhost '/': received the value 'true' of type 'bool' but current is none";
        let e = QueueMismatch::of(
            &refusal(AMQPSoftError::PRECONDITIONFAILED, said),
            "q1",
            &amqp,
        )
        .expect("a mismatch");
        assert_eq!(e.argument, "x-single-active-consumer");
        let text = e.to_string();
        for needed in [
            "queue `q1`",
            "`x-single-active-consumer`",
            "amqp.single_active_consumer (now true)",
            "rabbitmqctl delete_queue q1",
            said,
        ] {
            assert!(text.contains(needed), "no {needed:?} in {text}");
        }
        let other = "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q1' in vhost '/': received none but current is the value '10' of type 'long'";
        let e = QueueMismatch::of(
            &refusal(AMQPSoftError::PRECONDITIONFAILED, other),
            "q1",
            &amqp,
        )
        .expect("a mismatch");
        assert!(e.to_string().contains("amqp.declare = false"), "{e}");
        // An exchange of another type, or another refusal, is not a queue mismatch.
        let exchange = "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'x' in vhost '/': received 'topic' but current is 'fanout'";
        assert!(QueueMismatch::of(
            &refusal(AMQPSoftError::PRECONDITIONFAILED, exchange),
            "q1",
            &amqp
        )
        .is_none());
        let denied = "ACCESS_REFUSED - access to queue 'q1' in vhost '/' refused";
        assert!(
            QueueMismatch::of(&refusal(AMQPSoftError::ACCESSREFUSED, denied), "q1", &amqp)
                .is_none()
        );
    }

    #[test]
    fn broker_errors_are_scrubbed_of_the_url_they_quote() {
        let e = BrokerError {
            what: "connecting".into(),
            source: std::io::Error::other("Invalid URL: 'amqp:u:Br0k-echoed=pw@h:1/%2f'").into(),
        };
        let text = format!("{e} {e:?}");
        assert!(!text.contains("Br0k-echoed"), "{text}");
        assert!(text.contains("amqp:u:***@h:1"), "{text}");
        assert!(std::error::Error::source(&e).is_none());
    }
}
